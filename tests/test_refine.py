"""Stage 3, the refiner: the official forward, training, resuming, safety, sampling and eval."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import river
from test_robustness import ENV, ROOT, checkpoint_step, one_line_error, river_cli

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official", "refiner")

# a refiner small enough to train in seconds, on top of tiny autoencoder and U-Net widths
SMALL = river.Config(ae_channels=(8, 16, 16), codebook_size=32, unet_channels=(16, 32),
                     clip_frames=6, ae_steps=4, flow_steps=2, ae_batch=4, flow_batch=4,
                     refine_steps=60, refine_groups=1, refine_blocks=1, refine_width=16,
                     refine_batch=8, refine_lr=3e-3, warmup=5)


def test_the_official_checkpoint_computes_the_official_forward():
    refiner = river.load_refiner(os.path.join(FIXTURE, "checkpoint.pth"))
    ref = torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)
    assert sum(p.numel() for p in refiner.parameters()) == 827_531  # G = B = 3, F = 64, r = 8
    with torch.no_grad():
        out = refiner(ref["cond"], ref["recon"])  # refiner(previous, frame)
    torch.testing.assert_close(out, ref["refined"], atol=1e-5, rtol=1e-5)


def test_without_its_args_the_sizes_come_from_the_tensors(tmp_path):
    ckpt = torch.load(os.path.join(FIXTURE, "checkpoint.pth"), weights_only=False)
    ckpt["args"].rcan_stages = 2  # args win where present: a wrong one is caught...
    torch.save(ckpt, tmp_path / "lying.pth")
    with pytest.raises(river.RiverError, match="no key of a refiner"):
        river.load_refiner(str(tmp_path / "lying.pth"))
    del ckpt["args"]  # ...and without them the shapes say G, B, F and r
    torch.save(ckpt, tmp_path / "bare.pth")
    refiner = river.load_refiner(str(tmp_path / "bare.pth"))
    ref = torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(refiner(ref["cond"], ref["recon"]), ref["refined"],
                                   atol=1e-5, rtol=1e-5)


def test_a_river_refiner_starts_as_the_identity():
    refiner = river.Refiner(3, groups=1, blocks=1, width=8, skip=True)
    previous, frame = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert torch.equal(refiner(previous, frame), frame)


def test_refine_runs_each_prediction_with_the_frame_before_it():
    class CopyPrevious(torch.nn.Module):  # a refiner that returns its first input
        def forward(self, previous, frame):
            return previous + 0.1

    last = torch.zeros(2, 3, 8, 8)
    out = river.refine_frames(CopyPrevious(), last, torch.rand(2, 4, 3, 8, 8))
    # first prediction: the last real frame + 0.1; then each refined frame feeds the next
    for k in range(4):
        torch.testing.assert_close(out[:, k], torch.full_like(last, 0.1 * (k + 1)))


@pytest.fixture(scope="module")
def refined_run(data, tmp_path_factory):
    """A run with all three stages of SMALL."""
    run = tmp_path_factory.mktemp("refined")
    river.train(data, str(run), SMALL)
    return run


def test_the_refiner_learns_and_writes_its_checkpoint(data, refined_run):
    rows = river.RunLog(str(refined_run)).rows()
    refine = [r for r in rows if r.get("stage") == "refine"]
    assert refine[-1]["step"] == 60 and refine[-1]["loss"] < 0.5 * refine[0]["loss"]
    ckpt = torch.load(refined_run / "refine.pt", weights_only=True)
    flow = torch.load(refined_run / "flow.pt", weights_only=True)
    assert ckpt["stage"] == "refine" and ckpt["ae_hash"] == flow["ae_hash"]
    # held out, it beats the autoencoder alone: it sees the true previous frame
    model = river.load_river(str(refined_run), "cpu")
    pairs = river.spread_frames(data, span=2)  # (M, 2, C, H, W)
    recon = river.reconstruct(model.ae, pairs[:, 1], "cpu")
    alone = float(river.psnr(recon, pairs[:, 1]).mean())
    assert refine[-1]["refine_psnr"] > alone + 1
    with torch.no_grad():
        refined = model.refiner(pairs[:, 0], recon).clamp(-1, 1)
    assert float(river.psnr(refined, pairs[:, 1]).mean()) == pytest.approx(
        refine[-1]["refine_psnr"], abs=1e-3)


def test_eval_scores_the_refined_samples_beside_the_plain_ones(data, refined_run, tmp_path):
    result = river_cli("eval", "--run", refined_run, "--data", data, "--context", "2",
                       "--frames", "3", "--videos", "3", "--out", tmp_path / "ev")
    assert result.returncode == 0, result.stderr
    assert "refined, single samples" in result.stdout and "true latents" in result.stdout
    # the refined rows refine the very samples of the plain rows
    model = river.load_river(str(refined_run), "cpu")
    clips = river.eval_clips(data, "test", 2, 3, 1, 3)
    torch.manual_seed(0)
    preds = river.predictions(model, clips[:, :2], 3, 64, *model.sampling_settings())
    torch.testing.assert_close(preds["refined"],
                               river.refine_frames(model.refiner, clips[:, 1], preds["model"]))
    out = river.evaluate(model, clips, 2)
    assert out["refined_mean"]["psnr"] == pytest.approx(
        float(river.psnr(preds["refined"], clips[:, 2:]).mean()), abs=1e-4)
    assert out["model_mean"]["psnr"] == pytest.approx(
        float(river.psnr(preds["model"], clips[:, 2:]).mean()), abs=1e-4)


def test_sample_refines_with_the_runs_refiner_or_a_file(data, refined_run, tmp_path):
    ok = river_cli("sample", "--run", refined_run, "--data", data, "--num", "1", "--frames", "2",
                   "--refine", "--out", tmp_path / "a.gif")
    assert ok.returncode == 0 and (tmp_path / "a.gif").exists(), ok.stderr
    ok = river_cli("sample", "--run", refined_run, "--data", data, "--num", "1", "--frames", "2",
                   "--refiner", os.path.join(FIXTURE, "checkpoint.pth"), "--out", tmp_path / "b.gif")
    assert ok.returncode == 0 and (tmp_path / "b.gif").exists(), ok.stderr


def test_refine_errors_are_one_line(data, refined_run, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(refined_run, plain)
    os.remove(plain / "refine.pt")
    one_line_error(river_cli("sample", "--run", plain, "--data", data, "--refine"),
                   "no refiner", "--stage refine")
    one_line_error(river_cli("eval", "--run", plain, "--data", data, "--refiner",
                             plain / "flow.pt"), "not a refiner")
    one_line_error(river_cli("train", "--data", data, "--run", plain, "--stage", "refine",
                             "--resume", "--refine-steps", "0"), "--refine-steps")


def test_a_refiner_of_another_autoencoder_is_refused(data, refined_run, tmp_path):
    other = tmp_path / "other"
    river.train(data, str(other), river.replace(SMALL, refine_steps=0), seed=3)
    shutil.copy(refined_run / "refine.pt", other / "refine.pt")
    with pytest.raises(river.RiverError, match="another autoencoder"):
        river.load_river(str(other), "cpu")
    one_line_error(river_cli("train", "--data", data, "--run", other, "--stage", "refine",
                             "--resume", "--refine-steps", "60"), "refine.pt", "another autoencoder")


@pytest.mark.slow
def test_a_killed_refine_stage_resumes_where_it_stopped(data, tmp_path):
    """SIGKILL mid-stage, then --resume: the same weights as a run never interrupted."""
    base = tmp_path / "base"
    river.train(data, str(base), river.replace(SMALL, refine_steps=0), "ae")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(base, whole)
    shutil.copytree(base, killed)
    cmd = ["train", "--data", data, "--stage", "refine", "--resume", "--refine-steps", "80",
           "--ckpt-every", "10"]
    assert river_cli(*cmd, "--run", whole).returncode == 0
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "river.py"), *cmd, "--run",
                             str(killed)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and checkpoint_step(killed / "refine.pt") < 10:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    stopped = checkpoint_step(killed / "refine.pt")
    assert 10 <= stopped < 80
    assert river_cli(*cmd, "--run", killed).returncode == 0
    a = torch.load(whole / "refine.pt", weights_only=True)
    b = torch.load(killed / "refine.pt", weights_only=True)
    assert b["step"] == 80
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k])


def test_the_perceptual_loss_calls_the_i3d_on_whole_clips(data, tmp_path):
    """--refine-i3d: 0.1 x the distance of I3D features of the refined and the true clip."""
    calls = []

    class Features(torch.nn.Module):  # stands in for an I3D: (B, 3, T, 224, 224) -> (B, F)
        def forward(self, x):
            calls.append((tuple(x.shape), x.requires_grad))
            return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)

    cfg = river.replace(SMALL, refine_steps=2, refine_batch=5)
    river.train(data, str(tmp_path / "r"), cfg, refine_i3d=Features())
    assert len(calls) >= 4  # a fake and a real clip per step
    shapes = {shape for shape, _ in calls}
    assert shapes == {(1, 3, cfg.clip_frames, 224, 224)}  # refine_batch 5 // (T - 1) = 1 clip
    assert {grad for _, grad in calls} == {True, False}  # the refined clip carries gradients


def test_the_refiner_learns_on_frames_as_the_model_reads_them_out(data, tmp_path, monkeypatch):
    """With a change readout a prediction is the last real frame plus the decoded change, not a
    reconstruction: the refiner trains and is scored on exactly that."""
    model = river.River(river.replace(SMALL, change_scale=0.15)).eval()
    clips = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    out = river.true_readout(model, clips)
    decoded = model.ae.decode(model.encode_frames(clips).flatten(0, 1)).view_as(clips)
    torch.testing.assert_close(out[:, 0], decoded[:, 0])
    torch.testing.assert_close(out[:, 1:], (clips[:, :1] + decoded[:, 1:] - decoded[:, :1]).clamp(-1, 1))
    seen = []
    readout = river.true_readout
    monkeypatch.setattr(river, "true_readout", lambda *a, **k: seen.append(1) or readout(*a, **k))
    cfg = river.replace(SMALL, change_scale=0.15, ae_steps=1, flow_steps=1, refine_steps=1,
                        ae_batch=2, flow_batch=2, refine_batch=2)
    river.train(data, str(tmp_path / "run"), cfg)
    assert len(seen) >= 2  # the held-out pairs, and every training batch
