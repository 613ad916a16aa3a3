"""The method in river.py: modules, flow matching, solvers, sampler, metrics, training runs."""
import json
import math
import os

import h5py
import numpy as np
import pytest
import torch

import data_prep
import river

SMALL = river.Config(ae_channels=(8, 16, 16), codebook_size=32, unet_channels=(16, 32),
                     unet_blocks=1, clip_frames=6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small bouncing-balls file: 24 videos of 20 frames, 32x32."""
    path = str(tmp_path_factory.mktemp("data") / "balls.h5")
    data_prep.main(["synthetic", "--out", path, "--videos", "24", "--frames", "20"])
    return path


def train_args(data, run, *extra):
    return ["train", "--data", data, "--run", str(run), "--ae-steps", "6", "--flow-steps", "6",
            "--batch-size", "4", *extra]


@pytest.fixture(scope="module")
def trained_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    river.main(train_args(data, run))
    return run


# ----------------------------------------------------------------------------- modules

def test_shapes_through_every_module():
    cfg, B = SMALL, 3
    x = torch.randn(B, 3, 32, 32)
    ae = river.VQAutoencoder(cfg)
    z = ae.pre_quant(x)
    assert z.shape == (B, cfg.latent_dim, 8, 8)  # 32 / 2**2
    q, codes, loss, stats = ae.quantize(z)
    assert q.shape == z.shape and codes.shape == (B, 8, 8) and loss.dim() == 0
    assert 1 <= stats["codes_used"] <= cfg.codebook_size
    assert ae.post_quant(q).shape == x.shape
    assert ae.decode(ae.encode(x)).shape == x.shape
    net = river.UNet(cfg)
    t, d = torch.rand(B), torch.tensor([1, 2, 5])
    assert net(z, t, z, z, d).shape == z.shape
    attn = river.Attention(32)
    h = torch.randn(B, 32, 4, 4)
    assert attn(h).shape == h.shape


def test_decode_snaps_latents_to_codes():
    ae = river.VQAutoencoder(SMALL).eval()
    z = torch.randn(2, SMALL.latent_dim, 8, 8)
    snapped = ae.quantize.lookup(z)
    rows = river.rearrange(snapped, "b d h w -> (b h w) d")
    assert all((ae.quantize.embedding.weight == r).all(1).any() for r in rows)


def test_straight_through_gradient_reaches_the_encoder():
    ae = river.VQAutoencoder(SMALL)
    x = torch.randn(2, 3, 32, 32)
    recon, vq_loss, _ = ae(x)
    ((recon - x) ** 2).mean().backward()  # reconstruction loss only: no path but straight-through
    grads = [p.grad for p in ae.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_dead_codes_restart_at_encoder_outputs():
    vq = river.VectorQuantizer(K=16, D=4, commitment=0.25, restart_every=2)
    z = torch.randn(2, 4, 4, 4) * 5 + 100  # far from every initial code
    vq(z)  # first call: every code unused so far -> restarted at encoder outputs
    assert (vq.embedding.weight - 100).abs().mean() < 20


# ----------------------------------------------------------------------------- flow matching

def test_interpolation_and_target_follow_their_formulas():
    torch.manual_seed(0)
    eps, z, s = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), 1e-4
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    x = river.interpolate(eps, z, t, s)
    expected = (1 - (1 - s) * t.view(-1, 1, 1, 1)) * eps + t.view(-1, 1, 1, 1) * z
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(x[0], eps[0])
    torch.testing.assert_close(x[3], s * eps[3] + z[3])
    # the target velocity is the time derivative of the interpolation
    h = 1e-3
    numeric = (river.interpolate(eps, z, t + h, s) - river.interpolate(eps, z, t - h, s)) / (2 * h)
    torch.testing.assert_close(numeric, river.target_velocity(eps, z, s).expand_as(numeric),
                               atol=1e-3, rtol=1e-3)


def test_flow_loss_is_the_mse_to_the_target_velocity():
    cfg = SMALL
    latents = torch.randn(3, 6, cfg.latent_dim, 8, 8)
    seen = {}

    def field(x, t, ref, cond, d):
        seen.update(x=x, t=t, ref=ref, cond=cond, d=d)
        return torch.zeros_like(x)

    torch.manual_seed(1)
    loss = river.flow_loss(field, latents, cfg)
    torch.manual_seed(1)
    tau, ref, c, d = river.training_indices(3, 6, cfg.conditioning)
    t, eps = torch.rand(3), None
    rows = torch.arange(3)
    eps = torch.randn_like(latents[rows, tau])
    u = river.target_velocity(eps, latents[rows, tau], cfg.sigma_min)
    torch.testing.assert_close(loss, (u ** 2).mean())
    torch.testing.assert_close(seen["ref"], latents[rows, tau - 1])
    torch.testing.assert_close(seen["cond"], latents[rows, c])
    torch.testing.assert_close(seen["t"], t)


def test_training_indices_stay_in_range():
    for T in (3, 4, 16, 40):
        tau, ref, c, d = river.training_indices(20_000, T)
        assert tau.min() == 2 and tau.max() == T - 1
        assert (ref == tau - 1).all() and (c >= 0).all() and (c <= tau - 2).all()
        assert (d == ref - c).all() and (d >= 1).all()
        assert c.min() == 0 and (c == tau - 2).any()  # the whole range is reachable


def test_conditioning_modes():
    ref = torch.arange(0, 10)
    c, d = river.conditioning_index(ref, "last")
    assert (c == ref).all() and (d == 1).all()
    c, d = river.conditioning_index(ref, "fixed")
    assert (c == (ref - 1).clamp(min=0)).all() and (d == 1).all()
    with pytest.raises(river.RiverError, match="unknown conditioning"):
        river.conditioning_index(ref, "sideways")


@pytest.mark.parametrize("horizon", [-1, 1, 3])
def test_sampling_conditioning_respects_past_horizon(horizon):
    ref = torch.full((50_000,), 9)
    c, d = river.conditioning_index(ref, "random", horizon)
    reach = 9 if horizon < 0 else horizon
    assert c.min() == 9 - reach and c.max() == 8
    assert d.min() == 1 and d.max() == reach
    c, d = river.conditioning_index(torch.zeros(10, dtype=torch.long), "random", horizon)
    assert (c == 0).all() and (d == 1).all()  # a single context frame is used twice


# ----------------------------------------------------------------------------- solvers and sampler

@pytest.mark.parametrize("steps", [1, 4, 10])
def test_integrate_linear_ode(steps):
    a, x0 = -1.3, torch.tensor([2.0, -0.5], dtype=torch.float64)
    h = 1.0 / steps

    def field(x, t):
        return a * x

    x, nfe = river.integrate(field, x0, 0.0, 1.0, steps, "euler")
    torch.testing.assert_close(x, x0 * (1 + a * h) ** steps)
    assert nfe == steps
    x, nfe = river.integrate(field, x0, 0.0, 1.0, steps, "midpoint")
    torch.testing.assert_close(x, x0 * (1 + a * h + (a * h) ** 2 / 2) ** steps)
    assert nfe == 2 * steps
    x, nfe = river.integrate(field, x0, 0.0, 1.0, steps, "rk4")
    assert nfe == 4 * steps
    z = a * h
    torch.testing.assert_close(x, x0 * (1 + z + z ** 2 / 2 + z ** 3 / 6 + z ** 4 / 24) ** steps)
    if steps >= 4:  # fourth order: close to the exact solution x0 e^a
        torch.testing.assert_close(x, x0 * math.exp(a), atol=1e-4, rtol=0)
    assert x0.tolist() == [2.0, -0.5]  # the input is untouched


def test_integrate_time_dependent_field_and_unknown_solver():
    x, _ = river.integrate(lambda x, t: torch.full_like(x, 2 * t), torch.zeros(1), 0.2, 1.0, 50,
                           "rk4")
    assert abs(float(x) - (1 - 0.2 ** 2)) < 1e-6
    with pytest.raises(river.RiverError, match="unknown solver"):
        river.integrate(lambda x, t: x, torch.zeros(1), 0, 1, 1, "leapfrog")


def test_warm_start_state_follows_its_formula():
    z, eps, s = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), 0.3
    x = river.warm_start_state(z, s, 1e-7, eps)
    torch.testing.assert_close(x, (1 - (1 - 1e-7) * s) * eps + s * z)
    torch.testing.assert_close(river.warm_start_state(z, 0.0, 1e-7, eps), eps)


@pytest.mark.parametrize("n", [1, 3])
def test_generate_frames_shapes(n):
    model = river.River(SMALL).eval()
    frames, nfe = model.generate_frames(torch.rand(2, n, 3, 32, 32) * 2 - 1, 4, steps=3,
                                        solver="midpoint", return_nfe=True)
    assert frames.shape == (2, 4, 3, 32, 32) and nfe == 6
    assert frames.min() >= -1 and frames.max() <= 1


def test_sampler_draws_a_new_past_frame_at_every_evaluation():
    model = river.River(SMALL).eval()
    past = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, SMALL.latent_dim, 8, 8)
    seen = []

    def spy(x, t, ref, cond, d):
        seen.append((float(cond[0, 0, 0, 0]), int(d[0]), float(ref[0, 0, 0, 0])))
        return torch.zeros_like(x)

    model.field.forward = spy
    torch.manual_seed(0)
    model.next_latent(past, steps=200, warm_start=0.5, past_horizon=3)
    conds = {c for c, _, _ in seen}
    assert conds == {2.0, 3.0, 4.0}  # within 3 frames of the reference, every one drawn
    assert all(ref == 5.0 and d == 5 - c for c, d, ref in seen)


# ----------------------------------------------------------------------------- metrics

def test_psnr_hand_computed():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.2)  # 0.1 apart on [0, 1]: MSE 0.01 -> 20 dB
    torch.testing.assert_close(river.psnr(a, b), torch.full((2,), 20.0))
    assert river.psnr(a, a).min() > 90


def test_ssim_hand_computed():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(river.ssim(x, x), torch.ones(2))
    # constant images: variances vanish, SSIM = (2 p q + c1) / (p^2 + q^2 + c1)
    p, q, c1 = 0.25, 0.75, 0.01 ** 2
    a, b = torch.full((1, 1, 16, 16), 2 * p - 1), torch.full((1, 1, 16, 16), 2 * q - 1)
    torch.testing.assert_close(river.ssim(a, b), torch.tensor([(2 * p * q + c1) / (p * p + q * q + c1)]))
    assert river.ssim(x, -x).max() < 0.5


def test_frechet_distance_hand_computed():
    # 1-D: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2)
    assert river.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 4 + 9 - 12)
    # diagonal: a sum over dimensions
    d = river.frechet_distance([0, 0], [[1, 0], [0, 4]], [1, 1], [[4, 0], [0, 4]])
    assert d == pytest.approx(2 + (1 + 4 - 4) + 0)
    rng = np.random.default_rng(0)
    f = torch.tensor(rng.normal(size=(500, 3)))
    assert river.frechet_distance(*river.gaussian_fit(f), *river.gaussian_fit(f)) == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------- data path

def test_clips_in_ram_and_streamed_agree(data):
    torch.manual_seed(0)
    ram = river.ClipDataset(data, 5, skip=2)
    disk = river.ClipDataset(data, 5, skip=2, cache_bytes=0)
    assert ram.in_ram and not disk.in_ram
    a, b = ram.clip(3, 1), disk.clip(3, 1)
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    store = data_prep.VideoStore(data, "train")
    torch.testing.assert_close(a, river.to_float(store.read(3, 1, 10, 2)))


def test_short_videos_are_skipped_and_counted(tmp_path):
    path = str(tmp_path / "mixed.h5")
    with h5py.File(path, "w") as f:  # the plain official layout, built by hand
        for i, n in enumerate([3, 8, 2, 8]):
            f.create_dataset(f"len/{i}", data=n)
            for j in range(n):
                f.create_dataset(f"{i}/{j}", data=np.full((16, 16, 3), j, np.uint8))
    clips = river.ClipDataset(path, 5)
    assert len(clips) == 2 and clips.skipped == 2
    torch.testing.assert_close(clips.clip(0, 3)[:, 0, 0, 0], torch.arange(3, 8) / 127.5 - 1)
    with pytest.raises(river.RiverError, match="no video .* has the 9 frames"):
        river.ClipDataset(path, 9)


# ----------------------------------------------------------------------------- training runs

def test_overfitting_a_few_clips_drives_both_losses_down():
    torch.manual_seed(0)
    cfg = SMALL
    model = river.River(cfg)
    frames = torch.rand(4, 3, 32, 32).round() * 2 - 1
    latents = torch.randn(2, 6, cfg.latent_dim, 8, 8)

    def ae_loss():
        recon, vq_loss, _ = model.ae(frames)
        return ((recon - frames) ** 2).mean() + vq_loss

    def flow_loss():
        return river.flow_loss(model.field, latents.repeat(16, 1, 1, 1, 1), cfg)

    # the VQGAN layout is deeper than the U-Net: on noise frames it needs more steps to get going
    for loss_fn, params, steps in ((ae_loss, model.ae.parameters(), 200),
                                   (flow_loss, model.field.parameters(), 120)):
        opt = torch.optim.Adam(params, 3e-3)
        torch.manual_seed(1)
        before = float(loss_fn().detach())
        for _ in range(steps):
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.manual_seed(1)  # the same t, noise and frame indices as `before`
        assert float(loss_fn().detach()) < 0.5 * before


def test_run_directory_holds_what_it_should(trained_run):
    names = set(os.listdir(trained_run))
    assert {"config.json", "ae.pt", "flow.pt", "metrics.jsonl", "loss.png", "samples.gif",
            "samples.png"} <= names
    rows = [json.loads(line) for line in open(trained_run / "metrics.jsonl")]
    ae_rows = [r for r in rows if r["stage"] == "ae"]
    assert ae_rows[-1]["step"] == 6 and "recon_psnr" in ae_rows[-1] and "perplexity" in ae_rows[-1]
    assert [r for r in rows if r["stage"] == "flow"][-1]["step"] == 6
    ckpt = torch.load(trained_run / "flow.pt", weights_only=False)
    assert {"model", "ema", "opt", "sched", "step", "rng", "ae", "config"} <= set(ckpt)


def test_resume_continues_the_step_count_and_the_loss(data, tmp_path, monkeypatch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ["--stage", "ae", "--steps", "8", "--ckpt-every", "2"]
    river.main(train_args(data, whole, *args))

    def crashing(fn):  # the batch stream dies while step 5 is being drawn
        for _ in range(5):
            yield fn()
        raise RuntimeError("killed")

    monkeypatch.setattr(river, "endless", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        river.main(train_args(data, split, *args))
    assert torch.load(split / "ae.pt", weights_only=False)["step"] == 4
    monkeypatch.undo()
    river.main(train_args(data, split, *args, "--resume"))
    a = torch.load(whole / "ae.pt", weights_only=False)
    b = torch.load(split / "ae.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:  # the same RNG stream, the same batches: the same weights
        torch.testing.assert_close(a["model"][k], b["model"][k])
    logged = [json.loads(line)["step"] for line in open(split / "metrics.jsonl")]
    assert logged == [json.loads(line)["step"] for line in open(whole / "metrics.jsonl")]


def test_sample_and_eval_end_to_end(data, trained_run, tmp_path, capsys):
    out = tmp_path / "pred.gif"
    river.main(["sample", "--run", str(trained_run), "--data", data, "--frames", "4", "--num", "2",
                "--steps", "2", "--out", str(out)])
    assert out.exists() and (tmp_path / "pred.png").exists()
    from PIL import Image
    gif = Image.open(out)
    assert gif.n_frames == 2 + 4  # context + predicted
    river.main(["eval", "--run", str(trained_run), "--data", data, "--context", "2",
                "--frames", "4", "--samples", "2", "--videos", "2", "--steps", "2",
                "--out", str(tmp_path / "ev")])
    result = json.loads((tmp_path / "ev.json").read_text())
    assert result["protocol"]["videos"] == 2 and result["nfe_per_frame"] == 2
    assert len(result["model_mean"]["psnr_per_frame"]) == 4
    assert result["model_best"]["psnr"] >= result["model_mean"]["psnr"] - 1e-9
    assert (tmp_path / "ev_psnr.png").exists()
    printed = capsys.readouterr().out
    assert "copy last frame" in printed and "FVD skipped" in printed
    assert json.loads(printed.strip().splitlines()[-2])["copy_last"]["psnr"] > 0


def test_sample_from_a_users_npy_clip(trained_run, tmp_path):
    clip = (np.random.default_rng(0).random((5, 48, 48)) * 255).astype(np.uint8)
    np.save(tmp_path / "clip.npy", clip)
    river.main(["sample", "--run", str(trained_run), "--input", str(tmp_path / "clip.npy"),
                "--context", "2", "--frames", "3", "--steps", "1", "--out", str(tmp_path / "p.gif")])
    from PIL import Image
    assert Image.open(tmp_path / "p.gif").n_frames == 5
    two_tracks = Image.open(tmp_path / "p.gif").size
    # a clip with only its context: no ground truth, the GIF shows the prediction alone
    np.save(tmp_path / "short.npy", clip[:2])
    river.main(["sample", "--run", str(trained_run), "--input", str(tmp_path / "short.npy"),
                "--context", "2", "--frames", "3", "--steps", "1", "--out", str(tmp_path / "q.gif")])
    gif = Image.open(tmp_path / "q.gif")
    assert gif.n_frames == 5 and gif.size[0] == two_tracks[0] // 2


def test_claims_end_to_end(data, trained_run, tmp_path, capsys):
    out = tmp_path / "claims"
    river.main(["claims", "--data", data, "--run", str(trained_run), "--out", str(out),
                "--videos", "2", "--grid-videos", "1"])
    result = json.loads((out / "claims.json").read_text())
    assert set(result["conditioning"]) == {"random", "last", "fixed"}
    assert len(result["steps_warm_start"]) == 24
    assert result["steps_warm_start"]["100,0.5"]["nfe_per_frame"] == 100
    for mode in ("last", "fixed"):
        cfg = json.loads((out / f"cond-{mode}" / "config.json").read_text())
        assert cfg["conditioning"] == mode and cfg["flow_steps"] == 6
    table = (out / "claims.md").read_text()
    assert "random past frame (paper)" in table and "| 100 | 0.5 | 100 |" in table
    assert table in capsys.readouterr().out


def test_fvd_with_a_user_supplied_torchscript_i3d(data, trained_run, tmp_path):
    class StandIn(torch.nn.Module):  # any TorchScript (B, 3, T, 224, 224) -> (B, F) will do
        def forward(self, x):
            return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)

    torch.jit.script(StandIn()).save(str(tmp_path / "i3d.pt"))
    river.main(["eval", "--run", str(trained_run), "--data", data, "--context", "2", "--frames",
                "3", "--videos", "2", "--steps", "1", "--fvd-i3d", str(tmp_path / "i3d.pt"),
                "--out", str(tmp_path / "ev")])
    result = json.loads((tmp_path / "ev.json").read_text())
    assert result["fvd"] >= 0 and math.isfinite(result["fvd"])
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(SystemExit):
        river.main(["eval", "--run", str(trained_run), "--data", data, "--fvd-i3d",
                    str(tmp_path / "bad.pt")])
