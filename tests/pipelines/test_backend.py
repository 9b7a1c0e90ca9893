"""The in-process backend (--backend local): the stages of a run on Ray, with no Ray.

Its output is compared with a run on the suite's Ray in the same test: the same rows,
columns and labels. Where it is chosen (``choose_backend``) is checked case by case,
and a fresh interpreter shows that a small job starts no Ray at all."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.runtime import session
from pseudolabel.pipelines.runtime.session import choose_backend
from tests.pipelines.conftest import cli

ROWS, DIM = 100_000, 16


def test_auto_runs_in_this_process_unless_something_asks_for_ray(monkeypatch):
    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(session, "memory_limit", lambda: 64 * ROWS * DIM * 4)
    base = RunConfig(input="in", output="out", k=8)
    backend, why = choose_backend(base, ROWS, DIM, 4)
    assert backend == "local" and "no cluster was given" in why
    for change, reason in [
        ({"ray_address": "auto"}, "a Ray cluster was given"),
        ({"gpus_per_worker": 1.0}, "--gpus-per-worker"),
        ({"workers": 2}, "--workers"),
        ({"ray_num_cpus": 2}, "--ray-num-cpus"),
        ({"balanced": True, "k": 3000}, "the balance scores 3e+08 cells"),  # 100k x 3000
        ({"backend": "ray"}, "--backend ray"),
    ]:
        backend, why = choose_backend(dataclasses.replace(base, **change), ROWS, DIM, 4)
        assert backend == "ray" and reason in why, change
    assert choose_backend(dataclasses.replace(base, balanced=True), ROWS, DIM, 4)[0] == "local"
    minibatch = dataclasses.replace(base, algorithm="minibatch")
    assert choose_backend(minibatch, ROWS, DIM, 4)[0] == "local"  # over the resident rows
    # Rows over a quarter of the memory: Ray's workers (on a cluster, or embedded).
    backend, why = choose_backend(base, 17 * ROWS, DIM, 4)
    assert backend == "ray" and "over 0.25 of the" in why
    assert (
        choose_backend(dataclasses.replace(base, backend="local"), 17 * ROWS, DIM, 4)[0] == "local"
    )
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as under `ray job submit`
    assert choose_backend(base, ROWS, DIM, 4) == ("ray", "a Ray cluster was given")
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(session.ray, "is_initialized", lambda: True)  # a notebook's Ray
    assert choose_backend(base, ROWS, DIM, 4)[0] == "ray"


def test_local_cpus_follow_a_containers_quota(monkeypatch):
    """A pod limited to 1.5 CPUs on a large node computes with one thread, not all."""
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/sys/fs/cgroup/cpu.max":
            return io.StringIO("150000 100000\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(session.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(session, "open", fake_open, raising=False)
    assert session.local_cpus() == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--ray-address", "auto"), "--ray-address and --gpus-per-worker need --backend ray"),
        (("--gpus-per-worker", "1"), "--ray-address and --gpus-per-worker need --backend ray"),
    ],
)
def test_local_refuses_what_needs_ray(tmp_path, capsys, change, message):
    cli("run", "--input", tmp_path, "--output", tmp_path / "o", "--backend", "local", *change,
        code=2)  # fmt: skip
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ("--topk", "3", "--truth-column", "truth"),
        ("--spherical", "--balanced", "--topk", "2"),
        # labelled from a second read: Ray Data's streaming pass, or a worker in-process
        ("--label-from", "stream", "--keep-columns", "truth"),
    ],
    ids=["plain", "spherical-balanced", "second-read"],
)
def test_in_process_labels_are_the_ray_labels(
    ray_local, small_dataset, tmp_path, flags, monkeypatch
):
    """The same flags on Ray and in this process (here while the suite's Ray is up:
    --backend local does not use it) give the same rows, columns and labels."""
    import faiss

    root, _, _ = small_dataset
    tables, manifests = {}, {}
    # The caller's own thread settings (a notebook's), which the local run must put back.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    caller = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    for backend in ("ray", "local"):
        out = tmp_path / backend
        # The balanced duals sum the workers' column sums: another split rounds them
        # otherwise (~1e-3 relative here), which moves near-tied second choices. So
        # that run is compared with one worker on Ray, as in this process.
        workers = ("--workers", "1") if "--balanced" in flags else ()
        manifests[backend] = cli("run", "--input", root, "--output", out, "--iterations", "4",
                                 "--backend", backend, *flags, *workers)  # fmt: skip
        assert manifests[backend]["backend"]["name"] == backend
        tables[backend] = pq.read_table(out / "labels").sort_by("id")
    # The in-process worker used both cores; the caller's settings are put back.
    threads = os.environ.get("OMP_NUM_THREADS"), faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(caller)
    assert threads == ("1", 1)
    local, on_ray = manifests["local"], manifests["ray"]
    assert "ray" not in local and local["fit"]["workers"] == 1
    assert "ray_start" not in local["timings"] and on_ray["ray"]["cpus"] == 2
    assert on_ray["fit"]["workers"] == (1 if "--balanced" in flags else 2)
    assert local["label"]["nodes"] == 1 and local["label"]["devices"] == ["cpu"]
    second_read = "stream" in flags
    assert local["label"]["source"] == ("reread" if second_read else "workers")
    assert on_ray["label"]["source"] == ("stream" if second_read else "workers")
    got, want = tables["local"], tables["ray"]
    assert got.schema == want.schema and got.num_rows == 6000
    for name in got.column_names:
        if name in ("distance", "cosine", "topk_distances", "topk_probs"):
            a, b = (np.stack(t.column(name).to_numpy(zero_copy_only=False)) for t in (got, want))
            # probabilities: exp(-d / eps) magnifies the distances' rounding by 1 / eps
            atol = 1e-3 if name == "topk_probs" else 1e-5
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=name)
        else:
            assert got.column(name).equals(want.column(name)), name
    assert local["clusters"]["sizes"] == on_ray["clusters"]["sizes"]
    assert local["clusters"].get("nearest") == on_ray["clusters"].get("nearest")
    inertia = [[r["inertia"] for r in m["fit"]["history"]] for m in (local, on_ray)]
    np.testing.assert_allclose(*inertia, rtol=1e-6)  # the same loop: float64 sums


SCRIPT = """
import json, sys
import ray
import pseudolabel

