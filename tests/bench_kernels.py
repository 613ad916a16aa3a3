"""Benchmark: the csrc/ ops against their PyTorch counterparts, side by side, one run.

    python tests/bench_kernels.py [--repeats 7] [--threads 2] [--ghz 2.6] [--device cpu|cuda]
    python tests/bench_kernels.py --threads 1 --cpu-time    # repeatable on a busy machine
    python tests/bench_kernels.py --quick                   # tiny sizes: checks the script

Named bench_*.py so pytest does not collect it. Each fused op is first checked against its
reference (a benchmark of a wrong kernel is worthless), then timed as the median of
`repeats` runs after one warm-up, on the CPU and, when there is one, on the GPU (--device
picks one; the GPU adds the sizes training uses, a code width of 6 and a misaligned x):
  vq_nearest   vs torch.cdist(z, e).argmin(1) and the expanded-matmul reference of river.py;
               on the CPU once per copy of the inner kernel this CPU can run (default, avx2,
               avx512, forced with torch.ops.river.set_cpu_isa), all taking turns in one run.
               Achieved GFLOP/s counts 2 N K D (one FMA per code dimension per pair); the
               fraction of peak is of the FMA peak at that copy's vector width (see
               cpu_peak_gflops: the clock is an estimate, --ghz overrides it; the default
               copy, SSE2 on x86-64, has no FMA instruction and can reach half of it).
  euler_step_  vs x.add_(v, alpha=dt) and y.copy_(x); GB/s counts the bytes that must move:
               3 per element-size for euler and add (read x, read v, write x), 2 for copy.
Prints a table, then ONE JSON line of ratios: speedups > 1 mean the fused op is faster (keys
without a copy's name are the copy river uses, the widest); time_vs_add < 1 means
euler_step_ beats x.add_; bandwidth_vs_copy is the fraction of copy's GB/s that euler_step_
reaches (a CPU cache also reads y before writing it, so copy really moves 3 x 4 bytes and
euler can exceed 1.0). On a shared machine, rerun when numbers look noisy: a core taken by
another process shows up as ~8 ms (a scheduler time slice), in the fused op and in cdist.
--cpu-time (with --threads 1) times the CPU calls by the CPU time of the one thread doing
the work, which leaves out the time it waited for a core: repeatable under load.
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import river  # noqa: E402

VQ_SIZES = [(16384, 4, 1024), (16384, 4, 16384), (16384, 8, 8192)]  # (N, D, K)
EULER_SIZES = [(64 * 1024, 0), (8 * 1024 * 1024, 0)]  # (elements, offset of x and v)
# the GPU also: training's largest batches and a code width of 6, once a slow path, and an
# x and v that start 1 element past 16 bytes (buf[1:])
CUDA_VQ_SIZES = VQ_SIZES + [(65536, 4, 16384), (16384, 6, 8192)]
CUDA_EULER_SIZES = EULER_SIZES + [(8 * 1024 * 1024, 1)]
QUICK_VQ_SIZES, QUICK_EULER_SIZES = [(512, 4, 256)], [(4096, 0), (4096, 1)]


def median_times(fns, repeats, device, setup=None, clock=time.perf_counter):
    """Median seconds per call of each fn in `fns` (name -> fn), timed by `clock`. The fns
    take turns within every repeat, so load from other processes on a shared machine hits
    them alike; setup[name], if any, runs untimed before each of its fn's samples. On the
    GPU a sample is 20 back-to-back calls, so launch latency is amortised as in a loop."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    setup = setup or {}
    calls = 20 if device == "cuda" else 1
    samples = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up: caches, thread pools, lazy inits
        setup.get(name, lambda: None)()
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            setup.get(name, lambda: None)()
            sync()
            start = clock()
            for _ in range(calls):
                fn()
            sync()
            samples[name].append((clock() - start) / calls)
    return {name: statistics.median(t) for name, t in samples.items()}


# the copies of the CPU inner kernels, and the fp32 lanes of one vector register of each
CPU_ISA_LANES = {"default": 4, "avx2": 8, "avx512": 16}


def cpu_isas():
    """The copies this CPU can run, narrowest first (set_cpu_isa refuses the others)."""
    isas = []
    for isa in CPU_ISA_LANES:
        try:
            torch.ops.river.set_cpu_isa(isa)
            isas.append(isa)
        except RuntimeError:
            pass
    torch.ops.river.set_cpu_isa("auto")
    return isas


