"""fqt_compile/cbuild.py: the C kernels' build helper (cache, errors, CPU checks)."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from fqt_compile import cbuild

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")


@needs_cc
def test_build_caches_by_source_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("FQT_CACHE_DIR", str(tmp_path))
    src = "int fqt_test_add(int a, int b) { return a + b; }\n"
    path = cbuild.build("cbuild_test", src, ["-O2", "-shared", "-fPIC"])
    assert path.startswith(str(tmp_path)) and cbuild.build("cbuild_test", src, ["-O2", "-shared", "-fPIC"]) == path
    assert ctypes.CDLL(path).fqt_test_add(2, 3) == 5
    other = cbuild.build("cbuild_test", src + "\n", ["-O2", "-shared", "-fPIC"])
    assert other != path  # another source, another library


@needs_cc
def test_build_error_names_the_compiler_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FQT_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="failed: .*error"):
        cbuild.build("cbuild_bad", "int f( { }\n", ["-shared", "-fPIC"])
    assert not list(tmp_path.glob("cbuild_bad_*.so"))


def test_unsupported_platform_names_missing_flags(monkeypatch):
    monkeypatch.setattr(cbuild, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(cbuild.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cbuild.platform, "machine", lambda: "x86_64")
    assert "avx512f" in cbuild.unsupported_platform({"avx512f", "avx2"})
    assert cbuild.unsupported_platform({"avx2"}) is None
    monkeypatch.setattr(cbuild.platform, "machine", lambda: "aarch64")
    assert "needs Linux x86-64" in cbuild.unsupported_platform({"avx2"})
