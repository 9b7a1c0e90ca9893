"""The command line as a user meets it: real processes, each with its own local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pseudolabel.ops.sinkhorn import sample_tolerance
from tests.data import write_parquet_shards
from tests.pipelines.conftest import cli
from tests.processes import kill_session, run_in_session, spawn

BIN = Path(sys.executable).parent
DESIGN_FLAGS = [
    "--input", "--output", "--k", "--algorithm", "--iterations", "--balanced", "--spherical",
    "--workers", "--gpus-per-worker", "--topk", "--seed", "--id-column", "--embedding-column",
    "--config",
]  # fmt: skip


def pseudolabel(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return run_in_session([str(BIN / "pseudolabel"), *args], timeout=timeout, env=env)


def test_help_lists_the_contracted_flags():
    out = pseudolabel("run", "--help").stdout
    missing = [f for f in DESIGN_FLAGS if f not in out]
    assert missing == []
    assert "demo" in pseudolabel("--help").stdout


def test_run_prints_progress_and_summary(tmp_path):
    x = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    write_parquet_shards(tmp_path / "in", x, 3)
    result = pseudolabel(
        "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
        "--k", "4", "--iterations", "3", "--tol", "0", "--workers", "2", "--cpus-per-worker",
        "0.5", "--config", str(Path(__file__).parents[2] / "cluster_configs" / "local.yaml"),
        # Flags whose effect the manifest shows (asserted below).
        "--init", "random", "--balanced", "--epsilon", "0.01", "--sinkhorn-tol", "0.002",
        "--score-cache-gb", "0", "--label-workers", "1", "--ray-num-cpus", "3",
        "--reduce", "scatter",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for i in (1, 2, 3):
        assert f"fit: iter   {i}/3  inertia" in result.stdout
    assert "3000 labelled rows" in result.stdout
    # Quiet by default: every line is ours (a timestamped progress line, or the summary),
    # and none of Ray's INFO logging or Ray Data's execution banners reach the console.
    for line in result.stdout.splitlines():
        assert line.startswith(("[", "pseudolabel: ", "  ")), line
    assert " INFO " not in result.stderr and "Running Dataset" not in result.stderr, result.stderr[
        -3000:
    ]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["ray"] == {"cpus": 3, "gpus": 0}  # the embedded Ray, as --ray-num-cpus said
    assert manifest["fit"]["iterations_run"] == 3 and manifest["fit"]["workers"] == 2
    assert manifest["fit"]["devices"] == ["cpu", "cpu"]
    assert manifest["fit"]["reduce"] == "scatter"  # summed on the workers, said once
    assert result.stdout.count("reduce-scattered over the 2 workers") == 1
    # The workers wrote the centroids they held, a file per slice, beside the state.
    kept = sorted(p.name for p in (tmp_path / "out" / "_checkpoints").iterdir())
    assert "ckpt-000003-c00001.npy" in kept and "ckpt-000003.npz" in kept, kept
    label = manifest["label"]  # every labeler reported itself, as many as asked for: the
    # fit's 2 workers, which hold every row (--label-workers sizes a streaming pass)
    assert label["source"] == "workers" and label["actors"] == label["asked"] == 2
    assert label["devices"] == ["cpu", "cpu"]
    assert manifest["fit"]["init"].startswith("random")
    balance = manifest["balance"]
    assert balance["epsilon_relative"] == 0.01 and balance["sinkhorn"]["tol"] == 0.002
    # A sample of 1024 of 3000 rows (256 per cluster, by sampling key) estimates the 4
    # cluster shares to about 0.035 (L1): Sinkhorn stops at 0.3 of that, above the asked
    # 0.002 (ops.sinkhorn.sample_tolerance).
    m = balance["sample_rows"]
    assert abs(m - 1024) < 100
    assert balance["sinkhorn"]["tol_used"] == sample_tolerance(0.002, np.full(4, 0.25), m, 3000)
    assert 0.002 < balance["sinkhorn"]["tol_used"] < 0.02
    assert balance["sinkhorn"]["marginal_error"] < balance["sinkhorn"]["tol_used"]
    # --score-cache-gb 0: solved on the workers, scores recomputed every step
    assert balance["sinkhorn_on"] == "workers" and balance["score_cache"] == [False, False]
    assert manifest["clusters"]["balance"]["max_over_min"] <= 1.03  # 750 +- 1%


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    x = np.ones((40, 3), np.float32)
    x[5, 2] = np.inf
    write_parquet_shards(tmp_path / "in", x, 1)
    result = pseudolabel(
        "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--k", "2"
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("pseudolabel:")]
    assert len(errors) == 1
    assert "part-00000.parquet: row 5: NaN or inf in embedding" in errors[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--k", "0"], "--k must be at least 1, got 0"),
        (["run", "--k", "3", "--topk", "5"], "--topk 5 exceeds --k 3"),
        (
            ["curate", "--levels", "8,4", "--sample-size", "10", "--k", "6"],
            "--k 6 differs from the first level 8",
        ),
    ],
)
def test_config_errors_before_any_work(tmp_path, args, message, capsys):
    cli(args[0], "--input", tmp_path, "--output", tmp_path / "o", *args[1:], code=2)
    assert capsys.readouterr().err == f"pseudolabel: error: {message}\n"
    assert not (tmp_path / "o").exists()


def on_a_terminal(*args: str, timeout: float = 300) -> tuple[int, str]:
    """(exit code, what the terminal showed) of the CLI with a pseudo-terminal for its
    stdout and stderr, as a person running it in a shell has."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    leader, follower = pty.openpty()
    # 40 rows x 120 columns: a terminal of no size gets no bars (tqdm draws to its width).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    # In a session of its own: its Ray is ended with it if it outlives the deadline.
    proc = spawn([str(BIN / "pseudolabel"), *args], stdout=follower, stderr=follower,
                 text=False, env=env)  # fmt: skip
    os.close(follower)
    shown, deadline = bytearray(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 1.0)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process has ended
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        raise
    return code, shown.decode(errors="replace")


