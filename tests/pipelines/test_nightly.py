"""Nightly runs: partitions and dates in URLs, a warm start, drift, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.errors import ConfigError
from tests.data import mixture, write_parquet_shards
from tests.pipelines.conftest import cli, fast_config


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Two daily partitions of the same 3,000 ids, re-embedded with a little noise."""
    root = tmp_path_factory.mktemp("nightly")
    x, _ = mixture(3000, 8, 6, seed=21)
    noise = 0.01 * np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    write_parquet_shards(root / "emb" / "date=2026-11-20", x, 2)
    write_parquet_shards(root / "emb" / "date=2026-11-21", x + noise, 2)
    return root


@pytest.fixture(scope="module")
def two_nights(ray_local, nights):
    """The nightly command line on the 21st on Ray, then on the 22nd in this process
    (--backend local: the warm start and the drift join without Ray): their manifests."""
    return nightly(nights, "2026-11-21"), nightly(nights, "2026-11-22", "--backend", "local")


def nightly(root, run_date: str, *flags: str) -> dict:
    """The nightly job's command line: {date} and {previous_date} filled from --run-date."""
    cli(
        "run", "--input", f"{root}/emb/date={{previous_date}}/",
        "--output", f"{root}/runs/{{date}}/", "--k", "6",
        "--init-centroids", f"{root}/runs/{{previous_date}}/centroids.npy",
        "--previous-run", f"{root}/runs/{{previous_date}}/", "--run-date", run_date, *flags,
    )  # fmt: skip
    return json.loads((root / "runs" / run_date / "manifest.json").read_text())


def test_two_nights(nights, two_nights):
    first, second = two_nights
    assert first["input"]["url"].endswith("emb/date=2026-11-20")
    assert "not found: seeded from the data" in first["fit"]["init"]
    assert first["drift"]["missing"] is True
    assert (nights / "runs" / "2026-11-21" / "_SUCCESS").exists()

    assert first["backend"]["name"] == "ray" and second["backend"]["name"] == "local"
    assert second["fit"]["init"] == "given"  # warm start from last night's centroids
    drift = second["drift"]
    assert drift["previous_run"].endswith("runs/2026-11-21")
    assert drift["matching"] == "hungarian" and drift["shared_ids"] == 3000
    assert drift["label_changed_fraction"] < 0.02  # same data, slightly re-embedded
    assert drift["centroid_shift"]["max"] < 0.1

    report = (nights / "runs" / "2026-11-22" / "report.html").read_text()
    # timings, objective, sizes, distances, projection, drift
    assert report.count("<svg ") == 6
    assert "<h2>Drift</h2>" in report and "shared ids changed label" in report


def test_warm_start_with_wrong_shape(ray_local, nights, tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((5, 8), np.float32))
    with pytest.raises(ConfigError, match=r"has shape \(5, 8\); this run needs \(6, 8\)"):
        run(
            fast_config(
                input=f"{nights}/emb/date=2026-11-20/",
                output=str(tmp_path / "o"),
                k=6,
                init_centroids=str(tmp_path / "c.npy"),
            )
        )


def test_bad_date_placeholder():
    with pytest.raises(ConfigError, match=r"only \{date\} and \{previous_date\}"):
        fast_config(input="in/{day}/", output="o", k=2)
    with pytest.raises(ConfigError, match="--run-date must be YYYY-MM-DD"):
        fast_config(input="in", output="o", k=2, run_date="22/11/2026")


def test_report_command_rebuilds_the_report(nights, two_nights, tmp_path):
    from pseudolabel.pipelines.cli import main

    out = nights / "runs" / "2026-11-21"
    (out / "report.html").unlink(missing_ok=True)
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_text().count("<svg ") == 5  # no drift
    assert main(["report", str(tmp_path)]) == 2  # not a finished run: a one-line error
