"""One command that checks river on a CUDA machine in the ten minutes one is lent, and
rehearses all of itself on the CPU first.

    python tests/gpu_check.py             # on a GPU
    python tests/gpu_check.py --dry-run   # every part's plumbing here, on the CPU kernels

Each part runs as a process group of its own under a time limit cut from one budget
(--budget, 470 s), its output streamed to LOGS/<part>.log as it is written, so a part that
hangs or is stopped still leaves what it printed. Seconds on an H100, my estimate against
the part's limit (estimates: no GPU has run this yet; the build took 44 s on one core of
this project's 2-core EPYC against torch 2.11.0+cu130, for sm_90 only, so 130 s leaves room):

  part        est / limit
  preflight     5 /  15  torch, CUDA, the GPU, nvcc, the driver, CUDA_HOME; the check stops
                         here when torch sees no GPU or nvcc's CUDA major is not torch's
  build        60 / 130  the csrc/ extension for this GPU (TORCH_CUDA_ARCH_LIST its compute
                         capability), RIVER_KERNELS=ext, into LOGS/ext, a TORCH_EXTENSIONS_DIR
                         of this run's own (RIVER_BUILD_HERE=1: not an installed copy): a killed build leaves no lock that a later part or
                         run waits on forever. When it fails, its summary holds the compiler's
                         errors, the parts that need the kernels are skipped and the others
                         run on the PyTorch reference
  kernels      45 /  90  pytest tests/test_kernels.py -k cuda: every kernel instantiation (D
                         1-10, 11, 13, 16, 17, 24, 25, 32, 33, 48, 49, 63-65, 100, 128 in each
                         dtype), large codebooks in slices, N*K over 2^31, every Euler head,
                         streams, graphs; CUDA_LAUNCH_BLOCKING=1 (a bad launch fails where it
                         happens; the graph case apart, capture refuses it), --timeout 60 per
                         test, --maxfail 5, -rfE, junit files LOGS/kernels*.xml
  sanitizer    35 /  60  compute-sanitizer memcheck, then racecheck, over both ops at small
                         sizes; a runtime that answers "Device not supported" is reported as
                         such, not as a failure
  river        45 /  75  river's own loop on the GPU: train --preset tiny (40 autoencoder and
                         40 flow steps, checkpoints every 20), --resume to 60 flow steps (the
                         CUDA RNG saved and restored), sample and eval under bf16 autocast (the
                         CUDA default); RIVER_KERNELS=ext and the references made to raise, so
                         no fallback can pass as the kernels
  torchrun     20 /  30  torchrun --standalone --nproc_per_node=1 river.py train: the NCCL
                         set-up, references raising too
  bench        15 /  30  optional: tests/bench_kernels.py, the kernels against the reference
                         and against cdist
  compile      40 /  40  optional: torch.compile of the bair64 U-Net's bf16 flow step
                         against eager (inductor may need longer: then its eager speed only)
  all         265 / 470  (each part's limit is also cut to what the budget has left after
                         the least the parts behind it need)

Optional parts that run out of time are reported, and do not fail the check; it fails only
when something is wrong: a part failed, or a required part ran out of time. The end: a table
of each part's verdict, the kernels' speed and the versions, then ONE JSON line:
  {"gpu_check": 2, "dry_run": ..., "ok": ..., "device": ..., "versions": {...},
   "seconds": ..., "budget_s": ..., "logs": DIR, "parts": {"build": {"status": "ok" |
   "failed" | "timeout" | "skipped", "seconds": ..., "summary": ..., ...}, ...}}
--dry-run runs every part here: the CPU build into its own folder, the pytest run (its CUDA
cases skip), the sanitizer's target without the sanitizer, river's loop with bf16 autocast on
the CPU kernels (the references raising), torchrun on gloo, the benchmark at --quick sizes
and the compile part with the eager backend; tests/test_gpu_check.py runs it.
"""

import argparse
import glob
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# part -> (most seconds it may take on a GPU, least it needs to be worth starting)
PARTS = {"preflight": (15, 10), "build": (130, 60), "kernels": (90, 30), "sanitizer": (60, 20),
         "river": (75, 40), "torchrun": (30, 15), "bench": (30, 10), "compile": (40, 20)}
