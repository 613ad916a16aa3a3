"""The paper's two ideas at small scale, where they should hold and where they should not.

    python tests/claims.py [--quick] [--out runs/claims]      # or: python river.py claims ...

RIVER ("Efficient Video Prediction via Sparsely Conditioned Flow Matching", Davtyan, Sameni,
Favaro, ICCV 2023) rests on two ideas, tested here on 2 CPU cores with the `tiny` preset:

1. Sparse conditioning. The vector field sees the last frame and ONE past frame, drawn anew at
   every network evaluation, so that over one integration it sees much of the past at the cost
   of one frame. Four arms, trained at an equal budget on the same autoencoder with the same
   seeds: random past frame (the paper), last frame only, last + fixed previous frame, and
   dense (the last K = 4 frames at once, a wider input). On two data sets: bouncing balls,
   where the last two frames determine the next one, and the occluder data set, where a grey
   bar sweeps over still blocks and the frame in which a hidden block comes back out (a
   "memory frame", flagged in the file) can be known only from an older frame.
2. Warm start. Beginning the integration at t = s from the previous frame's latent, partly
   noised, keeps only about (1 - s) of the solver steps (the official grid, `time_grid`).
   Quality against network evaluations (NFE) per frame for several s, on the demo balls and
   on balls at a quarter of their speed, where the previous frame is near the next one.

And a picture of sparse conditioning at work: for one predicted frame, the past frame drawn
at every evaluation, its distance d, and the decoded one-step estimate x + (1 - t) v.

Writes OUT/claims.md (every table, as printed), OUT/claims.json (every number) and
OUT/sparse_conditioning.png. Finished trainings are reused when the command runs again with
the same settings. Nothing here is in river.py's method: the experiment only calls it.
"""
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data_prep  # noqa: E402
import river  # noqa: E402


@dataclass
class Budget:
    """How much of everything one run spends (FULL: about 50 min on an idle 2-core CPU)."""
    videos: int = 1000            # per synthetic data set, split 80/10/10
    frames: int = 32              # frames per video
    ae_steps: int = 500           # each autoencoder (balls, occluder)
    batch: int = 64               # batch of every training step (both stages) and memory probe
    flow_steps: int = 1200        # each flow model: every arm, every seed
    seeds: int = 1                # training seeds of the conditioning arms
    eval_videos: int = 100        # test videos per arm (0: all)
    samples: int = 4              # samples per test video: mean and best-of-N
    sample_steps: int = 10        # Euler steps of the arms and the picture: the random past
                                  # frame needs evaluations to vary over (tiny's default is 2)
    grid_videos: int = 50         # test videos of the warm-start grid (one sample each)
    grid_steps: tuple = (1, 2, 4, 8, 16, 32)
    warm_starts: tuple = (0.0, 0.1, 0.3, 0.5, 0.7)


FULL = Budget()
QUICK = Budget(videos=20, frames=20, ae_steps=2, flow_steps=2, batch=16, eval_videos=2,
               samples=2, sample_steps=4, grid_videos=1, grid_steps=(1, 2),
               warm_starts=(0.0, 0.5))

ARMS = {"random": "random past frame (paper)", "last": "last frame only",
        "fixed": "last + fixed previous frame", "dense": "dense: last 4 frames at once"}
DATASETS = {"balls": "bouncing balls (demo data)",
            "occluder": "occluder (bar over still blocks; memory frames flagged)",
            "slow_balls": "bouncing balls at speed 0.25"}
REACH_DB = 0.1  # a warm start "reaches" the cold start's best PSNR when within this margin


# ---------------------------------------------------------------------------------------
# Bookkeeping: timed parts
# ---------------------------------------------------------------------------------------

class Clock:
    """Wall-clock seconds per part of the run, printed as each part ends."""

    def __init__(self):
        self.start, self.parts = time.time(), {}

    @contextmanager
    def part(self, name):
        print(f"\n== {name}", flush=True)
        tic = time.time()
        yield
        self.parts[name] = self.parts.get(name, 0.0) + time.time() - tic
        print(f"== {name}: {self.parts[name]:.0f} s (total so far {self.total():.0f} s)",
              flush=True)

    def total(self):
        return time.time() - self.start


