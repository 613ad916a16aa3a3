"""Every csrc/*.cu compiles with nvcc for sm_80 (A100) and sm_90 (H100).

Runs wherever nvcc is (on PATH or in /usr/local/cuda/bin), GPU or not: the .cu files need
only the CUDA runtime headers, so a broken kernel shows up on a CPU-only machine too.
"""

import glob
import os
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
NVCC = shutil.which("nvcc") or next(
    (p for p in ["/usr/local/cuda/bin/nvcc"] if os.access(p, os.X_OK)), None)


def test_there_are_kernels():
    assert {os.path.basename(f) for f in CU_FILES} >= {"euler_step.cu", "vq_nearest.cu"}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in /usr/local/cuda/bin")
@pytest.mark.parametrize("cu_file", CU_FILES, ids=os.path.basename)
def test_nvcc_compiles(cu_file, tmp_path):
    cmd = [NVCC, "-O2", "-std=c++17", "-Werror", "all-warnings",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-c", cu_file, "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
