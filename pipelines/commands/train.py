"""``pseudolabel train``: Ray Train fits a head on (embedding, pseudo-label).

Ray Data reads the embeddings (the same validated reader) and the committed run's label
files and joins them by id, once per command; a held-out share is split off by a hash
of the id. A ``TorchTrainer`` trains the head (linear, or an MLP) on several workers,
reports the loss and held-out metrics every epoch and checkpoints through Ray Train
under ``OUTPUT/_train/<name>``: a rerun with the same output resumes from the last one.

    OUTPUT/head.npz, head.json   the head's weights (no pickle) and its shape
    OUTPUT/metrics.json          per-epoch history; heldout_accuracy with a truth column
    OUTPUT/rounds/R/             DeepCluster-style rounds: features, the run on them
    OUTPUT/_SUCCESS              written last

With a truth column, ``--compare`` also trains heads on the nearest-centroid labels and
on random labels (beside the main head, in the same Ray Train run), and scores every
head's features with a linear probe on the truth. The truth's classes are not counted first:
each worker's confusion table widens as class ids turn up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tempfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from pseudolabel.ops.metrics import contingency, nmi
from pseudolabel.pipelines.config import TrainConfig
from pseudolabel.pipelines.errors import ConfigError, InputError
from pseudolabel.pipelines.io.datasource import embedding_dataset
from pseudolabel.pipelines.io.fingerprint import refuse_stale, settings_fingerprint
from pseudolabel.pipelines.io.layout import LABELS, SUCCESS, RunOutput
from pseudolabel.pipelines.io.plan import SUFFIXES, make_plan
from pseudolabel.pipelines.io.storage import Location, resolve

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pseudolabel")

PROBE_ROWS = 20_000  # rows per split brought to the driver for the linear probe


# ------------------------------------------------------------------------------ data


def _crc(values: np.ndarray, salt: bytes = b"") -> np.ndarray:
    """CRC32 of each value's text: the same in every process and every run."""
    return np.fromiter((zlib.crc32(salt + str(v).encode()) for v in values), np.uint32, len(values))


def _split(
    batch: dict[str, np.ndarray],
    heldout: bool,
    fraction: float,
    targets: dict[str, tuple[str, int]],
) -> dict[str, np.ndarray]:
    """map_batches: keep the held-out rows (or the others) and add one column per head
    to train: ``targets`` maps it to (label column, 0), or to ("", k) for the baseline, a
    random label in [0, k) per id, fixed across epochs and runs."""
    keep = (_crc(batch["id"]) < fraction * 2**32) == heldout
    out = {k: v[keep] for k, v in batch.items()}
    for name, (label_column, random_k) in targets.items():
        if random_k:
            out[name] = (_crc(out["id"], b"random") % random_k).astype(np.int64)
        else:
            out[name] = out[label_column].astype(np.int64)
    return out


def _plan(cfg: TrainConfig, extra_columns: tuple[str, ...] = ()) -> tuple:
    """(plan, read settings) of the embeddings, read as float32."""
    settings = cfg.read_settings(extra_columns)
    plan = make_plan(cfg.input, settings)
    return plan, dataclasses.replace(settings, dim=plan.dim, dtype="float32")


def joined_dataset(
    cfg: TrainConfig, labels_url: str, columns: list[str], input_columns: tuple[str, ...] = ()
) -> tuple:
    """(embeddings, with ``input_columns`` of the input, joined to the label columns by
    id, materialised; dim)."""
    plan, settings = _plan(cfg, extra_columns=input_columns)
    if input_columns and plan.fmt != "parquet":
        raise ConfigError(
            f"--truth-column {input_columns[0]!r}: .npy input holds no columns; run "
            f"`pseudolabel run` with --truth-column to carry it into the labels"
        )
    labels_root = resolve(labels_url, cfg.storage_options).join(LABELS)
    labels = ray.data.read_parquet(
        labels_root.path, filesystem=labels_root.arrow_fs(), columns=["id", *columns]
    )
    joined = embedding_dataset(plan, settings).join(
        labels, join_type="inner", num_partitions=max(2, cfg.workers), on=("id",)
    )
    return joined.materialize(), plan.dim


