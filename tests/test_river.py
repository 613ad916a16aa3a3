"""The method in river.py: modules, flow matching, solvers, sampler, metrics, training runs."""
import json
import math
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import data_prep
import river
from conftest import write_video

SMALL = river.Config(ae_channels=(8, 16, 16), codebook_size=32, unet_channels=(16, 32),
                     unet_blocks=1, clip_frames=6)


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
    for T in (3, 16):
        tau, ref, c, d = river.training_indices(1000, T, "last")
        assert (c == ref).all() and (d == 1).all()
        tau, ref, c, d = river.training_indices(1000, T, "fixed")
        assert (c == ref - 1).all() and (d == 1).all()
    c, d = river.past_frame(6, 1000, "last")
    assert (c == 5).all() and (d == 1).all()
    c, d = river.past_frame(6, 1000, "fixed")
    assert (c == 4).all() and (d == 1).all()


@pytest.mark.parametrize("horizon", [-1, 1, 3])
def test_sampling_conditioning_respects_past_horizon(horizon):
    c, d = river.past_frame(10, 50_000, "random", horizon)
    reach = 9 if horizon < 0 else horizon
    assert c.min() == 9 - reach and c.max() == 8
    assert d.min() == 1 and d.max() == reach and (d == 9 - c).all()
    c, d = river.past_frame(1, 10, "random", horizon)
    assert (c == 0).all() and (d == 1).all()  # a single context frame is its own past


def test_past_frame_draws_what_the_official_sampler_draws():
    torch.manual_seed(3)
    c, d = river.past_frame(7, 5)
    torch.manual_seed(3)
    expected = torch.randint(0, 6, (5,))  # the official call: randint(0, L - 1, (B,))
    assert torch.equal(c, expected) and torch.equal(d, 6 - expected)


# ----------------------------------------------------------------------------- solvers and sampler

def solve(field, x0, steps, solver):
    return river.integrate(field, x0, river.time_grid(0.0, steps), solver)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_integrate_linear_ode(steps):
    a, x0 = -1.3, torch.tensor([2.0, -0.5], dtype=torch.float64)
    z = a / steps

    def field(x, t):
        return a * x

    torch.testing.assert_close(solve(field, x0, steps, "euler"), x0 * (1 + z) ** steps)
    torch.testing.assert_close(solve(field, x0, steps, "midpoint"),
                               x0 * (1 + z + z ** 2 / 2) ** steps)
    x = solve(field, x0, steps, "rk4")
    torch.testing.assert_close(x, x0 * (1 + z + z ** 2 / 2 + z ** 3 / 6 + z ** 4 / 24) ** steps)
    if steps >= 4:  # fourth order: close to the exact solution x0 e^a
        torch.testing.assert_close(x, x0 * math.exp(a), atol=1e-4, rtol=0)
    assert x0.tolist() == [2.0, -0.5]  # the input is untouched
    for solver, evals in (("euler", 1), ("midpoint", 2), ("rk4", 4)):
        assert river.nfe_per_frame(steps, 0.0, solver) == evals * steps


def test_rk4_is_the_three_eighths_rule():
    """torchdiffeq's rk4 (the official solver): evaluations at t, t + dt/3, t + 2dt/3, t + dt
    and the weights 1/8, 3/8, 3/8, 1/8, exact for a cubic in t."""
    times = []

    def field(x, t):
        times.append(float(t))
        return torch.full_like(x, 4 * float(t) ** 3)

    x = river.integrate(field, torch.zeros(1, dtype=torch.float64), torch.tensor([0.0, 0.6]), "rk4")
    assert times == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert float(x) == pytest.approx(0.6 ** 4, abs=1e-3)  # x = t^4; Simpson 3/8 of a cubic


def test_time_grid_is_the_official_grid_so_a_warm_start_saves_evaluations():
    for steps, s in ((10, 0.0), (99, 0.0), (99, 0.5), (20, 0.3), (3, 0.9)):
        official = torch.linspace(s, 1, max(2, int((1 - s) * (steps + 1))))
        assert torch.equal(river.time_grid(s, steps), official)
    assert river.nfe_per_frame(99, 0.0, "rk4") == 396  # the official default: 100 points
    assert river.nfe_per_frame(99, 0.5, "rk4") == 196  # a warm start at 0.5 halves the cost
    assert river.nfe_per_frame(10, 0.5, "euler") == 4
    assert river.nfe_per_frame(2, 0.95, "euler") == 1  # never fewer than one step


