"""The top-level ``passes/`` folder installs as ``fqt_compile.passes`` (setup.py ``package_dir``),
and the wheel declares the ``fqt`` torch.compile backend.

The wheel test builds the real wheel from the repository root and installs it, without
dependencies, into a fresh virtual environment; torch comes from this environment's
site-packages through PYTHONPATH (entries there are not site directories, so this
environment's editable-install hook, a ``.pth`` file, is not run and cannot shadow the wheel).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_passes_import_in_this_environment():
    import fqt_compile
    import fqt_compile.passes

    # Editable install: the repository's passes/ folder; regular install: fqt_compile/passes.
    passes_dir = Path(fqt_compile.passes.__file__).resolve().parent
    assert passes_dir in {(REPO_ROOT / "passes").resolve(), Path(fqt_compile.__file__).resolve().parent / "passes"}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools builds in the tree (build/, fqt_compile.egg-info/); remove what this build
    # created so a stale egg-info cannot shadow the editable install's metadata.
    artifacts = [REPO_ROOT / "build", REPO_ROOT / "fqt_compile.egg-info"]
    created = [p for p in artifacts if not p.exists()]
    try:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO_ROOT)])
    finally:
        for p in created:
            shutil.rmtree(p, ignore_errors=True)
    wheels = list(out.glob("fqt_compile-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(entry_points).decode())
    assert "fqt_compile/passes/__init__.py" in names
    assert not any(n.startswith("passes/") for n in names)  # only under fqt_compile/
    assert "fqt_compile/quantizers.py" in names
    assert parser.has_section("torch_dynamo_backends")
    assert parser.get("torch_dynamo_backends", "fqt").strip() == "fqt_compile.backend:fqt_backend"


def test_wheel_installs_passes_as_fqt_compile_passes(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # This environment's pip installs into the fresh one (pip >= 22.3: --python).
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    probe = (
        "import importlib.metadata as md, fqt_compile, fqt_compile.passes, fqt_compile.passes.insert_qdq;"
        "print(fqt_compile.passes.__file__);"
        "print(fqt_compile.__file__);"
        "print(sorted(e.name for e in md.entry_points(group='torch_dynamo_backends')))"
    )
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"], "PYTHONNOUSERSITE": "1"}
    proc = _run([str(py), "-c", probe], cwd=tmp_path, env=env)
    passes_file, pkg_file, backends = proc.stdout.strip().splitlines()
    venv_root = venv.resolve()
    assert Path(passes_file).resolve().is_relative_to(venv_root), passes_file
    assert Path(passes_file).parent.name == "passes" and Path(passes_file).parent.parent.name == "fqt_compile"
    assert Path(pkg_file).resolve().is_relative_to(venv_root), pkg_file
    assert "fqt" in backends
