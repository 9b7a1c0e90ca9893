"""A rerun never returns a stale result: a finished output or a checkpoint is reused only
by a run of the same settings on the same input files, and a nightly run does not build
on a previous run that never finished."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.errors import ConfigError
from tests.data import write_parquet_shards
from tests.pipelines.conftest import cli, fast_config
from tests.pipelines.test_cli import pseudolabel


@pytest.fixture
def finished(ray_local, tmp_path):
    """A finished run (k=4) of 2,000 rows in two shards, and its config."""
    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    write_parquet_shards(tmp_path / "in", x, 2)
    config = fast_config(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), k=4, iterations=2
    )
    return run(config), config, tmp_path


def test_rerun_with_other_settings_fails_fast_and_names_the_field(finished):
    manifest, _, tmp_path = finished
    assert manifest["fingerprint"]["k"] == 4
    assert manifest["fingerprint"]["input_files"]["files"] == 2
    args = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    t0 = time.monotonic()
    refused = pseudolabel(*args, "--k", "7", "--iterations", "2")
    seconds = time.monotonic() - t0
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "k: 4 -> 7" in refused.stderr and "--overwrite" in refused.stderr
    assert "ray:" not in refused.stdout + refused.stderr  # refused before Ray started
    assert seconds < 5, seconds  # process start and imports included
    # The same settings on a differently sized cluster reuse the result (--overwrite
    # recomputing: test_run.py::test_seed_overwrite_dtype_columns_and_skips_from_the_command_line).
    reused = pseudolabel(*args, "--k", "4", "--iterations", "2", "--workers", "1")
    assert reused.returncode == 0, reused.stderr[-2000:]
    assert "is complete (_SUCCESS)" in reused.stdout + reused.stderr


def rewrite_first_shard(tmp_path) -> None:
    """Same file name, same row count and size, other values: only the version differs."""
    x = np.random.default_rng(1).standard_normal((1000, 8)).astype(np.float32)
    time.sleep(0.01)  # a distinct modification time even on a coarse clock
    write_parquet_shards(tmp_path / "in", x, 1)


def test_rewritten_input_is_another_input_for_outputs_and_checkpoints(finished):
    _, config, tmp_path = finished
    rewrite_first_shard(tmp_path)
    with pytest.raises(ConfigError, match="input_files: 2 files"):
        run(config)  # the finished output is not returned for the new input
    (tmp_path / "out" / "_SUCCESS").unlink()  # as if killed after the fit's checkpoints
    with pytest.raises(ConfigError, match=r"holds checkpoints of .*\(input_files: "):
        run(config)  # nor is the fit resumed from them


def test_nightly_run_refuses_an_unfinished_previous_run(finished):
    tmp_path = finished[2]
    (tmp_path / "out" / "_SUCCESS").unlink()  # last night's run never finished
    previous = tmp_path / "out"
    for flag, url in (("init_centroids", previous / "centroids.npy"), ("previous_run", previous)):
        night = fast_config(
            input=str(tmp_path / "in"), output=str(tmp_path / "night"), k=4, iterations=2,
            **{flag: str(url)},
        )  # fmt: skip
        with pytest.raises(ConfigError, match=r"has no _SUCCESS .*--allow-incomplete-previous"):
            run(night)
        assert not (tmp_path / "night" / "_SUCCESS").exists()
    # Asked for on the command line: a warning, and the run goes on.
    night = cli(
        "run", "--input", tmp_path / "in", "--output", tmp_path / "night", "--k", "4",
        "--iterations", "2", "--previous-run", previous, "--allow-incomplete-previous",
    )  # fmt: skip
    assert night["rows"]["output"] == 2000 and night["drift"]["previous_run"].endswith("/out")
