"""Benchmark: the csrc/ ops against their PyTorch counterparts, side by side, one run.

    python tests/bench_kernels.py [--repeats 7] [--threads 2]

Named bench_*.py so pytest does not collect it. Each fused op is first checked against its
reference (a benchmark of a wrong kernel is worthless), then timed as the median of
`repeats` runs after one warm-up, on the CPU and, when there is one, on the GPU:
  vq_nearest   vs torch.cdist(z, e).argmin(1) and the expanded-matmul reference of river.py;
               achieved GFLOP/s counts 2 N K D (one FMA per code dimension per pair).
  euler_step_  vs x.add_(v, alpha=dt) and y.copy_(x); GB/s counts the bytes that must move:
               3 per element-size for euler and add (read x, read v, write x), 2 for copy.
Prints a table, then ONE JSON line of ratios: speedups > 1 mean the fused op is faster;
time_vs_add < 1 means euler_step_ beats x.add_; bandwidth_vs_copy is the fraction of
copy's GB/s that euler_step_ reaches (a CPU cache also reads y before writing it, so copy
really moves 3 x 4 bytes and euler can exceed 1.0). On a shared machine, rerun when numbers
look noisy: a core taken by another process shows up as ~8 ms (a scheduler time slice).
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import river  # noqa: E402

VQ_SIZES = [(16384, 4, 1024), (16384, 4, 16384), (16384, 8, 8192)]  # (N, D, K)
EULER_SIZES = [64 * 1024, 8 * 1024 * 1024]


def median_times(fns, repeats, device):
    """Median seconds per call of each fn in `fns` (name -> fn). The fns take turns within
    every repeat, so load from other processes on a shared machine hits them alike. On the
    GPU a sample is 20 back-to-back calls, so launch latency is amortised as in a loop."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    calls = 20 if device == "cuda" else 1
    samples = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up: caches, thread pools, lazy inits
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in samples.items()}


def cpu_peak_gflops(threads):
    """FP32 FMA peak: threads x FMA pipes x lanes x 2 FLOPs x clock. The assumption is
    printed: 2 FMA pipes per core (true for Zen 2-4 and for Intel since Haswell)."""
    flags, mhz = "", 0.0
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()
        mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M).group(1))
    except (OSError, AttributeError):
        pass
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    ghz = mhz / 1000 or 2.5
    peak = threads * 2 * lanes * 2 * ghz
    note = (f"assumed peak {peak:.0f} GFLOP/s = {threads} cores x 2 FMA pipes x {lanes} fp32 "
            f"lanes ({'AVX-512' if lanes == 16 else 'AVX2' if lanes == 8 else 'SSE'}) x 2 "
            f"FLOPs x {ghz:.2f} GHz (cpu MHz of /proc/cpuinfo)")
    return peak, note


def check(device):
    """The fused ops agree with the references before anything is timed."""
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(999, 8, generator=g).to(device), torch.randn(777, 8, generator=g).to(device)
    idx, dist = torch.ops.river.vq_nearest(z, e)
    ref_idx, ref_dist = river.vq_nearest_reference(z, e)
    assert (idx == ref_idx).float().mean() > 0.99, "vq_nearest disagrees with the reference"
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)
    x, v = torch.randn(100003, device=device), torch.randn(100003, device=device)
    expected = river.euler_step_reference_(x.clone(), v, 0.3)
    torch.ops.river.euler_step_(x, v, 0.3)
    torch.testing.assert_close(x, expected)


def bench(device, repeats):
    rows, ratios = [], {}
    for N, D, K in VQ_SIZES:
        g = torch.Generator().manual_seed(N + D + K)
        z = torch.randn(N, D, generator=g).to(device)
        e = torch.randn(K, D, generator=g).to(device)
        t = median_times({"ext": lambda: torch.ops.river.vq_nearest(z, e),
                          "cdist": lambda: torch.cdist(z, e).argmin(1),
                          "ref": lambda: river.vq_nearest_reference(z, e)}, repeats, device)
        gflops = 2 * N * K * D / 1e9
        name = f"vq_nearest N={N} D={D} K={K}"
        rows += [(name, "river vq_nearest", t["ext"], f"{gflops / t['ext']:.1f} GFLOP/s"),
                 (name, "cdist + argmin", t["cdist"], f"{t['cdist'] / t['ext']:.1f}x slower"),
                 (name, "reference (matmul)", t["ref"], f"{t['ref'] / t['ext']:.1f}x slower")]
        tag = f"{device}_vq_N{N}_D{D}_K{K}"
        ratios[f"{tag}_speedup_vs_cdist"] = round(t["cdist"] / t["ext"], 2)
        ratios[f"{tag}_speedup_vs_reference"] = round(t["ref"] / t["ext"], 2)
        ratios[f"{tag}_gflops"] = round(gflops / t["ext"], 1)
    for n in EULER_SIZES:
        x, v = torch.randn(n, device=device), torch.randn(n, device=device)
        y = torch.empty_like(x)
        # dt = 0 keeps x unchanged over the repeats; the op still reads and writes it all
        t = median_times({"ext": lambda: torch.ops.river.euler_step_(x, v, 0.0),
                          "add": lambda: x.add_(v, alpha=0.0),
                          "copy": lambda: y.copy_(x)}, repeats, device)
        gbps = {"ext": 12 * n / t["ext"] / 1e9, "add": 12 * n / t["add"] / 1e9,
                "copy": 8 * n / t["copy"] / 1e9}
        name = f"euler_step_ n={n}"
        rows += [(name, "river euler_step_", t["ext"], f"{gbps['ext']:.1f} GB/s"),
                 (name, "x.add_(v, alpha=dt)", t["add"], f"{gbps['add']:.1f} GB/s"),
                 (name, "y.copy_(x)", t["copy"], f"{gbps['copy']:.1f} GB/s")]
        tag = f"{device}_euler_n{n}"
        ratios[f"{tag}_time_vs_add"] = round(t["ext"] / t["add"], 3)
        ratios[f"{tag}_bandwidth_vs_copy"] = round(gbps["ext"] / gbps["copy"], 3)
    return rows, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["RIVER_KERNELS"] = "ext"
    assert river.load_kernels()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    all_ratios = {}
    for device in devices:
        check(device)
        rows, ratios = bench(device, args.repeats)
        all_ratios.update(ratios)
        header = f"{device.upper()}: " + (
            cpu_peak_gflops(args.threads)[1] if device == "cpu"
            else torch.cuda.get_device_name())
        print(header)
        print(f"{'case':<34} {'implementation':<22} {'median ms':>10}  note")
        for name, impl, t, note in rows:
            print(f"{name:<34} {impl:<22} {t * 1e3:>10.3f}  {note}")
        if device == "cpu":
            peak = cpu_peak_gflops(args.threads)[0]
            for key in [k for k in ratios if k.endswith("_gflops")]:
                all_ratios[key.replace("_gflops", "_fraction_of_peak")] = round(
                    ratios[key] / peak, 3)
        print()
    print(json.dumps(all_ratios))


if __name__ == "__main__":
    main()
