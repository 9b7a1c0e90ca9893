"""The report's SVG plots: ticks, the mapping from data to pixels, and well-formed
pictures for every kind of series, including the awkward inputs a run can produce."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pseudolabel.pipelines.commands.charts import Panel, nice_ticks, svg, tick_texts

NS = "{http://www.w3.org/2000/svg}"


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(1.37e5, 1.79e5) == pytest.approx([1.4e5, 1.5e5, 1.6e5, 1.7e5])
    assert nice_ticks(1, 20, integer=True) == [5, 10, 15, 20]
    assert nice_ticks(0.5, 2.5, integer=True) == [1, 2]  # never a step below one
    assert nice_ticks(3, 3) == [3]
    assert nice_ticks(0, float("nan")) == []


def test_tick_texts_keep_close_ticks_apart():
    assert tick_texts([0, 0.5, 250]) == ["0", "0.5", "250"]
    assert tick_texts([1.4e5, 1.5e5]) == ["1.4e+05", "1.5e+05"]
    assert tick_texts([1.25e5, 1.3e5]) == ["1.25e+05", "1.3e+05"]  # .2g would give 1.2, 1.3


def test_points_map_linearly_into_the_box():
    x = np.array([0.0, 1.0, 3.0])
    plot = ET.fromstring(svg(Panel("t", "x", "y").add("points", x, x)))
    box = plot.find(f"{NS}rect")
    left, top = float(box.get("x")), float(box.get("y"))
    right, bottom = left + float(box.get("width")), top + float(box.get("height"))
    dots = plot.findall(f".//{NS}circle[@class='point']")
    cx = np.array([float(d.get("cx")) for d in dots])
    cy = np.array([float(d.get("cy")) for d in dots])
    assert np.all((left < cx) & (cx < right) & (top < cy) & (cy < bottom))
    # Linear in both, x to the right, y upwards (pixels grow downwards).
    assert np.allclose(np.diff(cx) / np.diff(x), cx[1] - cx[0], rtol=1e-2) and cx[1] > cx[0]
    assert np.allclose(np.diff(cy) / np.diff(x), cy[1] - cy[0], rtol=1e-2) and cy[1] < cy[0]


@pytest.mark.parametrize(
    "panel",
    [
        Panel("line", "x", "y", integer_x=True).add("line", [1, 2, 3], [5, 4, 4], markers=True),
        Panel("one point", "x", "y").add("line", [1], [7.0], markers=True),
        Panel("log", "steps", "error", log_y=True)
        .add("line", [10, 20, 40], [1.0, 1e-3, 2e-6], markers=True)
        .add("hline", None, 1e-4, label="tol", colour="#000", dashed=True),
        Panel("flat log", "x", "y", log_y=True).add("line", [1, 2], [3.0, 3.0]),
        Panel("hist", "d", "rows").add("bars", np.linspace(0, 1, 6), [0, 3, 9, 2, 0]),
        Panel("a missing value", "x", "y").add("line", [1, 2, 3], [1.0, np.nan, 2.0]),
        Panel("time", "seconds", categories=["plan", "fit"]).add("hbars", None, [0.0, 0.0]),
        Panel("no time", "seconds", categories=[]).add("hbars", None, []),
        Panel("odd time", "seconds", categories=["a", "b"]).add("hbars", None, [np.nan, 2.0]),
        Panel("empty", "x", "y"),
        Panel("no finite value", "d", "rows").add("bars", [0.0, 1.0], [0]),
        Panel("forty decades", "x", "y", log_y=True)
        .add("line", [1, 2], [1e-30, 1e10])
        .add("hline", None, 0.0, label="not on a log axis"),
    ],
    ids=lambda p: p.title,
)
def test_every_kind_draws_a_well_formed_picture(panel):
    text = svg(panel)
    assert "nan" not in text and "inf" not in text  # no coordinate lost to a bad value
    plot = ET.fromstring(text)
    assert plot.find(f"{NS}title").text == panel.title
    ticks = [t.text for t in plot.iter(f"{NS}text") if t.get("text-anchor") == "end"]
    assert len(ticks) == len(set(ticks)) <= 12  # distinct tick labels, not a crowd


def test_hbars_are_as_long_as_their_values_and_named():
    panel = Panel("Time per stage", "seconds", categories=["plan", "fit", "label"])
    plot = ET.fromstring(svg(panel.add("hbars", None, [1.0, 8.0, 2.0])))
    widths = [float(b.get("width")) for b in plot.findall(f".//{NS}rect[@class='bar']")]
    assert np.allclose(np.array(widths) / widths[1], [1 / 8, 1, 2 / 8], atol=1e-3)
    assert {"plan", "fit", "label"} <= {t.text for t in plot.iter(f"{NS}text")}


def test_side_by_side_panels_share_one_picture():
    panels = [Panel("a", "x").add("bars", [0, 1, 2], [1, 2]), Panel("b", "x")]
    plot = ET.fromstring(svg(panels, width=300, height=200))
    assert plot.get("width") == "600" and plot.find(f"{NS}title").text == "a / b"


def test_a_single_value_gets_round_distinct_ticks():
    plot = ET.fromstring(svg(Panel("one", "iteration", "inertia").add("line", [1], [1.2346e8])))
    ticks = [t.text for t in plot.iter(f"{NS}text") if t.get("text-anchor") == "end"]
    assert len(ticks) >= 3 and len(set(ticks)) == len(ticks)
    assert all(len(t) <= 8 for t in ticks), ticks  # 1.2e+08, not 123456788.60000001


def test_an_empty_histogram_draws_no_bar_height():
    plot = ET.fromstring(svg(Panel("h", "d", "rows").add("bars", [0, 1, 2], [0, 0])))
    assert [float(b.get("height")) for b in plot.iter(f"{NS}rect") if b.get("class") == "bar"] \
        == [0.0, 0.0]  # fmt: skip


def test_histograms_refuse_a_log_axis():
    with pytest.raises(ValueError, match="linear y axis"):
        svg(Panel("h", "d", "rows", log_y=True).add("bars", [0, 1], [3]))


def test_a_long_line_is_thinned_to_the_same_picture():
    """65,536 cluster sizes, largest first: a few vertices a pixel column, keeping each
    column's extremes, so the drawn envelope is the full line's."""
    sizes = np.sort(np.random.default_rng(0).pareto(1.5, 65536) * 100 + 1)[::-1]
    panel = Panel("sizes", "cluster", "rows").add("line", np.arange(1, len(sizes) + 1), sizes)
    text = svg(panel)
    assert len(text) < 60_000
    line = ET.fromstring(text).find(f".//{NS}polyline").get("points").split()
    y = np.array([float(p.split(",")[1]) for p in line])
    full = ET.fromstring(svg(Panel("s", "c", "r").add("line", [1, 65536], [sizes[0], sizes[-1]])))
    ends = [float(p.split(",")[1]) for p in full.find(f".//{NS}polyline").get("points").split()]
    assert (
        len(line) < 4 * 640
        and y.min() == pytest.approx(ends[0])
        and y.max() == pytest.approx(ends[1])
    )
