"""fp32 against bf16 autocast, side by side in one process (a script, not a test).

    python tests/bench_precision.py [--cases tiny:ae,tiny:flow,...] [--steps 20] [--repeats 3]

For each case (preset:stage, with :uvit for the official vector field) on random data shaped
like the real batches (tests/bench_train.py's stage_parts): the median seconds of a forward
pass (eval mode, no gradient) and of a training step (forward, backward, AdamW) under
river.autocast(cpu, "fp32") and under river.autocast(cpu, "bf16"), alternated so a noisy
neighbour hits both alike, best of `repeats`. Prints a table of the speed-ups (fp32 time /
bf16 time) and a JSON line. bf16 pays on CPUs with AMX or AVX-512 BF16 (`lscpu` flags amx_bf16,
avx512_bf16); elsewhere autocast emulates it and is slower.
"""
import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
import river  # noqa: E402

CASES = "tiny:ae,tiny:flow,real32:ae,real32:flow,bair64:flow,bair64:flow:uvit"


def timed(fn, steps):
    """Median seconds of fn() over `steps` calls, after two warm-up calls."""
    times = []
    for _ in range(steps + 2):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times[2:])


def measure(cfg, stage, precision, steps):
    """(forward s, training step s) of the stage's network under the precision."""
    torch.manual_seed(0)
    net, loss_fn, draw = bench_train.stage_parts(cfg, stage)
    batch, cpu = draw(), torch.device("cpu")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def forward():
        net.eval()
        with torch.no_grad(), river.autocast(cpu, precision):
            loss_fn(net, batch)

    def train():
        net.train()
        opt.zero_grad(set_to_none=True)
        with river.autocast(cpu, precision):
            loss, _ = loss_fn(net, batch)
        loss.backward()
        opt.step()
    return timed(forward, steps), timed(train, steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=CASES)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"{bench_train.cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {args.steps} steps, best of {args.repeats}")
    print(f"{'case':22}{'batch':>6}{'fp32 fwd s':>12}{'bf16 fwd s':>12}{'fwd x':>7}"
          f"{'fp32 step s':>13}{'bf16 step s':>13}{'step x':>8}")
    result = {}
    for case in args.cases.split(","):
        preset, stage, *field = case.split(":")
        cfg = replace(river.PRESETS[preset], **({"field": field[0]} if field else {}))
        runs = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            for precision in runs:
                runs[precision].append(measure(cfg, stage, precision, args.steps))
        (f32, s32), (f16, s16) = (min(r, key=lambda x: x[1]) for r in runs.values())
        batch = cfg.ae_batch if stage == "ae" else cfg.flow_batch
        print(f"{case:22}{batch:6}{f32:12.4f}{f16:12.4f}{f32 / f16:7.2f}{s32:13.4f}{s16:13.4f}"
              f"{s32 / s16:8.2f}")
        result[case] = {"forward_speedup": f32 / f16, "step_speedup": s32 / s16,
                        "fp32_step_s": s32, "bf16_step_s": s16}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