def test_demo(tmp_path):
    """The demo on a terminal: progress bars while it works, then the summary."""
    code, shown = on_a_terminal(
        "demo", "--dir", str(tmp_path), "--rows", "20000", "--k", "8", "--dim", "48",
        "--shards", "5", "--workers", "2",
    )  # fmt: skip
    assert code == 0, shown[-3000:]
    assert "wrote 20000 rows x 48 dims in 5 parquet shards" in shown
    assert "fit: 2 cpu workers" in shown
    # tqdm redraws a bar in place with carriage returns; the load bar counts the rows the
    # workers hold, the fit's its iterations, the balance bar its steps, the label bar the
    # rows the workers labelled.
    frames = shown.replace("\r\n", "\n").replace("\r", "\n").splitlines()
    assert any(f.startswith("load:") and "/20000 [" in f and "row/s" in f for f in frames), shown
    assert any(f.startswith("fit:") and "/20 [" in f and "inertia=" in f for f in frames), shown
    assert any(f.startswith("balance:") and "step/s" in f for f in frames), shown
    assert any(f.startswith("label:") and "/20000 [" in f and "row/s" in f for f in frames), shown
    lines = frames
    nearest = next(line for line in lines if "NMI" in line and "(nearest_label)" in line)
    assert float(nearest.split("NMI")[1].split()[0]) > 0.9
    balanced = next(line for line in lines if "sizes" in line and "(balanced)" in line)
    assert float(balanced.split("max/min")[1].split()[0]) <= 1.2
    assert (tmp_path / "run" / "_SUCCESS").exists()
    assert (tmp_path / "run" / "duals.npy").exists()


@pytest.mark.parametrize("command", ["run", "label", "curate", "train", "demo"])
def test_every_option_says_what_it_does_and_what_it_is_when_not_given(command):
    """Each option of each subcommand has a description, and says "(required)" or its
    default (storage options excepted: a default there could only be {})."""
    from pseudolabel.pipelines.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.dest in ("help", "config", "storage_options", "storage_options_file"):
            continue
        text = (action.help or "") % {"default": action.default}
        assert text.strip(), f"{command} {action.option_strings}: no description"
        if action.dest not in ("quiet", "verbose"):  # switches: off unless given
            assert "(required)" in text or "default" in text, f"{action.option_strings}: {text}"


def test_required_flags_are_marked_and_a_missing_k_says_so():
    from pseudolabel.pipelines.cli import build_parser, config_from_args
    from pseudolabel.pipelines.errors import ConfigError

    parser = build_parser()
    help_text = " ".join(parser._subparsers._group_actions[0].choices["run"].format_help().split())
    for flag in ("--input URL", "--output URL", "--k K"):
        assert f"{flag} " in help_text
    assert "number of clusters (required)" in help_text
    assert "--iterations N Lloyd iterations, or mini-batch epochs (at most) (default: 20)" in (
        help_text
    )
    with pytest.raises(ConfigError, match="--k is required"):
        config_from_args(parser.parse_args(["run", "--input", "a", "--output", "b"]))


@pytest.mark.parametrize(
    "argv", [["-q", "report", "out"], ["report", "-q", "out"], ["report", "out", "--quiet"]]
)
def test_quiet_before_or_after_the_subcommand(argv):
    from pseudolabel.pipelines.cli import build_parser

    assert build_parser().parse_args(argv).quiet is True
    assert build_parser().parse_args(["report", "out"]).quiet is False


