import json
import time

import numpy as np
import pytest

from pseudolabel.ops.kmeans import IterationRecord, KMeansState
from pseudolabel.pipelines.errors import ConfigError
from pseudolabel.pipelines.io.checkpoints import Checkpoints
from pseudolabel.pipelines.io.layout import CHECKPOINTS, RunOutput
from pseudolabel.pipelines.io.storage import resolve


def state(i, k=3, minibatch=False):
    record = IterationRecord(i, 10.0 / i, 0.1, 0.5, 0, 100)
    weights = np.arange(k, dtype=np.float64) if minibatch else None
    return KMeansState(np.full((k, 2), i, np.float32), i, weights, [record] * i)


def test_checkpoint_roundtrip_and_pruning(tmp_path):
    ckpt = Checkpoints(resolve(str(tmp_path / CHECKPOINTS)), {"k": 3})
    assert ckpt.latest() is None
    for i in range(1, 5):
        ckpt.save(state(i, minibatch=True))
    latest = ckpt.latest()
    assert latest.iteration == 4 and latest.centroids[0, 0] == 4
    np.testing.assert_array_equal(latest.weight_sums, [0, 1, 2])
    assert len(latest.history) == 4 and latest.history[0].inertia == 2.5
    names = sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir())
    assert names == ["ckpt-000003.npz", "ckpt-000004.npz"]  # one object each, two kept


def test_held_centroids_are_checkpointed_in_slices_and_pruned_with_them(tmp_path):
    """Centroids held on the workers (a reduce-scatter) are written a slice per file
    (runtime.held.SlicedCentroids, here in this process) and read back whole; pruning a
    checkpoint deletes its slices, also those of a re-save and those a rerun on fewer
    workers left; a torn slice makes its checkpoint unreadable, not wrong."""
    from pseudolabel.ops.stats import slice_bounds
    from pseudolabel.pipelines.runtime import calls
    from pseudolabel.pipelines.runtime.held import SlicedCentroids
    from pseudolabel.pipelines.runtime.workers.rows import ResidentRows

    class Holder:  # the worker's side of ``write``, called in this process
        write_slice = calls.LocalCall(lambda *a: ResidentRows.write_slice(None, *a))

    def held(i: int, workers: int) -> KMeansState:
        x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2) + i
        bounds = slice_bounds(7, workers)
        refs = [calls.put(x[lo:hi]) for lo, hi in bounds]
        c = SlicedCentroids(refs, bounds, [Holder()] * workers, timeout=10)
        return KMeansState(c, i, None, [IterationRecord(i, 1.0, 0.1, 0.5, 0, 100)] * i)

    with calls.in_process():  # whether or not another test left Ray up
        slices_saved_pruned_and_read(tmp_path / CHECKPOINTS, held)


def slices_saved_pruned_and_read(root, held) -> None:
    ckpt = Checkpoints(resolve(str(root)), {"k": 7})
    ckpt.save(held(1, 4))
    ckpt.save(held(2, 3))
    ckpt.save(state(2, k=7))  # the refinement's re-save of the same iteration
    names = sorted(p.name for p in root.iterdir())
    assert names == ["ckpt-000001-c00000.npy", "ckpt-000001-c00001.npy",
                     "ckpt-000001-c00002.npy", "ckpt-000001-c00003.npy", "ckpt-000001.npz",
                     "ckpt-000002-c00000.npy", "ckpt-000002-c00001.npy",
                     "ckpt-000002-c00002.npy", "ckpt-000002.npz"]  # fmt: skip
    resumed = Checkpoints(resolve(str(root)), {"k": 7})
    assert resumed.latest().centroids[0, 0] == 2  # the re-save's array
    resumed.save(held(3, 2))
    resumed.save(held(4, 2))
    assert sorted(p.name for p in root.iterdir()) == [
        "ckpt-000003-c00000.npy", "ckpt-000003-c00001.npy", "ckpt-000003.npz",
        "ckpt-000004-c00000.npy", "ckpt-000004-c00001.npy", "ckpt-000004.npz",
    ]  # fmt: skip
    latest = resumed.latest()
    np.testing.assert_array_equal(latest.centroids, np.arange(14).reshape(7, 2) + 4)
    (root / "ckpt-000004-c00001.npy").write_bytes(b"torn")
    assert Checkpoints(resolve(str(root)), {"k": 7}).latest().iteration == 3


def test_torn_checkpoint_falls_back_to_previous(tmp_path):
    ckpt = Checkpoints(resolve(str(tmp_path)), {"k": 3})
    ckpt.save(state(1))
    ckpt.save(state(2))
    (tmp_path / "ckpt-000002.npz").write_bytes(b"PK\x03\x04 torn")
    assert ckpt.latest().iteration == 1


