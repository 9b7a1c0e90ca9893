"""A real local Ray shared by the in-process pipeline tests (started once per session)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data import mixture, write_parquet_shards


def _start_local_ray() -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    _start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def own_ray(ray_local):
    """A Ray of the module's own, for tests that SIGKILL or SIGSTOP its processes: the
    shared one is stopped first and started afresh after the module, so nothing they
    killed, froze or left half-built reaches the tests of another module."""
    import ray

    ray.shutdown()
    _start_local_ray()
    yield
    ray.shutdown()
    _start_local_ray()


BALANCED_K = 10  # clusters of the balanced fixtures


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """6,000 rows x 16 dims from 12 components, in 5 parquet shards, with truth."""
    root = tmp_path_factory.mktemp("small") / "input"
    x, truth = mixture(6000, 16, 12, seed=3)
    write_parquet_shards(root, x, shards=5, truth=truth, row_group_rows=500)
    return root, x, truth


@pytest.fixture(scope="session")
def dominant(tmp_path_factory):
    """8,000 rows, half of them in one component: plain k-means sizes are far from even."""
    w = np.full(BALANCED_K, 0.5 / (BALANCED_K - 1))
    w[0] = 0.5
    x, truth = mixture(8000, 12, BALANCED_K, seed=7, weights=w)
    root = tmp_path_factory.mktemp("dominant") / "input"
    write_parquet_shards(root, x, shards=4, truth=truth, row_group_rows=500)
    return root, x, truth


@pytest.fixture(scope="session")
def balanced_run(ray_local, dominant, tmp_path_factory):
    """(output folder, manifest) of a balanced run with top-3 labels on ``dominant``."""
    from pseudolabel.pipelines.commands.run import run

    root, _, _ = dominant
    out = tmp_path_factory.mktemp("balanced") / "run"
    manifest = run(
        fast_config(
            input=str(root),
            output=str(out),
            k=BALANCED_K,
            balanced=True,
            topk=3,
            truth_column="truth",
            iterations=15,
        )
    )
    return out, manifest


def fast_config(**kw):
    """Run settings sized for a 2-core test machine."""
    from pseudolabel.pipelines.config import build

    defaults = dict(k=12, workers=2, cpus_per_worker=0.5, label_workers=1, iterations=10)
    return build(**{**defaults, **kw})


# fast_config's sizes, as flags: added to a `run` or `curate` command line that lacks them
# (--k to `run` only: curate's comes from --levels).
FAST_FLAGS = {"--k": "12", "--workers": "2", "--cpus-per-worker": "0.5", "--label-workers": "1",
              "--iterations": "10"}  # fmt: skip


def cli(*argv: object, code: int = 0) -> dict | None:
    """``pseudolabel ARGV`` in this process, on the suite's Ray: the parser, the settings'
    checks and the run a user gets from the command line. Asserts the exit code (2: a
    one-line error on stderr) and returns the manifest of ``--output``, if written."""
    import json
    from pathlib import Path

    from pseudolabel.pipelines.cli import main

    args = [str(a) for a in argv]
    if args[0] in ("run", "curate"):
        fill = {
            f: v
            for f, v in FAST_FLAGS.items()
            if f not in args and (f, args[0]) != ("--k", "curate")
        }
        args += [a for flag, value in fill.items() for a in (flag, value)]
    assert main(args) == code, args
    if "--output" not in args:
        return None
    manifest = Path(args[args.index("--output") + 1]) / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.exists() else None


def nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on loopback behind a fault-injecting proxy (tests/s3server.py)."""
    from tests.s3server import S3

    server = S3()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3):
    import uuid

    def calm():
        s3.proxy.fail_next, s3.proxy.failed, s3.proxy.deny_key = 0, 0, None
        s3.proxy.stall_next, s3.proxy.stalled, s3.proxy.fail_every = 0, 0, 0
        s3.proxy.before_get = None

    calm()  # faults a test injected end with it, before and after
    name = f"bucket-{uuid.uuid4().hex[:10]}"
    s3.fs().mkdir(name)
    yield name
    calm()
