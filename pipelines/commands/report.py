"""``report.html``: the run at a glance, for people. One self-contained file (plots are
inline SVG drawn by ``commands.charts``; no script, no fetch), so it can be copied out of
a bucket and opened anywhere.

Sections: the summary; time per stage; the objective per iteration; cluster sizes
(balanced against nearest-centroid); the largest and smallest clusters (size, mean
distance to the centroid, nearest other centre, example ids); distance and top-m margin
histograms; a 2-D PCA projection of a sample of input rows coloured by cluster;
Sinkhorn's convergence and the size corrections; drift against the previous run;
skipped rows by reason; the settings and package versions.

Everything is read back from the committed output (manifest, centroids, duals, label
files) and a bounded sample of the input, so ``pseudolabel report`` rebuilds it later.
Reads are bounded whatever the run's size: the first LABEL_SAMPLE_ROWS label rows, the
first PROJECTED_ROWS input rows, and k x SHOWN_CLUSTERS distances between centres.
"""

from __future__ import annotations

import html
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.pipelines.commands.charts import GREY, PALETTE, Panel, svg
from pseudolabel.pipelines.commands.summary import text_summary
from pseudolabel.pipelines.io.layout import CENTROIDS, DUALS, REPORT, RunOutput, load_npy
from pseudolabel.pipelines.io.storage import resolve

log = logging.getLogger("pseudolabel")

LABEL_SAMPLE_ROWS = 1_000_000  # label rows read for the histograms and example ids
PROJECTED_ROWS = 2_000  # input rows in the 2-D projection
SHOWN_CLUSTERS = 8  # the largest and the smallest clusters in the table, each
COLOURED_CLUSTERS = 10  # the projection colours the largest clusters, greys the rest
EXAMPLE_IDS = 3
SAMPLED_COLUMNS = ("id", "label", "distance", "topk_distances")  # of the label sample

STYLE = """
body{font-family:system-ui,sans-serif;max-width:64em;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:.9em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td.text,th.text{text-align:left}
figure{margin:1em 0} svg{max-width:100%;height:auto} .note{color:#666;font-size:.9em}
"""


# ----------------------------------------------------------------------------- html


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], text_columns: tuple[int, ...] = ()) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        cls = " class='text'" if i in text_columns else ""
        return f"<{tag}{cls}>{_esc(v)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(chart: str) -> str:
    return f"<figure>{chart}</figure>"


def _note(text: str) -> str:
    return f"<p class='note'>{_esc(text)}</p>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------------------- plots


def _objective(history: list[dict], algorithm: str) -> str:
    panel = Panel(
        "Objective",
        "iteration" if algorithm != "minibatch" else "epoch",
        "inertia (sum of squared distances)",
        integer_x=True,
    )
    x = [h["iteration"] for h in history]
    return svg(panel.add("line", x, [h["inertia"] for h in history], markers=True))


def _sizes(clusters: dict) -> str:
    """Sizes sorted from largest to smallest, one line per labelling: the rank plot
    shows the long tail of plain k-means and the flat line of balanced labels."""
    panel = Panel("Cluster sizes", "cluster, largest first", "rows", integer_x=True)
    series = [("balanced" if "nearest" in clusters else "label", clusters["sizes"])]
    if "nearest" in clusters:
        series.append(("nearest centroid", clusters["nearest"]["sizes"]))
    for name, sizes in series:
        ranked = np.sort(np.asarray(sizes))[::-1]
        panel.add("line", np.arange(1, len(ranked) + 1), ranked, label=name)
    mean = sum(clusters["sizes"]) / clusters["k"]
    return svg(panel.add("hline", None, mean, label="n / k", colour="#000", dashed=True))


def _timings(timings: dict[str, float]) -> str:
    stages = [(k, v) for k, v in timings.items() if k != "total"]
    panel = Panel("Time per stage", "seconds", categories=[k for k, _ in stages])
    return svg(panel.add("hbars", None, [v for _, v in stages]), height=70 + 26 * len(stages))


