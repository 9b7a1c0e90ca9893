"""Object storage against a real S3 server on loopback (moto), with injected failures."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.errors import StorageError
from tests.data import mixture, write_parquet_shards
from tests.pipelines.conftest import cli, fast_config


@pytest.fixture
def s3_input(s3, bucket, tmp_path):
    x, truth = mixture(3000, 8, 6, seed=11)
    write_parquet_shards(tmp_path / "in", x, shards=3, truth=truth, row_group_rows=400)
    s3.fs().put(str(tmp_path / "in") + "/", f"{bucket}/emb/", recursive=True)
    return f"s3://{bucket}/emb", x


def read_labels(fs, prefix):
    tables = []
    for key in sorted(fs.find(f"{prefix}/labels")):
        with fs.open(key, "rb") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    return tables


def test_s3_in_s3_out(ray_local, s3, bucket, s3_input):
    url, x = s3_input
    out = f"s3://{bucket}/runs/one"
    manifest = run(
        fast_config(input=url, output=out, k=6, storage_options=s3.options(), topk=2, balanced=True)
    )
    fs = s3.fs()
    names = {k.rsplit("/", 1)[-1] for k in fs.ls(f"{bucket}/runs/one")}
    assert {
        "_SUCCESS",
        "manifest.json",
        "centroids.npy",
        "duals.npy",
        "labels",
        "_checkpoints",
    } <= names
    ids = np.concatenate([t.column("id").to_numpy() for t in read_labels(fs, out)])
    assert np.array_equal(np.sort(ids), np.arange(len(x)))
    # Every write stayed under --output: the bucket holds the input and the run only.
    assert all(k.startswith((f"{bucket}/emb/", f"{bucket}/runs/one/")) for k in fs.find(bucket))
    text = fs.cat(f"{bucket}/runs/one/manifest.json").decode()
    assert "not-a-real-secret" not in text
    assert json.loads(text)["config"]["storage_options"]["secret"] == "<redacted>"
    assert manifest["rows"]["output"] == len(x)

    # The report rebuilt from S3, with the endpoint and keys from --storage-options.
    fs.rm(f"{bucket}/runs/one/report.html")
    cli("report", out, "--storage-options", json.dumps(s3.options()))
    assert "<h2>Cluster sizes</h2>" in fs.cat(f"{bucket}/runs/one/report.html").decode()


def test_transient_slowdowns_are_retried(ray_local, s3, bucket, s3_input):
    url, x = s3_input
    s3.proxy.fail_every = 12  # every 12th request, of every kind, gets 503 SlowDown
    manifest = run(
        fast_config(
            input=url,
            output=f"s3://{bucket}/runs/flaky",
            k=6,
            storage_options=s3.options(),
            iterations=2,
        )
    )
    assert s3.proxy.failed >= 5
    assert manifest["rows"]["output"] == len(x)


def test_a_slowdown_storm_fails_with_a_clear_error(s3, bucket, s3_input):
    url, _ = s3_input
    s3.proxy.fail_next = 200  # far more 503s in a row than the retries absorb
    options = {**s3.options(), "config_kwargs": {"retries": {"max_attempts": 2}}}
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match="the object store refused"):
        run(
            fast_config(input=url, output=f"s3://{bucket}/runs/storm", k=6, storage_options=options)
        )
    assert time.perf_counter() - t0 < 60


def test_read_timeouts_are_retried(ray_local, s3, bucket, s3_input):
    url, x = s3_input
    options = {**s3.options(), "config_kwargs": {"read_timeout": 1}}
    s3.proxy.stall_next, s3.proxy.stall_seconds = 3, 3.0
    manifest = run(
        fast_config(
            input=url, output=f"s3://{bucket}/runs/slow", k=6, storage_options=options, iterations=2
        )
    )
    assert s3.proxy.stalled == 3 and manifest["rows"]["output"] == len(x)


def test_bad_credentials_fail_fast_without_leaking(s3, bucket, s3_input):
    url, _ = s3_input
    s3.proxy.deny_key = "BADKEY"
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match="access denied: check the credentials") as err:
        run(
            fast_config(
                input=url,
                output=f"s3://{bucket}/runs/denied",
                k=6,
                storage_options=s3.options(key="BADKEY"),
            )
        )
    assert time.perf_counter() - t0 < 30
    assert "not-a-real-secret" not in str(err.value) and "BADKEY" not in str(err.value)


@pytest.mark.parametrize("side", ["input", "output"])
def test_missing_bucket(s3, bucket, s3_input, side):
    url, _ = s3_input
    paths = {"input": url, "output": f"s3://{bucket}/runs/x"}
    paths[side] = "s3://no-such-bucket-here/prefix"
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        run(fast_config(k=6, storage_options=s3.options(), **paths))


def test_unreachable_endpoint_is_bounded(bucket):
    from tests.s3server import free_port

    options = {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match="cannot reach the object store"):
        run(
            fast_config(
                input=f"s3://{bucket}/in", output=f"s3://{bucket}/out", k=2, storage_options=options
            )
        )
    assert time.perf_counter() - t0 < 60
