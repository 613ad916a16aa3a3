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
RIVER_BUILD_HERE=1 compiles into torch's extension cache even where an installed build of
today's sources exists (tests/gpu_check.py's build part: this run's own build, not pip's);
CUDA_HOME names the toolkit (see guess_cuda_home); TORCH_CUDA_ARCH_LIST the GPU architectures.
Nothing here imports torch at import time: setup.py must load this file without it.

The CUDA toolkit must have torch's CUDA major version (torch.version.cuda): torch's builder
refuses another, and CUDA 13 binaries need an NVIDIA driver >= 580. The pip CUDA wheels'
headers are used only for what the toolkit lacks, and searched after its own
(cuda_include_dirs). A failed build raises BuildError: its message holds the compiler's error
lines, its `advice` what to do (river.load_kernels prints both with its warning). Where the
CUDA kernels fail, the CPU kernels are still built (load's strict=False) and a warning says
that CUDA tensors use the references.
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


# Headers that ATen/cuda's headers include beyond the CUDA runtime's; a bare toolkit may lack them
LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h")


def cuda_include_dirs(cuda_home):
    """Folders of the pip CUDA wheels (nvidia/cu13/include, nvidia/*/include) that hold a header
    of LIBRARY_HEADERS the toolkit in cuda_home lacks; [] when it has them all. The wheels'
    folders hold the runtime's headers too, of the wheel's CUDA version: ahead of the
    toolkit's, nvcc would compile against another version's runtime headers. So they are
    searched after the toolkit (extension_args passes them with -isystem, last)."""
    missing = [h for h in LIBRARY_HEADERS
               if not os.path.exists(os.path.join(cuda_home or "", "include", h))]
    if not missing:
        return []
    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = sorted(d for root in roots
                   for d in glob.glob(os.path.join(root, "nvidia", "*", "include")) if os.path.isdir(d))
    return [d for d in found if any(os.path.exists(os.path.join(d, h)) for h in missing)]


def extension_args(cuda, relative_to=None):
    """Sources and flags of river_kernels, as keyword arguments shared by setup.py's
    CppExtension/CUDAExtension and torch.utils.cpp_extension.load: sources (relative to
    `relative_to` when given: setuptools wants paths relative to setup.py), cxx and nvcc
    flags, include directories (none: the pip CUDA headers come last, as -isystem flags, see
    cuda_include_dirs) and linker flags."""
    names = CPU_SOURCES + (CUDA_SOURCES if cuda else [])
    sources = [os.path.join(CSRC, n) for n in names]
    if relative_to:
        sources = [os.path.relpath(s, relative_to) for s in sources]
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    define = f"-DRIVER_SOURCE_HASH={source_hash()}"  # river_ops.cpp makes it a string
    # after every -I and -isystem of torch and the toolkit, which come before these flags
    after = [f for d in cuda_include_dirs(cuda_home()) for f in ("-isystem", d)] if cuda else []
    return {"sources": sources, "cxx": ["-O3", *omp, define, *after],
            "nvcc": ["-O3", define, *after], "include_dirs": [], "ldflags": omp}


def cuda_home():
    """The toolkit torch builds with (torch.utils.cpp_extension.CUDA_HOME, read on its import:
    call want_cuda first, which may set it)."""
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME


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


REF = "or set RIVER_KERNELS=ref to use the PyTorch reference ops without building"
CPU_ADVICE = ("the CPU kernels need a C++ compiler with OpenMP and ninja (pip install ninja); "
              + REF)


def cuda_advice():
    """What to do when the CUDA kernels do not build, in one sentence. It blames the toolkit
    only when its version differs from torch's CUDA (or cannot be read): with the same
    version, the compiler's own errors say what went wrong."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    wanted, found = torch.version.cuda, nvcc_version(CUDA_HOME)
    if found == wanted:
        return (f"nvcc {found} in CUDA_HOME={CUDA_HOME} is torch's CUDA version, so the "
                "compiler's errors say what failed; TORCH_CUDA_ARCH_LIST names the GPU "
                "architectures to build (e.g. \"9.0\"), RIVER_NO_CUDA=1 builds the CPU kernels "
                "only, " + REF)
    major = wanted.split(".")[0]
    install = wanted if found and found.split(".")[0] == major else f"{major}.x"
    return (f"the CUDA toolkit must match torch.version.cuda ({wanted}; CUDA_HOME={CUDA_HOME} "
            f"has nvcc {found or 'unknown'}): install CUDA {install} and set CUDA_HOME to it "
            "(CUDA 13 also needs an NVIDIA driver >= 580), " + REF)


def check_cuda_toolkit():
    """Refuse a toolkit of another CUDA major version than torch's before compiling."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    found = nvcc_version(CUDA_HOME)
    if found and found.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise BuildError(f"nvcc in {CUDA_HOME} is CUDA {found} but torch was built with CUDA "
                         f"{torch.version.cuda}", cuda_advice())


def compiler_errors(text, most=12):
    """The lines of a failed build's log that say what went wrong: the compilers' errors
    ("error", "fatal") and ninja's FAILED targets, without the command lines (torch's
    message starts with one); the log's last lines when none is found. Each cut to 300
    characters."""
    text = re.sub(r"^Error building extension '\w+':\s*", "", text.strip())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    commands = re.compile(r"^\[\d+/\d+\]|\s-c\s.*\s-o\s")  # [1/4] nvcc ..., a compile line
    said = [ln for ln in lines if re.search(r"\berror\b|\bfatal\b|^FAILED:", ln, re.I)
            and not commands.search(ln)]
    return [ln[:300] for ln in (said[:most] or lines[-5:] or ["(no output)"])]


def compile_kernels(cuda):
    """JIT-build river_kernels with ninja, the CUDA kernels too when `cuda`, and load it; a
    failure raises BuildError with the compiler's error lines and what to do."""
    from torch.utils.cpp_extension import load as jit_load
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
        errors = "\n    ".join(compiler_errors(str(e)))
        raise BuildError(f"the {'CUDA' if cuda else 'CPU'} build failed ({type(e).__name__}: "
                         f"{errors})", cuda_advice() if cuda else CPU_ADVICE) from e
    finally:
        note.cancel()


def gpu_wanted():
    """A CUDA device is there and RIVER_NO_CUDA does not ask for the CPU kernels only."""
    import torch
    return torch.cuda.is_available() and os.environ.get("RIVER_NO_CUDA") != "1"


def without_cuda(cause, advice, strict):
    """A GPU is there but its kernels are not: raise BuildError when strict, else warn (once
    per load) that CUDA tensors use the references while the CPU kernels serve the CPU."""
    if strict:
        raise BuildError(cause, advice)
    warnings.warn(f"river: {cause}; CUDA tensors use the PyTorch reference ops (the CPU "
                  f"kernels are built and used); {advice}")


def load_installed(origin, strict):
    """Import the installed river_kernels; its device types."""
    import torch
    import river_kernels  # noqa: F401  (registers the ops)
    if torch._C._dispatch_has_kernel_for_dispatch_key("river::vq_nearest", "CUDA"):
        return ("cpu", "cuda")
    if gpu_wanted():
        without_cuda(f"the installed {origin} has no CUDA kernels (it was built without nvcc)",
                     "rebuild it where nvcc is found (pip install --no-build-isolation -e .), "
                     "or uninstall it, and river.py compiles them on first use", strict)
    return ("cpu",)


def build_here(strict):
    """Compile with ninja: the CUDA kernels too where a GPU and a toolkit are found; when they
    fail, the CPU kernels alone (strict: raise instead). Returns the device types."""
    # want_cuda first: it may set CUDA_HOME, which cpp_extension reads on import. No CUDA
    # build where torch has no CUDA device to run it (setup.py still builds it for later)
    import torch
    cuda = want_cuda() and torch.cuda.is_available()
    if cuda:
        try:
            check_cuda_toolkit()
            compile_kernels(True)
            return ("cpu", "cuda")
        except BuildError as e:
            if strict:
                raise
            without_cuda(f"{e}; building the CPU kernels only", e.advice, strict)
    elif gpu_wanted():
        without_cuda("no CUDA toolkit found (nvcc, CUDA_HOME): the csrc/ kernels are built for "
                     "the CPU only", cuda_advice(), strict)
    compile_kernels(False)
    return ("cpu",)


def load(strict=False):
    """Make torch.ops.river.* usable and return the device types they take ("cpu", and
    "cuda" when built with CUDA), or raise BuildError (with advice). An installed
    river_kernels (pip install -e ., setup.py build_ext --inplace) is imported if it was built
    from today's sources; otherwise they are compiled with ninja into torch's extension cache,
    which recompiles only when they change. Where a GPU is seen but its kernels cannot be had
    (an installed build without them, no toolkit, a failed CUDA build), a warning says why
    and CUDA tensors use the references, the CPU kernels still built; strict=True
    (RIVER_KERNELS=ext) raises instead. Then the ops get their fakes."""
    installed = (None if os.environ.get("RIVER_BUILD_HERE") == "1"
                 else importlib.util.find_spec("river_kernels"))
    if installed and built_hash(installed.origin) == source_hash():
        devices = load_installed(installed.origin, strict)
    else:
        if installed:
            warnings.warn(f"river: {installed.origin} was built from other csrc/ sources; "
                          "compiling the current ones (pip install --no-build-isolation -e . "
                          "rebuilds the installed copy)")
        devices = build_here(strict)
    register_fakes()
    return devices


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