OPTIONAL = {"bench", "compile"}  # timings: running out of time there is no fault
NEEDS_KERNELS = {"kernels", "sanitizer", "bench"}  # skipped when the build failed
DRY_SECONDS = 240  # per part, on the CPU
# river part: steps of each stage, the checkpoint interval, the flow steps after --resume
STEPS = {False: (40, 20, 60), True: (4, 2, 6)}  # by dry_run


def emit(**result):
    """A part's result, merged into its entry of the JSON line (printed as it comes, so a
    part stopped at its time limit still reports what it had)."""
    print("RESULT " + json.dumps(result), flush=True)


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_streamed(cmd, env=None, cwd=ROOT):
    """Run cmd, copying its output to ours line by line as it comes (into the part's log);
    returns (exit status, the output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd, bufsize=1)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return proc.wait(), "".join(lines)


# ---------------------------------------------------------------------------------------
# The parts, each run as `gpu_check.py --part NAME`
# ---------------------------------------------------------------------------------------

def part_preflight(args, device):
    """Versions and the one mismatch that makes the rest pointless."""
    import torch
    import river
    build = river.csrc_build()
    build.guess_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME  # None for a CPU torch: the guess then
    CUDA_HOME = CUDA_HOME or os.environ.get("CUDA_HOME")
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda, "cuda_home": CUDA_HOME,
                "nvcc": build.nvcc_version(CUDA_HOME) if CUDA_HOME else None,
                "driver": nvidia_smi("driver_version"), "gpu": None, "arch": None}
    if torch.cuda.is_available():
        versions.update(gpu=torch.cuda.get_device_name(),
                        arch="{}.{}".format(*torch.cuda.get_device_capability()))
    emit(versions=versions, arch=versions["arch"],
         summary=", ".join(f"{k} {v}" for k, v in versions.items() if v))
    if args.dry_run:
        return
    assert versions["torch_cuda"], "this torch has no CUDA (a CPU build): install a CUDA one"
    assert versions["gpu"], "torch sees no GPU (driver, CUDA_VISIBLE_DEVICES?)"
    nvcc, ours = versions["nvcc"], versions["torch_cuda"]
    assert not nvcc or nvcc.split(".")[0] == ours.split(".")[0], (
        f"nvcc in {CUDA_HOME} is CUDA {nvcc} but torch is CUDA {ours}: set CUDA_HOME to a "
        f"CUDA {ours.split('.')[0]}.x toolkit")


def nvidia_smi(field):
    """One field of nvidia-smi's first GPU, or None."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def part_build(args, device):
    import river
    start = time.time()
    try:
        kernels = river.load_kernels()  # RIVER_KERNELS=ext: a failure raises, with why
    except RuntimeError as e:  # the reason of the failure: the compiler's errors included
        emit(error=str(e)[:3000], summary=str(e).split("; ")[0][:1500])
        raise
    emit(kernels=sorted(kernels), build_s=round(time.time() - start, 1),
         summary=f"kernels for {', '.join(sorted(kernels))} in {time.time() - start:.0f} s"
                 + (f" (TORCH_CUDA_ARCH_LIST {os.environ['TORCH_CUDA_ARCH_LIST']})"
                    if os.environ.get("TORCH_CUDA_ARCH_LIST") else ""))
    assert device.type in kernels, f"the extension has no {device.type} kernels"


# pytest's selections: CUDA_LAUNCH_BLOCKING=1 reports a bad launch where it happens, but
# syncs after every launch, which a CUDA graph's capture refuses: the graph case runs apart
KERNEL_RUNS = [("kernels", "cuda and not graph", {"CUDA_LAUNCH_BLOCKING": "1"}),
               ("kernels_graph", "cuda and graph", {})]


def part_kernels(args, device):
    """pytest over the CUDA cases of test_kernels.py; on the CPU they are collected and skip."""
    timeout = importlib.util.find_spec("pytest_timeout") is not None
    codes, counts, failing = [], {}, []
    for name, select, env in KERNEL_RUNS:
        junit = os.path.join(args.logs, f"{name}.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", select,
               "--maxfail", "5", "-rfE", f"--junitxml={junit}",
               os.path.join(ROOT, "tests", "test_kernels.py")]
        cmd[4:4] = ["--timeout", "60"] if timeout else []
        codes.append(run_streamed(cmd, env={**os.environ, **env})[0])
        these, bad = junit_counts(junit)
        counts = {k: counts.get(k, 0) + n for k, n in these.items()}
        failing += bad
    emit(**counts, failing=failing, pytest_timeout=timeout,
         summary=", ".join(f"{n} {k}" for k, n in counts.items() if n)
         + (f"; failing: {', '.join(failing)}" if failing else "")
         + ("" if timeout else "; no pytest-timeout here, the part's limit only"))
    assert codes == [0] * len(codes), f"pytest exited with {codes}"
    assert args.dry_run or counts["passed"] > 0, "no CUDA case ran"


