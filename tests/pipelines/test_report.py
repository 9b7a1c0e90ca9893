"""report.html of a balanced run: its sections, its plots, and the per-cluster table
checked against values computed here from the labels, the rows and the centroids. Then
the page in a real headless browser, when one is installed."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest

SECTIONS = [
    "Summary", "Time per stage", "Objective", "Cluster sizes", "Clusters", "Distances",
    "Projection", "Balancing", "Skipped rows", "Settings", "Versions",
]  # fmt: skip


class Page(HTMLParser):
    """The headings, images and table rows of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.images, self.tables = [], [], []
        self._tag, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
            self.tables[-1].append(self._row)
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._tag == "h2":
            self.headings.append(data)
            self._tag = None


def test_report_sections_plots_and_cluster_table(dominant, balanced_run):
    _, x, _ = dominant
    out, manifest = balanced_run
    page = Page((out / "report.html").read_text())
    assert page.headings == SECTIONS
    assert len(page.images) == 6  # timings, objective, sizes, distances, PCA, Sinkhorn
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    timings = dict(page.tables[0][1:])
    assert float(timings["total"]) == pytest.approx(manifest["timings"]["total"], abs=0.01)
    assert float(timings["total"]) > 0  # not written before the total was known

    # The per-cluster table, recomputed from the label files, the rows and the centroids.
    labels = pq.read_table(out / "labels").sort_by("id")
    ids, label = labels.column("id").to_numpy(), labels.column("label").to_numpy()
    c = np.load(out / "centroids.npy").astype(np.float64)
    sizes = np.bincount(label, minlength=len(c))
    mean = np.bincount(label, ((x[ids] - c[label]) ** 2).sum(1), len(c)) / sizes
    between = ((c[:, None] - c[None]) ** 2).sum(-1) + np.diag(np.full(len(c), np.inf))
    table = page.tables[1]
    assert table[0][1:] == ["cluster", "rows", "mean distance", "nearest centre", "at distance",
                            "example ids"]  # fmt: skip
    assert [r[0] for r in table[1:]] == ["largest"] * 8 + ["smallest"] * 2  # k = 10
    for _, j, rows, m, other, at, examples in table[1:]:
        j = int(j)
        assert int(rows) == sizes[j]
        assert float(m) == pytest.approx(mean[j], rel=1e-3)
        assert int(other) == between[j].argmin()
        assert float(at) == pytest.approx(between[j].min(), rel=1e-3)
        assert all(label[ids == int(i)][0] == j for i in examples.split(", "))
    assert manifest["rows"]["skipped"]["total"] == 0
    assert "None: every input row was labelled." in (out / "report.html").read_text()
    assert dict(page.tables[-1][1:])["ray"] == manifest["versions"]["ray"]


def test_report_renders_in_a_headless_browser(balanced_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no headless browser: `apt-get install chromium` runs this test")
    out, _ = balanced_run
    shot = tmp_path / "report.png"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--enable-logging=stderr", "--v=0"]  # fmt: skip
    done = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1100,4200", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert console == []  # no script errors, no failed loads
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    # Rendered, with its plots: many distinct colours, not a blank or broken page.
    assert (
        pixels.shape[0] == 4200
        and len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 200
    )
    dom = subprocess.run(
        [*flags, "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert len(re.findall(r"<img ", dom)) == 6 and len(re.findall(r"<table>", dom)) == 4
