"""How csrc/ is built and loaded: the one description that setup.py and river.py share.

Both build the extension `river_kernels` from the same sources with the same flags, by
calling `extension_args()`; river.py's `load_kernels` calls `load()`, which imports an
installed build or compiles one with ninja. The sources' SHA-256 (`source_hash()`) is
compiled into the library as the string "river-source-hash:<hex>", so a build made from
other sources (an edited csrc/) is told from a current one without loading it
(`built_hash()`).

Flags, and why:
    -O3                  the CPU loops rely on the vectoriser.
    -fopenmp             at::parallel_for is an inline `#pragma omp parallel`: without it the
                         kernels run on one core. Links libgomp.so.1, the runtime torch loads.
    no -march=native     a built module must run on any x86-64; river_ops.cpp carries its own
                         AVX2 and AVX-512 copies of the inner kernels and picks one at run time.
    -DRIVER_SOURCE_HASH  the sources' hash (see above).

Environment knobs: RIVER_NO_CUDA=1 builds the CPU extension even where CUDA could be built;
CUDA_HOME names the toolkit (see guess_cuda_home); TORCH_CUDA_ARCH_LIST the GPU architectures.
Nothing here imports torch at import time: setup.py must load this file without it.

The CUDA toolkit must have torch's CUDA major version (torch.version.cuda): torch's builder
refuses another, and CUDA 13 binaries need an NVIDIA driver >= 580. A failed build raises
BuildError, whose `advice` says what to do (river.load_kernels prints it with its warning).
"""
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import threading
import warnings

CSRC = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["river_ops.cpp"]
CUDA_SOURCES = ["river_ops_cuda.cpp", "euler_step.cu", "vq_nearest.cu"]
HASH_TAG = b"river-source-hash:"


def source_hash():
    """SHA-256 over every source and header in csrc/ (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CSRC, "*"))):
        if path.endswith((".cpp", ".cu", ".h", ".cuh")):
            digest.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def built_hash(library):
    """The source hash compiled into a built library file, or None if it carries none."""
    with open(library, "rb") as f:
        data = f.read()
    at = data.find(HASH_TAG)
    return data[at + len(HASH_TAG):at + len(HASH_TAG) + 64].decode() if at >= 0 else None


def guess_cuda_home():
    """Set CUDA_HOME to /usr/local/cuda when torch would guess wrong. Torch takes the parent of
    `which nvcc`'s directory; a wrapper script such as /usr/local/bin/nvcc then yields
    /usr/local, which has no CUDA headers. Must run before torch.utils.cpp_extension loads."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    fallback = "/usr/local/cuda"
    if (guess and not has_cuda_headers(guess) and has_cuda_headers(fallback)):
        print(f"river: nvcc at {nvcc} is not inside a CUDA toolkit; using CUDA_HOME={fallback}",
              file=sys.stderr)
        os.environ["CUDA_HOME"] = fallback


def has_cuda_headers(root):
    return bool(root) and os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h"))


def want_cuda():
    """Build the CUDA kernels too: torch has CUDA, a toolkit with headers is found, and
    RIVER_NO_CUDA is not set. Imports torch (call only when building)."""
    import torch
    if torch.version.cuda is None or os.environ.get("RIVER_NO_CUDA") == "1":
        return False
    guess_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME
    return has_cuda_headers(CUDA_HOME)


