"""setup.py: installs river (river.py, data_prep.py) and builds csrc/ into `river_kernels`.

    pip install --no-build-isolation -e .      # or: python setup.py build_ext --inplace

`import river_kernels` registers torch.ops.river.vq_nearest and torch.ops.river.euler_step_;
river.load_kernels() tries that first and falls back to a JIT build of the same sources.
csrc/build.py holds the sources and flags, shared with that JIT build, and says why each
flag is there.

The extension is a CppExtension when torch has no CUDA or no CUDA toolkit is found, a
CUDAExtension (+ the .cu kernels and their binding) otherwise. Torch is imported only to
build: without torch (pip's isolated build env, a metadata-only call) the pure-Python
package is installed and a note says how to get the kernels. torch is not a build
requirement on purpose: pip would fetch a multi-GB CUDA wheel to build against.

Environment knobs: RIVER_NO_EXTENSION=1 skips the extension (river.py then JIT-builds it or
uses its references); the others are in csrc/build.py.
"""
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def load_build():
    """csrc/build.py, loaded by path (it is not a package)."""
    spec = importlib.util.spec_from_file_location("river_build", os.path.join(HERE, "csrc", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_kwargs():
    """ext_modules and cmdclass for river_kernels, or {} when it cannot or should not be built."""
    if os.environ.get("RIVER_NO_EXTENSION") == "1":
        print("river: RIVER_NO_EXTENSION=1, installing without the csrc/ extension")
        return {}
    try:
        import torch  # noqa: F401
    except ImportError:
        print("river: torch is not importable here, installing without the csrc/ extension; "
              "river.py will JIT-build it on first use, or reinstall with "
              "`pip install --no-build-isolation -e .` once torch is installed")
        return {}
    build = load_build()
    cuda = build.want_cuda()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    args = build.extension_args(cuda, relative_to=HERE)  # setuptools wants relative paths
    kind = CUDAExtension if cuda else CppExtension
    ext = kind("river_kernels", sources=args["sources"], include_dirs=args["include_dirs"],
               extra_compile_args={"cxx": args["cxx"], "nvcc": args["nvcc"]} if cuda
               else {"cxx": args["cxx"]}, extra_link_args=args["ldflags"])
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
    extras_require={"test": ["pytest"], "video": ["av"], "hub": ["huggingface_hub"]},
    **extension_kwargs(),
)