import numpy as np

result = pseudolabel.run(sys.argv[1], sys.argv[2], k=6, iterations=5, truth_column="truth")
said = {"ray": ray.is_initialized(), "torch": "torch" in sys.modules}
model = pseudolabel.KMeans(6, max_iter=5).fit(sys.argv[1])
run_centres = np.load(sys.argv[2] + "/centroids.npy")
said["api"] = {
    "ray": ray.is_initialized(),
    "centres_diff": float(np.abs(model.cluster_centers_ - run_centres).max()),
}
print(json.dumps({**said, "backend": result.manifest["backend"]}))
"""


def test_a_small_job_starts_no_ray(small_dataset, tmp_path):
    """In a fresh interpreter, ``pseudolabel.run``, ``KMeans.fit(url)`` and ``pseudolabel
    label`` run in it: Ray is never initialised (nor torch loaded), the API's centres are
    the run's, and the label command's labels of the run's centroids are the run's."""
    root, _, _ = small_dataset
    env_python = sys.executable
    done = subprocess.run([env_python, "-c", SCRIPT, str(root), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["ray"] is False and said["backend"]["name"] == "local"
    assert said["torch"] is False  # a worker this small sums with numpy (ops.stats)
    assert said["api"]["ray"] is False and said["api"]["centres_diff"] < 1e-5
    assert "no cluster was given" in said["backend"]["why"]
    relabel = subprocess.run(
        [env_python, "-m", "pseudolabel", "label", "--input", str(root), "--output",
         str(tmp_path / "relabel"), "--centroids", str(tmp_path / "run"), "--truth-column",
         "truth", "--backend", "auto"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert relabel.returncode == 0, relabel.stderr[-3000:]
    assert "backend: in this process, no Ray" in relabel.stdout
    manifest = json.loads((tmp_path / "relabel" / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "local" and manifest["label"]["source"] == "reread"
    fitted, again = (
        pq.read_table(tmp_path / d / "labels").sort_by("id") for d in ("run", "relabel")
    )
    assert again.column("label").equals(fitted.column("label"))
    assert again.column("truth").equals(fitted.column("truth"))


def test_the_in_process_worker_caches_what_the_ray_workers_would(dominant, tmp_path):
    """One worker in process holds the Sinkhorn sample that Ray splits over a worker per
    CPU, so its score cache is theirs summed (--score-cache-gb per CPU): a sample whose
    scores fit the Ray workers' caches is cached in process too, not scored each step."""
    root, _, _ = dominant
    # Every one of the 8,000 rows is sampled (800 per cluster): scores and kernel take
    # 2 x 8000 x 10 x 4 = 640 kB, over one budget of 0.0004 GiB (429 kB), under two.
    m = cli("run", "--input", root, "--output", tmp_path / "o", "--k", "10", "--balanced",
            "--balance-sample", "800", "--score-cache-gb", "0.0004",
            "--backend", "local")  # fmt: skip
    assert m["balance"]["sample_rows"] == 8000 and m["balance"]["sinkhorn_on"] == "workers"
    assert m["balance"]["score_cache"] == [True]


