"""The ``pseudolabel`` command line: a thin layer over the Python API and the commands.

    pseudolabel run --input URL --output URL --k K [flags]    (flags: pseudolabel run --help)
    pseudolabel curate ... | train ... | report OUTPUT | demo

The flags of ``run``, ``curate`` and ``train`` are the fields of their settings
dataclasses (``pipelines.config``); ``--config FILE`` supplies any of them as YAML keys,
and flags given on the command line win. ``python -m pseudolabel`` is the same program
(``ray job submit ... -- python -m pseudolabel run ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from pseudolabel.pipelines import config as cfg
from pseudolabel.pipelines.errors import ConfigError, PseudolabelError

log = logging.getLogger("pseudolabel")


def _flag_type(annotation: str):
    base = annotation.replace(" | None", "")
    return {"int": int, "float": float, "str": str, "dict": json.loads}[base]


def add_config_flags(parser: argparse.ArgumentParser, settings: type = cfg.RunConfig) -> None:
    """One flag per field of the ``settings`` dataclass, and ``--config FILE``."""
    example = " (e.g. cluster_configs/local.yaml)" if settings is cfg.RunConfig else ""
    parser.add_argument(
        "--config", help=f"YAML file of settings, keyed by these flags' names{example}"
    )
    for f in cfg.fields(settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = _with_default(f)
        if f.type in ("bool", "bool | None"):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        kwargs: dict[str, Any] = {"type": _flag_type(f.type), "default": None, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        elif f.type.startswith(("int", "float")):
            kwargs["metavar"] = "N" if f.type.startswith("int") else "X"
        parser.add_argument(flag, **kwargs)
    if any(f.name == "storage_options" for f in cfg.fields(settings)):
        add_storage_options_file(parser)


def _with_default(f: Any) -> str:
    """A flag's help with what it is when not given: "(required)", or its default
    (unless the text already says it, as "default: one per CPU" does)."""
    text = f.metadata.get("help", "")
    if f.metadata.get("required"):
        return f"{text} (required)"
    if "default" in text:
        return text
    if f.metadata.get("json"):
        return text  # options may hold secrets: never echo them, not even a default
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif default is None or default == "":
        shown = "none"
    else:
        shown = default
    return f"{text} (default: {shown})"


def add_storage_options_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options-file",
        metavar="FILE",
        help="fsspec options as a JSON or YAML file: keeps keys and secrets out of the "
        f"command line (or set {STORAGE_OPTIONS_ENV} to the JSON)",
    )


# Storage options also come from here: a secret in argv shows in the process list,
# Ray's job table and the job's log; an environment variable (from a Kubernetes Secret,
# say) or a file does not.
STORAGE_OPTIONS_ENV = "PSEUDOLABEL_STORAGE_OPTIONS"
SECRET_WORDS = ("secret", "key", "token", "password", "credential", "session")


def storage_options_from(args: argparse.Namespace) -> dict[str, Any] | None:
    """Storage options merged key by key: the environment variable, then the file, then
    the flag (the most explicit wins); None when none of them is given. Warns when a
    secret-looking key arrives on the command line."""
    import os

    import yaml

    layers: list[tuple[str, Any]] = []
    if os.environ.get(STORAGE_OPTIONS_ENV):
        layers.append((f"${STORAGE_OPTIONS_ENV}", os.environ[STORAGE_OPTIONS_ENV]))
    path = getattr(args, "storage_options_file", None)
    if path:
        try:
            with open(path) as f:
                layers.append((f"--storage-options-file {path}", f.read()))
        except OSError as e:
            raise ConfigError(f"--storage-options-file {path}: {e.strerror}") from None
    if getattr(args, "storage_options", None) is not None:
        layers.append(("--storage-options", args.storage_options))
    if not layers:
        return None
    merged: dict[str, Any] = {}
    for name, value in layers:
        try:
            value = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError as e:
            raise ConfigError(f"storage options from {name}: not JSON or YAML ({e})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"storage options from {name} must be a mapping")
        merged.update(value)
        secrets = sorted(k for k in value if any(w in str(k).lower() for w in SECRET_WORDS))
        if name == "--storage-options" and secrets:
            log.warning(
                "--storage-options carries %s on the command line, where the process "
                "list, Ray's job table and the job log show it: pass it with "
                "--storage-options-file or %s instead",
                ", ".join(repr(k) for k in secrets),
                STORAGE_OPTIONS_ENV,
            )
    return merged


def config_from_args(args: argparse.Namespace, settings: type = cfg.RunConfig):
    """The validated settings: defaults <- the --config YAML <- the flags (storage
    options: <- $PSEUDOLABEL_STORAGE_OPTIONS <- --storage-options-file <- the flag)."""
    values = cfg.load_yaml(args.config, settings) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in cfg.fields(settings)}
    for f in cfg.fields(settings):  # before any check of the value a default would fail
        if f.metadata.get("required") and overrides[f.name] is None and f.name not in values:
            raise ConfigError(f"--{f.name.replace('_', '-')} is required: {f.metadata['help']}")
    if "storage_options" in overrides:
        overrides["storage_options"] = storage_options_from(args)
    return cfg.build_config(settings, values, **overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from pseudolabel.pipelines.api import run_config
    from pseudolabel.pipelines.commands.summary import text_summary

    config = config_from_args(args)
    result = run_config(config)
    print(text_summary(result.manifest, result.output), flush=True)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from pseudolabel.pipelines.commands.label import label
    from pseudolabel.pipelines.commands.summary import text_summary

    config = config_from_args(args, cfg.LabelConfig)
    manifest = label(config)
    print(text_summary(manifest, config.output), flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pseudolabel.pipelines.commands.report import write_report
    from pseudolabel.pipelines.errors import InputError
    from pseudolabel.pipelines.io.layout import RunOutput
    from pseudolabel.pipelines.io.storage import resolve

    options = storage_options_from(args) or {}
    output = RunOutput(resolve(args.output, options))
    if not output.committed():
        raise InputError(f"{output.root.url} has no _SUCCESS: not a finished run")
    print(write_report(output, output.manifest(), options), flush=True)
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from pseudolabel.pipelines.commands.curate import curate, summary

    config = config_from_args(args, cfg.CurateConfig)
    manifest = curate(config)
    print(summary(manifest, config.output), flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pseudolabel.pipelines.commands.train import train

    metrics = train(config_from_args(args, cfg.TrainConfig))
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
    from pseudolabel.pipelines.commands.demo import run_demo

    run_demo(
        args.dir, rows=args.rows, dim=args.dim, k=args.k, shards=args.shards, workers=args.workers
    )
    return 0


QUIET_HELP = "only warnings and the summary (before or after the subcommand)"
VERBOSE_HELP = "Ray's own logging too: its INFO lines, workers' output, Ray Data's banners"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pseudolabel",
        description="Cluster sharded embeddings on Ray and write pseudo-labels.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    # -q/-v after the subcommand too; SUPPRESS keeps the top level's value when absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help=QUIET_HELP)  # fmt: skip
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=VERBOSE_HELP)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    commands = [  # (name, what it does, its settings, its function)
        ("run", "fit k-means on the input and label every row", cfg.RunConfig, cmd_run),
        ("label", "label rows with the centroids (and duals) of an earlier run; fit nothing",
         cfg.LabelConfig, cmd_label),
        ("curate", "hierarchical k-means and a balanced sample of ids (data curation)",
         cfg.CurateConfig, cmd_curate),
        ("train", "Ray Train a head on the pseudo-labels of a run", cfg.TrainConfig, cmd_train),
    ]  # fmt: skip
    for name, text, settings, func in commands:
        command = sub.add_parser(name, parents=[common], help=text)
        add_config_flags(command, settings)
        command.set_defaults(func=func)

    report = sub.add_parser(
        "report", parents=[common], help="write report.html for a finished run, print a summary"
    )
    report.add_argument("output", metavar="OUTPUT", help="the run's --output")
    report.add_argument("--storage-options", help="fsspec options as JSON")
    add_storage_options_file(report)
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser(
        "demo", parents=[common], help="generate a small sharded dataset and run the whole job"
    )
    demo.add_argument(
        "--dir",
        default="demo_output",
        help="where to write input and output (default: %(default)s)",
    )
    demo.add_argument(
        "--rows", type=int, default=100_000, help="rows to generate (default: %(default)s)"
    )
    demo.add_argument(
        "--dim", type=int, default=64, help="embedding dimension (default: %(default)s)"
    )
    demo.add_argument("--k", type=int, default=32, help="clusters (default: %(default)s)")
    demo.add_argument(
        "--shards", type=int, default=8, help="parquet files to write (default: %(default)s)"
    )
    demo.add_argument(
        "--workers", type=int, default=None, help="worker actors (default: one per CPU)"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    from pseudolabel.pipelines import progress

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    progress.configure(quiet=quiet, verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("-q and -v: choose one")
    setup_logging(args.quiet, args.verbose)
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