@pytest.mark.parametrize("argv", [["-v", "run"], ["run", "-v"], ["run", "--verbose"]])
def test_verbose_before_or_after_the_subcommand(argv):
    from pseudolabel.pipelines.cli import build_parser

    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["run"]).verbose is False


def test_quiet_and_verbose_together_are_refused():
    result = pseudolabel("-q", "run", "-v", "--input", "a", "--output", "b", "--k", "2")
    assert result.returncode == 2 and "-q and -v: choose one" in result.stderr


def test_ray_is_quiet_unless_verbose():
    """What -v changes in Ray's own settings: the level of its console handlers (its
    log files keep everything), workers' output forwarded to the driver, Ray Data's
    execution banners."""
    import logging

    import ray.data

    from pseudolabel.pipelines import progress

    console = [
        h
        for h in logging.getLogger("ray.data").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    assert console  # Ray Data logs to the console through a handler of its own
    try:
        for verbose, level in ((False, logging.WARNING), (True, logging.INFO)):
            progress.configure(verbose=verbose)
            progress.quiet_ray()
            assert progress.ray_init_kwargs()["log_to_driver"] is verbose
            assert all(h.level == level for h in console)
            assert ray.data.DataContext.get_current().print_on_execution_start is verbose
    finally:
        progress.configure()


# Values for flags whose generic sample (below) would not pass the settings' checks.
FLAG_SAMPLES = {
    "input": "in-{date}", "output": "out-{date}", "run_date": "2026-11-20", "k": 8,
    "topk": 3, "tol": 0.01, "levels": "8,4", "sample_size": 100, "heldout": 0.2,
    "balance_tol": 0.02, "truth_column": "truth", "centroids": "model.npy",
    "storage_options": {"anon": True}, "id_column": "key", "embedding_column": "vec",
    "keep_columns": "colour,size", "resampling_steps": 2, "duals": "duals.npy",
    "fit_sample": "500", "label_from": "stream",
}  # fmt: skip
# Settings that refuse each other's non-default values: the later ones of a pair are
# given in a second command line, with the earlier at its default.
# Mini-batch holds no rows to resample, or to sample for the fit.
FLAG_CONFLICTS = {
    "resampling_steps": "algorithm", "fit_sample": "algorithm", "reduce": "algorithm"
}  # fmt: skip


def _sample(field) -> object:
    """A value for ``field`` other than its default, that its settings accept."""
    import dataclasses

    if field.name in FLAG_SAMPLES:
        return FLAG_SAMPLES[field.name]
    default = field.default if field.default is not dataclasses.MISSING else None
    if field.metadata.get("choices"):
        return next(c for c in field.metadata["choices"] if c != default)
    if field.type.startswith("bool"):
        return not default
    if field.type.startswith("int"):
        return (default or 0) + 2
    if field.type.startswith("float"):
        return (default or 0.25) * 2
    return f"sample-{field.name}"


@pytest.mark.parametrize("command", ["run", "label", "curate", "train"])
def test_every_flag_reaches_the_settings(command):
    """Each flag of each subcommand, set on the command line to something other than its
    default, arrives in the settings as given: no flag is parsed and dropped, or read
    into the wrong setting. (What each setting does is tested where it acts.) A new
    setting gets a flag and is covered here without a change; one whose generic sample
    fails the checks needs an entry in FLAG_SAMPLES."""
    import json as json_module

    from pseudolabel.pipelines import config as cfg
    from pseudolabel.pipelines.cli import build_parser, config_from_args

    settings = {"run": cfg.RunConfig, "label": cfg.LabelConfig, "curate": cfg.CurateConfig,
                "train": cfg.TrainConfig}[command]  # fmt: skip
    fields = cfg.fields(settings)
    names = {f.name for f in fields}
    later = names & FLAG_CONFLICTS.keys()
    passes = [names - later] + ([names - set(FLAG_CONFLICTS.values())] if later else [])
    for given in passes:
        argv, expected = [command], {}
        for field in fields:
            if field.name not in given:
                continue
            value, flag = _sample(field), "--" + field.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else f"--no-{flag[2:]}")
            else:
                argv += [flag, json_module.dumps(value) if isinstance(value, dict) else str(value)]
            expected[field.name] = value
        got = config_from_args(build_parser().parse_args(argv), settings)
        for name, value in expected.items():
            if name in ("input", "output"):  # {date} is filled in from --run-date
                value = value.replace("{date}", expected.get("run_date", "{date}"))
            assert getattr(got, name) == value, name