def test_in_process_bars_move_as_the_worker_loads_and_labels(small_dataset, tmp_path, monkeypatch):
    """In this process a call runs at once, so the load and label bars move with the
    worker's own batches (``calls.progressed``), not in one jump at the end: 12 row
    groups loaded, 6,000 rows labelled in batches of 1,000 into files of 2,500 rows,
    each bar only moving forward and ending full."""
    from contextlib import contextmanager

    from pseudolabel.pipelines import progress
    from pseudolabel.pipelines.runtime import shards

    moves: dict[str, list[float]] = {}

    class Recorder(progress._Bar):
        def __init__(self, desc):
            super().__init__(None)
            self.n, self.desc = 0.0, desc

        def update(self, n=1, **postfix):
            if n:
                self.n += n
                moves[self.desc].append(self.n)

        def set(self, value, **postfix):
            self.update(value - self.n)

        def reach(self, value):
            if value > self.n:
                self.update(value - self.n)

    @contextmanager
    def bar(total, desc, unit="it"):
        moves[desc] = []
        yield Recorder(desc)

    monkeypatch.setattr(progress, "bar", bar)
    monkeypatch.setattr(shards, "FILE_ROWS", 2500)  # three label files: the bar never goes back
    root, _, _ = small_dataset
    m = cli("run", "--input", root, "--output", tmp_path / "o", "--k", "6", "--iterations",
            "3", "--label-batch-rows", "1000", "--backend", "local")  # fmt: skip
    assert m["backend"]["name"] == "local" and m["label"]["source"] == "workers"
    assert moves["load"][-1] == 6000 and len(moves["load"]) >= 12
    assert moves["label"] == [1000, 2000, 2500, 3500, 4500, 5000, 6000]


def test_minibatch_in_process_is_the_python_apis_minibatch(small_dataset, tmp_path):
    """Mini-batch over the rows one in-process worker holds, cut into batches by the
    rows' keys (``ops.sampling.epoch_batches``), is ``KMeans(algorithm="minibatch")`` on
    the same rows as an array: the same batches, the same centres. The workers, holding
    every row, label them (no second read)."""
    import pseudolabel

    root, x, _ = small_dataset
    m = cli("run", "--input", root, "--output", tmp_path / "o", "--k", "6", "--algorithm",
            "minibatch", "--iterations", "3", "--batch-rows", "1000", "--tol", "0",
            "--backend", "local")  # fmt: skip
    assert m["backend"]["name"] == "local" and m["label"]["source"] == "workers"
    assert [h["steps"] for h in m["fit"]["history"]] == [6, 6, 6]  # 6,000 rows, 1,000 a step
    model = pseudolabel.KMeans(6, algorithm="minibatch", max_iter=3, tol=0, batch_rows=1000)
    model.fit(x)
    centres = np.load(tmp_path / "o" / "centroids.npy")
    np.testing.assert_allclose(centres, model.cluster_centers_, rtol=1e-6, atol=1e-6)
    labels = pq.read_table(tmp_path / "o" / "labels").sort_by("id").column("label").to_numpy()
    np.testing.assert_array_equal(labels, model.predict(x))


def test_a_minibatch_checkpoint_continues_only_where_its_epochs_are_cut_alike():
    """In process an epoch's batches are cut by the rows' keys, on Ray they stream: a
    mini-batch fit resumes on the backend that began it; a Lloyd fit on either."""
    from types import SimpleNamespace

    from pseudolabel.pipelines.stages.fit import fit_fingerprint

    plan = SimpleNamespace(input_url="in", total_rows=6000, dim=16)
    run = {"input_files": "sha"}
    for algorithm, same in (("lloyd", True), ("minibatch", False)):
        config = RunConfig(input="in", output="out", k=6, algorithm=algorithm)
        local, ray = (fit_fingerprint(config, plan, run, b) for b in ("local", "ray"))
        assert (local == ray) is same, algorithm