def test_checkpoint_of_another_run_is_refused(tmp_path):
    Checkpoints(resolve(str(tmp_path)), {"k": 3, "seed": 0}).save(state(1))
    with pytest.raises(ConfigError, match=r"different settings or input \(k: 3 -> 4\); rerun"):
        Checkpoints(resolve(str(tmp_path)), {"k": 4, "seed": 0}).latest()


def test_checkpoints_never_unpickle(tmp_path):
    ckpt = Checkpoints(resolve(str(tmp_path)), {"k": 3})
    ckpt.save(state(1))
    np.savez(tmp_path / "ckpt-000001.npz", centroids=np.array([object()]), state=np.array("{}"))
    assert ckpt.latest() is None  # refused, not executed


def test_publish_replaces_labels_and_commit_writes_success_last(tmp_path):
    out = RunOutput(resolve(str(tmp_path)))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "stale.parquet").write_bytes(b"old")
    staging = out.new_staging()
    staging.join("a.parquet").write_bytes(b"A")
    staging.join("b.parquet").write_bytes(b"B")
    published = out.publish(staging.files([".parquet"]))
    assert [p.url.rsplit("/", 1)[1] for p in published] == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert not (tmp_path / "_staging").exists()
    assert not out.committed()
    out.commit({"ok": 1})
    assert out.committed() and json.loads((tmp_path / "manifest.json").read_text()) == {"ok": 1}
    out.clear()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("balanced", [False, True])
def test_labeler_placed_for_a_gpu_it_cannot_see_labels_on_the_cpu(balanced):
    """The label pass's actors pick their device as fit workers do (ops.gpu.usable_device);
    the device they report is the one that computed (balanced labels: the CPU always)."""
    import pyarrow as pa

    from pseudolabel.ops.gpu import torch_cuda_ready
    from pseudolabel.pipelines.stages.label import Labeler, LabelSpec

    if torch_cuda_ready() and not balanced:
        pytest.skip("this machine has a GPU: the labeler would use it")
    rng = np.random.default_rng(0)
    c = rng.standard_normal((5, 4)).astype(np.float32)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    duals = np.zeros(5) if balanced else None
    spec = LabelSpec("l2", device="cuda", duals=duals, epsilon=1.0 if balanced else None)
    labeler = Labeler(c, spec, {})
    assert labeler.rows.assigner.device == "cpu"
    flat = pa.array(x.ravel())
    out = labeler(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(flat, 4)}))
    nearest = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    assert (out.column("label").to_numpy() == nearest).all()  # zero duals: the nearest


def test_labeler_refuses_centroids_replaced_under_the_run(tmp_path):
    """Labelers load centroids.npy by URL and check it is the file the driver wrote: a
    second writer on the same --output cannot slip other centroids into the labels."""
    from pseudolabel.pipelines.errors import InputError
    from pseudolabel.pipelines.stages.label import Labeler, LabelSpec

    out = RunOutput(resolve(str(tmp_path)))
    rng = np.random.default_rng(0)
    sha = out.write_array("centroids.npy", rng.standard_normal((4, 3)).astype(np.float32))
    url = str(tmp_path / "centroids.npy")
    labeler = Labeler(url, LabelSpec("l2", centroids_sha256=sha), {})
    assert labeler.rows.assigner.centroids.shape == (4, 3)
    out.write_array("centroids.npy", rng.standard_normal((4, 3)).astype(np.float32))
    with pytest.raises(InputError, match="not the file this run wrote"):
        Labeler(url, LabelSpec("l2", centroids_sha256=sha), {})


def test_a_label_pool_that_cannot_start_is_a_clear_error(ray_local, tmp_path):
    """Ray Data would wait for its actors forever: the label pass gives up after
    --startup-timeout and says what it asked for and what the cluster has."""
    from pseudolabel.pipelines.errors import ResourceError
    from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
    from pseudolabel.pipelines.stages.label import LabelPool, LabelSpec, label_pass
    from tests.data import write_parquet_shards

    x = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    write_parquet_shards(tmp_path / "in", x, 1)
    plan = make_plan(str(tmp_path / "in"), ReadSettings())
    out = RunOutput(resolve(str(tmp_path / "out")))
    out.write_array("centroids.npy", x[:3])
    pool = LabelPool(size=1, num_cpus=1, num_gpus=1, startup_timeout=2)  # no GPU here
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match=r"1 labelers did not start within 2 s; .* 1 GPU"):
        label_pass(
            plan, ReadSettings(dim=4), out.root.join("centroids.npy"), LabelSpec("l2"), pool,
            out.root.join("_staging", "x"),
        )  # fmt: skip
    assert time.monotonic() - t0 < 60