# ---------------------------------------------------------------------------------------
# Data and autoencoders
# ---------------------------------------------------------------------------------------

def make_data(folder, budget, seed):
    """The three data sets, written unless already there: {name: path}."""
    os.makedirs(folder, exist_ok=True)
    recipes = {"balls": dict(kind="balls"), "occluder": dict(kind="occluder"),
               "slow_balls": dict(kind="balls", speed=0.25)}
    paths = {}
    for name, kind in recipes.items():
        paths[name] = os.path.join(folder, f"{name}.h5")
        if not os.path.exists(paths[name]):
            print(f"writing {paths[name]} ({DATASETS[name]})")
            data_prep.write_synthetic(paths[name], videos=budget.videos, frames=budget.frames,
                                      seed=seed, **kind)
    return paths


def usable_autoencoder(path, cfg):
    """True if path holds an autoencoder that loads into this config's model."""
    try:
        river.load_autoencoder(river.River(cfg), path)
        return True
    except river.RiverError:
        return False


def autoencoders(paths, cfg, out, demo_run, device, seed):
    """One autoencoder per look: the balls (shared by the slow balls) and the occluder.
    The demo's (demo_run/ae.pt) is reused for the balls when it fits. Returns
    {data set: (ae.pt path, where it came from, reconstruction PSNR on its val frames)}."""
    found = {}
    for name in ("balls", "occluder"):
        demo_ae = os.path.join(demo_run, "ae.pt") if demo_run else ""
        if name == "balls" and os.path.exists(demo_ae) and usable_autoencoder(demo_ae, cfg):
            found[name] = (demo_ae, f"reused from {demo_run}")
            continue
        run = os.path.join(out, f"ae-{name}")
        river.train(paths[name], run, cfg, "ae", resume=True, device=device, seed=seed)
        found[name] = (os.path.join(run, "ae.pt"), f"trained here ({cfg.ae_steps} steps)")
    found["slow_balls"] = (found["balls"][0], "the balls' autoencoder (the same look)")
    result = {}
    for name, (path, source) in found.items():
        model = river.River(cfg)
        river.load_autoencoder(model, path)
        frames = river.spread_frames(paths[name])
        db = river.psnr_of_reconstruction(model.ae, frames, torch.device("cpu"))
        result[name] = {"path": path, "source": source, "recon_psnr": db}
        print(f"autoencoder for {name}: {path} ({source}), {db:.2f} dB on {len(frames)} val frames")
    return result


# ---------------------------------------------------------------------------------------
# Training the arms (through river.train; a finished run with the same settings is reused)
# ---------------------------------------------------------------------------------------

def train_flow(data, run, cfg, ae, seed, device):
    """river.train's flow stage into `run`, on the autoencoder in `ae`. A run trained with other
    settings (config, autoencoder, seed, data) is moved aside (river's --force) and redone."""
    state = river.autoencoder_state(ae, cfg)
    key = json.loads(json.dumps({"config": asdict(cfg), "ae": river.ae_fingerprint(state),
                                 "seed": seed, "data": os.path.abspath(data)}))
    marker = os.path.join(run, "claims_key.json")
    done = os.path.exists(os.path.join(run, "flow.pt"))
    stale = done and (not os.path.exists(marker) or json.load(open(marker)) != key)
    if stale:
        print(f"{run} was trained with other settings: starting it over")
    model = river.train(data, run, cfg, "flow", ae=ae, resume=not stale, force=stale,
                        device=device, seed=seed)
    with open(marker, "w") as f:
        json.dump(key, f)
    return model.eval()


def training_speed(run):
    """Median optimizer steps per second of the flow stage's logged windows (metrics.jsonl)."""
    rows = [r["steps_per_s"] for r in river.RunLog(run).rows()
            if r.get("stage") == "flow" and "steps_per_s" in r]
    return float(np.median(rows)) if rows else float("nan")


