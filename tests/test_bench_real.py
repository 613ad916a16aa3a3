"""tests/bench_real.py end to end at a toy budget: two small generated videos -> square tiles
split in time -> river trained for 2 + 2 steps -> one JSON line with sane numbers."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import write_video

BENCH = Path(__file__).with_name("bench_real.py")


def moving_texture(seed, frames=160, height=48, width=64):
    """A smooth random texture sliding one pixel right per frame: copy-last is off, not
    hopeless."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height // 4, (width + frames) // 4, 3)).astype(np.uint8)
    texture = texture.repeat(4, 0).repeat(4, 1)  # (H, W + T, 3), 4x4 blocks
    return np.stack([texture[:, frames - t:frames - t + width] for t in range(frames)])


def test_bench_real_prints_one_json_line(tmp_path, av):
    footage = tmp_path / "footage"
    footage.mkdir()
    for seed in range(2):
        write_video(footage / f"clip{seed}.mkv", moving_texture(seed))
    out = tmp_path / "bench"
    command = [sys.executable, str(BENCH), str(footage), "--image_size", "32", "--out",
               str(out), "--ae-steps", "2", "--flow-steps", "2", "--batch-size", "4",
               "--samples", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RIVER_KERNELS": "ref"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # river's own output goes to stderr
    row = json.loads(lines[0])
    assert {"model", "model_best", "copy_last", "true_latents", "train_videos", "clips",
            "image_size", "preset", "train_s", "cpu", "nfe_per_frame"} <= set(row)
    # 64x48 -> 2 tiles per video; 160 frames -> 112 train, 8 dropped, 16 val (one clip),
    # 8 dropped, 16 test
    assert row["train_videos"] == 4 and row["clips"] == 4 and row["split"] == "val"
    assert row["samples"] == 2 and row["nfe_per_frame"] == 3 and "psnr_spread" in row["model"]
    assert row["image_size"] == 32 and row["preset"] == "real32" and row["precision"] == "fp32"
    assert row["steps"] == {"ae": 2, "flow": 2}
    for key in ("model", "model_best", "copy_last", "true_latents"):
        assert math.isfinite(row[key]["psnr"]) and 3 < row[key]["psnr"] < 60
        assert -1 <= row[key]["ssim"] <= 1
    assert row["train_s"]["ae"] > 0 and row["train_s"]["flow"] > 0 and row["cpu"]
    assert (out / "footage-32.h5").exists() and (out / "footage-real32" / "flow.pt").exists()


def test_bench_real_errors(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "is not a folder of videos" in result.stderr
