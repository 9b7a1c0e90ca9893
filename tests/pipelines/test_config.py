import dataclasses
from pathlib import Path

import pytest

from pseudolabel.pipelines import config as cfg
from pseudolabel.pipelines.cli import build_parser, config_from_args
from pseudolabel.pipelines.errors import ConfigError

LOCAL = Path(__file__).parents[2] / "cluster_configs" / "local.yaml"


def test_local_yaml_equals_builtin_defaults():
    values = cfg.load_yaml(LOCAL)
    defaults = {
        f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in cfg.fields()
        if not f.metadata.get("required")
    }
    assert values == defaults


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "k: 7\niterations: 3\nspherical: true\nbalanced: true\noverwrite: true\n"
        "allow_incomplete_previous: true\ninput: a\noutput: b\n"
    )
    args = build_parser().parse_args(
        ["run", "--config", str(path), "--iterations", "9", "--no-spherical", "--no-balanced",
         "--no-overwrite", "--no-allow-incomplete-previous"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.k, config.iterations, config.spherical) == (7, 9, False)
    assert not (config.balanced or config.overwrite or config.allow_incomplete_previous)
    # train's switch, the same way
    path.write_text("compare: true\ntruth_column: t\ninput: a\nlabels: l\noutput: b\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--no-compare"])
    assert config_from_args(args, cfg.TrainConfig).compare is False


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("k: 3\nitersations: 4\n")
    with pytest.raises(ConfigError, match=r"unknown settings \['itersations'\]"):
        cfg.load_yaml(path)


def test_bad_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("k: [3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfg.load_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.load_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"output": ""}, "--output is required"),
        ({"k": 0}, "--k must be at least 1"),
        ({"topk": 9}, "--topk 9 exceeds --k 3"),
        ({"workers": 0}, "--workers must be at least 1"),
        ({"algorithm": "dbscan"}, "algorithm must be one of"),
        ({"tol": -1.0}, "--tol must be >= 0"),
        (
            {"algorithm": "minibatch", "resampling_steps": 2},
            r"--resampling-steps needs --algorithm lloyd",
        ),
        ({"fit_sample": "-5"}, "--fit-sample must be a row count or auto"),
        ({"algorithm": "minibatch", "fit_sample": "auto"}, "--fit-sample needs --algorithm"),
        ({"reduce": "allreduce"}, "reduce must be one of"),
        ({"algorithm": "minibatch", "reduce": "scatter"}, "--reduce needs --algorithm lloyd"),
        ({"label_from": "disk"}, "label_from must be one of"),
        ({"algorithm": "minibatch", "label_from": "workers"}, "--label-from workers needs"),
        ({"fit_sample": "auto", "label_from": "workers"}, "--label-from workers needs"),
    ],
)
def test_validation_messages(overrides, message):
    values = {"input": "a", "output": "b", "k": 3, **overrides}
    with pytest.raises(ConfigError, match=message):
        cfg.RunConfig(**values).validate()


def test_manifest_view_redacts_storage_options():
    config = cfg.build(input="a", output="b", k=2, storage_options={"secret": "hunter2"})
    assert "hunter2" not in repr(config)
    assert config.to_dict()["storage_options"] == {"secret": "<redacted>"}


def test_fit_sample_rows():
    """auto: 256 rows per centroid; 0, or a sample at least as large as the input: all."""
    assert cfg.build(input="a", output="b", k=12, fit_sample="auto").fit_sample_rows(6000) == 3072
    assert cfg.build(input="a", output="b", k=24, fit_sample="auto").fit_sample_rows(6000) == 0
    assert cfg.build(input="a", output="b", k=2, fit_sample=500).fit_sample_rows(6000) == 500
    assert cfg.build(input="a", output="b", k=2).fit_sample_rows(6000) == 0


def test_label_source():
    """auto labels on the fit's workers when they hold every row (Lloyd, no sample taken)
    and no --keep-columns would have to be held too; else a streaming pass reads again."""
    run = dict(input="a", output="b", k=12)
    assert cfg.build(**run).label_source(6000) == "workers"
    assert cfg.build(**run, algorithm="minibatch").label_source(6000) == "stream"
    # in this process the mini-batch fit's worker holds every row
    assert cfg.build(**run, algorithm="minibatch").label_source(6000, backend="local") == "workers"
    assert cfg.build(**run, fit_sample="auto").label_source(6000) == "stream"  # 3072 rows
    assert cfg.build(**run, fit_sample="auto").label_source(3000) == "workers"  # all rows
    assert cfg.build(**run, keep_columns="colour").label_source(6000) == "stream"
    kept = cfg.build(**run, keep_columns="colour", label_from="workers")
    assert kept.label_source(6000) == "workers"
    assert cfg.build(**run, label_from="stream").label_source(6000) == "stream"
    # Spherical rows held in float16 are rounded unit vectors: the stream's are exact.
    assert cfg.build(**run, spherical=True).label_source(6000, "float16") == "stream"
    assert (
        cfg.build(**run, spherical=True, dtype="float32").label_source(6000, "float16") == "workers"
    )
    assert cfg.build(**run, spherical=True, dtype="float16").label_source(6000) == "stream"
    assert cfg.build(**run, dtype="float16").label_source(6000) == "workers"  # l2: as read


def test_empty_id_column_means_row_numbers():
    assert cfg.build(input="a", output="b", k=2, id_column="").id_column is None


def test_storage_options_from_the_environment_a_file_and_the_flag(tmp_path, monkeypatch, caplog):
    """Secrets can stay off the command line (a file, an environment variable); one that
    arrives there gets a warning. Layers merge key by key, the most explicit winning."""
    options = tmp_path / "storage.yaml"
    options.write_text("endpoint_url: http://minio:9000\nkey: AK\nsecret: SK\n")
    monkeypatch.setenv("PSEUDOLABEL_STORAGE_OPTIONS", '{"anon": false, "key": "from-env"}')
    base = ["run", "--input", "in", "--output", "out", "--k", "2"]
    parser = build_parser()
    from_file = parser.parse_args([*base, "--storage-options-file", str(options)])
    with caplog.at_level("WARNING", logger="pseudolabel"):
        config = config_from_args(from_file)
    assert config.storage_options == {
        "anon": False, "key": "AK", "secret": "SK", "endpoint_url": "http://minio:9000"
    }  # fmt: skip
    assert "command line" not in caplog.text
    assert config.to_dict()["storage_options"]["secret"] == "<redacted>"
    in_argv = parser.parse_args([*base, "--storage-options", '{"secret": "x"}'])
    with caplog.at_level("WARNING", logger="pseudolabel"):
        config = config_from_args(in_argv)
    assert config.storage_options == {"anon": False, "key": "from-env", "secret": "x"}
    assert "carries 'secret' on the command line" in caplog.text
    with pytest.raises(ConfigError, match="must be a mapping"):
        monkeypatch.setenv("PSEUDOLABEL_STORAGE_OPTIONS", "[1, 2]")
        config_from_args(parser.parse_args(base))