STEP = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
import river
cfg, device = river.config_from_dict(json.loads({cfg!r})), torch.device({device!r})
model = river.River(cfg).to(device)
if {step!r}:
    x = torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    shape = model.ae.encode(x).shape[1:]  # (D, h, w)
    z = torch.randn(cfg.flow_batch, cfg.clip_frames, *shape, device=device)
    opt = torch.optim.AdamW(model.field.parameters())
    for _ in range(2):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = river.flow_loss(model.field, z, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
if device.type == "cuda":
    peak = torch.cuda.max_memory_allocated()
else:  # VmHWM: ru_maxrss would keep the parent's peak across fork and exec
    try:
        status = open("/proc/self/status").read().split("VmHWM:")[1]
        peak = int(status.split()[0]) * 1024
    except (OSError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"peak_mb": peak / 2**20}}))
"""


def peak_memory(cfg, device, step=True):
    """Peak memory (MB) of two flow training steps at the config's batch, in a fresh process:
    peak resident set size on a CPU (VmHWM; torch itself included), max_memory_allocated
    on CUDA.
    step=False: the floor, the process with river imported and the model built."""
    code = STEP.format(root=ROOT, cfg=json.dumps(asdict(cfg)), device=str(device), step=step)
    env = {**os.environ, "RIVER_KERNELS": "ref"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise river.RiverError(f"the memory probe failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


# ---------------------------------------------------------------------------------------
# The conditioning arms
# ---------------------------------------------------------------------------------------

def scores(result):
    """The numbers of one evaluate() result that the tables show."""
    row = {f"{k}_{m}": result[name][m] for name, k in (("model_mean", "mean"), ("model_best", "best"))
           for m in ("psnr", "ssim")}
    memory = result.get("memory_frames")
    for name, k in (("model_mean", "mean"), ("model_best", "best")):
        for m in ("psnr", "ssim"):
            row[f"memory_{k}_{m}"] = memory[name][m] if memory else None
    row["memory_frames"] = memory["model_mean"]["frames"] if memory else 0
    row["ms_per_frame"] = 1000 * result["seconds_per_frame"]
    row["nfe_per_frame"] = result["nfe_per_frame"]
    return row


def mean_over_seeds(rows):
    """Per key, the mean over seeds (None stays None), and the PSNR spread (max - min)."""
    out = {k: (None if rows[0][k] is None else float(np.mean([r[k] for r in rows])))
           for k in rows[0] if not isinstance(rows[0][k], dict)}
    out["seed_spread_psnr"] = max(r["mean_psnr"] for r in rows) - min(r["mean_psnr"] for r in rows)
    return out


def conditioning_arms(paths, aes, cfg, budget, out, device, seed, clock):
    """Train and evaluate every arm on the balls and the occluder. Returns the results and
    the trained models of seed `seed` ({(data set, arm): River})."""
    results, models = {}, {}
    for name in ("balls", "occluder"):
        split = river.pick_split(paths[name], "test")
        clips, memory = river.eval_clips(paths[name], split, cfg.context,
                                         cfg.clip_frames - cfg.context, cfg.frame_skip,
                                         budget.eval_videos, memory=True)
        results[name] = {"videos": len(clips), "arms": {}}
        for arm in ARMS:
            arm_cfg = replace(cfg, conditioning=arm)
            per_seed = {}
            for s in range(seed, seed + budget.seeds):
                run = os.path.join(out, name, f"{arm}-seed{s}")
                with clock.part(f"train {name} / {arm} / seed {s}"):
                    model = train_flow(paths[name], run, arm_cfg, aes[name]["path"], s, device)
                with clock.part(f"evaluate {name} / {arm} / seed {s}"):
                    r = river.evaluate(model, clips, cfg.context, budget.samples, seed=seed,
                                       memory=memory)
                per_seed[s] = {**scores(r), "steps_per_s": training_speed(run),
                               "copy_last": r["copy_last"],
                               "copy_last_memory": r.get("memory_frames", {}).get("copy_last")}
                print_arm(name, arm, s, per_seed[s])
                if s == seed:
                    models[name, arm] = model
            results[name]["arms"][arm] = {"seeds": per_seed,
                                          "summary": mean_over_seeds(list(per_seed.values()))}
        first = results[name]["arms"]["random"]["seeds"][seed]
        results[name]["copy_last"] = first["copy_last"]
        results[name]["copy_last_memory"] = first["copy_last_memory"]
    return results, models


def print_arm(name, arm, s, row):
    memory = (f", memory frames {row['memory_mean_psnr']:.2f} dB" if row["memory_mean_psnr"]
              is not None else "")
    print(f"{name} / {arm} / seed {s}: {row['mean_psnr']:.2f} dB mean, {row['best_psnr']:.2f} "
          f"best-of-N{memory}; {row['steps_per_s']:.1f} steps/s")


def arm_costs(cfg, device):
    """Per arm: field parameters and peak memory of a training step; plus the process floor."""
    costs = {"floor_mb": peak_memory(cfg, device, step=False)}
    for arm in tqdm(ARMS, desc="memory probes", leave=False, disable=None):
        arm_cfg = replace(cfg, conditioning=arm)
        costs[arm] = {"field_params": sum(p.numel() for p in river.UNet(arm_cfg).parameters()),
                      "peak_mb": peak_memory(arm_cfg, device)}
    return costs


# ---------------------------------------------------------------------------------------
# Warm start against NFE
# ---------------------------------------------------------------------------------------

def warm_start_grid(model, clips, budget, context, seed):
    """Quality against NFE per frame for every warm start s and step count (the official grid:
    `steps` over [0, 1], of which a warm start keeps about (1 - s)). Step counts that give the
    same time grid are evaluated once. Returns rows sorted by s, then NFE."""
    done = {}
    jobs = [(s, n) for s in budget.warm_starts for n in budget.grid_steps]
    for s, n in tqdm(jobs, desc="warm-start grid", leave=False, disable=None):
        grid = tuple(round(float(t), 6) for t in river.time_grid(s, n))
        if grid in done:
            done[grid]["steps"].append(n)
            continue
        r = river.evaluate(model, clips, context, 1, steps=n, warm_start=s, seed=seed)
        done[grid] = {"warm_start": s, "steps": [n], "nfe_per_frame": r["nfe_per_frame"],
                      "psnr": r["model_mean"]["psnr"], "ssim": r["model_mean"]["ssim"],
                      "ms_per_frame": 1000 * r["seconds_per_frame"],
                      "copy_last_psnr": r["copy_last"]["psnr"]}
    return sorted(done.values(), key=lambda r: (r["warm_start"], r["nfe_per_frame"]))


def reach(rows, margin=REACH_DB):
    """Per warm start s: the fewest NFE per frame at which its PSNR comes within `margin` dB
    of the cold start's best, or None; with the cold start's best and s's own best."""
    cold = [r for r in rows if r["warm_start"] == 0]
    target = max(cold, key=lambda r: r["psnr"])
    out = {}
    for s in sorted({r["warm_start"] for r in rows}):
        mine = [r for r in rows if r["warm_start"] == s]
        hit = [r["nfe_per_frame"] for r in mine if r["psnr"] >= target["psnr"] - margin]
        best = max(mine, key=lambda r: r["psnr"])
        out[s] = {"reaches_at_nfe": min(hit) if hit else None, "best_psnr": best["psnr"],
                  "best_at_nfe": best["nfe_per_frame"]}
    return {"cold_best_psnr": target["psnr"], "cold_best_nfe": target["nfe_per_frame"],
            "margin_db": margin, "per_warm_start": out}