def test_integrate_time_dependent_field():
    x = river.integrate(lambda x, t: torch.full_like(x, 2 * float(t)), torch.zeros(1),
                        river.time_grid(0.2, 50), "rk4")
    assert abs(float(x) - (1 - 0.2 ** 2)) < 1e-6


def test_warm_start_state_follows_its_formula():
    z, eps, s = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), 0.3
    x = river.warm_start_state(z, s, 1e-7, eps)
    torch.testing.assert_close(x, (1 - (1 - 1e-7) * s) * eps + s * z)
    torch.testing.assert_close(river.warm_start_state(z, 0.0, 1e-7, eps), eps)


@pytest.mark.parametrize("n", [1, 3])
def test_generate_frames_returns_the_context_then_the_predictions(n):
    model = river.River(SMALL).eval()
    context = torch.rand(2, n, 3, 32, 32) * 2 - 1
    frames = model.generate_frames(context, 4, steps=3, solver="midpoint")
    assert frames.shape == (2, n + 4, 3, 32, 32)
    assert frames.min() >= -1 and frames.max() <= 1
    # the context passes through the autoencoder, as in the official generate_frames
    recon = model.ae.decode(model.ae.encode(context.flatten(0, 1))).view(2, n, 3, 32, 32)
    torch.testing.assert_close(frames[:, :n], recon)


def spy_on_field(model, seen):
    def spy(x, t, ref, cond, d):
        seen.append((float(cond[0, 0, 0, 0]), int(d[0]), float(ref[0, 0, 0, 0]), float(t[0])))
        return torch.zeros_like(x)

    model.field.forward = spy


def test_sampler_draws_a_new_past_frame_at_every_evaluation():
    model = river.River(SMALL).eval()
    past = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, SMALL.latent_dim, 8, 8)
    seen = []
    spy_on_field(model, seen)
    torch.manual_seed(0)
    model.next_latent(past, steps=400, warm_start=0.5, past_horizon=3)
    conds = {c for c, _, _, _ in seen}
    assert conds == {2.0, 3.0, 4.0}  # within 3 frames of the reference, every one drawn
    assert all(ref == 5.0 and d == 5 - c for c, d, ref, _ in seen)


def test_sampler_makes_the_official_random_draws_in_the_official_order():
    """Per frame one torch.randn((B, D, h, w)), then one torch.randint(0, L - 1, (B,)) per
    network evaluation: with the same seed, river draws exactly what the official code draws."""
    model, B, L = river.River(SMALL).eval(), 3, 5
    history = torch.randn(B, L, SMALL.latent_dim, 8, 8)
    seen = []
    spy_on_field(model, seen)
    torch.manual_seed(7)
    model.next_latent(history, steps=3, solver="rk4")
    torch.manual_seed(7)
    torch.randn(B, SMALL.latent_dim, 8, 8)
    draws = [torch.randint(0, L - 1, (B,)) for _ in range(12)]  # 3 steps x 4 evaluations
    assert len(seen) == 12
    assert [c for c, *_ in seen] == [float(history[0, int(c[0]), 0, 0, 0]) for c in draws]
    assert [t for *_, t in seen] == pytest.approx([0, 1 / 9, 2 / 9, 1 / 3, 1 / 3, 4 / 9, 5 / 9,
                                                   2 / 3, 2 / 3, 7 / 9, 8 / 9, 1], abs=1e-6)


