"""One build story: setup.py and river.py build and load csrc/ through csrc/build.py, and a
build made from other sources than today's csrc/ is noticed, not loaded silently."""
import importlib.util
import os
import shutil
import subprocess
import types
import warnings

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


# what torch's JIT raises when a compile fails: its first line the command, then ninja's
# FAILED target, the command again, the compiler's messages
NINJA_LOG = """Error building extension 'river_kernels': [1/2] c++ -MMD -MF river_ops.o.d \
-DTORCH_EXTENSION_NAME=river_kernels -isystem /torch/include -fPIC -std=c++17 -O3 -fopenmp \
-c /src/csrc/river_ops.cpp -o river_ops.o
FAILED: river_ops.o
c++ -MMD -MF river_ops.o.d -DTORCH_EXTENSION_NAME=river_kernels -isystem /torch/include -O3 \
-c /src/csrc/river_ops.cpp -o river_ops.o
/src/csrc/river_ops.cpp:10:3: error: 'foo' was not declared in this scope
   10 |   foo();
      |   ^~~
ninja: build stopped: subcommand failed.
"""


def test_a_failed_build_warns_with_the_compilers_errors(monkeypatch):
    import torch.utils.cpp_extension

    def broken(**kw):
        raise RuntimeError(NINJA_LOG)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # nothing installed
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    monkeypatch.delenv("RIVER_KERNELS", raising=False)
    river.load_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning) as record:
            assert not river.load_kernels()
    finally:
        river.load_kernels.cache_clear()
    message = str(record[-1].message)
    assert "the CPU build failed (RuntimeError: " in message
    assert "river_ops.cpp:10:3: error: 'foo' was not declared in this scope" in message
    assert "FAILED: river_ops.o" in message and "using the PyTorch reference ops" in message
    assert "-MMD" not in message  # not the command lines


def test_compiler_errors_of_nvcc_and_of_a_log_without_any():
    errors = river.csrc_build().compiler_errors
    log = ("Error building extension 'river_kernels': [1/4] /usr/local/cuda/bin/nvcc " + "-x " * 200
           + "-c vq_nearest.cu -o vq_nearest.cuda.o\nFAILED: vq_nearest.cuda.o\n"
           "/src/vq_nearest.cu(12): error: identifier \"tile\" is undefined\n"
           "1 error detected in the compilation of \"/src/vq_nearest.cu\".\n"
           "ninja: build stopped: subcommand failed.")
    assert errors(log) == ["FAILED: vq_nearest.cuda.o",
                           '/src/vq_nearest.cu(12): error: identifier "tile" is undefined',
                           '1 error detected in the compilation of "/src/vq_nearest.cu".']
    assert errors("no compiler\nfound at all\n") == ["no compiler", "found at all"]
    assert all(len(line) <= 300 for line in errors("error: " + "x" * 1000))


def installed_without_cuda(monkeypatch, tmp_path):
    """An installed river_kernels built from today's sources, with CPU kernels only, on a
    machine that has a GPU."""
    import sys
    import torch
    build = river.csrc_build()
    library = tmp_path / "river_kernels.so"
    library.write_bytes(b"\x7fELF..." + build.HASH_TAG + build.source_hash().encode())
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(origin=str(library)))
    monkeypatch.setitem(sys.modules, "river_kernels", types.ModuleType("river_kernels"))
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda op, key: key != "CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "register_fakes", lambda: None)
    monkeypatch.delenv("RIVER_NO_CUDA", raising=False)
    return library


def test_an_installed_build_without_cuda_kernels_warns_once_on_a_gpu(monkeypatch, tmp_path):
    library = installed_without_cuda(monkeypatch, tmp_path)
    monkeypatch.delenv("RIVER_KERNELS", raising=False)
    river.load_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"the installed {library} has no CUDA kernels.*"
                                             "CUDA tensors use the PyTorch reference ops"):
            assert river.load_kernels() == {"cpu"}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert river.load_kernels() == {"cpu"}  # once: no second warning
        monkeypatch.setenv("RIVER_KERNELS", "ext")  # forced: an error, not a fallback
        river.load_kernels.cache_clear()
        with pytest.raises(RuntimeError, match="RIVER_KERNELS=ext but .* has no CUDA kernels"):
            river.load_kernels()
        monkeypatch.setenv("RIVER_NO_CUDA", "1")  # asked for: silent
        river.load_kernels.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert river.load_kernels() == {"cpu"}
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


def fake_cuda(tmp_path, monkeypatch, toolkit_has_libraries):
    """A toolkit (cuda_runtime_api.h of version 1, cublas_v2.h and cusparse.h or not) and a
    pip CUDA wheel's include folder (runtime headers of version 2, and the libraries'),
    which site.getsitepackages() lists. Returns (toolkit include, wheel include)."""
    import site
    toolkit = tmp_path / "cuda" / "include"
    wheel = tmp_path / "site" / "nvidia" / "cu13" / "include"
    other = tmp_path / "site" / "nvidia" / "nccl" / "include"  # holds none of them
    for folder in (toolkit, wheel, other):
        folder.mkdir(parents=True)
    for folder, version in ((toolkit, 1), (wheel, 2)):  # guarded, as the real ones are
        (folder / "cuda_runtime_api.h").write_text(
            f"#ifndef FAKE_CUDART\n#define FAKE_CUDART {version}\n#endif\n")
    (other / "nccl.h").write_text("\n")
    for header in ("cublas_v2.h", "cusparse.h"):
        (wheel / header).write_text("#include \"cuda_runtime_api.h\"\n")
        if toolkit_has_libraries:
            (toolkit / header).write_text("#include \"cuda_runtime_api.h\"\n")
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(tmp_path / "site")])
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path / "nowhere"))
    monkeypatch.setattr(river.csrc_build(), "cuda_home", lambda: str(tmp_path / "cuda"),
                        raising=False)
    return toolkit, wheel


def test_pip_cuda_headers_only_where_the_toolkit_lacks_them(tmp_path, monkeypatch):
    fake_cuda(tmp_path, monkeypatch, toolkit_has_libraries=True)
    args = river.csrc_build().extension_args(True)
    assert not args["include_dirs"] and "-isystem" not in args["cxx"] + args["nvcc"]


def test_pip_cuda_headers_come_after_the_toolkits(tmp_path, monkeypatch):
    """Without cublas_v2.h in the toolkit the wheel's folder is added, but searched after the
    toolkit's (whose cuda_runtime_api.h must win): compiled with the include order torch's
    JIT and setuptools use (include_dirs as -I, then torch's and the toolkit's -isystem, then
    the extension's flags)."""
    toolkit, wheel = fake_cuda(tmp_path, monkeypatch, toolkit_has_libraries=False)
    args = river.csrc_build().extension_args(True)
    source = tmp_path / "probe.cpp"
    source.write_text("#include <cuda_runtime_api.h>\n#include <cublas_v2.h>\n"  # as ATen
                      "static_assert(FAKE_CUDART == 1, \"the wheel's runtime header won\");\n")
    cxx = [f for f in args["cxx"] if f != "-fopenmp"]
    cmd = ["g++", "-fsyntax-only", *[f"-I{d}" for d in args["include_dirs"]], "-isystem",
           str(toolkit), *cxx, str(source)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert args["cxx"][-2:] == args["nvcc"][-2:] == ["-isystem", str(wheel)]  # not the nccl one
