"""tests/gpu_check.py rehearsed on the CPU, so that the GPU run is its first real use and not
its first execution: `--dry-run` runs every part's plumbing (the CPU kernels, tiny sizes) and
prints a table and one JSON line; a failed build skips what needs the kernels and says why;
a part stopped at its limit leaves its log, and fails the check only when it is required.
And the piece of river.py that only a GPU run reaches: the CUDA RNG restored on resume."""

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import river

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "gpu_check.py")
PARTS = ["preflight", "build", "kernels", "sanitizer", "river", "torchrun", "bench", "compile"]


def gpu_check(logs, *args, env=None):
    """Run gpu_check.py --dry-run; (exit status, stdout lines, stderr, the JSON line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--logs", str(logs), *args],
                         capture_output=True, text=True, env=env, timeout=900)
    lines = out.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return out.returncode, lines, out.stderr, report


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    logs = tmp_path_factory.mktemp("gpu_check_logs")
    code, lines, err, report = gpu_check(logs)
    assert code == 0, "\n".join(lines[-30:]) + err[-3000:]
    return lines, logs, report


@pytest.mark.slow
def test_one_json_line_with_every_part(dry_run):
    lines, logs, report = dry_run
    assert report["gpu_check"] == 2 and report["dry_run"] is True and report["ok"] is True
    assert report["device"] == "cpu (dry run)" and report["versions"]["torch"] == torch.__version__
    assert report["logs"] == str(logs) and report["seconds"] > 0 and report["budget_s"] == 470
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        assert part["seconds"] >= 0 and isinstance(part["summary"], str) and part["summary"]
        if part["status"] == "skipped":
            assert part["reason"], name
        assert (logs / f"{name}.log").stat().st_size > 0  # streamed there as it ran
    table = lines[:-1]  # the table, the versions and the kernels' speed before the JSON
    assert any("OK in" in line for line in table)
    for name in PARTS:
        assert any(line.startswith(f"{name} ") for line in table), name
    assert any(line.startswith("versions: ") and "torch " in line for line in table)
    assert any(line.startswith("kernels: vq_nearest ") for line in table)


@pytest.mark.slow
def test_the_cpu_side_of_each_part(dry_run):
    _, logs, report = dry_run
    parts = report["parts"]
    assert parts["build"]["kernels"] == ["cpu"]
    assert list((logs / "ext").glob("river_kernels*/*.so"))  # this run's own folder
    kernels = parts["kernels"]  # the CUDA cases, collected and skipped on the CPU
    assert kernels["skipped"] > 100 and kernels["passed"] == kernels["failed"] == 0
    assert (logs / "kernels.xml").exists()
    assert "dry run" in parts["sanitizer"]["reason"]
    assert "both ops ran and agree" in (logs / "sanitizer.log").read_text()
    loop = parts["river"]  # train, resume, sample, eval with the references refused
    assert loop["kernels_proven"] is True and loop["rng_saved"] == ["cpu"]
    assert set(loop["seconds_by_step"]) == {"train", "resume", "sample", "eval"}
    assert math.isfinite(loop["psnr"]) and (logs / "river_run" / "pred.gif").exists()
    assert "references refused" in (logs / "river.log").read_text()
    assert parts["torchrun"]["backend"] == "gloo"
    speed = report["speed"]
    assert speed["vq_vs_cdist"][0] > 0 and speed["euler_time_vs_add"][0] > 0
    assert parts["compile"]["backend"] == "eager" and parts["compile"]["speedup"] > 0


@pytest.mark.slow
def test_a_failed_build_skips_what_needs_the_kernels(tmp_path):
    cxx = tmp_path / "cxx"  # a compiler that tells its version and refuses to compile
    cxx.write_text("#!/bin/sh\ncase \"$1\" in -v|--version) exec g++ \"$@\";; esac\n"
                   "echo 'river_ops.cpp:1:1: error: refused by the test' >&2\nexit 1\n")
    cxx.chmod(0o755)
    code, lines, err, report = gpu_check(tmp_path / "logs", "--parts",
                                         "build,kernels,sanitizer,bench", env={"CXX": str(cxx)})
    assert code == 1 and report["ok"] is False
    build = report["parts"]["build"]
    assert build["status"] == "failed" and "the CPU build failed" in build["reason"]
    assert "river_ops.cpp:1:1: error: refused by the test" in build["reason"]  # the compiler's
    for name in ("kernels", "sanitizer", "bench"):
        part = report["parts"][name]
        assert part["status"] == "skipped" and part["reason"].startswith("the build failed: ")


@pytest.mark.slow
@pytest.mark.parametrize("part, ok", [("river", False), ("compile", True)])
def test_a_part_out_of_time_leaves_its_log_and_fails_only_if_required(tmp_path, part, ok):
    code, lines, err, report = gpu_check(tmp_path, "--parts", part, "--seconds", "8",
                                         env={"GPU_CHECK_STALL": part})  # never done in time
    entry = report["parts"][part]
    assert entry["status"] == "timeout" and "stopped at its limit of 8 s" in entry["reason"]
    assert report["ok"] is ok and code == (0 if ok else 1)
    assert (tmp_path / f"{part}.log").stat().st_size > 0  # what it printed before the stop


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_without_a_gpu_it_asks_for_dry_run():
    out = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "use --dry-run" in out.stderr


def test_resume_restores_the_cuda_rng_into_the_runs_device(monkeypatch):
    """A run on --device cuda:1 as a single process (the current device stays 0) gets its
    saved CUDA generator back on cuda:1, not on cuda:0."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    saved = torch.arange(16, dtype=torch.uint8)
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "stage": "flow", "step": 7, "rng": [{"cpu": torch.get_rng_state(), "cuda": saved}]}
    on_cuda1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    monkeypatch.setattr(model, "parameters", lambda recurse=True: iter([on_cuda1]))
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": restored.append((state, device)))
    assert river.resume(ckpt, model, opt, sched, None, 1e-3, 0.0, rank=0) == (7, 0)
    assert len(restored) == 1 and torch.equal(restored[0][0], saved)
    device = restored[0][1]  # an index names a CUDA device
    assert (torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            ) == torch.device("cuda", 1)