def test_dense_conditioning_sees_the_last_k_frames_at_once():
    cfg = river.replace(SMALL, conditioning="dense", dense_frames=4)
    latents = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(2, 6, cfg.latent_dim, 8, 8)
    cond = river.conditioning_latents(latents, torch.tensor([4, 1]), None, cfg)
    assert cond.shape == (2, 3 * cfg.latent_dim, 8, 8)
    assert cond[0, ::cfg.latent_dim, 0, 0].tolist() == [3, 2, 1]  # newest first
    assert cond[1, ::cfg.latent_dim, 0, 0].tolist() == [0, 0, 0]  # the clip's start repeats
    model = river.River(cfg).eval()
    assert model.field.stem.in_channels == 5 * cfg.latent_dim  # x, reference, 3 older frames
    assert river.flow_loss(model.field, latents, cfg).dim() == 0
    seen = []

    def spy(x, t, ref, cond, d):
        seen.append((cond[0, ::cfg.latent_dim, 0, 0].tolist(), d.tolist()))
        return torch.zeros_like(x)

    model.field.forward = spy
    model.next_latent(latents, steps=3)
    assert seen == [([4, 3, 2], [1, 1])] * 3


def test_random_plus_previous_sees_the_previous_frame_and_a_random_older_one():
    cfg = river.replace(SMALL, conditioning="random+previous")
    latents = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(2, 6, cfg.latent_dim, 8, 8)
    cond = river.conditioning_latents(latents, torch.tensor([4, 1]), torch.tensor([0, 0]), cfg)
    assert cond.shape == (2, 2 * cfg.latent_dim, 8, 8)
    assert cond[:, ::cfg.latent_dim, 0, 0].tolist() == [[3, 0], [0, 0]]  # previous, then c
    model = river.River(cfg).eval()
    assert model.field.stem.in_channels == 4 * cfg.latent_dim  # x, reference, previous, c
    torch.manual_seed(0)
    tau, ref, c, d = river.training_indices(4000, 16, "random+previous")
    assert set(c.tolist()) == set(range(14)) and bool((d == ref - c).all())  # c as random's
    seen = []

    def spy(x, t, ref, cond, d):
        seen.append((cond[0, ::cfg.latent_dim, 0, 0].tolist(), d.tolist()))
        return torch.zeros_like(x)

    model.field.forward = spy
    torch.manual_seed(1)
    model.next_latent(latents, steps=20)
    assert {prev for (prev, c), _ in seen} == {4} and len({c for (_, c), _ in seen}) > 2
    assert all(d[0] == 5 - c for (_, c), d in seen)  # d is the random frame's distance
    with pytest.raises(river.RiverError, match="U-ViT takes one conditioning latent"):
        river.check_config(river.replace(cfg, field="uvit"))


def test_predicted_latents_decode_snapped_to_codes_or_as_they_are():
    model = river.River(SMALL).eval()
    z = torch.randn(2, SMALL.latent_dim, 8, 8)
    raw = model.ae.post_quant(z * model.ae.std + model.ae.mean).clamp(-1, 1)
    torch.testing.assert_close(model.ae.decode(z, snap=False), raw)
    assert not torch.allclose(model.ae.decode(z), raw)
    context, history = torch.zeros(2, 1, 3, 32, 32), z[:, None]
    for snap in (True, False):
        model.cfg = river.replace(SMALL, snap_to_codes=snap)
        torch.testing.assert_close(model.readout(context, history)[:, 0],
                                   model.ae.decode(z, snap=snap))


def test_a_single_context_frame_sits_twice_in_the_official_history():
    """The official sampler starts from one context frame twice, [z0, z0]: the second
    predicted frame can then draw the duplicate at d = 2, which [z0, z1] never offers, and
    every later distance grows by one. The duplicate is not returned."""
    context, steps = torch.rand(1, 1, 3, 32, 32) * 2 - 1, 60
    distances = {}
    for official in (True, False):
        model = river.River(river.replace(SMALL, official_history=official)).eval()
        seen = []
        spy_on_field(model, seen)
        torch.manual_seed(0)
        frames = model.generate_frames(context, 3, steps=steps, solver="euler")
        assert frames.shape == (1, 4, 3, 32, 32)  # the context, then 3 predictions
        assert len(seen) == 3 * steps  # Euler: one evaluation per step
        per_frame = [seen[i * steps:(i + 1) * steps] for i in range(3)]
        distances[official] = [sorted({d for _, d, _, _ in f}) for f in per_frame]
        z0 = float(model.ae.encode(context[:, 0])[0, 0, 0, 0])
        assert all(cond == ref == z0 for cond, _, ref, _ in per_frame[0])
        # frame 2: c = 0 is z0 either way; with the duplicate c = 1 is z0 too
        assert all(cond == z0 and ref != z0 for cond, _, ref, _ in per_frame[1])
    assert distances[True] == [[1], [1, 2], [1, 2, 3]]  # history [z0, z0, z1, ...]
    assert distances[False] == [[1], [1], [1, 2]]  # history [z0, z1, ...]


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
    with pytest.raises(river.data_prep.DataError, match="no video .* has the 9 frames"):
        river.ClipDataset(path, 9)


