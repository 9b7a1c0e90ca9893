"""``report.html``: the run at a glance, for people. PNG plots embedded as data URIs, so
the one file can be copied out of a bucket and opened anywhere.

Plots: the objective per iteration, cluster sizes (balanced and nearest labels), and,
with a previous run, how far each matched centroid moved. Everything is read back from
the committed output (manifest, centroids), so ``pseudolabel report`` rebuilds it later.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from typing import Any

import numpy as np

from pseudolabel.pipelines.commands.summary import text_summary
from pseudolabel.pipelines.io.layout import CENTROIDS, REPORT, RunOutput, load_npy
from pseudolabel.pipelines.io.storage import resolve

log = logging.getLogger("pseudolabel")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _figures(manifest: dict[str, Any], storage_options: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    history = manifest["fit"]["history"]
    if history:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([h["iteration"] for h in history], [h["inertia"] for h in history], marker="o")
        ax.set(
            xlabel="iteration" if manifest["fit"]["algorithm"] == "lloyd" else "epoch",
            ylabel="inertia (sum of squared distances)",
            title="Objective",
        )
        ax.grid(alpha=0.3)
        figures.append(("Objective per iteration", _png(fig)))
        plt.close(fig)

    clusters = manifest["clusters"]
    series = [("balanced" if "nearest" in clusters else "label", clusters["sizes"])]
    if "nearest" in clusters:
        series.append(("nearest centroid", clusters["nearest"]["sizes"]))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sizes_all = np.concatenate([np.asarray(s) for _, s in series])
    bins = np.linspace(0, max(1, sizes_all.max()) * 1.05, 40)
    for name, sizes in series:
        ax.hist(sizes, bins=bins, alpha=0.6, label=name)
    ax.axvline(sum(clusters["sizes"]) / clusters["k"], color="k", lw=1, ls="--", label="n / k")
    ax.set(xlabel="rows in the cluster", ylabel="clusters", title="Cluster sizes")
    ax.legend()
    figures.append(("Cluster sizes", _png(fig)))
    plt.close(fig)

    drift = manifest.get("drift")
    if drift and not drift.get("missing"):
        from pseudolabel.ops.drift import match_centroids, matched_shifts

        previous = load_npy(resolve(drift["previous_run"], storage_options).join(CENTROIDS))
        current = np.asarray(manifest["_centroids"])
        shift = matched_shifts(previous, current, match_centroids(previous, current)[0])
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(shift, bins=40)
        ax.set(
            xlabel="distance moved by a matched centroid",
            ylabel="centroids",
            title=f"Drift: {100 * drift['label_changed_fraction']:.2f}% of "
            f"{drift['shared_ids']} shared ids changed label",
        )
        figures.append(("Drift against the previous run", _png(fig)))
        plt.close(fig)
    return figures


def write_report(output: RunOutput, manifest: dict[str, Any], storage_options: dict) -> str:
    """Write ``report.html`` under the output; return the text summary."""
    summary = text_summary(manifest, output.root.url)
    centroids = load_npy(output.root.join(CENTROIDS))
    figures = _figures({**manifest, "_centroids": centroids}, storage_options)
    parts = [
        "<!doctype html><meta charset='utf-8'><title>pseudolabel report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}</style>",
        f"<h1>pseudolabel run</h1><p>{html.escape(output.root.url)}</p>",
        f"<pre>{html.escape(summary)}</pre>",
    ]
    for title, data in figures:
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{data}'>"
        )
    output.root.join(REPORT).write_bytes("\n".join(parts).encode())
    log.info("report: %s", output.root.join(REPORT).url)
    return summary
