"""One installed package: ``pseudolabel`` with ``ops`` and ``pipelines`` inside it, and
nothing generic at the top of site-packages; ``python -m pseudolabel`` is the CLI."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_holds_one_package_with_every_module(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("pseudolabel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"pseudolabel", wheel.name.split("-py")[0] + ".dist-info"}, tops
    # Every module of the source tree is in the wheel, under pseudolabel/ (the packages
    # list in pyproject.toml misses none).
    source = {
        f"pseudolabel/{p.relative_to(ROOT).as_posix()}"
        for room in ("ops", "pipelines")
        for p in (ROOT / room).rglob("*.py")
    } | {f"pseudolabel/{p.name}" for p in (ROOT / "pseudolabel").glob("*.py")}
    assert source <= set(names), sorted(source - set(names))


def test_python_dash_m_is_the_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pseudolabel", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the installed package, not the checkout's folder
    )
    assert out.returncode == 0, out.stderr
    assert "--input URL" in out.stdout and "--balanced" in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('ops'), "
         "u.find_spec('pipelines'))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )  # fmt: skip
    assert probe.stdout.split() == ["None", "None"]  # no top-level ops or pipelines