# ----------------------------------------------------------------------------- training runs

@pytest.mark.slow
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
    assert "copy the last frame" in printed and "FVD skipped" in printed
    assert json.loads(printed.strip().splitlines()[-2])["copy_last"]["psnr"] > 0
    assert "true latents, read out" in printed and "2 single sample(s) per clip" in printed


def test_sample_shows_several_samples_beside_the_truth_and_copy_last(data, trained_run,
                                                                     tmp_path):
    model = river.load_river(str(trained_run), "cpu")
    clips = river.eval_clips(data, "test", 2, 3, 1, 2)
    torch.manual_seed(0)
    pred = river.write_predictions(model, clips[:, :2], clips[:, 2:], 3, str(tmp_path / "p"),
                                   samples=3, copy_last=True, steps=1)
    assert pred.shape == (2, 3, *clips[:, 2:].shape[1:])
    assert not torch.equal(pred[:, 0], pred[:, 1])  # samples, each its own draw
    from PIL import Image
    gif = Image.open(tmp_path / "p.gif")
    h, w = clips.shape[-2:]
    # truth, copy last and 3 samples: 5 tracks of 4x frames with a 1-pixel border, 2 videos
    assert gif.n_frames == 5 and gif.size == (5 * (4 * w + 2), 2 * (4 * h + 2))
    assert (tmp_path / "p.png").exists()
    rows = {"truth": clips[:, 2:], "copy last": clips[:, 1:2].expand(-1, 3, -1, -1, -1)}
    t = river.tracks(clips[:, :2], rows, 1)  # (B, rows, n + P, h + 2, w + 2, 3)
    assert tuple(t[0, 0, 4, 0, 0]) == (128, 128, 128) and tuple(t[0, 1, 4, 0, 0]) == (0, 90, 220)
    assert (t[:, 1, 2:, 1:-1, 1:-1] == t[:, 1, 1:2, 1:-1, 1:-1]).all()  # the last frame held
    river.main(["sample", "--run", str(trained_run), "--data", data, "--frames", "3", "--num",
                "1", "--steps", "1", "--samples", "2", "--copy-last", "--out",
                str(tmp_path / "q.gif")])
    assert Image.open(tmp_path / "q.gif").size[0] == 4 * (4 * w + 2)


def test_eval_reports_the_true_latents_read_out(data, trained_run):
    """Without a change readout that row is the quantized reconstruction of the very frames
    being predicted."""
    model = river.load_river(str(trained_run), "cpu")
    clips = river.eval_clips(data, "test", 2, 3, 1, 3)
    out = river.evaluate(model, clips, 2, steps=1)
    recon = model.ae.decode(model.ae.encode(clips[:, 2:].flatten(0, 1))).view(clips[:, 2:].shape)
    expected = river.psnr(recon, clips[:, 2:])
    assert out["autoencoder"]["psnr"] == pytest.approx(float(expected.mean()), abs=1e-4)
    assert out["autoencoder"]["psnr_per_frame"] == pytest.approx(expected.mean(0).tolist(), abs=1e-4)
    assert out["autoencoder"]["psnr"] != pytest.approx(out["copy_last"]["psnr"], abs=1e-3)


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