def cpu_description(ghz):
    """(model name, clock in GHz, flags) of this CPU, from Linux's /proc/cpuinfo (what lscpu
    reads). The clock is --ghz if given, else "cpu MHz": the nominal clock in a VM, while a
    core under load may turbo higher."""
    model, mhz, flags = platform.processor() or "unknown CPU", 0.0, set()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.M).group(1)
        mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M).group(1))
        flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    except (OSError, AttributeError):
        pass
    return model, ghz or mhz / 1000 or 2.5, flags


def cpu_peak_gflops(threads, lanes, ghz):
    """FP32 FMA peak: threads x FMA pipes x lanes x 2 FLOPs x clock, assuming 2 FMA pipes
    per core (true for Zen 2-4 and for Intel since Haswell; 512-bit FMAs: Xeon Gold and
    Platinum and later Xeons, one pipe on some smaller Skylake-SP parts)."""
    return threads * 2 * lanes * 2 * ghz


def check(device, isas, vq_sizes):
    """The fused ops agree with the references before anything is timed (vq_nearest on the
    CPU: every copy in `isas`; on the GPU: at every size timed, too)."""
    g = torch.Generator().manual_seed(0)
    cases = [(999, 8, 777), (999, 6, 777)] + (vq_sizes if device == "cuda" else [])
    for N, D, K in cases:
        z = torch.randn(N, D, generator=g).to(device)
        e = torch.randn(K, D, generator=g).to(device)
        ref_idx, ref_dist = river.vq_nearest_reference(z, e)
        for isa in isas if device == "cpu" else [None]:
            if isa:
                torch.ops.river.set_cpu_isa(isa)
            idx, dist = torch.ops.river.vq_nearest(z, e)
            assert (idx == ref_idx).float().mean() > 0.99, f"vq_nearest [{isa}] disagrees"
            torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)
    if device == "cpu":
        torch.ops.river.set_cpu_isa("auto")
    for offset in (0, 1):
        x = torch.randn(100003 + offset, device=device)[offset:]
        v = torch.randn(100003 + offset, device=device)[offset:]
        expected = river.euler_step_reference_(x.clone(), v, 0.3)
        torch.ops.river.euler_step_(x, v, 0.3)
        torch.testing.assert_close(x, expected)