def splits(joined, cfg: TrainConfig, targets: dict[str, tuple[str, int]]) -> dict:
    """Train and held-out parts, with a target column per head (see ``_split``). Plain
    tasks with half a CPU: beside the Train workers they never hold a CPU between
    batches, so the pass cannot wait on itself."""

    def part(heldout: bool):
        return joined.map_batches(
            _split,
            fn_kwargs={"heldout": heldout, "fraction": cfg.heldout, "targets": targets},
            batch_format="numpy",
            num_cpus=0.5,
        )

    return {"train": part(False), "heldout": part(True)}


# ------------------------------------------------------------------------- training


def _truth_table(table: torch.Tensor, pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Add (pred, truth) counts to a (k, classes) table, widened when a larger class
    id turns up: the classes need not be counted before training."""
    import torch

    if len(truth) and int(truth.min()) < 0:
        raise ValueError(f"the truth column holds a negative class id ({int(truth.min())})")
    classes = int(truth.max()) + 1 if len(truth) else 0
    if classes > table.shape[1]:
        table = torch.nn.functional.pad(table, (0, classes - table.shape[1]))
    table.index_put_((pred, truth), torch.ones(len(pred), dtype=table.dtype), accumulate=True)
    return table


def _train_loop(loop: dict) -> None:
    """Every Ray Train worker: one head per target column, trained on the same batches;
    epochs over its shard, held-out metrics summed over all workers, a checkpoint (each
    head's model and optimiser, and its history) from rank 0."""
    import os

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pseudolabel.ops.metrics import matched_accuracy
    from pseudolabel.ops.probe import make_head

    targets, truth_column = loop["targets"], loop["truth_column"]
    distributed = dist.is_available() and dist.is_initialized()
    models, opts = {}, {}
    for t in targets:
        torch.manual_seed(loop["seed"])  # every head starts from the same weights
        models[t] = ray.train.torch.prepare_model(
            make_head(loop["dim"], loop["k"], loop["head"], loop["hidden"])
        )
        opts[t] = torch.optim.Adam(models[t].parameters(), lr=loop["lr"])

    def inner(t: str) -> torch.nn.Module:  # unwrapped from DDP
        return getattr(models[t], "module", models[t])

    history: dict[str, list] = {t: [] for t in targets}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        for t in targets:
            inner(t).load_state_dict(state["models"][t])
            opts[t].load_state_dict(state["optimizers"][t])
            history[t] = list(state["history"][t])
    done = len(history[targets[0]])
    train, heldout = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("heldout")
    for epoch in range(done, loop["epochs"]):
        total = {t: torch.zeros(3, dtype=torch.float64) for t in targets}  # loss, rows, steps
        for model in models.values():
            model.train()
        for batch in train.iter_torch_batches(
            batch_size=loop["batch_size"],
            local_shuffle_buffer_size=4 * loop["batch_size"],
            local_shuffle_seed=loop["seed"] + epoch,
        ):
            x = batch["embedding"].float()
            for t in targets:
                logits = models[t](x)
                loss = torch.nn.functional.cross_entropy(logits, batch[t].long())
                opts[t].zero_grad()
                loss.backward()
                opts[t].step()
                total[t] += torch.tensor([loss.item() * len(x), len(x), 1], dtype=torch.float64)
        agree = {t: torch.zeros(2, dtype=torch.float64) for t in targets}
        tables = {t: torch.zeros((loop["k"], 0), dtype=torch.float64) for t in targets}
        with torch.no_grad():
            for model in models.values():
                model.eval()
            for batch in heldout.iter_torch_batches(batch_size=4096):
                x = batch["embedding"].float()
                for t in targets:
                    pred = models[t](x).argmax(1)
                    agree[t] += torch.tensor(
                        [(pred == batch[t]).sum().item(), len(pred)], dtype=torch.float64
                    )
                    if truth_column:
                        truth = batch[truth_column].long()
                        tables[t] = _truth_table(tables[t], pred, truth)
        if distributed:
            for t in targets:
                dist.all_reduce(total[t])
                dist.all_reduce(agree[t])
                if truth_column:  # the widest table of any worker, then the sum
                    width = torch.tensor([tables[t].shape[1]])
                    dist.all_reduce(width, op=dist.ReduceOp.MAX)
                    pad = int(width) - tables[t].shape[1]
                    tables[t] = torch.nn.functional.pad(tables[t], (0, pad)).contiguous()
                    dist.all_reduce(tables[t])
        report: dict[str, Any] = {"epoch": epoch + 1}
        for t in targets:
            metrics = {
                "epoch": epoch + 1,
                "loss": float(total[t][0] / max(total[t][1], 1)),
                "train_rows": int(total[t][1]),
                "steps": int(total[t][2]),  # optimiser steps, all workers together
                "heldout_agreement": float(agree[t][0] / max(agree[t][1], 1)),
                "heldout_rows": int(agree[t][1]),
                "resumed_from_epoch": done,
            }
            if truth_column and tables[t].sum() > 0:
                metrics["heldout_accuracy"] = matched_accuracy(tables[t].numpy())
            history[t].append(metrics)
            report.update({f"{t}/{m}": v for m, v in metrics.items() if m != "epoch"})
        with tempfile.TemporaryDirectory() as d:
            saved = None
            if ray.train.get_context().get_world_rank() == 0:
                torch.save(
                    {
                        "models": {t: inner(t).state_dict() for t in targets},
                        "optimizers": {t: opts[t].state_dict() for t in targets},
                        "history": history,
                    },
                    os.path.join(d, "state.pt"),
                )
                saved = ray.train.Checkpoint.from_directory(d)
            ray.train.report(report, checkpoint=saved)


@dataclass
class HeadResult:
    history: list[dict[str, Any]]
    state: dict[str, Any]  # the head's state_dict (tensors)


def train_heads(
    cfg: TrainConfig, joined, targets: dict[str, tuple[str, int]], name: str, dim: int, k: int
) -> dict[str, HeadResult]:
    """One head per entry of ``targets`` (see ``_split``), trained together in one Ray
    Train run on the same batches; resumable under OUTPUT/_train/<name>."""
    import torch
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = resolve(cfg.output, cfg.storage_options).join("_train")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "dim": dim,
            "k": k,
            "head": cfg.head,
            "hidden": cfg.hidden,
            "lr": cfg.lr,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "targets": list(targets),
            "truth_column": cfg.truth_column,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage.path,
            storage_filesystem=storage.arrow_fs(),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=splits(joined, cfg, targets),
    )
    log.info(
        "train[%s]: Ray Train, %d workers, %d epochs, %s head%s",
        name,
        cfg.workers,
        cfg.epochs,
        cfg.head,
        f" on each of {', '.join(targets)}" if len(targets) > 1 else "",
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/state.pt", weights_only=True)
    heads = {}
    for t in targets:
        last = state["history"][t][-1]
        log.info(
            "train[%s]: %d epochs, loss %.4f, held-out agreement %.3f%s",
            t if len(targets) > 1 else name,
            last["epoch"],
            last["loss"],
            last["heldout_agreement"],
            f", accuracy vs truth {last['heldout_accuracy']:.3f}"
            if "heldout_accuracy" in last
            else "",
        )
        heads[t] = HeadResult(list(state["history"][t]), state["models"][t])
    return heads


def train_head(cfg: TrainConfig, joined, label_column: str, name: str, dim: int, k: int):
    """The head on ``label_column``: a run of ``train_heads`` with one target."""
    return train_heads(cfg, joined, {"target": (label_column, 0)}, name, dim, k)["target"]


def _head_module(state: dict, kind: str, hidden: int, dim: int, k: int):
    """A trained head, in eval mode, from its state_dict."""
    from pseudolabel.ops.probe import make_head

    head = make_head(dim, k, kind, hidden)
    head.load_state_dict(state)
    return head.eval()


def _save_head(root: Location, cfg: TrainConfig, state: dict, dim: int, k: int) -> None:
    arrays = {key: value.numpy() for key, value in state.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    root.join("head.npz").write_bytes(buf.getvalue())
    root.join("head.json").write_bytes(
        json.dumps(
            {"head": cfg.head, "hidden": cfg.hidden, "dim": dim, "k": k, "layers": list(arrays)}
        ).encode()
    )


# ------------------------------------------------------------------------ the command


def train(cfg: TrainConfig) -> dict[str, Any]:
    from pseudolabel.pipelines.runtime.session import ray_session

    cfg.validate()
    with ray_session(cfg):
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    run_out = RunOutput(resolve(cfg.labels, cfg.storage_options))
    if not run_out.committed():
        raise InputError(f"--labels {run_out.root.url} has no _SUCCESS: not a finished run")
    manifest = run_out.manifest()
    k = int(manifest["clusters"]["k"])
    columns = [cfg.label_column]
    if cfg.compare and "nearest" in manifest["clusters"]:
        columns.append("nearest_label")
    # The truth comes with the labels when the run carried it, else from the input.
    from_input: tuple[str, ...] = ()
    if cfg.truth_column and manifest["config"].get("truth_column") == cfg.truth_column:
        columns.append(cfg.truth_column)
    elif cfg.truth_column:
        from_input = (cfg.truth_column,)
    out = resolve(cfg.output, cfg.storage_options)
    fingerprint = train_fingerprint(cfg, manifest)
    claim_output(out, fingerprint, cfg.overwrite)
    joined, dim = joined_dataset(cfg, cfg.labels, columns, from_input)
    # --compare's heads train beside the main one, in the same Ray Train run on the same
    # batches: one start-up, one read, and one checkpoint that resumes them all.
    targets = {
        "target": (cfg.label_column, 0),
        **(_compared(cfg, columns, k) if cfg.compare else {}),
    }
    heads = train_heads(cfg, joined, targets, "head", dim, k)
    main = heads.pop("target")
    _save_head(out, cfg, main.state, dim, k)
    metrics: dict[str, Any] = {
        "labels": run_out.root.url,
        "label_column": cfg.label_column,
        "head": cfg.head,
        "epochs": main.history,
        **{
            m: main.history[-1][m]
            for m in ("loss", "heldout_agreement", "heldout_accuracy")
            if m in main.history[-1]
        },
    }
    if cfg.compare:
        metrics["comparison"] = _compare(cfg, joined, {cfg.label_column: main, **heads}, dim, k)
    if cfg.rounds:
        metrics["rounds"] = _rounds(cfg, manifest, main, dim, k)
    metrics["fingerprint"] = fingerprint
    out.join("metrics.json").write_bytes(json.dumps(metrics, indent=2).encode())
    out.join(SUCCESS).write_bytes(b"")
    return metrics


# What a train output holds; _SUCCESS is removed first and written last.
TRAIN_OUTPUTS = ("head.npz", "head.json", "metrics.json", "rounds", "_train")
TRAIN_FINGERPRINT = ("_train", "fingerprint.json")
# Not what the head learns: how training executes; --epochs (more of them continue from
# the last checkpoint); and --rounds, whose heads are trained under their own names.
# --compare is not among them: its heads share the main head's run and checkpoint.
TRAIN_OPERATIONAL = frozenset(
    {"output", "overwrite", "workers", "cpus_per_worker", "storage_options", "epochs", "rounds"}
)


def train_fingerprint(cfg: TrainConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings a head depends on and the input files (as a run's), and the labels
    run it learns from (its fingerprint and when it was made: a recomputed run is new
    labels)."""
    out = settings_fingerprint(cfg, TRAIN_OPERATIONAL, tuple(SUFFIXES))
    labels = manifest.get("fingerprint") or manifest.get("config")
    out["labels_run"] = {
        "created": manifest.get("created"),
        "sha256": hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest(),
    }
    return out


def claim_output(out: Location, fingerprint: dict[str, Any], overwrite: bool) -> None:
    """Before any training: an output that holds another head (other settings, other
    labels) is refused, or with ``overwrite`` removed, ``_SUCCESS`` first so that nothing
    looks finished meanwhile. Then this head's fingerprint is recorded, so that a
    crashed training resumes only as the same training."""
    started = out.join(SUCCESS).exists() or any(out.join(n).exists() for n in TRAIN_OUTPUTS)
    if started and overwrite:
        log.info("--overwrite: removing the previous training at %s", out.url)
        out.join(SUCCESS).remove()
        for name in TRAIN_OUTPUTS:
            out.join(name).remove()
    elif started:
        recorded = out.join(*TRAIN_FINGERPRINT)
        old = json.loads(recorded.read_bytes()) if recorded.exists() else None
        refuse_stale(out.url, "a head trained", old, fingerprint)
    out.join(*TRAIN_FINGERPRINT).write_bytes(json.dumps(fingerprint).encode())


def _compared(cfg: TrainConfig, columns: list[str], k: int) -> dict[str, tuple[str, int]]:
    """--compare's other heads (see ``_split``): random labels, and the nearest-centroid
    labels of a balanced run when the main head is not trained on them."""
    others = {"random": ("", k)}
    if "nearest_label" in columns and cfg.label_column != "nearest_label":
        others["nearest_label"] = ("nearest_label", 0)
    return others


def _compare(cfg, joined, heads: dict[str, HeadResult], dim, k) -> dict:
    """Probe accuracy on the truth of each head's features: pseudo-labels, nearest
    labels, random labels, and the raw embeddings for reference."""
    from pseudolabel.ops.probe import head_features, linear_probe

    def fetch(part) -> tuple[np.ndarray, np.ndarray]:
        batch = part.limit(PROBE_ROWS).take_batch(PROBE_ROWS, batch_format="numpy")
        return np.asarray(batch["embedding"], np.float32), batch[cfg.truth_column]

    base = splits(joined, cfg, {})
    (xt, yt), (xh, yh) = fetch(base["train"]), fetch(base["heldout"])
    report = {"raw_embeddings": {"probe_accuracy": linear_probe(xt, yt, xh, yh)}}
    for name, result in heads.items():
        head = _head_module(result.state, cfg.head, cfg.hidden, dim, k)
        report[name] = {
            "probe_accuracy": linear_probe(
                head_features(head, xt), yt, head_features(head, xh), yh
            ),
            "heldout_accuracy": result.history[-1].get("heldout_accuracy"),
        }
        log.info("compare: %s labels: probe accuracy %.3f", name, report[name]["probe_accuracy"])
    return report


class _Features:
    """map_batches: the head's features as the new embedding (DeepCluster re-embedding);
    other columns (a truth column) pass through."""

    def __init__(self, state: dict, head: str, hidden: int, dim: int, k: int):
        self.head = _head_module(state, head, hidden, dim, k)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from pseudolabel.ops.probe import head_features

        f = head_features(self.head, batch["embedding"])
        columns = {k: pa.array(v) for k, v in batch.items() if k != "embedding"}
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(f.ravel()), f.shape[1])
        return pa.table(columns)


def _rounds(cfg: TrainConfig, manifest: dict, first: HeadResult, dim: int, k: int) -> list:
    """Re-embed with the head, re-cluster with the same run settings, retrain; NMI
    between the labels of consecutive rounds tracks how far the clustering moves."""
    from pseudolabel.pipelines.commands.run import run

    out = resolve(cfg.output, cfg.storage_options)
    truth = (cfg.truth_column,) if cfg.truth_column else ()
    plan, settings = _plan(cfg, extra_columns=truth)  # the truth is carried through
    previous_url, state, rounds = cfg.labels, first.state, []
    for r in range(1, cfg.rounds + 1):
        features = out.join("rounds", str(r), "features")
        features.remove()
        embedding_dataset(plan, settings).map_batches(
            _Features,
            fn_constructor_args=(state, cfg.head, cfg.hidden, dim, k),
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
        ).write_parquet(features.path, filesystem=features.arrow_fs())
        run_url = out.join("rounds", str(r), "run").url
        run(_round_config(manifest["config"], cfg, features.url, run_url, r))
        rows = manifest["input"]["rows"]
        agreement = nmi(_contingency(previous_url, run_url, cfg.storage_options, rows))
        joined, _ = joined_dataset(
            cfg, run_url, [cfg.label_column] + ([cfg.truth_column] if cfg.truth_column else [])
        )
        head = train_head(cfg, joined, cfg.label_column, f"round-{r}", dim, k)
        state = head.state
        rounds.append(
            {
                "round": r,
                "nmi_to_previous": agreement,
                **{
                    m: head.history[-1][m]
                    for m in ("loss", "heldout_accuracy")
                    if m in head.history[-1]
                },
            }
        )
        log.info("round %d: NMI to the previous labels %.4f", r, agreement)
        previous_url = run_url
    return rounds


def _round_config(previous: dict, cfg: TrainConfig, input_url: str, output_url: str, r: int):
    """The first run's settings (from its manifest) for round r's re-embedded rows."""
    from pseudolabel.pipelines.config import RunConfig, run_settings

    values = run_settings(previous)
    values.update(
        input=input_url,
        output=output_url,
        seed=cfg.seed + r,
        truth_column=cfg.truth_column,
        id_column="id",  # the features are written with the run's id column as "id"
        embedding_column="embedding",
        init_centroids=None,
        previous_run=None,
        storage_options=cfg.storage_options,  # the manifest holds them redacted
        overwrite=True,
    )
    return RunConfig(**values).validate()


def _contingency(a_url: str, b_url: str, options: dict, rows: int) -> np.ndarray:
    """Labels of two runs of about ``rows`` rows, joined by id, as a contingency table:
    the join runs in Ray tasks partitioned by id, the driver gets the pairs' counts."""
    from pseudolabel.pipelines.runtime.label_partitions import label_contingency

    a, b = (resolve(u, options).join(LABELS).files([".parquet"]) for u in (a_url, b_url))
    return contingency(*label_contingency(a, b, rows))