def test_sample_from_a_video_file_and_a_frame_folder_read_as_data_prep_reads_them(
        trained_run, tmp_path, av, monkeypatch):
    video = np.zeros((6, 40, 40, 3), np.uint8)
    video[:, :, :, 0] = np.arange(6)[:, None, None] * 40  # frame t has red level 40 t
    write_video(tmp_path / "clip.mkv", video)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(video):  # 1.png ... 6.png: text order would put 10 before 2
        Image.fromarray(frame).save(folder / f"{t + 1}.png")
    seen = []
    monkeypatch.setattr(river, "write_predictions",
                        lambda model, context, truth, *a, **k: seen.append((context, truth)))
    for source in (tmp_path / "clip.mkv", folder):
        river.main(["sample", "--run", str(trained_run), "--input", str(source), "--context", "2",
                    "--frames", "4", "--steps", "1", "--out", str(tmp_path / "p.gif")])
    expected = river.to_float(data_prep.read_clip(str(folder), 32))
    assert len(seen) == 2  # one prediction per source: the loop below checks something
    for context, truth in seen:
        torch.testing.assert_close(torch.cat([context, truth], 1)[0], expected)


class FieldI3D(torch.nn.Module):
    """Stands in for StyleGAN-V's i3d_torchscript.pt: the same call signature, and it checks
    that it is called as the published FVDs call it."""

    def forward(self, x, rescale: bool = True, resize: bool = True,
                return_features: bool = False):
        assert not rescale and not resize and return_features, "called without the FVD kwargs"
        assert x.shape[1] == 3 and x.shape[3:] == (224, 224), "expects (B, 3, T, 224, 224)"
        assert float(x.min()) >= -1 and float(x.max()) <= 1, "expects videos in [-1, 1]"
        return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)


class PlainI3D(torch.nn.Module):  # any other TorchScript (B, 3, T, 224, 224) -> (B, F)
    def forward(self, x):
        return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)


@pytest.mark.parametrize("module", [FieldI3D, PlainI3D])
def test_fvd_with_a_user_supplied_torchscript_i3d(data, trained_run, tmp_path, module):
    torch.jit.script(module()).save(str(tmp_path / "i3d.pt"))
    river.main(["eval", "--run", str(trained_run), "--data", data, "--context", "2", "--frames",
                "3", "--videos", "2", "--steps", "1", "--fvd-i3d", str(tmp_path / "i3d.pt"),
                "--out", str(tmp_path / "ev")])
    result = json.loads((tmp_path / "ev.json").read_text())
    fvd = result["fvd"]
    assert fvd["model"] >= 0 and math.isfinite(fvd["model"]) and math.isfinite(fvd["copy_last"])
    assert fvd["videos"] == 2 and fvd["samples"] == 8 and fvd["context_included"]
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(SystemExit):
        river.main(["eval", "--run", str(trained_run), "--data", data, "--fvd-i3d",
                    str(tmp_path / "bad.pt")])


def test_fvd_clip_with_or_without_the_context():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[2])
            return x.mean((2, 3, 4))

    model = river.River(SMALL).eval()
    clips = torch.rand(2, 5, 3, 32, 32) * 2 - 1
    for with_context, frames in ((True, 5), (False, 3)):
        seen.clear()
        river.evaluate(model, clips, 2, steps=1, i3d=Spy(), fvd_context=with_context)
        assert seen == [frames] * 6  # a clip a call on the CPU: 2 generated, copy-last, real


def test_eval_protocols_fix_the_fields_conventions(data, trained_run, tmp_path):
    cfg = river.Config()
    args = river.build_parser().parse_args(["eval", "--data", data, "--protocol", "kth"])
    assert river.eval_settings(args, cfg) == dict(context=10, frames=30, videos=256, samples=100,
                                                  report="best", fvd_context=True)
    args = river.build_parser().parse_args(["eval", "--data", data, "--samples", "3"])
    assert river.eval_settings(args, cfg)["samples"] == 3
    assert river.eval_settings(args, cfg)["context"] == cfg.context
    # a longer context leaves the rest of a training clip to predict, as in `sample`
    args = river.build_parser().parse_args(["eval", "--data", data, "--context", "4"])
    assert river.eval_settings(args, cfg)["frames"] == cfg.clip_frames - 4
    args = river.build_parser().parse_args(["eval", "--data", data, "--context", "16"])
    with pytest.raises(river.RiverError, match="leaves no frame"):
        river.eval_settings(args, cfg)
    # explicit options override the protocol; eval.json records what was run and its name
    river.main(["eval", "--run", str(trained_run), "--data", data, "--protocol", "bair",
                "--frames", "2", "--videos", "2", "--samples", "2", "--steps", "1",
                "--out", str(tmp_path / "ev")])
    protocol = json.loads((tmp_path / "ev.json").read_text())["protocol"]
    assert protocol["name"] == "bair" and protocol["context"] == 1 and protocol["predicted"] == 2
    assert protocol["samples"] == 2 and protocol["report"] == "best" and protocol["fvd_context"]


