"""setup.py: installs river (river.py, data_prep.py) and builds csrc/ into `river_kernels`.

    pip install --no-build-isolation -e .      # or: python setup.py build_ext --inplace

`import river_kernels` registers torch.ops.river.vq_nearest and torch.ops.river.euler_step_;
river.load_kernels() tries that first and falls back to a JIT build of the same sources.

The extension is a CppExtension (csrc/river_ops.cpp) when torch has no CUDA or nvcc is
absent, a CUDAExtension (+ csrc/river_ops_cuda.cpp and csrc/*.cu) otherwise. Torch is
imported only to build: without torch (pip's isolated build env, a metadata-only call)
the pure-Python package is installed and a note says how to get the kernels. torch is
not a build requirement on purpose: pip would fetch a multi-GB CUDA wheel to build against.

Environment knobs:
    RIVER_NO_EXTENSION=1   skip the extension (river.py then JIT-builds it or uses references)
    RIVER_NO_CUDA=1        build the CPU extension even where CUDA is available
    TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "8.0;9.0" (read by torch's BuildExtension)
    CUDA_HOME              the CUDA toolkit; unset, torch guesses from `which nvcc`, and
                           /usr/local/cuda replaces a guess that has no CUDA headers

Flags, and why:
    -O3                     the CPU loops rely on the vectoriser.
    -fopenmp                at::parallel_for is an inline `#pragma omp parallel`: without it the
                            kernels run on one core. Links libgomp.so.1, the runtime torch loads.
    no -march=native        a built module must run on any x86-64; river_ops.cpp carries its own
                            AVX2 path and picks it at run time.
"""

import glob
import os
import sys

from setuptools import setup


def cuda_include_dirs():
    """Headers of the pip CUDA wheels (nvidia/cu13/include, nvidia/*/include): ATen/cuda
    headers include cublas_v2.h and cusparse.h, which a bare toolkit may lack."""
    import site
    roots = site.getsitepackages() + [site.getusersitepackages()]
    dirs = []
    for root in roots:
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def guess_cuda_home():
    """Set CUDA_HOME to /usr/local/cuda when torch would guess wrong. Torch takes the parent of
    `which nvcc`'s directory; a wrapper script such as /usr/local/bin/nvcc then yields
    /usr/local, which has no CUDA headers. Must run before torch.utils.cpp_extension loads."""
    import shutil
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    fallback = "/usr/local/cuda"
    if (guess and not os.path.exists(os.path.join(guess, "include", "cuda_runtime_api.h"))
            and os.path.exists(os.path.join(fallback, "include", "cuda_runtime_api.h"))):
        print(f"river: nvcc at {nvcc} is not inside a CUDA toolkit; using CUDA_HOME={fallback}")
        os.environ["CUDA_HOME"] = fallback


def extension_kwargs():
    """ext_modules and cmdclass for river_kernels, or {} when it cannot or should not be built."""
    if os.environ.get("RIVER_NO_EXTENSION") == "1":
        print("river: RIVER_NO_EXTENSION=1, installing without the csrc/ extension")
        return {}
    try:
        import torch
        if torch.version.cuda is not None:
            guess_cuda_home()
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("river: torch is not importable here, installing without the csrc/ extension; "
              "river.py will JIT-build it on first use, or reinstall with "
              "`pip install --no-build-isolation -e .` once torch is installed")
        return {}

    csrc = "csrc"  # setuptools wants source paths relative to setup.py
    cxx = ["-O3", "-fopenmp"]
    cuda = (torch.version.cuda is not None and CUDA_HOME is not None
            and os.environ.get("RIVER_NO_CUDA") != "1")
    if cuda:
        ext = CUDAExtension(
            "river_kernels",
            sources=[os.path.join(csrc, f) for f in
                     ("river_ops.cpp", "river_ops_cuda.cpp", "euler_step.cu", "vq_nearest.cu")],
            include_dirs=cuda_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "river_kernels",
            sources=[os.path.join(csrc, "river_ops.cpp")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    print(f"river: building river_kernels ({'CPU + CUDA' if cuda else 'CPU'})", file=sys.stderr)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="river-vp",
    version="0.1.0",
    description="RIVER video prediction (ICCV 2023) in one readable PyTorch file",
    python_requires=">=3.9",
    py_modules=["river", "data_prep"],
    install_requires=["torch>=2.4", "ninja", "h5py", "numpy", "einops", "matplotlib", "tqdm",
                      "pillow"],
    # video: data_prep.py reads .mp4/.avi/... through PyAV (its wheels bundle FFmpeg)
    extras_require={"test": ["pytest"], "video": ["av"]},
    **extension_kwargs(),
)
