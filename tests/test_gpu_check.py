"""tests/gpu_check.py's CPU side: `--dry-run` runs every part at tiny sizes (skipping what needs
CUDA, saying why) and prints a table and one JSON line of the promised structure."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "gpu_check.py")
PARTS = ["build", "tests", "bench", "train", "sample", "compile", "demo"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    logs = tmp_path_factory.mktemp("gpu_check_logs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--logs", str(logs)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout.strip().splitlines(), logs


def test_one_json_line_with_every_part(dry_run):
    lines, logs = dry_run
    report = json.loads(lines[-1])
    assert report["gpu_check"] == 1 and report["dry_run"] is True and report["ok"] is True
    assert report["device"] == "cpu (dry run)" and report["torch"] == torch.__version__
    assert report["logs"] == str(logs) and report["seconds"] > 0
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        assert part["seconds"] >= 0 and isinstance(part["summary"], str) and part["summary"]
        if part["status"] == "skipped":
            assert part["reason"], name
        assert (logs / f"{name}.log").exists()
    # everything else on the line is the table, one row per part, before the JSON
    table = lines[:-1]
    assert any("OK in" in line for line in table)
    for name in PARTS:
        assert any(line.startswith(f"{name} ") for line in table), name


def test_the_cpu_side_of_each_part(dry_run):
    parts = json.loads(dry_run[0][-1])["parts"]
    assert parts["build"]["status"] == "ok" and "cpu" in parts["build"]["kernels"]
    tests = parts["tests"]  # the CUDA cases are collected, not run
    assert tests["status"] == "skipped" and tests["collected"] > 0 and "CUDA" in tests["reason"]
    ratios = parts["bench"]["ratios"]
    assert parts["bench"]["status"] == "ok"
    assert any(k.startswith("cpu_vq_") and k.endswith("_speedup_vs_cdist") for k in ratios)
    assert any(k.startswith("cpu_euler_") and k.endswith("_time_vs_add") for k in ratios)
    train = parts["train"]
    assert train["status"] == "ok"
    for row in ("unet_fp32", "unet_bf16", "uvit_fp32", "uvit_bf16", "ae_fp32", "ae_bf16"):
        assert train[row]["s_per_step"] > 0 and math.isfinite(train[row]["loss"]), row
    assert train["unet_fp32"]["batch"][:2] == [2, 16]  # (B, T, D, h, w) latent clips
    assert parts["sample"]["status"] == "ok" and parts["sample"]["s_per_frame"] > 0
    for name in ("compile", "demo"):  # GPU only
        assert parts[name]["status"] == "skipped" and "GPU" in parts[name]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_without_a_gpu_it_asks_for_dry_run():
    out = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "use --dry-run" in out.stderr
