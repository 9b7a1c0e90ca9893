"""pseudolabel train on a small mixture, CPU only: Ray Train with two workers trains a
head, checkpoints, resumes, and beats the random-label baseline by a clear margin."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.commands.train import claim_output, train
from pseudolabel.pipelines.config import TrainConfig
from pseudolabel.pipelines.errors import ConfigError
from pseudolabel.pipelines.io.storage import resolve
from tests.data import mixture, write_parquet_shards
from tests.pipelines.conftest import cli, fast_config


@pytest.fixture(scope="module")
def labelled(ray_local, tmp_path_factory):
    """A balanced run on a mixture whose input has a truth column the labels lack: a
    training with --truth-column reads it from the input (joined by id)."""
    root = tmp_path_factory.mktemp("train")
    x, truth = mixture(4000, 16, 8, seed=31)
    write_parquet_shards(root / "in", x, 2, truth=truth, row_group_rows=1000)
    run(fast_config(input=str(root / "in"), output=str(root / "run"), k=8, balanced=True))
    return root


def config(root, out, **kw):
    settings = dict(
        input=str(root / "in"),
        labels=str(root / "run"),
        output=str(out),
        head="mlp",
        hidden=32,
        epochs=2,
        workers=2,
        cpus_per_worker=0.5,
        batch_size=64,
        truth_column="truth",
    )
    return TrainConfig(**{**settings, **kw})


def test_train_compare_rounds_checkpoint_and_resume(ray_local, labelled, tmp_path):
    """One training with every analysis (a Ray Train run costs ~20 s here): the head and
    --compare's other heads in one run, a --rounds round, then a resume and refusals."""
    out = tmp_path / "head"
    # Through the command line, each flag checked by its effect below.
    cli(
        "train", "--input", labelled / "in", "--labels", labelled / "run", "--output", out,
        "--head", "mlp", "--hidden", "32", "--epochs", "2", "--workers", "2",
        "--cpus-per-worker", "0.5", "--batch-size", "64", "--truth-column", "truth",
        "--label-column", "label", "--heldout", "0.25", "--lr", "0.02", "--seed", "5",
        "--compare", "--rounds", "1",
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["epochs"][1]["loss"] < metrics["epochs"][0]["loss"]
    # --heldout 0.25: the ids whose CRC32 falls in the lowest quarter, computed here.
    heldout = sum(zlib.crc32(str(i).encode()) < 0.25 * 2**32 for i in range(4000))
    for epoch in metrics["epochs"]:
        assert epoch["heldout_rows"] == heldout and epoch["train_rows"] == 4000 - heldout
        # --batch-size 64 on --workers 2: each worker's last batch may be short.
        assert epoch["train_rows"] / 64 <= epoch["steps"] <= epoch["train_rows"] / 64 + 2
    assert metrics["label_column"] == "label" and metrics["head"] == "mlp"
    compare = metrics["comparison"]
    assert set(compare) == {"raw_embeddings", "label", "nearest_label", "random"}
    # Pseudo-labels carry the structure; random labels do not: a clear margin.
    assert compare["label"]["heldout_accuracy"] > compare["random"]["heldout_accuracy"] + 0.3
    # The probe of every head's features: the raw embeddings of these 8 well separated
    # components are near 1 (tests/ops/test_probe.py); the heads' features, random labels
    # included (a ReLU layer keeps the classes apart), far above chance (1/8).
    probes = {name: v["probe_accuracy"] for name, v in compare.items()}
    assert probes["raw_embeddings"] > 0.95, probes
    assert all(p > 0.5 for p in probes.values()), probes
    assert list((out / "_train" / "head").glob("checkpoint_*"))
    head = np.load(out / "head.npz", allow_pickle=False)
    assert head["0.weight"].shape == (32, 16) and head["2.weight"].shape == (8, 32)
    assert json.loads((out / "head.json").read_text())["k"] == 8
    assert (out / "_SUCCESS").exists()
    (round1,) = metrics["rounds"]  # re-embed, re-cluster, retrain: NMI to the labels
    assert 0.5 < round1["nmi_to_previous"] <= 1.0
    assert (out / "rounds" / "1" / "run" / "_SUCCESS").exists()

    # --compare's heads share the main head's run and checkpoint: all resume together.
    resumed = train(config(labelled, out, epochs=3, compare=True, heldout=0.25, lr=0.02, seed=5))
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    assert resumed["epochs"][2]["resumed_from_epoch"] == 2  # from the checkpoint, not 0
    assert set(resumed["comparison"]) == set(compare)
    with pytest.raises(ConfigError, match=r"compare: True -> False.*--overwrite"):
        train(
            config(labelled, out, epochs=3, heldout=0.25, lr=0.02, seed=5)
        )  # fewer heads than the checkpoint holds
    # Another head is not resumed from this one's checkpoints: refused before training.
    with pytest.raises(ConfigError, match=r"head: 'mlp' -> 'linear'.*--overwrite"):
        train(config(labelled, out, head="linear", compare=True, heldout=0.25, lr=0.02, seed=5))


def test_train_output_is_claimed_by_its_fingerprint(tmp_path):
    """A trained output is continued only by the same training; --overwrite removes it,
    _SUCCESS first; the new fingerprint is recorded before any training starts."""
    out = resolve(str(tmp_path))
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "_train").mkdir()
    (tmp_path / "head.npz").write_bytes(b"old head")
    with pytest.raises(ConfigError, match="no fingerprint recorded"):
        claim_output(out, {"head": "mlp"}, overwrite=False)  # whose head is this?
    flags = ["train", "--input", "i", "--labels", "l", "--output", str(tmp_path), "--overwrite"]
    claim_output(out, {"head": "mlp"}, parsed(flags).overwrite)
    assert not (tmp_path / "_SUCCESS").exists() and not (tmp_path / "head.npz").exists()
    assert json.loads((tmp_path / "_train" / "fingerprint.json").read_text()) == {"head": "mlp"}
    claim_output(out, {"head": "mlp"}, overwrite=False)  # the same training: continued
    with pytest.raises(ConfigError, match="head: 'mlp' -> 'linear'"):
        claim_output(out, {"head": "linear"}, overwrite=False)