# ---------------------------------------------------------------------------------------
# The picture: sparse conditioning at work
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def record_evaluations(model, history, steps):
    """Sample the latent after history (1, L, D, h, w) with river's sampler (Euler, cold
    start), recording every evaluation of the field: its input x, time t, conditioning latent
    and distance d, and the velocity v. The field's forward is wrapped, then restored."""
    seen, forward = [], model.field.forward

    def spy(x, t, ref, cond, d):
        v = forward(x, t, ref, cond, d)
        seen.append({"t": float(t[0]), "x": x.clone(), "v": v.float().clone(),
                     "cond": cond.clone(), "d": int(d[0])})
        return v

    model.field.forward = spy
    try:
        z = model.next_latent(history, steps)
    finally:
        del model.field.forward  # back to the class's forward
    return z, seen


def memory_example(path, split, lo, hi):
    """The first (video, frame) of a split whose frame is a memory frame, with lo <= frame < hi."""
    for v, flags in enumerate(data_prep.memory_flags(path, split)):
        for f in np.flatnonzero(flags):
            if lo <= f < hi:
                return v, int(f)
    return None


@torch.no_grad()
def picture(models, path, out_png, steps, seed):
    """For one memory frame of the occluder's test split, given the true frames before it:
    per evaluation of the field, the past frame drawn (distance d), the state x_t and the
    decoded one-step estimate x + (1 - t) v, for the random arm (the paper) and the fixed arm.
    Writes out_png; returns what it shows, with the PSNR of every estimate."""
    split = river.pick_split(path, "test")
    cfg = models["random"].cfg
    found = memory_example(path, split, 3, cfg.clip_frames)
    if found is None:  # a tiny data set may have none: take any frame
        found = (0, min(cfg.clip_frames, data_prep.VideoStore(path, split).lengths[0]) - 1)
    video, frame = found
    truth = river.to_float(data_prep.VideoStore(path, split).read(video, 0, frame + 1))
    panels, info = [], {"video": video, "frame": frame, "split": split, "steps": steps}
    for arm in ("random", "fixed"):
        model = models[arm]
        device = next(model.parameters()).device
        history = model.ae.encode(truth[:frame].to(device))[None]  # (1, frame, D, h, w)
        torch.manual_seed(seed)
        z, seen = record_evaluations(model, history, steps)
        decode = lambda lat: model.ae.decode(lat).cpu()[0]  # noqa: E731
        columns = [{"t": e["t"], "d": e["d"], "past": decode(e["cond"]), "state": decode(e["x"]),
                    "estimate": decode(e["x"] + (1 - e["t"]) * e["v"])} for e in seen]
        pred = decode(z)
        for c in columns:
            c["psnr"] = float(river.psnr(c["estimate"], truth[frame]))
        panels.append((arm, columns, decode(history[:, -1]), pred))
        info[arm] = [{"t": c["t"], "d": c["d"], "estimate_psnr": c["psnr"]} for c in columns]
        info[arm + "_prediction_psnr"] = float(river.psnr(pred, truth[frame]))
    draw_picture(panels, truth[frame], info, out_png)
    return info


