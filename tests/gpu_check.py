"""One command to check river on a CUDA machine, and its CPU side in CI.

    python tests/gpu_check.py             # on a GPU: under 8 minutes on an H100/H200
    python tests/gpu_check.py --dry-run   # the same parts at tiny sizes on the CPU (CI)

The parts, in order, each in a process of its own with a time limit cut from one budget
(--budget, 470 s), so a part that hangs cannot take the others down with it:
  build    the csrc/ extension for this GPU's architecture (TORCH_CUDA_ARCH_LIST set to its
           compute capability unless given), CUDA kernels required
  tests    the CUDA cases of tests/test_kernels.py (pytest -k cuda)
  bench    tests/bench_kernels.py --device cuda: the kernels against PyTorch, as ratios
  train    one optimizer step of the bair64 preset (river.PRESETS["bair64"]) in fp32 and
           under bf16 autocast: the autoencoder, the U-Net field and the U-ViT field
           (field="uvit"); seconds per step, peak memory, a finite loss
  sample   River.generate_frames with the bair64 U-Net: seconds per predicted frame
  compile  torch.compile of the bf16 flow step of each field: compile seconds and the
           speedup over eager (it pays when the speedup is above 1)
  demo     `python river.py demo` in a temporary directory, end to end on the GPU; when the
           budget runs out first, how far it got (stage, steps, steps/s)
Prints a short table, then ONE JSON line (the last line of stdout):
  {"gpu_check": 1, "dry_run": ..., "ok": ..., "device": ..., "seconds": ...,
   "parts": {"build": {"status": "ok" | "failed" | "timeout" | "skipped", "seconds": ...,
                       "summary": ..., ...}, ...}, "logs": DIR}
ok is true when no part failed or ran out of time. Each part's full output is in DIR.
--dry-run runs the CPU side of every part at tiny sizes (the tiny preset, a small U-ViT,
--quick benchmark) and skips what needs CUDA (the CUDA tests are only collected; compile and
demo are skipped), saying why; tests/test_gpu_check.py runs it in CI.
"""

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# part -> (most seconds it may take on a GPU, least it needs to be worth starting)
PARTS = {"build": (200, 60), "tests": (120, 30), "bench": (90, 20), "train": (90, 30),
         "sample": (45, 15), "compile": (150, 60), "demo": (240, 60)}
DRY_SECONDS = 120  # per part, on the CPU
STATUSES = ("ok", "failed", "timeout", "skipped")


def emit(**result):
    """A part's result, merged into its entry of the JSON line (printed as it comes, so a
    part stopped at its time limit still reports what it had)."""
    print("RESULT " + json.dumps(result), flush=True)


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------
# The parts, each run as `gpu_check.py --part NAME`
# ---------------------------------------------------------------------------------------

def part_build(args, device):
    import torch
    import river
    os.environ["RIVER_KERNELS"] = "ext"
    start = time.time()
    kernels = river.load_kernels()
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    emit(kernels=sorted(kernels), arch=arch, build_s=round(time.time() - start, 1),
         summary=f"kernels for {', '.join(sorted(kernels))}" + (f" (sm {arch})" if arch else ""))
    assert device.type in kernels, f"the extension has no {device.type} kernels"
    if device.type == "cuda":  # one call on the device, so a wrong architecture shows here
        z = torch.randn(100, 4, device=device)
        idx, dist = torch.ops.river.vq_nearest(z, z)
        assert torch.equal(idx.cpu(), torch.arange(100)), "vq_nearest on the GPU is wrong"


def part_tests(args, device):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
           os.path.join(ROOT, "tests", "test_kernels.py")]
    if args.dry_run:
        out = subprocess.run(cmd + ["--collect-only"], capture_output=True, text=True, cwd=ROOT)
        found = re.search(r"(\d+)/\d+ tests collected", out.stdout)
        collected = int(found[1]) if found else 0
        emit(status="skipped", collected=collected,
             reason="needs CUDA: the CUDA cases were collected, not run",
             summary=f"{collected} CUDA cases collected; run on a GPU")
        assert collected > 0, out.stdout[-2000:]
        return
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(out.stdout[-20000:], out.stderr[-5000:], sep="\n")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                out.stdout.splitlines()[-1] if out.stdout else "")}
    emit(**counts, summary=", ".join(f"{n} {k}" for k, n in counts.items()))
    assert out.returncode == 0, f"pytest exited with {out.returncode}"


