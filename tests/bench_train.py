"""The training loop against the bare network step, side by side (a script, not a test).

    python tests/bench_train.py [--preset tiny] [--steps 60] [--repeats 3]

For each stage of the preset, on random data shaped like the real batches:
- bare: forward, backward, AdamW step of the network alone on one fixed batch;
- loop: river.train_stage for the same number of steps, fed as train_autoencoder and
  train_flow feed it (random clips drawn from a ClipDataset each step), with its EMA,
  gradient clipping, schedule and a log row every step (its own timer).
Prints the median seconds per step of each and the ratio loop / bare (target: <= 1.15), the
best of `repeats` runs of each, alternated so a noisy neighbour hits both alike, and a JSON
line. Medians of single steps keep a busy machine's hiccups out of the ratio.
"""
import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import river  # noqa: E402


def stage_parts(cfg, stage):
    """(network, loss function of (net, batch), a ClipDataset of the stage's items, batch size)."""
    model = river.River(cfg)
    if stage == "ae":
        videos = [torch.rand(8, cfg.channels, cfg.image_size, cfg.image_size) * 2 - 1
                  for _ in range(64)]
        frames = river.ClipDataset(videos, frames=1)

        def loss_fn(ae, x):
            recon, vq_loss, stats = ae(x)
            return torch.nn.functional.mse_loss(recon, x) + vq_loss, stats
        return model.ae, loss_fn, lambda: frames.batch(cfg.ae_batch)[:, 0]
    side = cfg.image_size // 2 ** (len(cfg.ae_channels) - 1)
    latents = river.ClipDataset([torch.randn(32, cfg.latent_dim, side, side) for _ in range(64)],
                                cfg.clip_frames, cfg.frame_skip)
    return (model.field, lambda field, z: (river.flow_loss(field, z, cfg), {}),
            lambda: latents.batch(cfg.flow_batch))


def bare(cfg, stage, steps):
    """Median seconds of a forward, backward and AdamW step of the network alone."""
    net, loss_fn, draw = stage_parts(cfg, stage)
    batch = draw()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 3):  # three warm-up steps
        tic = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(net, batch)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - tic)
    return statistics.median(times[3:])


def loop(cfg, stage, steps):
    """Median seconds of a step of river.train_stage, from its own log (a row every step; its
    progress lines, printed when there is no terminal, are silenced)."""
    net, loss_fn, draw = stage_parts(cfg, stage)
    with tempfile.TemporaryDirectory() as run, contextlib.redirect_stdout(io.StringIO()):
        river.train_stage(stage, net, loss_fn, river.endless(draw), steps + 3, 1e-4, cfg, run,
                          torch.device("cpu"), ema_decay=cfg.ema_decay if stage == "flow" else 0.0,
                          ckpt_every=10 ** 9, log_every=1)
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return statistics.median(1 / r["steps_per_s"] for r in rows[3:])


def cpu_name():
    """The CPU's model name (lscpu), for the first line of a benchmark's output."""
    return subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"],
                          capture_output=True, text=True).stdout.strip() or platform.processor()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=tuple(river.PRESETS))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = river.PRESETS[args.preset]
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"preset {args.preset}, {args.steps} steps, best of {args.repeats}")
    print(f"{'stage':6}{'batch':>7}{'bare s/step':>13}{'loop s/step':>13}{'loop/bare':>11}")
    result = {}
    for stage in ("ae", "flow"):
        times = {"bare": [], "loop": []}
        for _ in range(args.repeats):
            torch.manual_seed(0)
            times["bare"].append(bare(cfg, stage, args.steps))
            torch.manual_seed(0)
            times["loop"].append(loop(cfg, stage, args.steps))
        b, lp = min(times["bare"]), min(times["loop"])
        batch = cfg.ae_batch if stage == "ae" else cfg.flow_batch
        print(f"{stage:6}{batch:7}{b:13.4f}{lp:13.4f}{lp / b:11.2f}")
        result[stage] = {"bare_s": b, "loop_s": lp, "ratio": lp / b}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