def junit_counts(path):
    """(passed, failed, errors, skipped counts), names of failing tests) of a junit file."""
    import xml.etree.ElementTree as ET
    counts, failing = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}, []
    if not os.path.exists(path):
        return counts, failing
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(outcome, "passed")
        counts[key] += 1
        if key in ("failed", "errors"):
            failing.append(case.get("name"))
    return counts, failing[:10]


def sanitizer_target(device_name):
    """Both ops at small sizes, each kernel and path once, checked against the references on
    the CPU (inputs made on the CPU, so the GPU runs little besides the ops)."""
    import torch
    import river
    assert device_name.split(":")[0] in river.load_kernels(), "the kernels did not load"
    g, dev = torch.Generator().manual_seed(0), torch.device(device_name)
    # tile path at D = 4 (3 slices), D = 64 (many tiles), D = 100 (the plain loop); bf16
    for N, K, D, dtype in ((1001, 700, 4, torch.float32), (300, 500, 64, torch.float32),
                           (200, 300, 100, torch.float32), (513, 700, 8, torch.bfloat16)):
        z, e = torch.randn(N, D, generator=g).to(dtype), torch.randn(K, D, generator=g).to(dtype)
        idx, dist = torch.ops.river.vq_nearest(z.to(dev), e.to(dev))
        ref_idx, _ = river.vq_nearest_reference(z, e)
        assert (idx.cpu() == ref_idx).float().mean() > 0.99, f"vq_nearest N={N} K={K} D={D}"
    # a common 16-byte head, and none (every element singly)
    for x_at, v_at, dtype in ((1, 1, torch.float32), (3, 5, torch.float16), (0, 0, torch.bfloat16)):
        buf = torch.randn(2, 10007 + 8, generator=g).to(dtype)
        x, v = buf[0, x_at:x_at + 10007], buf[1, v_at:v_at + 10007]
        y = x.to(dev, copy=True)  # x stays as it was, to compare with
        torch.ops.river.euler_step_(y, v.to(dev), 0.3)
        torch.testing.assert_close(y.cpu().float(), x.float() + 0.3 * v.float(),
                                   rtol=1e-2, atol=1e-2)
    print("sanitizer target: both ops ran and agree with the references", flush=True)


def find_sanitizer():
    """compute-sanitizer on PATH or in the toolkit (CUDA_HOME/bin), or None."""
    found = shutil.which("compute-sanitizer")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        path = os.path.join(home or "", "bin", "compute-sanitizer")
        found = found or (path if home and os.access(path, os.X_OK) else None)
    return found


def part_sanitizer(args, device):
    tool, target = find_sanitizer(), [sys.executable, os.path.abspath(__file__),
                                      "--sanitizer-target", str(device)]
    if args.dry_run:  # the target alone: compute-sanitizer needs a GPU
        code, _ = run_streamed(target)
        emit(status="skipped" if code == 0 else "failed", sanitizer=tool,
             reason="dry run: the target ran on the CPU kernels, without compute-sanitizer",
             summary=f"target ok on the CPU; compute-sanitizer {tool or 'not found'}")
        assert code == 0, f"the target exited with {code}"
        return
    if not tool:
        emit(status="skipped", reason="compute-sanitizer not found (PATH, CUDA_HOME/bin)",
             summary="compute-sanitizer not found")
        return
    # every tensor its own allocation, so an access past one is outside any
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    verdicts = {}
    for check in ("memcheck", "racecheck"):
        code, out = run_streamed([tool, "--tool", check, "--error-exitcode", "99",
                                  "--print-limit", "20", *target], env=env)
        refused = [ln for ln in out.splitlines() if re.search(r"not supported", ln, re.I)]
        errors = re.search(r"ERROR SUMMARY: (\d+) error", out)
        verdicts[check] = ("refused: " + refused[0].strip("= ")[:200] if refused
                           else f"{errors[1] if errors else '?'} errors, exit {code}")
        emit(**{check: verdicts[check]})
        if refused:  # this runtime's sanitizer does not take this GPU: say so, no failure
            emit(status="skipped", reason=f"compute-sanitizer {verdicts[check]}",
                 summary=f"compute-sanitizer {verdicts[check]}")
            return
        assert code == 0, f"compute-sanitizer {check}: {verdicts[check]}"
    emit(summary=", ".join(f"{k} {v}" for k, v in verdicts.items()))