def part_bench(args, device):
    cmd = [sys.executable, os.path.join(ROOT, "tests", "bench_kernels.py"),
           "--device", device.type]
    cmd += ["--quick", "--repeats", "1", "--threads", "1"] if args.dry_run else ["--repeats", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(out.stdout, out.stderr[-5000:], sep="\n")
    assert out.returncode == 0, f"bench_kernels.py exited with {out.returncode}"
    ratios = json.loads(out.stdout.strip().splitlines()[-1])
    cdist = [v for k, v in ratios.items()
             if re.fullmatch(r"\w+_vq_N\d+_D\d+_K\d+_speedup_vs_cdist", k)]
    euler = [v for k, v in ratios.items() if k.endswith("_time_vs_add")]
    emit(ratios=ratios, summary=f"vq_nearest {min(cdist):.1f}-{max(cdist):.1f}x faster than "
                                f"cdist; euler_step_ {max(euler):.2f}x the time of add_")


def bair64(args, field):
    """The config of the train, sample and compile parts: bair64, or tiny in a dry run."""
    import river
    if args.dry_run:  # tiny sizes: 32x32 frames, small U-ViT, 2 clips
        return replace(river.PRESETS["tiny"], field=field, flow_batch=2, ae_batch=2,
                       uvit_width=64, uvit_depth=1, uvit_mid_depth=1)
    return replace(river.PRESETS["bair64"], field=field)


def make_step(model, latents, cfg, precision, field=None):
    """One flow-matching optimizer step of model.field (or `field`, a compiled copy)."""
    import torch
    import river
    opt = torch.optim.AdamW(model.field.parameters(), lr=cfg.flow_lr)
    field = model.field if field is None else field

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(latents.device.type, torch.bfloat16, enabled=precision == "bf16"):
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
    frames (B, T, C, H, W) through its autoencoder."""
    import torch
    import river
    torch.manual_seed(0)
    model = river.River(cfg).to(device)
    B, T = cfg.flow_batch, cfg.clip_frames
    frames = torch.rand(B * T, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    latents = model.ae.encode(frames)  # (B T, D, h, w)
    return model, latents.unflatten(0, (B, T)).contiguous()


def part_train(args, device):
    import torch
    import torch.nn.functional as F
    steps = 1 if args.dry_run else 5
    rows = {}
    for field in ("unet", "uvit"):
        cfg = bair64(args, field)
        model, latents = model_and_latents(cfg, device)
        for precision in ("fp32", "bf16"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            s, loss = timed(make_step(model, latents, cfg, precision), device, steps)
            row = {"s_per_step": round(s, 4), "loss": loss, "batch": list(latents.shape)}
            if device.type == "cuda":
                row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows[f"{field}_{precision}"] = row
            emit(**{f"{field}_{precision}": row})
            assert math.isfinite(loss), f"{field} {precision}: loss {loss}"
    # the autoencoder's step: its quantizer runs vq_nearest on B h w vectors, K codes
    cfg = bair64(args, "unet")
    model = model_and_latents(cfg, device)[0]
    frames = torch.rand(cfg.ae_batch, cfg.channels, cfg.image_size, cfg.image_size,
                        device=device) * 2 - 1
    opt = torch.optim.AdamW(model.ae.parameters(), lr=cfg.ae_lr)
    for precision in ("fp32", "bf16"):
        def ae_step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                recon, vq_loss, _ = model.ae(frames)
                loss = F.mse_loss(recon.float(), frames) + vq_loss
            loss.backward()
            opt.step()
            return loss.detach()
        s, loss = timed(ae_step, device, steps)
        rows[f"ae_{precision}"] = {"s_per_step": round(s, 4), "loss": loss}
        emit(**{f"ae_{precision}": rows[f"ae_{precision}"]})
        assert math.isfinite(loss), f"autoencoder {precision}: loss {loss}"
    emit(summary=" ".join(f"{k} {v['s_per_step'] * 1e3:.0f}ms" for k, v in rows.items()))


def part_sample(args, device):
    import torch
    cfg = bair64(args, "unet")
    model = model_and_latents(cfg, device)[0].eval()
    frames, steps = (2, 2) if args.dry_run else (4, cfg.sample_steps)
    context = torch.rand(4, cfg.context, cfg.channels, cfg.image_size, cfg.image_size,
                         device=device) * 2 - 1
    model.generate_frames(context, 1, steps=steps)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    video = model.generate_frames(context, frames, steps=steps)
    synchronize(device)
    s = (time.perf_counter() - start) / frames
    assert video.shape == (4, cfg.context + frames, cfg.channels, cfg.image_size,
                           cfg.image_size) and video.isfinite().all()
    emit(s_per_frame=round(s, 4), videos=4, steps=steps,
         summary=f"{s * 1e3:.0f} ms per frame of 4 videos, {steps} Euler steps")


def part_compile(args, device):
    import torch
    if args.dry_run:
        emit(status="skipped", reason="torch.compile is timed on the GPU only (compiling on one "
                                      "CPU thread takes minutes)", summary="GPU only")
        return
    rows = {}
    for field in ("unet", "uvit"):
        cfg = bair64(args, field)
        model, latents = model_and_latents(cfg, device)
        eager, _ = timed(make_step(model, latents, cfg, "bf16"), device, 5)
        start = time.perf_counter()
        step = make_step(model, latents, cfg, "bf16", field=torch.compile(model.field))
        step()
        synchronize(device)
        compile_s = time.perf_counter() - start
        compiled, loss = timed(step, device, 5)
        rows[field] = {"compile_s": round(compile_s, 1), "eager_s_per_step": round(eager, 4),
                       "compiled_s_per_step": round(compiled, 4),
                       "speedup": round(eager / compiled, 2), "pays": eager / compiled > 1.05}
        emit(**{field: rows[field]})
        assert math.isfinite(loss)
    emit(summary=" ".join(f"{f} {r['speedup']}x (compile {r['compile_s']:.0f}s)"
                          for f, r in rows.items()))


def part_demo(args, device):
    if args.dry_run:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "river.py"), "demo", "--help"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "--run" in out.stdout, out.stderr
        emit(status="skipped", reason="the demo trains for minutes: it runs on the GPU only "
                                      "(here: `river.py demo --help` answers)",
             summary="GPU only")
        return
    work = tempfile.mkdtemp(prefix="river_demo_")
    run = os.path.join(work, "run")
    cmd = [sys.executable, os.path.join(ROOT, "river.py"), "demo", "--run", run,
           "--data", os.path.join(work, "balls.h5"), "--device", device.type]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=work,
                             timeout=max(10, args.seconds - 10))
        print(out.stdout[-20000:], out.stderr[-5000:], sep="\n")
        gain = re.search(r"the model is ([+-][\d.]+) dB", out.stdout)
        emit(**progress(run), gain_db=float(gain[1]) if gain else None,
             summary=f"{gain[1] if gain else '?'} dB over copy-last")
        assert out.returncode == 0, f"river.py demo exited with {out.returncode}"
    except subprocess.TimeoutExpired:
        emit(status="timeout", **progress(run),
             reason=f"the demo did not finish in {args.seconds - 10:.0f} s",
             summary="out of time: " + ", ".join(f"{k} {v['steps']} steps at "
                                                   f"{v['steps_per_s']:.0f}/s"
                                                   for k, v in progress(run)["stages"].items()))


def progress(run):
    """How far a demo run got: per stage, the last logged step and the median steps/s."""
    stages = {}
    try:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                if "steps_per_s" in row:
                    s = stages.setdefault(row["stage"], {"steps": 0, "rates": []})
                    s["steps"], s["rates"] = row["step"], s["rates"] + [row["steps_per_s"]]
    except (OSError, ValueError):
        pass
    return {"stages": {k: {"steps": v["steps"],
                           "steps_per_s": round(sorted(v["rates"])[len(v["rates"]) // 2], 1)}
                       for k, v in stages.items()}}


PART_FUNCTIONS = {"build": part_build, "tests": part_tests, "bench": part_bench,
                  "train": part_train, "sample": part_sample, "compile": part_compile,
                  "demo": part_demo}


# ---------------------------------------------------------------------------------------
# The driver: every part in its own process, one budget, one JSON line
# ---------------------------------------------------------------------------------------

def run_part(name, args, seconds, logs):
    """Run one part as a child process for at most `seconds`; returns its entry."""
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name,
           "--seconds", str(int(seconds))] + (["--dry-run"] if args.dry_run else [])
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True)  # its own group: killed whole
    try:
        output, _ = proc.communicate(timeout=seconds)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    entry = {"status": "ok", "seconds": round(time.time() - start, 1)}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            entry.update(json.loads(line[len("RESULT "):]))
    if timed_out:
        entry.update(status="timeout", reason=f"stopped at its limit of {seconds:.0f} s")
    elif proc.returncode != 0:
        errors = [ln for ln in output.splitlines() if re.match(r"\w*(Error|Exception)\b", ln)]
        last = (errors or output.strip().splitlines() or ["?"])[-1]
        entry.update(status="failed", reason=last[:300])
    with open(os.path.join(logs, f"{name}.log"), "w") as f:
        f.write(output)
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU side at tiny sizes; skips what needs CUDA")
    parser.add_argument("--budget", type=float, default=470,
                        help="seconds for all parts together (default 470: 8 minutes with room)")
    parser.add_argument("--logs", help="folder for each part's output (default: a new temp dir)")
    parser.add_argument("--part", choices=tuple(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.part:  # a child: one part
        PART_FUNCTIONS[args.part](args, device)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("error: torch sees no CUDA device (on a CPU machine use --dry-run)", file=sys.stderr)
        return 2
    if not args.dry_run and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
    logs = args.logs or tempfile.mkdtemp(prefix="river_gpu_check_")
    os.makedirs(logs, exist_ok=True)
    start, parts = time.time(), {}
    names = list(PARTS)
    for i, name in enumerate(names):
        most, least = PARTS[name]
        if args.dry_run:
            seconds = DRY_SECONDS
        else:  # what is left, less the least the parts after this one need
            left = args.budget - (time.time() - start) - sum(PARTS[n][1] for n in names[i + 1:])
            seconds = min(most, left)
        if seconds < (10 if args.dry_run else least):
            parts[name] = {"status": "skipped", "seconds": 0.0, "summary": "no time left",
                           "reason": f"{seconds:.0f} s left of the budget, it needs {least}"}
        else:
            parts[name] = run_part(name, args, seconds, logs)
        parts[name].setdefault("summary", parts[name].get("reason", ""))
        print(f"{name:8} {parts[name]['status']:8} {parts[name]['seconds']:6.1f} s  "
              f"{parts[name]['summary']}", file=sys.stderr, flush=True)
    report = {"gpu_check": 1, "dry_run": args.dry_run,
              "ok": all(p["status"] in ("ok", "skipped") for p in parts.values()),
              "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "seconds": round(time.time() - start, 1), "budget_s": args.budget, "logs": logs,
              "parts": parts}
    print(f"river gpu_check on {report['device']}: {'OK' if report['ok'] else 'FAILED'} in "
          f"{report['seconds']:.0f} s (logs: {logs})")
    print(f"{'part':8} {'status':8} {'seconds':>7}  summary")
    for name, p in parts.items():
        print(f"{name:8} {p['status']:8} {p['seconds']:7.1f}  {p['summary']}")
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
