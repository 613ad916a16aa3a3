"""What river does for real footage: generating changes, the presets that train on it."""
import pytest
import torch

import river

SMALL = river.Config(ae_channels=(8, 16, 16), codebook_size=32, unet_channels=(16, 32),
                     clip_frames=6)


def test_with_a_change_scale_the_field_learns_the_scaled_change():
    cfg = river.replace(SMALL, change_scale=0.2)
    latents = torch.randn(3, 6, cfg.latent_dim, 8, 8)
    seen = {}

    def field(x, t, ref, cond, d):
        seen.update(x=x, t=t)
        return torch.zeros_like(x)

    torch.manual_seed(1)
    loss = river.flow_loss(field, latents, cfg)
    torch.manual_seed(1)
    tau, ref, c, d = river.training_indices(3, 6, cfg.conditioning)
    rows = torch.arange(3)
    t = torch.rand(3)
    change = (latents[rows, tau] - latents[rows, ref]) / 0.2  # a still frame: exactly 0
    eps = torch.randn_like(change)
    torch.testing.assert_close(seen["x"], river.interpolate(eps, change, t, cfg.sigma_min))
    torch.testing.assert_close(loss, (river.target_velocity(eps, change, cfg.sigma_min) ** 2).mean())


def test_sampling_a_change_adds_it_to_the_reference():
    cfg = river.replace(SMALL, change_scale=0.2)
    model = river.River(cfg).eval()  # its field starts as the zero field
    history = torch.randn(2, 3, cfg.latent_dim, 8, 8)
    torch.manual_seed(0)
    z = model.next_latent(history, steps=4)
    torch.manual_seed(0)
    eps = torch.randn(history[:, -1].shape)
    # dx/dt = 0 leaves the noise where it started: the change is 0.2 eps
    torch.testing.assert_close(z, history[:, -1] + 0.2 * eps)
    # a warm start begins at "no change": at s = 0.99 the frame barely moves
    z = model.next_latent(history, steps=100, warm_start=0.99)
    assert (z - history[:, -1]).abs().max() < 0.2 * 0.02 * 6


def test_generating_changes_keeps_the_last_real_frame_where_nothing_changes():
    cfg = river.replace(SMALL, change_scale=0.2)
    model = river.River(cfg).eval()
    # dx/dt = -x / (1 - t): on Euler's grid the state reaches exactly 0 (no change) at t = 1
    model.field.forward = lambda x, t, ref, cond, d: -x / (1 - t.view(-1, 1, 1, 1)).clamp_min(0.02)
    context = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    frames = model.generate_frames(context, 3, steps=49)
    # the decoded change is nothing: the predictions are the real last frame, not its
    # reconstruction through the codes
    torch.testing.assert_close(frames[:, 2:], context[:, -1:].expand(-1, 3, -1, -1, -1))
    assert (frames[:, 1] - context[:, -1]).abs().mean() > 0.1  # the context is reconstructed


def test_augmented_clips_are_mirrored_or_played_backwards_or_both():
    clips = torch.rand(400, 5, 3, 4, 6)
    out = river.augmented(clips)
    kinds = []
    for x, y in zip(clips, out):
        kinds.append(next(k for k, f in (("same", lambda v: v), ("mirror", lambda v: v.flip(-1)),
                                         ("backwards", lambda v: v.flip(0)),
                                         ("both", lambda v: v.flip(-1).flip(0)))
                          if torch.equal(f(x), y)))
    assert {k: kinds.count(k) for k in set(kinds)}.keys() == {"same", "mirror", "backwards", "both"}
    assert all(60 < kinds.count(k) < 140 for k in set(kinds))  # each about a quarter