def river_cli(argv):
    """`python river.py ARGV` with river's PyTorch references made to raise when
    GPU_CHECK_REFUSE_REFERENCES=1 (with RIVER_KERNELS=ext): a fallback where the kernels
    should run fails instead of passing as them. Prints the process group's backend."""
    import river
    if os.environ.get("GPU_CHECK_REFUSE_REFERENCES") == "1":
        for name in ("vq_nearest_reference", "euler_step_reference_"):
            setattr(river, name, refusing(name))
        print(f"gpu_check: kernels for {sorted(river.load_kernels())}, references refused",
              flush=True)
    river.main(argv)
    if river.dist.is_available() and river.dist.is_initialized():
        print(f"gpu_check: process group backend {river.dist.get_backend()}", flush=True)


def refusing(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"river.{name} ran: a fallback where the csrc/ kernels must run "
                             f"({', '.join(f'{a.dtype} {tuple(a.shape)}' for a in args[:2])})")
    return refuse


def river_env(args):
    """The river CLI's environment: references refused unless the build failed."""
    refuse = os.environ.get("RIVER_KERNELS") == "ext"
    return {**os.environ, "GPU_CHECK_REFUSE_REFERENCES": "1" if refuse else "0"}, refuse


def synthetic_data(args):
    """The bouncing balls file of the river and torchrun parts (made once per run)."""
    import data_prep
    path = os.path.join(args.logs, "data", "balls.h5")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data_prep.write_synthetic(path, videos=12 if args.dry_run else 48, frames=20)
    return path


def river_step(name, argv, env):
    """One river command through river_cli, in the part's log; its seconds and output."""
    emit(at=name)
    start = time.time()
    code, out = run_streamed([sys.executable, os.path.abspath(__file__), "--river-cli", *argv],
                             env=env)
    assert code == 0, f"river.py {' '.join(argv[:1])} ({name}) exited with {code}"
    return time.time() - start, out


def checkpoint(run, stage, step, device):
    """The stage's checkpoint is at `step` and holds the RNG states, the CUDA one on a GPU."""
    import torch
    import river
    ckpt = river.torch_load(os.path.join(run, f"{stage}.pt"))
    assert ckpt["step"] == step, f"{stage}.pt is at step {ckpt['step']}, not {step}"
    rng = ckpt["rng"][0]
    if device.type == "cuda":
        assert "cuda" in rng and rng["cuda"].numel() == torch.cuda.get_rng_state(device).numel()
    return sorted(rng)


def part_river(args, device):
    """river's own loop: train, resume, sample, eval, with the kernels proven in use."""
    data, (env, refused) = synthetic_data(args), river_env(args)
    run, (steps, every, more) = os.path.join(args.logs, "river_run"), STEPS[args.dry_run]
    # the CUDA default is bf16 autocast; the dry run asks for it on the CPU
    common = ["--device", str(device)] + (["--precision", "bf16"] if args.dry_run else [])
    train = ["train", "--data", data, "--run", run, "--preset", "tiny", "--ckpt-every",
             str(every), "--ae-steps", str(steps), *common]
    train += ["--batch-size", "2"] if args.dry_run else []
    s = {"train": river_step("train", train + ["--flow-steps", str(steps)], env)[0]}
    rng = checkpoint(run, "flow", steps, device)
    s["resume"], out = river_step("resume", train + ["--flow-steps", str(more), "--resume"], env)
    assert f"flow: resuming at step {steps}" in out, "the flow stage did not resume"
    checkpoint(run, "flow", more, device)
    few = ["--frames", "2", "--steps", "2"] if args.dry_run else []
    gif = os.path.join(run, "pred.gif")
    s["sample"] = river_step("sample", ["sample", "--run", run, "--data", data, "--num", "2",
                                        "--out", gif, *few, *common], env)[0]
    assert os.path.exists(gif), f"sample wrote no {gif}"
    s["eval"] = river_step("eval", ["eval", "--run", run, "--data", data, "--videos", "2",
                                    *few, *common], env)[0]
    with open(os.path.join(run, "eval.json")) as f:
        psnr = json.load(f)["model_mean"]["psnr"]
    assert math.isfinite(psnr), f"eval's PSNR is {psnr}"
    emit(seconds_by_step={k: round(v, 1) for k, v in s.items()}, rng_saved=rng, psnr=psnr,
         kernels_proven=refused,
         summary=f"train {steps}+{steps} steps, resumed to {more} (RNG {'+'.join(rng)}), "
                 f"sample, eval (PSNR {psnr:.1f}) in {sum(s.values()):.0f} s; "
                 + ("references refused: the kernels ran" if refused
                    else "on the PyTorch reference (no kernels)"))