def bench(device, repeats, isas, peaks, cpu_time, vq_sizes, euler_sizes):
    """Rows of the table and the JSON ratios. isas: the copies of the CPU inner kernels to
    time (widest last); peaks[isa]: its FMA peak in GFLOP/s; cpu_time: time CPU calls by
    the calling thread's CPU time."""
    clock = time.thread_time if cpu_time and device == "cpu" else time.perf_counter
    rows, ratios = [], {}
    for N, D, K in vq_sizes:
        g = torch.Generator().manual_seed(N + D + K)
        z = torch.randn(N, D, generator=g).to(device)
        e = torch.randn(K, D, generator=g).to(device)
        paths = isas if device == "cpu" else ["cuda"]
        fns = {p: (lambda: torch.ops.river.vq_nearest(z, e)) for p in paths}
        setup = {p: (lambda p=p: torch.ops.river.set_cpu_isa(p)) for p in isas}
        fns.update({"cdist": lambda: torch.cdist(z, e).argmin(1),
                    "ref": lambda: river.vq_nearest_reference(z, e)})
        t = median_times(fns, repeats, device, setup, clock)
        if device == "cpu":
            torch.ops.river.set_cpu_isa("auto")
        gflop = 2 * N * K * D / 1e9
        name = f"vq_nearest N={N} D={D} K={K}"
        tag = f"{device}_vq_N{N}_D{D}_K{K}"
        for p in paths:
            note = f"{gflop / t[p]:6.1f} GFLOP/s"
            if p in peaks:
                note += f" = {gflop / t[p] / peaks[p]:4.0%} of {p} peak"
            note += f", {t['cdist'] / t[p]:5.1f}x faster than cdist"
            rows.append((name, f"river vq_nearest [{p}]", t[p], note))
            for key in ([f"{tag}_{p}", tag] if p == paths[-1] else [f"{tag}_{p}"]):
                ratios[f"{key}_speedup_vs_cdist"] = round(t["cdist"] / t[p], 2)
                ratios[f"{key}_gflops"] = round(gflop / t[p], 1)
                if p in peaks:
                    ratios[f"{key}_fraction_of_peak"] = round(gflop / t[p] / peaks[p], 3)
        rows += [(name, "cdist + argmin", t["cdist"], ""),
                 (name, "reference (matmul)", t["ref"],
                  f"{t['ref'] / t[paths[-1]]:.1f}x slower than [{paths[-1]}]")]
        ratios[f"{tag}_speedup_vs_reference"] = round(t["ref"] / t[paths[-1]], 2)
    for n, offset in euler_sizes:
        x = torch.randn(n + offset, device=device)[offset:]
        v = torch.randn(n + offset, device=device)[offset:]
        y = torch.empty_like(x)
        # dt = 0 keeps x unchanged over the repeats; the op still reads and writes it all
        t = median_times({"ext": lambda: torch.ops.river.euler_step_(x, v, 0.0),
                          "add": lambda: x.add_(v, alpha=0.0),
                          "copy": lambda: y.copy_(x)}, repeats, device, clock=clock)
        gbps = {"ext": 12 * n / t["ext"] / 1e9, "add": 12 * n / t["add"] / 1e9,
                "copy": 8 * n / t["copy"] / 1e9}
        name = f"euler_step_ n={n}" + (f" offset {offset}" if offset else "")
        rows += [(name, "river euler_step_", t["ext"], f"{gbps['ext']:.1f} GB/s"),
                 (name, "x.add_(v, alpha=dt)", t["add"], f"{gbps['add']:.1f} GB/s"),
                 (name, "y.copy_(x)", t["copy"], f"{gbps['copy']:.1f} GB/s")]
        tag = f"{device}_euler_n{n}" + (f"_offset{offset}" if offset else "")
        ratios[f"{tag}_time_vs_add"] = round(t["ext"] / t["add"], 3)
        ratios[f"{tag}_bandwidth_vs_copy"] = round(gbps["ext"] / gbps["copy"], 3)
    return rows, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ghz", type=float, default=0.0,
                        help="CPU clock for the FMA peak (default: cpu MHz of /proc/cpuinfo)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time CPU calls by the thread's CPU time (needs --threads 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="time one device only (default: the CPU, and the GPU if any)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, to check the script rather than time the kernels")
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time counts the calling thread only: use it with --threads 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    os.environ["RIVER_KERNELS"] = "ext"
    kernels = river.load_kernels()
    devices = ([args.device] if args.device else
               ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    missing = [d for d in devices if d not in kernels]
    assert not missing, f"the csrc/ extension has no kernels for {missing}"
    isas = cpu_isas()
    model, ghz, flags = cpu_description(args.ghz)
    peaks = {isa: cpu_peak_gflops(args.threads, CPU_ISA_LANES[isa], ghz) for isa in isas}
    all_ratios = {}
    for device in devices:
        vq_sizes, euler_sizes = ((QUICK_VQ_SIZES, QUICK_EULER_SIZES) if args.quick else
                                 (CUDA_VQ_SIZES, CUDA_EULER_SIZES) if device == "cuda" else
                                 (VQ_SIZES, EULER_SIZES))
        check(device, isas, vq_sizes)
        rows, ratios = bench(device, args.repeats, isas, peaks if device == "cpu" else {},
                             args.cpu_time, vq_sizes, euler_sizes)
        all_ratios.update(ratios)
        if device == "cpu":
            simd = " ".join(f for f in ("avx2", "fma", "avx512f", "amx_tile") if f in flags)
            print(f"CPU: {model} ({simd or 'no AVX2'}), {args.threads} threads; copies of the "
                  f"inner kernels: {', '.join(isas)} (river uses {isas[-1]})")
            print("FMA peak: " + ", ".join(
                f"{isa} {peaks[isa]:.0f} GFLOP/s" for isa in isas) + f" = {args.threads} "
                f"cores x 2 FMA pipes x 4/8/16 fp32 lanes x 2 FLOPs x {ghz:.2f} GHz "
                f"({'--ghz' if args.ghz else 'cpu MHz of /proc/cpuinfo'})")
            # other processes' load, to judge wall-clock numbers by
            print(f"timed by {'CPU time of the thread' if args.cpu_time else 'wall clock'}; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        else:
            print(f"CUDA: {torch.cuda.get_device_name()}")
        print(f"{'case':<34} {'implementation':<26} {'median ms':>10}  note")
        for name, impl, t, note in rows:
            print(f"{name:<34} {impl:<26} {t * 1e3:>10.3f}  {note}")
        print()
    print(json.dumps(all_ratios))


if __name__ == "__main__":
    main()