def test_resume_with_a_longer_budget(data, tmp_path):
    run = tmp_path / "run"
    river.main(train_args(data, run, "--stage", "ae"))
    river.main(train_args(data, run, "--stage", "ae", "--steps", "10", "--lr", "1e-3",
                          "--resume"))
    ckpt = torch.load(run / "ae.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["config"]["ae_steps"] == 10
    assert json.loads((run / "config.json").read_text())["ae_lr"] == 1e-3
    # the schedule now ends at step 10 with the new peak learning rate
    group = ckpt["opt"]["param_groups"][0]
    assert group["initial_lr"] == 1e-3
    assert group["lr"] == pytest.approx(1e-3 * river.lr_factor(10, river.Config().warmup, 10))
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps == [6, 10]
    with pytest.raises(SystemExit):  # what the model is may not change
        river.main(train_args(data, run, "--stage", "ae", "--conditioning", "fixed", "--resume"))


def test_every_third_party_import_is_a_declared_dependency():
    import ast
    import re
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    imported = set()
    for name in ("river.py", "data_prep.py"):
        for node in ast.walk(ast.parse(open(os.path.join(root, name)).read())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"river", "data_prep", "river_kernels"}
    setup = open(os.path.join(root, "setup.py")).read()
    declared = {re.split("[<>=]", r)[0].lower() for r in re.findall(r'"([A-Za-z][\w.<>=-]*)"',
                                                                    setup[setup.index("install_requires"):])}
    distribution = {"PIL": "pillow"}  # import name -> package name where they differ
    assert {distribution.get(m, m).lower() for m in third_party} <= declared


def test_memory_frames_are_scored_apart(tmp_path):
    path = str(tmp_path / "occ.h5")
    data_prep.main(["synthetic", "--kind", "occluder", "--out", path, "--videos", "30",
                    "--frames", "20"])
    clips, memory = river.eval_clips(path, "test", 2, 8, 2, 0, memory=True)
    flags = data_prep.memory_flags(path, "test")
    assert memory.shape == (len(clips), 8) and memory.any()
    assert memory[0].tolist() == flags[0][4:19:2].tolist()  # the predicted frames, every 2nd
    model = river.River(SMALL).eval()
    out = river.evaluate(model, clips[:, :5], 2, steps=1, memory=memory[:, :3])
    assert out["memory_frames"]["copy_last"]["frames"] == int(memory[:, :3].sum())
    balls = str(tmp_path / "balls.h5")
    data_prep.main(["synthetic", "--out", balls, "--videos", "30", "--frames", "20"])
    assert river.eval_clips(balls, "test", 2, 3, 1, 0, memory=True)[1] is None


@pytest.mark.slow
def test_demo_end_to_end_at_a_tiny_budget(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(river.PRESETS, "tiny", river.replace(river.PRESETS["tiny"], ae_steps=2,
                                                             flow_steps=2, ae_batch=4, flow_batch=4))
    run = tmp_path / "demo"
    river.main(["demo", "--data", data, "--run", str(run)])
    printed = capsys.readouterr().out
    assert "demo done" in printed and "over copying the last frame" in printed
    # no terminal here, so no progress bar: each stage prints its progress as lines instead
    assert "ae step 2/2: loss" in printed and "flow step 2/2: loss" in printed
    for name in ("test_predictions.gif", "test_predictions.png", "eval.json", "eval_psnr.png",
                 "loss.png", "samples.gif"):
        assert (run / name).exists(), name
    river.main(["demo", "--data", data, "--run", str(run)])  # again: finished steps are kept
    assert torch.load(run / "flow.pt", weights_only=True)["step"] == 2