def _histogram(panel: Panel, values: np.ndarray, bins: int) -> Panel:
    counts, edges = np.histogram(values[np.isfinite(values)], bins=bins)
    return panel.add("bars", edges, counts)


def _histograms(sample: pa.Table) -> str:
    """Distance to the label's centroid and, with top-m, the margin between the first
    and second centre: rows near a boundary have a small margin."""
    margins = None
    if "topk_distances" in sample.column_names and sample.num_rows:
        # Sorted: balanced top-m lists are ordered by the balanced score, not distance.
        d = np.sort(np.stack(sample.column("topk_distances").to_numpy(zero_copy_only=False)), 1)
        margins = d[:, 1] - d[:, 0] if d.shape[1] > 1 else None
    distances = np.asarray(sample.column("distance").to_numpy(), np.float64)
    panels = [_histogram(Panel("Distances", "distance to the label's centroid", "rows"),
                         distances, 50)]  # fmt: skip
    if margins is not None:
        xlabel = "second smallest minus smallest distance in the top m"
        panels.append(_histogram(Panel("Top-m margin", xlabel, "rows"), margins, 50))
    return svg(panels, width=640 if len(panels) == 1 else 500)


def _projection(x: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> str:
    """PCA to 2-D of the sample (SVD of the centred rows); the largest clusters in
    colour, the others grey."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    panel = Panel(f"{len(x)} input rows, PCA", "PC 1", "PC 2")
    top = np.argsort(sizes)[::-1][:COLOURED_CLUSTERS]
    rest = ~np.isin(labels, top)
    panel.add("points", xy[rest, 0], xy[rest, 1], label="other clusters", colour=GREY)
    for i, j in enumerate(top):
        mine = labels == j
        if mine.any():
            panel.add("points", xy[mine, 0], xy[mine, 1], label=f"cluster {j}",
                      colour=PALETTE[i % len(PALETTE)])  # fmt: skip
    return svg(panel, height=500)


def _sinkhorn(balance: dict) -> str:
    stages = balance["sinkhorn"]["stages"]
    steps = np.cumsum([s["iterations"] for s in stages])
    errors = Panel("Sinkhorn", "Sinkhorn steps", "cluster-size L1 error", log_y=True)
    errors.add("line", steps, [s["marginal_error"] for s in stages], markers=True)
    tol = balance["sinkhorn"].get("tol_used", balance["sinkhorn"]["tol"])
    errors.add("hline", None, tol, label="stopping tolerance",
               colour="#000", dashed=True)  # fmt: skip
    passes = Panel("Size corrections", "pass", "rows off target, largest", integer_x=True)
    history = balance["sizes"].get("history", [])
    if history:
        passes.add("line", [h["pass"] for h in history], [h["max_rows"] for h in history],
                   markers=True)  # fmt: skip
    return svg([errors, passes], width=500)


def _drift(manifest: dict, centroids: np.ndarray, storage_options: dict) -> str:
    from pseudolabel.ops.drift import match_centroids, matched_shifts

    drift = manifest["drift"]
    previous = load_npy(resolve(drift["previous_run"], storage_options).join(CENTROIDS))
    shift = matched_shifts(previous, centroids, match_centroids(previous, centroids)[0])
    title = (f"Drift: {100 * drift['label_changed_fraction']:.2f}% of "
             f"{drift['shared_ids']} shared ids changed label")  # fmt: skip
    panel = Panel(title, "distance moved by a matched centroid", "centroids")
    return svg(_histogram(panel, np.asarray(shift, np.float64), 40))


# ----------------------------------------------------------------------------- data


def label_sample(output: RunOutput, limit: int = LABEL_SAMPLE_ROWS) -> pa.Table:
    """The first ``limit`` rows of the label files (their small columns)."""
    parts, rows = [], 0
    for f in output.labels.files([".parquet"]):
        with f.open() as fh:  # one open: the schema says which columns there are
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            table = pf.read([c for c in SAMPLED_COLUMNS if c in names])
        parts.append(table.slice(0, limit - rows))
        rows += parts[-1].num_rows
        if rows >= limit:
            break
    return pa.concat_tables(parts) if parts else pa.table({})


def cluster_rows(
    manifest: dict, centroids: np.ndarray, sample: pa.Table
) -> list[tuple[str, list[Any]]]:
    """The largest and smallest clusters: (which, [cluster, rows, mean distance, nearest
    other centre, its distance, example ids])."""
    sizes = np.asarray(manifest["clusters"]["sizes"])
    means = manifest["clusters"].get("mean_distance") or [None] * len(sizes)
    order = np.argsort(-sizes, kind="stable")
    shown = [("largest", j) for j in order[:SHOWN_CLUSTERS]]
    shown += [
        ("smallest", j) for j in order[::-1][:SHOWN_CLUSTERS] if j not in order[:SHOWN_CLUSTERS]
    ]
    ids = labels = None
    if sample.num_rows:
        ids = sample.column("id").to_numpy(zero_copy_only=False)
        labels = sample.column("label").to_numpy()
    c = centroids.astype(np.float64)
    sq = (c * c).sum(1)
    rows = []
    for which, j in shown:
        d = sq[j] + sq - 2 * c @ c[j]  # squared distance from centre j to every centre
        d[j] = np.inf
        other = int(np.argmin(d)) if len(c) > 1 else None
        examples = [] if ids is None else ids[labels == j][:EXAMPLE_IDS].tolist()
        rows.append(
            (
                which,
                [
                    int(j),
                    int(sizes[j]),
                    "-" if means[j] is None else _fmt(float(means[j])),
                    "-" if other is None else other,
                    "-" if other is None else _fmt(float(max(d[other], 0.0))),
                    ", ".join(map(str, examples)) or "-",
                ],
            )
        )
    return rows


def projected_sample(manifest: dict, output: RunOutput, centroids: np.ndarray, options: dict):
    """(rows, labels) of up to PROJECTED_ROWS input rows, labelled here with the run's
    centroids (and duals) by the label pass's own rule; None if the input is gone."""
    from pseudolabel.ops.arrays import normalize_rows
    from pseudolabel.ops.balanced import BalancedAssigner
    from pseudolabel.pipelines.config import RunConfig, run_settings
    from pseudolabel.pipelines.io.plan import Shard, make_plan
    from pseudolabel.pipelines.io.read import iter_batches

    config = manifest["config"]  # its storage options are redacted: ``options`` instead
    run_config = RunConfig(**{**run_settings(config), "storage_options": options})
    settings = run_config.read_settings()
    plan = make_plan(manifest["input"]["url"], settings)
    settings = run_config.read_settings(plan)
    parts, rows = [], 0
    for shard in (Shard(f, 0, f.rows) for f in plan.files):
        for batch in iter_batches(shard, settings, with_ids=False):
            parts.append(np.asarray(batch.x, np.float32)[: PROJECTED_ROWS - rows])
            rows += len(parts[-1])
            if rows >= PROJECTED_ROWS:
                break
        if rows >= PROJECTED_ROWS:
            break
    x = np.concatenate(parts)
    metric = "ip" if config.get("spherical") else "l2"
    if metric == "ip":
        x = normalize_rows(x)
    beta = epsilon = None
    balance = manifest.get("balance")
    if balance and output.root.join(DUALS).exists():
        epsilon = float(balance["epsilon"])
        beta = load_npy(output.root.join(DUALS)) * epsilon
    labels = BalancedAssigner(centroids, metric, beta, epsilon, "cpu").assign(x, 0).label
    return x, np.asarray(labels)


# ----------------------------------------------------------------------------- page


def render(output: RunOutput, manifest: dict[str, Any], storage_options: dict) -> tuple[str, str]:
    """(the page, the text summary)."""
    summary = text_summary(manifest, output.root.url)
    centroids = load_npy(output.root.join(CENTROIDS))
    sample = label_sample(output)
    fit, clusters, timings = manifest["fit"], manifest["clusters"], manifest["timings"]
    body = [
        f"<h1>pseudolabel {'label' if fit['algorithm'] == 'given' else 'run'}</h1>",
        f"<p>{_esc(output.root.url)} &middot; {_esc(manifest.get('created', ''))}</p>",
        "<h2>Summary</h2>",
        f"<pre>{_esc(summary)}</pre>",
        "<h2>Time per stage</h2>",
        _table(
            ["stage", "seconds"],
            [[k, f"{v:.2f}"] for k, v in timings.items()],
            text_columns=(0,),
        ),
        _figure(_timings(timings)),
    ]
    if fit["history"]:
        body += [
            "<h2>Objective</h2>",
            _figure(_objective(fit["history"], fit["algorithm"])),
        ]
    body += ["<h2>Cluster sizes</h2>", _figure(_sizes(clusters))]
    rows = cluster_rows(manifest, centroids, sample)
    header = [
        "",
        "cluster",
        "rows",
        "mean distance",
        "nearest centre",
        "at distance",
        "example ids",
    ]
    body += [
        "<h2>Clusters</h2>",
        _table(header, [[which, *r] for which, r in rows], text_columns=(0, 6)),
        _note(
            f"Example ids from the first {sample.num_rows} label rows; distances are "
            "squared L2 (between unit vectors for spherical runs)."
        ),
    ]
    if sample.num_rows:
        body += ["<h2>Distances</h2>", _figure(_histograms(sample))]
    try:
        x, labels = projected_sample(manifest, output, centroids, storage_options)
        body += [
            "<h2>Projection</h2>",
            _figure(_projection(x, labels, np.asarray(clusters["sizes"]))),
            _note("Rows from the start of the input, labelled with the run's centroids."),
        ]
    except Exception as e:  # the input may be gone or changed: the report still stands
        log.warning("report: no projection (%s)", e)
        body += ["<h2>Projection</h2>", _note(f"Not drawn: the input could not be read ({e}).")]
    balance = manifest.get("balance")
    if balance and "sinkhorn" in balance:
        body += ["<h2>Balancing</h2>", _figure(_sinkhorn(balance))]
    drift = manifest.get("drift")
    if drift and not drift.get("missing"):
        body += [
            "<h2>Drift</h2>",
            _figure(_drift(manifest, centroids, storage_options)),
            _note(
                f"Against {drift['previous_run']}: {100 * drift['label_changed_fraction']:.2f}% "
                f"of {drift['shared_ids']} shared ids changed label."
            ),
        ]
    skipped = manifest["rows"]["skipped"]
    body += ["<h2>Skipped rows</h2>"]
    if skipped["by_reason"] or skipped["files"]:
        reasons = [[reason, n] for reason, n in sorted(skipped["by_reason"].items())]
        reasons += [
            [f"{f.get('url')}: {f.get('reason')}", f.get("rows", "-")] for f in skipped["files"]
        ]
        body.append(_table(["reason", "rows"], reasons, text_columns=(0,)))
    else:
        body.append(_note("None: every input row was labelled."))
    config = manifest["config"]
    body += [
        "<h2>Settings</h2>",
        _table(
            ["setting", "value"],
            [[k, json.dumps(v) if isinstance(v, dict | list) else v] for k, v in config.items()],
            text_columns=(0, 1),
        ),
        "<h2>Versions</h2>",
        _table(["package", "version"], [[k, v] for k, v in manifest["versions"].items()], (0, 1)),
    ]
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>pseudolabel report</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    return page, summary


def write_report(output: RunOutput, manifest: dict[str, Any], storage_options: dict) -> str:
    """Write ``report.html`` under the output; return the text summary."""
    page, summary = render(output, manifest, storage_options)
    output.root.join(REPORT).write_bytes(page.encode())
    log.info("report: %s", output.root.join(REPORT).url)
    return summary
