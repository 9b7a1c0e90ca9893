"""The ``pseudolabel`` command line.

    pseudolabel run --input URL --output URL --k K [flags]    (flags: pseudolabel run --help)
    pseudolabel demo                                          (a small end-to-end job)

Every ``run`` flag is a RunConfig field; ``--config FILE`` supplies any of them as YAML
keys, and flags given on the command line win. Works the same as
``ray job submit --working-dir . -- python -m pipelines.cli run ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from pipelines import config as cfg
from pipelines.errors import PseudolabelError

log = logging.getLogger("pseudolabel")


def _flag_type(annotation: str):
    base = annotation.replace(" | None", "")
    return {"int": int, "float": float, "str": str, "dict": json.loads}[base]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of settings (e.g. cluster_configs/local.yaml)")
    for f in cfg.fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        kwargs = {"type": _flag_type(f.type), "default": None, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        elif f.type.startswith(("int", "float")):
            kwargs["metavar"] = "N" if f.type.startswith("int") else "X"
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> cfg.RunConfig:
    values = cfg.load_yaml(args.config) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in cfg.fields()}
    return cfg.build(values, **overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import run
    from pipelines.summary import text_summary

    config = config_from_args(args)
    manifest = run(config)
    print(text_summary(manifest, config.output), flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.errors import InputError
    from pipelines.output import RunOutput
    from pipelines.report import write_report
    from pipelines.storage import resolve

    options = json.loads(args.storage_options) if args.storage_options else {}
    output = RunOutput(resolve(args.output, options))
    if not output.committed():
        raise InputError(f"{output.root.url} has no _SUCCESS: not a finished run")
    print(write_report(output, output.manifest(), options), flush=True)
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from pipelines.curate import curate, parse_levels, summary

    levels = parse_levels(args.levels)
    args.k = args.k or levels[0]
    config = config_from_args(args)
    manifest = curate(config, levels, args.sample_size, args.strategy)
    print(summary(manifest, config.output), flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.storage_options:
        values["storage_options"] = json.loads(args.storage_options)
    metrics = train(TrainConfig(**values))
    last = metrics["epochs"][-1]
    print(
        f"pseudolabel train: {last['epoch']} epochs, loss {last['loss']:.4f}, held-out "
        f"agreement with the pseudo-labels {last['heldout_agreement']:.3f}"
        + (
            f", accuracy vs truth {last['heldout_accuracy']:.3f}"
            if "heldout_accuracy" in last
            else ""
        ),
        flush=True,
    )
    for name, scores in metrics.get("comparison", {}).items():
        print(f"  probe accuracy, {name:>15}: {scores['probe_accuracy']:.3f}", flush=True)
    for r in metrics.get("rounds", []):
        print(f"  round {r['round']}: NMI to the previous labels {r['nmi_to_previous']:.4f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    run_demo(
        args.dir, rows=args.rows, dim=args.dim, k=args.k, shards=args.shards, workers=args.workers
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pseudolabel",
        description="Cluster sharded embeddings on Ray and write pseudo-labels.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="fit k-means on the input and label every row")
    add_config_flags(run)
    run.set_defaults(func=cmd_run)

    curate = sub.add_parser(
        "curate", help="hierarchical k-means and a balanced sample of ids (data curation)"
    )
    curate.add_argument(
        "--levels",
        required=True,
        metavar="K1,K2,...",
        help="clusters per level, shrinking: e.g. 10000,1000,100",
    )
    curate.add_argument("--sample-size", type=int, required=True, metavar="N", help="ids to select")
    curate.add_argument(
        "--strategy",
        choices=("random", "closest"),
        default="random",
        help="within a level-1 cluster: random ids, or the closest to it",
    )
    add_config_flags(curate)
    curate.set_defaults(func=cmd_curate)

    train = sub.add_parser("train", help="Ray Train a head on the pseudo-labels of a run")
    train.add_argument("--input", required=True, metavar="URL", help="the embeddings")
    train.add_argument(
        "--labels", required=True, metavar="RUN_URL", help="a finished run's --output"
    )
    train.add_argument("--output", required=True, metavar="URL")
    train.add_argument("--head", choices=("linear", "mlp"), help="default: mlp")
    train.add_argument("--hidden", type=int, metavar="N", help="MLP width (default 256)")
    train.add_argument("--epochs", type=int, metavar="E", help="default 5")
    train.add_argument("--workers", type=int, metavar="W", help="Ray Train workers (2)")
    train.add_argument("--cpus-per-worker", type=float, metavar="X", help="default 0.5")
    train.add_argument("--batch-size", type=int, metavar="N", help="default 256")
    train.add_argument("--lr", type=float, metavar="X", help="Adam learning rate (1e-2)")
    train.add_argument("--label-column", metavar="C", help="label (default) or nearest_label")
    train.add_argument(
        "--truth-column",
        metavar="C",
        help="score against it: held-out accuracy after Hungarian matching",
    )
    train.add_argument("--heldout", type=float, metavar="X", help="held-out share (0.1)")
    train.add_argument(
        "--rounds", type=int, metavar="R", help="DeepCluster rounds: re-embed, re-cluster, retrain"
    )
    train.add_argument(
        "--compare",
        action="store_true",
        default=None,
        help="also train on nearest-centroid and random labels; probe all",
    )
    train.add_argument("--seed", type=int, metavar="S")
    train.add_argument("--storage-options", help="fsspec options as JSON")
    train.set_defaults(func=cmd_train)

    report = sub.add_parser("report", help="write report.html for a finished run, print a summary")
    report.add_argument("output", metavar="OUTPUT", help="the run's --output")
    report.add_argument("--storage-options", help="fsspec options as JSON")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="generate a small sharded dataset and run the whole job")
    demo.add_argument("--dir", default="demo_output", help="where to write input and output")
    demo.add_argument("--rows", type=int, default=100_000)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--k", type=int, default=32)
    demo.add_argument("--shards", type=int, default=8)
    demo.add_argument("--workers", type=int, default=None)
    demo.set_defaults(func=cmd_demo)
    return parser


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    try:
        return args.func(args)
    except Exception as e:
        cause = _user_error(e)
        if cause is None:
            raise
        print(f"pseudolabel: error: {cause}", file=sys.stderr, flush=True)
        return 2


def _user_error(e: BaseException) -> PseudolabelError | None:
    """The PseudolabelError behind ``e``, unwrapping Ray's task errors."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, PseudolabelError) and not hasattr(e, "cause"):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


if __name__ == "__main__":
    sys.exit(main())