def part_torchrun(args, device):
    data, (env, refused) = synthetic_data(args), river_env(args)
    steps = "2" if args.dry_run else "10"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.abspath(__file__), "--river-cli", "train", "--data", data, "--run-dir",
           os.path.join(args.logs, "torchrun_run"), "--preset", "tiny", "--ae-steps", steps,
           "--flow-steps", steps, "--device", device.type]
    cmd += ["--batch-size", "2"] if args.dry_run else []
    code, out = run_streamed(cmd, env=env)
    backend = re.search(r"process group backend (\w+)", out)
    emit(backend=backend and backend[1], summary=f"1 process on {backend and backend[1]}, "
                                                 f"{steps}+{steps} steps"
                                                 + (", references refused" if refused else ""))
    assert code == 0, f"torchrun exited with {code}"
    assert backend and backend[1] == ("nccl" if device.type == "cuda" else "gloo"), backend


def part_bench(args, device):
    cmd = [sys.executable, os.path.join(ROOT, "tests", "bench_kernels.py"),
           "--device", device.type]
    cmd += ["--quick", "--repeats", "1", "--threads", "1"] if args.dry_run else ["--repeats", "5"]
    code, out = run_streamed(cmd)
    assert code == 0, f"bench_kernels.py exited with {code}"
    ratios = json.loads(out.strip().splitlines()[-1])

    def span(pattern):  # the ratios of river's own copy, as (least, most)
        found = [v for k, v in ratios.items() if re.fullmatch(pattern, k)]
        return [min(found), max(found)] if found else None
    speed = {"vq_vs_cdist": span(r"[a-z]+_vq_N\d+_D\d+_K\d+_speedup_vs_cdist"),
             "vq_vs_reference": span(r"[a-z]+_vq_N\d+_D\d+_K\d+_speedup_vs_reference"),
             "euler_time_vs_add": span(r"[a-z]+_euler_.*_time_vs_add")}
    emit(ratios=ratios, speed=speed, summary="vq_nearest {:.1f}-{:.1f}x faster than cdist, "
         "{:.1f}-{:.1f}x than the reference; euler_step_ {:.2f}-{:.2f}x the time of add_".format(
             *speed["vq_vs_cdist"], *speed["vq_vs_reference"], *speed["euler_time_vs_add"]))


def compile_config(args):
    """bair64's U-Net, or tiny with a small batch in a dry run."""
    import river
    if args.dry_run:
        return replace(river.PRESETS["tiny"], flow_batch=2, ae_batch=2)
    return river.PRESETS["bair64"]


def make_step(model, latents, cfg, field=None):
    """One bf16 flow-matching optimizer step of model.field (or `field`, a compiled copy)."""
    import torch
    import river
    opt = torch.optim.AdamW(model.field.parameters(), lr=cfg.flow_lr)
    field = model.field if field is None else field

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(latents.device.type, torch.bfloat16):
            loss = river.flow_loss(field, latents, cfg)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def timed(step, device, steps):
    """Seconds per call of step() (after one untimed call) and the last loss."""
    loss = step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    return (time.perf_counter() - start) / steps, float(loss)