def draw_picture(panels, truth, info, out_png):
    """One block of three rows per arm; columns: labels, the last frame, one per evaluation,
    the prediction and the truth."""
    plt = river.pyplot()
    steps = len(panels[0][1])
    rows, cols = 3 * len(panels), steps + 4
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols, 1.15 * rows + 0.7), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()

    def show(r, c, x, title=None, size=7):
        axes[r, c].imshow(river.to_uint8(x), interpolation="nearest")
        if title:
            axes[r, c].set_title(title, fontsize=size)

    for p, (arm, columns, reference, pred) in enumerate(panels):
        top = 3 * p
        labels = (f"{ARMS[arm]}:\npast frame drawn", "state $x_t$",
                  "one-step estimate\n$x + (1-t)\\,v$")
        for r, label in enumerate(labels):
            axes[top + r, 0].text(1.0, 0.5, label, ha="right", va="center", fontsize=7,
                                  transform=axes[top + r, 0].transAxes)
        show(top, 1, reference, "last frame\n(always given)")
        for i, c in enumerate(columns):
            show(top, i + 2, c["past"], f"t={c['t']:.2f}  d={c['d']}")
            show(top + 1, i + 2, c["state"])
            show(top + 2, i + 2, c["estimate"], f"{c['psnr']:.1f} dB", 6)
        show(top + 2, steps + 2, pred, f"prediction\n{info[arm + '_prediction_psnr']:.1f} dB")
        show(top + 2, steps + 3, truth, "truth")
    fig.suptitle(f"Sparse conditioning at work: occluder test video {info['video']}, frame "
                 f"{info['frame']} (a block comes back out from under the bar), given the true "
                 f"frames before it; Euler, {steps} steps from noise.\nEach column is one network "
                 "evaluation: the past frame it was shown (d: its distance to the last frame), "
                 "the state x_t, and where the state points (dB: PSNR against the truth).",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

def fmt(x, digits=2):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def tables(res):
    """claims.md: every table, in the order of the run."""
    st = res["settings"]
    b = st["budget"]
    threads = f"{st['threads']} thread" + ("" if st["threads"] == 1 else "s")
    lines = [
        f"# RIVER's claims at small scale{' (--quick: structure only, not results)' if st['quick'] else ''}",
        "",
        f"{st['machine']}; torch {st['torch']}, {threads}; tiny preset; "
        f"{st['context']} context -> {st['predicted']} predicted frames; seed {st['seed']}. "
        f"Timings (steps/s, ms/frame, elapsed) are wall clock on a machine that may be shared "
        f"with other work: read them as rough.", "",
        f"Budget: {b['videos']} videos per data set ({b['frames']} frames, 32x32), autoencoders "
        f"{b['ae_steps']} steps, every flow model {b['flow_steps']} steps at batch "
        f"{st['flow_batch']}, {b['seeds']} training seed(s) per arm; {st['eval_videos']} test "
        f"videos x {b['samples']} samples per arm, Euler {st['sample_steps']} steps, cold start.",
        "", "Autoencoders (reconstruction PSNR on 256 val frames):", "",
        "| data set | autoencoder | PSNR |", "|---|---|---|"]
    for name, a in res["autoencoders"].items():
        lines.append(f"| {DATASETS[name]} | {a['source']} | {fmt(a['recon_psnr'])} |")
    for name, r in res["conditioning"].items():
        memory = r["copy_last_memory"]
        lines += ["", f"## Conditioning arms: {DATASETS[name]}", "",
                  f"{r['videos']} test videos; PSNR (dB) / SSIM as the mean over samples and as "
                  f"best-of-{b['samples']} (the best sample over the whole clip), over all "
                  "predicted frames" + (f" and over the {memory['frames']} memory frames alone."
                                        if memory else "."), "",
                  "| arm | PSNR mean | PSNR best | SSIM mean | SSIM best | memory PSNR mean | "
                  "memory PSNR best | memory SSIM mean |", "|---|---|---|---|---|---|---|---|"]
        for arm, a in r["arms"].items():
            s = a["summary"]
            lines.append(f"| {ARMS[arm]} | {fmt(s['mean_psnr'])} | {fmt(s['best_psnr'])} | "
                         f"{fmt(s['mean_ssim'], 3)} | {fmt(s['best_ssim'], 3)} | "
                         f"{fmt(s['memory_mean_psnr'])} | {fmt(s['memory_best_psnr'])} | "
                         f"{fmt(s['memory_mean_ssim'], 3)} |")
        c = r["copy_last"]
        lines.append(f"| copy last frame (baseline) | {fmt(c['psnr'])} | {fmt(c['psnr'])} | "
                     f"{fmt(c['ssim'], 3)} | {fmt(c['ssim'], 3)} | "
                     f"{fmt(memory and memory['psnr'])} | {fmt(memory and memory['psnr'])} | "
                     f"{fmt(memory and memory['ssim'], 3)} |")
        if b["seeds"] > 1:
            lines += ["", "Seed spread (max - min over seeds) of PSNR mean: " + ", ".join(
                f"{arm} {a['summary']['seed_spread_psnr']:.2f} dB" for arm, a in r["arms"].items())]
    cost = res["cost"]
    lines += ["", "## What each arm costs", "",
              f"Peak memory: two flow training steps at batch {st['flow_batch']} in a fresh "
              f"process (peak RSS on a CPU, torch included; the process floor with the model "
              f"built is {cost['floor_mb']:.0f} MB). Training speed: median of the logged "
              "windows of each run (timing). Sampling: ms per predicted frame per video, "
              f"{st['eval_videos']} videos in one batch (timing).", "",
              "| arm | field parameters | peak MB | train steps/s balls | train steps/s occluder "
              "| sampling ms/frame | NFE/frame |", "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        arms = {n: r["arms"][arm]["summary"] for n, r in res["conditioning"].items()}
        ms = np.mean([a["ms_per_frame"] for a in arms.values()])
        lines.append(f"| {ARMS[arm]} | {cost[arm]['field_params']:,} | "
                     f"{cost[arm]['peak_mb']:.0f} | {fmt(arms['balls']['steps_per_s'], 1)} | "
                     f"{fmt(arms['occluder']['steps_per_s'], 1)} | {fmt(ms, 1)} | "
                     f"{int(arms['balls']['nfe_per_frame'])} |")
    for name, w in res["warm_start"].items():
        lines += ["", f"## Warm start against NFE: {DATASETS[name]}", "",
                  f"Random arm ({w['model']}), first {w['videos']} test videos, one sample each, "
                  "Euler on the official grid (`steps` over [0, 1]; a warm start at s keeps about "
                  f"(1 - s) of them; step counts giving the same grid run once). Copy last frame: "
                  f"{fmt(w['rows'][0]['copy_last_psnr'])} dB.", "",
                  "| warm start s | steps | NFE/frame | PSNR | SSIM | ms/frame |",
                  "|---|---|---|---|---|---|"]
        for r in w["rows"]:
            lines.append(f"| {r['warm_start']} | {', '.join(map(str, r['steps']))} | "
                         f"{r['nfe_per_frame']} | {fmt(r['psnr'])} | {fmt(r['ssim'], 3)} | "
                         f"{fmt(r['ms_per_frame'], 1)} |")
        rc = w["reach"]
        lines += ["", f"Cold start's best: {rc['cold_best_psnr']:.2f} dB at {rc['cold_best_nfe']} "
                  f"NFE/frame. Where each warm start reaches it (within {rc['margin_db']} dB):", "",
                  "| warm start s | reaches the cold best at NFE/frame | its own best PSNR (at NFE) |",
                  "|---|---|---|"]
        for s, p in rc["per_warm_start"].items():
            at = p["reaches_at_nfe"]
            lines.append(f"| {s} | {at if at is not None else 'does not reach it'} | "
                         f"{fmt(p['best_psnr'])} ({p['best_at_nfe']}) |")
    pic = res["picture"]
    lines += ["", "## Sparse conditioning at work", "",
              f"`{os.path.basename(pic['path'])}`: occluder test video {pic['video']}, frame "
              f"{pic['frame']}, given the true frames before it; one column per network "
              f"evaluation (Euler, {pic['steps']} steps).", "",
              "| arm | distances d drawn | PSNR of each one-step estimate | prediction PSNR |",
              "|---|---|---|---|"]
    for arm in ("random", "fixed"):
        ds = " ".join(str(e["d"]) for e in pic[arm])
        dbs = " ".join(f"{e['estimate_psnr']:.1f}" for e in pic[arm])
        lines.append(f"| {ARMS[arm]} | {ds} | {dbs} | {pic[arm + '_prediction_psnr']:.2f} |")
    lines += ["", "## Elapsed", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in res["elapsed_s"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

def run(args):
    budget = QUICK if args.quick else FULL
    budget = replace(budget, **{k: v for k, v in (
        ("flow_steps", args.flow_steps), ("ae_steps", args.ae_steps), ("seeds", args.seeds),
        ("eval_videos", args.videos), ("samples", args.samples),
        ("grid_videos", args.grid_videos)) if v is not None})
    out = args.out or ("runs/claims-quick" if args.quick else "runs/claims")
    data_dir = args.data_dir or (os.path.join(out, "data") if args.quick else "data")
    demo_run = None if args.quick else args.demo_run
    device = river.pick_device(args.device)
    cfg = replace(river.PRESETS["tiny"], ae_steps=budget.ae_steps, flow_steps=budget.flow_steps,
                  ae_batch=budget.batch, flow_batch=budget.batch, sample_steps=budget.sample_steps)
    os.makedirs(out, exist_ok=True)
    clock = Clock()
    print(f"claims: {'quick (structure only)' if args.quick else 'full'} run into {out}; "
          f"{torch.get_num_threads()} threads on {device}")

    with clock.part("data"):
        paths = make_data(data_dir, budget, args.seed)
    with clock.part("autoencoders"):
        aes = autoencoders(paths, cfg, out, demo_run, args.device, args.seed)
    conditioning, models = conditioning_arms(paths, aes, cfg, budget, out, args.device,
                                             args.seed, clock)
    with clock.part("memory probes"):
        cost = arm_costs(cfg, device)

    warm = {}
    for name in ("balls", "slow_balls"):
        if name == "balls":
            model, where = models["balls", "random"], f"balls/random-seed{args.seed}"
        else:
            run_dir = os.path.join(out, "slow_balls", f"random-seed{args.seed}")
            with clock.part("train slow_balls / random"):
                model = train_flow(paths[name], run_dir, cfg, aes[name]["path"], args.seed,
                                   args.device)
            where = f"slow_balls/random-seed{args.seed}"
        clips = river.eval_clips(paths[name], river.pick_split(paths[name], "test"), cfg.context,
                                 cfg.clip_frames - cfg.context, cfg.frame_skip, budget.grid_videos)
        with clock.part(f"warm-start grid {name}"):
            rows = warm_start_grid(model, clips, budget, cfg.context, args.seed)
        warm[name] = {"model": where, "videos": len(clips), "rows": rows, "reach": reach(rows)}

    png = os.path.join(out, "sparse_conditioning.png")
    with clock.part("picture"):
        pic = picture({arm: models["occluder", arm] for arm in ("random", "fixed")},
                      paths["occluder"], png, cfg.sample_steps, args.seed)
    pic["path"] = png

    clock.parts["total"] = clock.total()
    res = {"settings": {"quick": args.quick, "budget": asdict(budget), "seed": args.seed,
                        "machine": f"{platform.machine()} {platform.system()}, "
                                   f"{os.cpu_count()} CPUs" if device.type == "cpu" else
                                   torch.cuda.get_device_name(device),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "device": str(device), "context": cfg.context,
                        "predicted": cfg.clip_frames - cfg.context, "flow_batch": cfg.flow_batch,
                        "sample_steps": cfg.sample_steps,
                        "eval_videos": conditioning["balls"]["videos"], "data": paths,
                        "reach_margin_db": REACH_DB},
           "elapsed_s": clock.parts, "autoencoders": aes, "conditioning": conditioning,
           "cost": cost, "warm_start": warm, "picture": pic}
    md = tables(res)
    with open(os.path.join(out, "claims.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "claims.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    print("\n" + md)
    print(f"wrote {out}/claims.md, {out}/claims.json and {png} in {clock.total() / 60:.1f} min")
    return res


def build_parser():
    p = river.Parser(prog="river.py claims", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a small version in a few minutes: checks that everything runs and "
                        "writes its tables; its numbers mean nothing")
    p.add_argument("--out", help="output folder (default runs/claims; runs/claims-quick with --quick)")
    p.add_argument("--data-dir", help="where the three data sets are found or made (default "
                   "data/, as the demo; OUT/data with --quick)")
    p.add_argument("--demo-run", default="runs/demo",
                   help="reuse this run's ae.pt for the balls when it fits (default runs/demo)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=river.positive, help="training seeds per arm (default 1)")
    p.add_argument("--flow-steps", type=river.positive, help="steps of every flow model")
    p.add_argument("--ae-steps", type=river.positive, help="steps of each autoencoder")
    p.add_argument("--videos", type=int, help="test videos per arm (0: all)")
    p.add_argument("--samples", type=river.positive, help="samples per test video")
    p.add_argument("--grid-videos", type=river.positive, help="test videos of the warm-start grid")
    return p


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (river.RiverError, data_prep.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
