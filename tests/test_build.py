"""One build story: setup.py and river.py build and load csrc/ through csrc/build.py, and a
build made from other sources than today's csrc/ is noticed, not loaded silently."""
import importlib.util
import os
import shutil
import types

import pytest

import river

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_build(csrc):
    spec = importlib.util.spec_from_file_location("build_copy", os.path.join(csrc, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_source_hash_follows_every_source_file(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
    build = load_build(csrc)
    before = build.source_hash()
    assert before == river.csrc_build().source_hash()  # the copy hashes like the original
    for name in ("river_ops.cpp", "vq_nearest.cu", "kernels.h"):
        (csrc / name).write_text((csrc / name).read_text() + "\n// edited\n")
        assert build.source_hash() != before
        before = build.source_hash()


def test_setup_and_the_jit_loader_share_sources_and_flags():
    build = river.csrc_build()
    cpu, cuda = build.extension_args(False), build.extension_args(True)
    assert [os.path.basename(s) for s in cpu["sources"]] == ["river_ops.cpp"]
    assert {os.path.basename(s) for s in cuda["sources"]} == {
        "river_ops.cpp", "river_ops_cuda.cpp", "euler_step.cu", "vq_nearest.cu"}
    define = f"-DRIVER_SOURCE_HASH={build.source_hash()}"
    assert define in cpu["cxx"] and define in cuda["nvcc"] and "-O3" in cpu["cxx"]
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert "extension_args(" in setup and "-fopenmp" not in setup  # no flags of its own
    assert build.extension_args(False, relative_to=ROOT)["sources"] == [
        os.path.join("csrc", "river_ops.cpp")]


def test_a_library_built_from_other_sources_is_not_loaded(tmp_path, monkeypatch):
    build = river.csrc_build()
    stale = tmp_path / "river_kernels.so"
    stale.write_bytes(b"\x7fELF..." + build.HASH_TAG + b"0" * 64 + b"...")
    assert build.built_hash(str(stale)) == "0" * 64
    current = tmp_path / "current.so"
    current.write_bytes(b"..." + build.HASH_TAG + build.source_hash().encode())
    assert build.built_hash(str(current)) == build.source_hash()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(origin=str(stale)))
    compiled = []
    import torch.utils.cpp_extension
    monkeypatch.setattr(torch.utils.cpp_extension, "load",
                        lambda **kw: compiled.append(kw["extra_cflags"]))
    monkeypatch.setattr(build, "register_fakes", lambda: None)
    monkeypatch.delenv("RIVER_KERNELS", raising=False)
    river.load_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="built from other csrc/ sources"):
            assert river.load_kernels()
    finally:
        river.load_kernels.cache_clear()
    assert compiled and f"-DRIVER_SOURCE_HASH={build.source_hash()}" in compiled[0]


def test_a_failed_build_warns_with_its_cause(monkeypatch):
    import torch.utils.cpp_extension

    def broken(**kw):
        raise RuntimeError("g++: fatal error: no input files\nmore lines of the log")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # nothing installed
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    monkeypatch.delenv("RIVER_KERNELS", raising=False)
    river.load_kernels.cache_clear()
    try:
        cause = r"\(RuntimeError: g\+\+: fatal error: no input files\); using"  # first line
        with pytest.warns(UserWarning, match=cause):
            assert not river.load_kernels()
    finally:
        river.load_kernels.cache_clear()


@pytest.mark.parametrize("seconds, says", [(0.0, False), (2.5, True)])
def test_the_build_speaks_only_when_ninja_compiles(monkeypatch, capsys, seconds, says):
    """A cached build is a check of well under a second: silent. A compile says so."""
    import time

    import torch.utils.cpp_extension
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # nothing installed
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: time.sleep(seconds))
    build = river.csrc_build()
    monkeypatch.setattr(build, "register_fakes", lambda: None)
    assert build.load()[0] == "cpu"
    assert ("compiling the csrc/ kernels" in capsys.readouterr().err) == says


def test_no_cuda_build_where_torch_has_no_cuda_device(monkeypatch):
    """A CUDA build of torch on a machine without a GPU: the JIT compiles the CPU kernels only
    (setup.py still builds the CUDA ones, for a machine that has one)."""
    import torch
    import torch.utils.cpp_extension
    build, calls = river.csrc_build(), []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(build, "want_cuda", lambda: True)  # torch has CUDA, a toolkit is there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # but no device
    monkeypatch.setattr(build, "register_fakes", lambda: None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: calls.append(kw))
    assert build.load() == ("cpu",)
    assert not any(src.endswith(".cu") for src in calls[0]["sources"])
