"""What FVD's I3D costs on this machine, side by side in one process (a script, not a test).

    python tests/bench_i3d.py [--repeats 2] [--clips 300] [--no-bf16] [--resize-clips 32]

The unit is one 16-frame clip through river.i3d_features as FVD runs it: 32x32 frames (the
demo's), resized to 224x224, the Kinetics-400 I3D, fp32. Configurations alternate within each
repeat, so a noisy neighbour hits them alike; each prints its best seconds per clip and its
ratio to the first row. Rows: the chunk of clips per call at 1 thread; 1 and 2 threads, with
and without channels_last_3d weights; then bf16 autocast on one clip (on CPUs without AMX or
AVX-512 BF16, PyTorch's bf16 conv3d takes a slow path). The last line turns the fastest row
into the demo's cost: `--clips` clips (the demo's 100 test clips: the truth, the model and
copy-last, 300 in all). With --resize-clips N it also scores FVD(truth, copy-last) on N clips
of the demo's data (2 -> 14 frames at 32x32) with the reference's resize (river.resize_tf1) and
with F.interpolate's half-pixel one, which the PyTorch FVDs derived from StyleGAN-V use.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
import data_prep  # noqa: E402
import river  # noqa: E402


def seconds_per_clip(i3d, clips, chunk, threads):
    torch.set_num_threads(threads)
    tic = time.perf_counter()
    river.i3d_features(i3d, clips, chunk=chunk, progress=False)
    return (time.perf_counter() - tic) / len(clips)


def bf16_seconds_per_clip(i3d, clip):
    """One clip under bf16 autocast (i3d_features runs the I3D in fp32, so call it directly)."""
    torch.set_num_threads(1)
    x = river.resize_tf1(clip[0]).transpose(0, 1)[None]  # (T, 3, 224, 224) -> (1, 3, T, 224, 224)
    tic = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        i3d(x)
    return time.perf_counter() - tic


def resize_effect(i3d, count):
    """FVD of copy-last against the truth on `count` demo clips, with either resize."""
    with tempfile.TemporaryDirectory() as tmp:
        data_prep.write_synthetic(os.path.join(tmp, "balls.h5"), seed=0)
        truth = river.eval_clips(os.path.join(tmp, "balls.h5"), "test", 2, 14, 1, count)
    copy = truth[:, [0, 1] + [1] * 14]  # (M, 16, C, H, W): the last context frame, repeated

    def half_pixel(x):
        return F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)

    def features(clips, resize):
        x = resize(rearrange(clips, "m t c h w -> (m t) c h w"))
        x = rearrange(x, "(m t) c h w -> m c t h w", m=len(clips)).expand(-1, 3, -1, -1, -1)
        with torch.no_grad():
            return torch.cat([i3d(clip[None]) for clip in x])

    return {name: river.fvd(features(truth, resize), features(copy, resize))
            for name, resize in (("TF1's resize (river)", river.resize_tf1), ("half-pixel", half_pixel))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--clips", type=int, default=300, help="clips the demo's FVD sends through the I3D")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 row (minutes without AMX)")
    p.add_argument("--resize-clips", type=int, default=0, help="clips for the resize's FVD effect")
    args = p.parse_args()
    i3d = river.load_i3d()
    i3d_cl = river.load_i3d().to(memory_format=torch.channels_last_3d)
    clips = torch.rand(8, 16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows = {f"chunk {c}, 1 thread": (i3d, c, 1) for c in (1, 2, 4, 8)}
    rows.update({f"chunk 4, {t} thread{'s' * (t > 1)}{', channels_last_3d' * cl}": (i3d_cl if cl else i3d, 4, t)
                 for t in (1, 2) for cl in (False, True)})
    best = {}
    print(f"{bench_train.cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"best of {args.repeats}; s/clip = one 16-frame clip, 32x32 resized to 224")
    for _ in range(args.repeats):
        for name, (net, chunk, threads) in rows.items():
            s = seconds_per_clip(net, clips[:chunk], chunk, threads)
            best[name] = min(best.get(name, s), s)
    if not args.no_bf16:
        best["chunk 1, 1 thread, bf16 autocast"] = bf16_seconds_per_clip(i3d, clips[:1])
    first = next(iter(best.values()))
    print(f"{'configuration':40}{'s/clip':>9}{'x first':>9}")
    for name, s in best.items():
        print(f"{name:40}{s:9.3f}{first / s:9.2f}")
    name, s = min(best.items(), key=lambda kv: kv[1])
    print(f"fastest: {name}: {args.clips} clips in {args.clips * s:.0f} s")
    if args.resize_clips:
        torch.set_num_threads(1)
        fvds = resize_effect(i3d, args.resize_clips)
        print(f"FVD(truth, copy-last), {args.resize_clips} demo clips: " +
              ", ".join(f"{name} {value:.1f}" for name, value in fvds.items()))


if __name__ == "__main__":
    main()
