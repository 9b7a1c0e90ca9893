"""report.html of a balanced run: its sections, its plots, and the per-cluster table
checked against values computed here from the labels, the rows and the centroids. Then
the page in a real headless browser, when one is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest

SECTIONS = [
    "Summary", "Time per stage", "Objective", "Cluster sizes", "Clusters", "Distances",
    "Projection", "Balancing", "Skipped rows", "Settings", "Versions",
]  # fmt: skip


class Page(HTMLParser):
    """The headings, plots (each ``<svg>`` parsed as XML) and table rows of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.tables = [], []
        self.plots = [ET.fromstring(m) for m in re.findall(r"<svg .*?</svg>", text, re.S)]
        self._tag, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "table":
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
    titles = [p.find("{http://www.w3.org/2000/svg}title").text for p in page.plots]
    assert titles == ["Time per stage", "Objective", "Cluster sizes", "Distances / Top-m margin",
                      "2000 input rows, PCA", "Sinkhorn / Size corrections"]  # fmt: skip
    # The objective's line has a point per iteration, lower on the page as inertia falls.
    line = page.plots[1].find(".//{http://www.w3.org/2000/svg}polyline").get("points").split()
    inertia = [h["inertia"] for h in manifest["fit"]["history"]]
    pixel_y = [float(p.split(",")[1]) for p in line]
    assert len(pixel_y) == len(inertia)
    assert np.all(np.diff(pixel_y) * np.diff(inertia) <= 0)  # y grows downwards
    # One bar per timed stage, the longest for the longest stage.
    bars = page.plots[0].findall(".//{http://www.w3.org/2000/svg}rect[@class='bar']")
    stages = {k: v for k, v in manifest["timings"].items() if k != "total"}
    assert len(bars) == len(stages)
    widths = [float(b.get("width")) for b in bars]
    assert np.argmax(widths) == np.argmax(list(stages.values()))
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
    image = pytest.importorskip("PIL.Image", reason="pillow (the test extra) reads the shot")
    pixels = np.asarray(image.open(shot))
    # Rendered, with its plots: many distinct colours, not a blank or broken page.
    assert (
        pixels.shape[0] == 4200
        and len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 200
    )
    dom = subprocess.run(
        [*flags, "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert len(re.findall(r"<svg ", dom)) == 6 and len(re.findall(r"<table>", dom)) == 4