def model_and_latents(cfg, device):
    """River(cfg) on the device and a batch of latent clips (B, T, D, h, w) from random
    frames (B T, C, H, W) through its autoencoder."""
    import torch
    import river
    torch.manual_seed(0)
    model = river.River(cfg).to(device)
    B, T = cfg.flow_batch, cfg.clip_frames
    frames = torch.rand(B * T, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    with torch.no_grad():
        latents = model.ae.encode(frames)  # (B T, D, h, w)
    return model, latents.unflatten(0, (B, T)).contiguous()


def part_compile(args, device):
    """torch.compile of the U-Net's bf16 flow step against eager (the dry run: the eager
    backend, the plumbing only; inductor on one CPU thread takes minutes)."""
    import torch
    cfg, steps = compile_config(args), 1 if args.dry_run else 5
    emit(at="eager")
    model, latents = model_and_latents(cfg, device)
    eager, _ = timed(make_step(model, latents, cfg), device, steps)
    emit(at="compile", eager_s_per_step=round(eager, 4))
    start = time.perf_counter()
    backend = "eager" if args.dry_run else "inductor"
    step = make_step(model, latents, cfg, field=torch.compile(model.field, backend=backend))
    step()
    synchronize(device)
    compile_s = time.perf_counter() - start
    compiled, loss = timed(step, device, steps)
    assert math.isfinite(loss), f"the compiled step's loss is {loss}"
    emit(backend=backend, compile_s=round(compile_s, 1), eager_s_per_step=round(eager, 4),
         compiled_s_per_step=round(compiled, 4), speedup=round(eager / compiled, 2),
         summary=f"{backend}: {eager / compiled:.2f}x eager's speed after {compile_s:.0f} s "
                 f"of compiling (batch {tuple(latents.shape)})")


PART_FUNCTIONS = {"preflight": part_preflight, "build": part_build, "kernels": part_kernels,
                  "sanitizer": part_sanitizer, "river": part_river, "torchrun": part_torchrun,
                  "bench": part_bench, "compile": part_compile}


# ---------------------------------------------------------------------------------------
# The driver: every part in its own process group, one budget, one JSON line
# ---------------------------------------------------------------------------------------

def run_part(name, args, seconds, env):
    """Run one part for at most `seconds`, its output streamed to LOGS/<name>.log; its entry."""
    cmd = [sys.executable, "-u", os.path.abspath(__file__), "--part", name,
           "--logs", args.logs] + (["--dry-run"] if args.dry_run else [])
    log, start = os.path.join(args.logs, f"{name}.log"), time.time()
    with open(log, "w") as f:  # its own group: stopped whole, children included
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
    with open(log, errors="replace") as f:
        output = f.read()
    entry = {"status": "ok", "seconds": round(time.time() - start, 1)}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            entry.update(json.loads(line[len("RESULT "):]))
    if timed_out:
        during = f" during {entry['at']}" if "at" in entry else ""
        entry.update(status="timeout", reason=f"stopped at its limit of {seconds:.0f} s{during}")
    elif proc.returncode != 0:  # the part's own words (emit error=...) or its last error line
        errors = [ln for ln in output.splitlines() if re.match(r"\w*(Error|Exception)\b", ln)]
        last = (errors or output.strip().splitlines() or ["?"])[-1]
        entry.update(status="failed", reason=entry.pop("error", last[:1500]))
    return entry


def part_seconds(name, args, start, names):
    """A part's limit: its most, cut to what the budget has left after the least the
    parts behind it need."""
    if args.dry_run:
        return args.seconds or DRY_SECONDS
    behind = sum(PARTS[n][1] for n in names[names.index(name) + 1:])
    most = min(PARTS[name][0], args.seconds or math.inf)
    return min(most, args.budget - (time.time() - start) - behind)


def why_not(name, parts, env):
    """Why a part is not run (the preflight stopped the check, the build failed), or None."""
    if parts.get("preflight", {}).get("status") == "failed":
        return "the preflight stopped the check: " + parts["preflight"].get("reason", "")
    if name in NEEDS_KERNELS and parts.get("build", {}).get("status", "ok") != "ok":
        return "the build failed: " + parts["build"].get("reason", parts["build"].get("summary"))
    return None


def after(name, entry, env, args):
    """What a part's result changes for the parts behind it."""
    if name == "preflight" and entry.get("arch") and not env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = entry["arch"]  # this GPU's only: a shorter build
    if name == "build":
        env["RIVER_KERNELS"] = "ext" if entry["status"] == "ok" else "ref"
        for lock in glob.glob(os.path.join(env["TORCH_EXTENSIONS_DIR"], "**", "lock"),
                              recursive=True):
            os.remove(lock)  # a build stopped at its limit must not hold up the others


def run_all(args):
    """Every part in turn under the budget; {part: entry}."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RIVER_KERNELS": "ext",
           "RIVER_BUILD_HERE": "1", "TORCH_EXTENSIONS_DIR": os.path.join(args.logs, "ext")}
    start, parts, names = time.time(), {}, args.parts
    for name in names:
        seconds, least = part_seconds(name, args, start, names), PARTS[name][1]
        reason = why_not(name, parts, env)
        if reason is None and seconds < (1 if args.dry_run else least):
            reason = f"{seconds:.0f} s left of the budget, it needs {least}"
        if reason is None:
            parts[name] = run_part(name, args, seconds, env)
            after(name, parts[name], env, args)
        else:
            parts[name] = {"status": "skipped", "seconds": 0.0, "reason": reason}
        parts[name].setdefault("summary", parts[name].get("reason", ""))
        if parts[name]["status"] == "timeout" and name in OPTIONAL:
            parts[name]["summary"] = "optional, out of time: " + parts[name]["summary"]
        print(f"{name:9} {parts[name]['status']:8} {parts[name]['seconds']:6.1f} s  "
              f"{parts[name]['summary'][:300]}", file=sys.stderr, flush=True)
    return parts, time.time() - start


def verdict(parts):
    """True when nothing is wrong: no part failed, no required part ran out of time."""
    return all(p["status"] in ("ok", "skipped") or (p["status"] == "timeout" and n in OPTIONAL)
               for n, p in parts.items())


def report(args, parts, seconds):
    """The table, the versions and the kernels' speed, then the JSON line; the exit status."""
    versions = parts.get("preflight", {}).get("versions", {})
    ok = verdict(parts)
    device = "cpu (dry run)" if args.dry_run else versions.get("gpu") or "?"
    print(f"river gpu_check on {device}: {'OK' if ok else 'FAILED'} in {seconds:.0f} s "
          f"(logs: {args.logs})")
    print(f"{'part':9} {'status':8} {'seconds':>7}  summary")
    for name, p in parts.items():
        print(f"{name:9} {p['status']:8} {p['seconds']:7.1f}  {p['summary'][:500]}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    speed = parts.get("bench", {}).get("speed")
    print("kernels: " + (parts["bench"]["summary"] if speed else "not timed"))
    print(json.dumps({"gpu_check": 2, "dry_run": args.dry_run, "ok": ok, "device": device,
                      "versions": versions, "speed": speed, "seconds": round(seconds, 1),
                      "budget_s": args.budget, "logs": args.logs, "parts": parts}))
    return 0 if ok else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--river-cli"]:  # river.py's command line, references refused
        return river_cli(argv[1:])
    if argv[:1] == ["--sanitizer-target"]:
        return sanitizer_target(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="every part's plumbing on the CPU, at tiny sizes")
    parser.add_argument("--budget", type=float, default=470,
                        help="seconds for all parts together (default 470)")
    parser.add_argument("--logs", help="folder for each part's log (default: a new temp dir)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="the parts to run, comma-separated (default: all, in order)")
    parser.add_argument("--seconds", type=float, default=0,
                        help=f"each part's limit at most this (a dry run's: {DRY_SECONDS})")
    parser.add_argument("--part", choices=tuple(PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}: use {', '.join(PARTS)}")
    args.parts = [n for n in PARTS if n in args.parts.split(",")]
    args.logs = os.path.abspath(args.logs or tempfile.mkdtemp(prefix="river_gpu_check_"))
    if args.part:  # a child: one part
        import torch
        if args.dry_run and os.environ.get("GPU_CHECK_STALL") == args.part:
            print("stalling, as GPU_CHECK_STALL asks (tests: a part that runs out of time)")
            time.sleep(3600)
        PART_FUNCTIONS[args.part](args, torch.device("cpu" if args.dry_run else "cuda"))
        return 0
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("error: torch sees no CUDA device (on a CPU machine use --dry-run)", file=sys.stderr)
        return 2
    os.makedirs(args.logs, exist_ok=True)
    parts, seconds = run_all(args)
    return report(args, parts, seconds)


if __name__ == "__main__":
    sys.exit(main())