def test_compare_needs_a_truth_column(labelled, tmp_path):
    with pytest.raises(ConfigError, match="--compare needs --truth-column"):
        train(config(labelled, tmp_path / "x", compare=True, truth_column=None))


def test_truth_comes_from_the_input_when_the_labels_lack_it(ray_local, labelled, tmp_path):
    """A run without --truth-column: training with one reads it from the input (joined by
    id, so each row gets its own class), from the columns --id-column and
    --embedding-column name."""
    import pyarrow.parquet as pq

    from pseudolabel.pipelines.commands.train import joined_dataset

    renamed = pq.read_table(labelled / "in").rename_columns(["key", "vec", "truth"])
    (tmp_path / "renamed").mkdir()
    pq.write_table(renamed, tmp_path / "renamed" / "part-0.parquet")
    cfg = parsed(["train", "--input", str(tmp_path / "renamed"), "--labels",
                  str(labelled / "run"), "--output", str(tmp_path / "head"), "--truth-column",
                  "truth", "--id-column", "key", "--embedding-column", "vec"])  # fmt: skip
    joined, dim = joined_dataset(cfg, cfg.labels, ["label"], ("truth",))
    rows = joined.take_all()
    truth = {r["id"]: r["truth"] for r in labelled_truth(labelled)}
    assert dim == 16 and len(rows) == len(truth) == 4000
    assert all(r["truth"] == truth[r["id"]] for r in rows)


def parsed(argv: list[str]) -> TrainConfig:
    """TrainConfig from a command line, as `pseudolabel train` builds it."""
    from pseudolabel.pipelines.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(argv), TrainConfig)


def labelled_truth(root):
    import pyarrow.parquet as pq

    return pq.read_table(root / "in", columns=["id", "truth"]).to_pylist()


def test_truth_table_widens_as_classes_turn_up():
    """Train workers count (prediction, truth) without knowing the classes beforehand."""
    import torch

    from pseudolabel.pipelines.commands.train import _truth_table

    table = torch.zeros((3, 0), dtype=torch.float64)
    table = _truth_table(table, torch.tensor([0, 1]), torch.tensor([0, 1]))
    table = _truth_table(table, torch.tensor([2, 2, 0]), torch.tensor([4, 4, 0]))
    expected = np.zeros((3, 5))
    expected[0, 0], expected[1, 1], expected[2, 4] = 2, 1, 2
    np.testing.assert_array_equal(table.numpy(), expected)
    with pytest.raises(ValueError, match="negative class id"):
        _truth_table(table, torch.tensor([0]), torch.tensor([-1]))