def cuda_include_dirs():
    """Headers of the pip CUDA wheels (nvidia/cu13/include, nvidia/*/include): ATen/cuda
    headers include cublas_v2.h and cusparse.h, which a bare toolkit may lack."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    return sorted(d for root in roots for d in glob.glob(os.path.join(root, "nvidia", "*", "include"))
                  if os.path.isdir(d))


def extension_args(cuda, relative_to=None):
    """Sources and flags of river_kernels, as keyword arguments shared by setup.py's
    CppExtension/CUDAExtension and torch.utils.cpp_extension.load: sources (relative to
    `relative_to` when given: setuptools wants paths relative to setup.py), cxx and nvcc
    flags, include directories and linker flags."""
    names = CPU_SOURCES + (CUDA_SOURCES if cuda else [])
    sources = [os.path.join(CSRC, n) for n in names]
    if relative_to:
        sources = [os.path.relpath(s, relative_to) for s in sources]
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    define = f"-DRIVER_SOURCE_HASH={source_hash()}"  # river_ops.cpp makes it a string
    return {"sources": sources, "cxx": ["-O3", *omp, define], "nvcc": ["-O3", define],
            "include_dirs": cuda_include_dirs() if cuda else [], "ldflags": omp}


class BuildError(RuntimeError):
    """The extension did not build; str() is the cause, `advice` what to do about it."""

    def __init__(self, cause, advice):
        super().__init__(cause)
        self.advice = advice


def nvcc_version(cuda_home):
    """"major.minor" of cuda_home/bin/nvcc, or None when there is none that answers."""
    try:
        out = subprocess.run([os.path.join(cuda_home or "", "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found[1] if found else None


def cuda_advice():
    """What to do when the CUDA kernels do not build, in one sentence."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    return (f"the CUDA toolkit must match torch.version.cuda ({torch.version.cuda}; "
            f"CUDA_HOME={CUDA_HOME} has nvcc {nvcc_version(CUDA_HOME) or 'unknown'}): install "
            f"CUDA {torch.version.cuda.split('.')[0]}.x and set CUDA_HOME to it (CUDA 13 also "
            "needs an NVIDIA driver >= 580), or set RIVER_KERNELS=ref to use the PyTorch "
            "reference ops without building")


def check_cuda_toolkit():
    """Refuse a toolkit of another CUDA major version than torch's before compiling."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    found = nvcc_version(CUDA_HOME)
    if found and found.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise BuildError(f"nvcc in {CUDA_HOME} is CUDA {found} but torch was built with CUDA "
                         f"{torch.version.cuda}", cuda_advice())


def load():
    """Make torch.ops.river.* usable and return the device types they take ("cpu", and
    "cuda" when built with CUDA), or raise (BuildError with advice when CUDA is what failed).
    An installed river_kernels (pip install -e ., setup.py build_ext --inplace) is imported if
    it was built from today's sources; otherwise they are compiled with ninja into torch's
    extension cache, which recompiles only when they change. Then the ops get their fakes."""
    import torch
    installed = importlib.util.find_spec("river_kernels")
    if installed and built_hash(installed.origin) == source_hash():
        import river_kernels  # noqa: F401  (registers the ops)
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key("river::vq_nearest", "CUDA")
    else:
        if installed:
            warnings.warn(f"river: {installed.origin} was built from other csrc/ sources; "
                          "compiling the current ones (pip install --no-build-isolation -e . "
                          "rebuilds the installed copy)")
        # first: it may set CUDA_HOME, which cpp_extension reads on import; no CUDA build
        # where torch has no CUDA device to run it (setup.py still builds it for later)
        cuda = want_cuda() and torch.cuda.is_available()
        from torch.utils.cpp_extension import load as jit_load
        if cuda:
            check_cuda_toolkit()
        elif torch.cuda.is_available() and os.environ.get("RIVER_NO_CUDA") != "1":
            warnings.warn("river: no CUDA toolkit found (nvcc, CUDA_HOME): the csrc/ kernels "
                          "are built for the CPU only, and CUDA tensors use the PyTorch "
                          "reference ops; " + cuda_advice())
        args = extension_args(cuda)
        # a cached build only checks, in well under a second: say something only when ninja
        # is still at work after two, i.e. when it compiles
        note = threading.Timer(2.0, lambda: print("river: compiling the csrc/ kernels with "
                                                  "ninja (once, about a minute)", file=sys.stderr))
        note.start()
        try:
            jit_load(name="river_kernels", sources=args["sources"], extra_cflags=args["cxx"],
                     extra_cuda_cflags=args["nvcc"], extra_include_paths=args["include_dirs"],
                     extra_ldflags=args["ldflags"], is_python_module=False)
        except Exception as e:
            if not cuda:
                raise
            cause = (str(e).strip().splitlines() or [""])[0]
            raise BuildError(f"the CUDA build failed ({type(e).__name__}: {cause})",
                             cuda_advice()) from e
        finally:
            note.cancel()
    register_fakes()
    return ("cpu", "cuda") if cuda else ("cpu",)


def register_fakes():
    """Shape-only versions of the ops, so torch.compile and opcheck can trace them (once)."""
    import torch
    if getattr(register_fakes, "done", False):
        return

    @torch.library.register_fake("river::vq_nearest")
    def _(z, codebook):
        return z.new_empty(z.shape[0], dtype=torch.int64), z.new_empty(z.shape[0])

    @torch.library.register_fake("river::euler_step_")
    def _(x, v, dt):
        return None

    register_fakes.done = True