def test_augment_trains_on_mirrored_and_reversed_latents(data, tmp_path, monkeypatch):
    seen = []
    dataset = river.ClipDataset

    def spy(videos, *a, **kw):
        if not isinstance(videos, str):
            seen.append(videos)
        return dataset(videos, *a, **kw)

    monkeypatch.setattr(river, "ClipDataset", spy)
    cfg = river.replace(SMALL, ae_steps=1, flow_steps=1, ae_batch=2, flow_batch=2, augment=True)
    river.train(data, str(tmp_path / "run"), cfg)
    videos = seen[-1]  # the flow stage's latents: the videos, mirrored, then all backwards
    n = len(videos) // 4
    model = river.load_river(str(tmp_path / "run"), "cpu")
    frames = river.ClipDataset(data, 1, split="train").videos
    first = river.to_float(frames[0])
    torch.testing.assert_close(videos[0], model.ae.encode(first), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(videos[n], model.ae.encode(first.flip(-1)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(videos[2 * n], videos[0].flip(0))


def test_samples_are_scored_one_by_one_and_their_pixel_mean_apart(monkeypatch):
    """The rows of S samples: the mean over single samples and its spread over the samples,
    the best sample per clip, and the mean of the S predicted videos in pixels, its own row."""
    clips = torch.rand(3, 4, 3, 32, 32) * 2 - 1
    draws = [torch.rand(3, 2, 3, 32, 32) * 2 - 1 for _ in range(4)]  # 4 samples of 2 frames
    calls = iter(draws)
    monkeypatch.setattr(river, "predictions", lambda *a, **k: {"model": next(calls)})
    out = river.evaluate(river.River(SMALL).eval(), clips, 2, samples=4)
    truth = clips[:, 2:]
    each = torch.stack([river.psnr(d, truth) for d in draws], 1)  # (M, S, P)
    assert out["model_mean"]["psnr"] == pytest.approx(float(each.mean()), abs=1e-5)
    assert out["model_mean"]["psnr_spread"] == pytest.approx(float(each.mean((0, 2)).std()),
                                                             abs=1e-5)
    assert out["model_best"]["psnr"] == pytest.approx(float(each.mean(2).max(1).values.mean()),
                                                      abs=1e-5)
    mean = torch.stack(draws).mean(0)
    assert out["model_average"]["psnr"] == pytest.approx(float(river.psnr(mean, truth).mean()),
                                                         abs=1e-5)
    assert out["model_average"]["psnr"] > out["model_mean"]["psnr"]  # a hedge, not a sample


def test_eval_counts_the_network_evaluations_of_one_sample(data, tmp_path, capsys):
    run = tmp_path / "run"
    river.main(["train", "--data", data, "--run", str(run), "--ae-steps", "1", "--flow-steps",
                "1", "--batch-size", "2"])
    river.main(["eval", "--run", str(run), "--data", data, "--frames", "2", "--videos", "2",
                "--steps", "2", "--samples", "3", "--out", str(tmp_path / "ev")])
    import json
    result = json.load(open(tmp_path / "ev.json"))
    assert result["nfe_per_frame"] == 2 and result["protocol"]["samples"] == 3
    assert {"model_mean", "model_best", "model_average", "copy_last"} <= set(result)
    printed = capsys.readouterr().out
    assert "3 single sample(s) per clip" in printed and "mean of 3 samples (pixels)" in printed


def test_an_old_config_with_sample_averaging_still_loads():
    cfg = river.config_from_dict({**river.asdict(river.Config()), "sample_average": 8})
    assert cfg == river.Config()


@pytest.mark.parametrize("preset", ["real32", "real64"])
def test_the_real_presets_train_a_few_steps_and_predict(preset, tmp_path):
    import data_prep
    cfg = river.PRESETS[preset]
    data = str(tmp_path / "d.h5")
    data_prep.main(["synthetic", "--out", data, "--videos", "12", "--frames", "20", "--size",
                    str(cfg.image_size)])
    small = river.replace(cfg, ae_steps=2, flow_steps=2, ae_batch=2, flow_batch=2)
    model = river.train(data, str(tmp_path / "run"), small)
    assert model.cfg.change_scale and model.cfg.augment and not model.cfg.snap_to_codes
    assert model.cfg.conditioning == "random+previous"
    assert model.ae.encode(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[-1] == 16
    frames = model.eval().generate_frames(torch.zeros(1, 2, 3, cfg.image_size, cfg.image_size), 2)
    assert frames.shape == (1, 4, 3, cfg.image_size, cfg.image_size)


def test_a_clip_to_predict_from_can_be_cut_to_its_central_square(tmp_path, av):
    import numpy as np
    from PIL import Image

    import data_prep
    from conftest import write_video
    frames = (np.random.default_rng(0).random((4, 24, 40, 3)) * 255).astype(np.uint8)
    center = frames[:, :, 8:32]  # the 24x24 middle of a 40-wide frame
    np.save(tmp_path / "clip.npy", frames)
    np.save(tmp_path / "center.npy", center)
    assert np.array_equal(data_prep.read_clip(tmp_path / "clip.npy", 16, crop="center"),
                          data_prep.read_clip(tmp_path / "center.npy", 16))
    assert not np.array_equal(data_prep.read_clip(tmp_path / "clip.npy", 16),
                              data_prep.read_clip(tmp_path / "center.npy", 16))
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{i}.png")
    assert np.array_equal(data_prep.read_clip(tmp_path / "frames", 16, crop="center"),
                          data_prep.read_clip(tmp_path / "center.npy", 16))
    write_video(tmp_path / "clip.mkv", frames)  # lossless
    assert np.array_equal(data_prep.read_clip(tmp_path / "clip.mkv", 16, crop="center"),
                          data_prep.read_clip(tmp_path / "center.npy", 16))
    with pytest.raises(data_prep.DataError, match="squeeze or center"):
        data_prep.read_clip(tmp_path / "clip.npy", 16, crop="tiles")


def test_temperature_scales_the_starting_noise_and_one_is_the_paper(monkeypatch):
    model = river.River(SMALL).eval()
    history = torch.randn(2, 3, SMALL.latent_dim, 8, 8)
    starts = []
    monkeypatch.setattr(river, "integrate", lambda field, x, *a: starts.append(x) or x)
    for temperature in (1.0, 0.5, 0.0):
        model.cfg = river.replace(SMALL, temperature=temperature)
        torch.manual_seed(3)
        model.next_latent(history, 2)
    torch.manual_seed(3)
    eps = torch.randn(history[:, -1].shape)
    assert torch.equal(starts[0], eps)  # temperature 1: the paper's noise, bit for bit
    torch.testing.assert_close(starts[1], 0.5 * eps)
    assert not starts[2].any()
    with pytest.raises(river.RiverError, match="temperature must be at least 0"):
        river.River(river.replace(SMALL, temperature=-1))
