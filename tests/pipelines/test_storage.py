import pytest

from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.storage import resolve


def test_local_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = resolve("data")
    assert loc.url == str(tmp_path / "data") and loc.is_local


def test_contains(tmp_path):
    root = resolve(str(tmp_path / "in"))
    assert root.contains(resolve(str(tmp_path / "in" / "out")))
    assert root.contains(root)
    assert not root.contains(resolve(str(tmp_path / "input2")))
    assert not root.contains(resolve("memory://in/out"))


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    loc = resolve(str(tmp_path / "a" / "b.bin"))
    loc.write_bytes(b"one")
    loc.write_bytes(b"two")
    assert loc.read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]


def test_memory_filesystem_roundtrip():
    loc = resolve("memory://bucket/x")
    loc.join("f.parquet").write_bytes(b"1")
    loc.join("_SUCCESS").write_bytes(b"")
    assert [f.url for f in loc.files([".parquet"])] == ["memory://bucket/x/f.parquet"]
    loc.remove()
    assert not loc.exists()


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(InputError, match="cannot open nosuch://x"):
        resolve("nosuch://x")
