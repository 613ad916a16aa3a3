"""Runs that get killed, bad numbers, bad input, several processes: none may cost work."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data_prep
import river

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "RIVER_KERNELS": os.environ.get("RIVER_KERNELS", "ref"),
       "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def river_cli(*args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "river.py"), *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=kw.get("cwd", ROOT),
                          timeout=kw.get("timeout", 300))


def train_cmd(data, run, steps=40, *extra):
    return [sys.executable, os.path.join(ROOT, "river.py"), "train", "--data", data, "--run",
            str(run), "--stage", "ae", "--steps", str(steps), "--batch-size", "8",
            "--ckpt-every", "10", *extra]


def checkpoint_step(path):
    try:
        return torch.load(path, weights_only=False)["step"]
    except Exception:  # not there yet (a rename is atomic, so never half-written)
        return -1


def weights(path):
    return torch.load(path, weights_only=False)["model"]


# ----------------------------------------------------------------------------- crash safety

@pytest.mark.slow
def test_killed_at_random_moments_then_resumed_ends_like_an_uninterrupted_run(data, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(train_cmd(data, whole, 300), check=True, env=ENV, capture_output=True)
    rng = random.Random(0)
    kills, last, resumed_at = 0, -1, []
    for _ in range(4):
        proc = subprocess.Popen(train_cmd(data, killed, 300, "--resume"), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and checkpoint_step(killed / "ae.pt") <= last:
            time.sleep(0.05)  # until this run has saved a checkpoint of its own
        time.sleep(rng.uniform(0, 0.6))  # then at a random moment: mid-step or mid-save
        if proc.poll() is not None:
            break
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
        kills += 1
        last = checkpoint_step(killed / "ae.pt")
        resumed_at.append(last)
    assert kills == 4
    subprocess.run(train_cmd(data, killed, 300, "--resume"), check=True, env=ENV,
                   capture_output=True)
    assert not [n for n in os.listdir(killed) if ".tmp" in n]  # no half-written file is left
    a, b = weights(whole / "ae.pt"), weights(killed / "ae.pt")
    assert torch.load(killed / "ae.pt", weights_only=False)["step"] == 300
    for k in a:  # checkpoints restore the RNG: the resumed run replays the same batches
        torch.testing.assert_close(a[k], b[k])
    curve = {r["step"]: r["loss"] for r in map(json.loads, open(killed / "metrics.jsonl"))}
    reference = {r["step"]: r["loss"] for r in map(json.loads, open(whole / "metrics.jsonl"))}
    assert curve.keys() == reference.keys()  # every step logged once: no gaps, no repeats
    # a logged loss averages the steps since the previous line; where a resume fell in that
    # window the run saw only part of it, elsewhere the curve is the same to the last bit
    clean = [s for s in curve if not any(s - 25 < r < s for r in resumed_at)]
    assert len(clean) >= len(curve) // 2
    assert all(curve[s] == reference[s] for s in clean)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    proc = subprocess.Popen(train_cmd(data, tmp_path, 100000, "--ckpt-every", "100000"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)  # wait until training runs (the first log line is at step 25)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    assert torch.load(tmp_path / "ae.pt", weights_only=False)["step"] >= 25


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    cfg = river.Config(ae_channels=(8, 16, 16), codebook_size=32, warmup=1)
    model = river.River(cfg).field
    poison = {3, 4}

    def loss_fn(net, z):
        loss = net(z, torch.rand(len(z)), z, z, torch.ones(len(z))).pow(2).mean() + z.mean()
        return loss * (float("nan") if loss_fn.calls in poison else 1), {}

    def stream():
        while True:
            loss_fn.calls = getattr(loss_fn, "calls", 0) + 1
            yield torch.randn(2, 4, 8, 8)

    river.train_stage("flow", model, loss_fn, stream(), 10, 1e-3, cfg, str(tmp_path),
                      torch.device("cpu"), ckpt_every=1)
    ckpt = torch.load(tmp_path / "flow.pt", weights_only=False)
    assert ckpt["bad_steps"] == 2 and ckpt["step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    poison.update(range(1, 10**6))
    loss_fn.calls = 0
    (tmp_path / "bad").mkdir()
    fresh = river.River(cfg).field
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(river.RiverError, match="non-finite gradients"):
        river.train_stage("flow", fresh, loss_fn, stream(), 100, 1e-3, cfg,
                          str(tmp_path / "bad"), torch.device("cpu"), ckpt_every=1)
    saved = torch.load(tmp_path / "bad" / "flow.pt", weights_only=False)
    assert saved["bad_steps"] == 20  # the last checkpoint before the stop
    for k, v in saved["model"].items():  # never a poisoned update: still the initial weights
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- several processes

@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    worker = os.path.join(ROOT, "tests", "ddp_worker.py")
    two, one = tmp_path / "two", tmp_path / "one"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", worker, str(two)], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    subprocess.run([sys.executable, worker, str(one)], env=ENV, check=True, capture_output=True)
    r0, r1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    single = torch.load(one / "rank0.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # the ranks never drift apart
        torch.testing.assert_close(r0[k], single[k], atol=1e-4, rtol=1e-3)
    torch.manual_seed(0)  # the worker's initial weights: training moved them (not 0 steps)
    initial = river.River(river.Config(ae_channels=(8, 16, 16), codebook_size=32)).ae
    moved = [not torch.equal(r0[k], p) for k, p in initial.named_parameters()]
    assert len(moved) > 10 and sum(moved) > len(moved) // 2
    loss_two, loss_one = (float((d / "loss.txt").read_text()) for d in (two, one))
    assert loss_two == pytest.approx(loss_one, rel=1e-3)
    assert (two / "ae.pt").exists()  # rank 0 wrote the checkpoint


@pytest.mark.slow
def test_torchrun_trains_river_with_two_cpu_ranks(data, tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", os.path.join(ROOT, "river.py"), "train", "--data",
                          data, "--run-dir", str(tmp_path), "--ae-steps", "4", "--flow-steps", "4",
                          "--batch-size", "4"], env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.load(tmp_path / "flow.pt", weights_only=False)["step"] == 4
    assert len(torch.load(tmp_path / "flow.pt", weights_only=False)["rng"]) == 2


# ----------------------------------------------------------------------------- bad input

def one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_data_files(data, tmp_path):
    one_line_error(river_cli("train", "--data", tmp_path / "nope.h5", "--run", tmp_path / "r"),
                   "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    one_line_error(river_cli("train", "--data", tmp_path / "text.h5", "--run", tmp_path / "r"),
                   "HDF5")
    raw = open(data, "rb").read()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    one_line_error(river_cli("train", "--data", tmp_path / "cut.h5", "--run", tmp_path / "r"))
    import h5py
    with h5py.File(tmp_path / "layout.h5", "w") as f:
        f.create_dataset("0/0", data=np.zeros((8, 8, 3), np.uint8))
    one_line_error(river_cli("train", "--data", tmp_path / "layout.h5", "--run", tmp_path / "r"),
                   "len")


@pytest.mark.slow
def test_videos_too_short(tmp_path):
    path = tmp_path / "short.h5"
    data_prep.main(["synthetic", "--out", str(path), "--videos", "6", "--frames", "8"])
    one_line_error(river_cli("train", "--data", path, "--run", tmp_path / "r", "--ae-steps", "1"),
                   "16 frames", "--clip-frames")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    river.main(["train", "--data", data, "--run", str(run), "--ae-steps", "2", "--flow-steps", "2",
                "--batch-size", "2"])
    return run


@pytest.mark.slow
def test_bad_sampling_options(data, trained, tmp_path):
    out = tmp_path / "p.gif"
    base = ("--run", trained, "--data", data, "--out", out)
    one_line_error(river_cli("eval", *base, "--context", "18", "--frames", "10"), "context 18")
    one_line_error(river_cli("sample", *base, "--steps", "-1"), "--steps")
    one_line_error(river_cli("sample", *base, "--warm-start", "1"), "--warm-start")
    one_line_error(river_cli("sample", *base, "--frames", "0"), "--frames")
    one_line_error(river_cli("sample", *base, "--solver", "heun"), "solver")


def test_bad_training_options(data, trained, tmp_path):
    one_line_error(river_cli("train", "--data", data, "--run", tmp_path, "--steps", "-3"),
                   "at least 1")
    one_line_error(river_cli("train", "--data", data, "--run", tmp_path, "--preset", "huge"),
                   "preset")
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(river_cli("train", "--data", data, "--run", blocker / "run"), "writable")


@pytest.mark.slow
def test_bad_checkpoints(data, trained, tmp_path):
    # resuming with another config
    one_line_error(river_cli("train", "--data", data, "--run", trained, "--resume",
                             "--conditioning", "fixed"), "another config", "conditioning")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    one_line_error(river_cli("sample", "--ckpt", junk, "--data", data), "not a readable checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    one_line_error(river_cli("sample", "--ckpt", tmp_path / "other.pt", "--data", data),
                   "not a river checkpoint")
    one_line_error(river_cli("sample", "--ckpt", trained / "ae.pt", "--data", data),
                   "only the autoencoder")
    one_line_error(river_cli("train", "--data", data, "--run", tmp_path / "r", "--stage", "flow",
                             "--ae", trained / "ae.pt", "--preset", "bair64"), "does not fit")


# ----------------------------------------------------------------------------- safety

def files_of(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def test_a_second_train_without_resume_changes_nothing(data, trained):
    before = files_of(trained)
    one_line_error(river_cli("train", "--data", data, "--run", trained, "--ae-steps", "2",
                             "--flow-steps", "2", "--batch-size", "2"),
                   "ae.pt and flow.pt", "--resume", "--force")
    assert files_of(trained) == before  # config.json included


def test_force_starts_over_and_keeps_the_old_files_aside(data, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = files_of(run)
    river.main(["train", "--data", data, "--run", str(run), "--stage", "ae", "--ae-steps", "2",
                "--batch-size", "2", "--seed", "5", "--force"])
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and files_of(aside[0]) == before
    assert (run / "ae.pt").read_bytes() != before["ae.pt"] and not (run / "flow.pt").exists()


@pytest.mark.slow
def test_a_flow_model_never_outlives_its_autoencoder(data, trained, tmp_path):
    other = tmp_path / "other"
    river.main(["train", "--data", data, "--run", str(other), "--stage", "ae", "--ae-steps", "2",
                "--batch-size", "2", "--seed", "1"])
    one_line_error(river_cli("train", "--data", data, "--run", trained, "--stage", "flow",
                             "--ae", other / "ae.pt", "--resume"), "another autoencoder")
    # training stage 1 further under an existing flow stage asks for --force
    one_line_error(river_cli("train", "--data", data, "--run", trained, "--stage", "ae",
                             "--steps", "4", "--resume"), "flow.pt", "--force")
    # the same autoencoder resumes (nothing left to do at the same budget)
    assert river_cli("train", "--data", data, "--run", trained, "--stage", "flow", "--resume",
                     "--ae", trained / "ae.pt").returncode == 0


class Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_no_checkpoint_runs_code(data, trained, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"river": 1, "stage": "flow", "payload": Payload(str(marker))}, tmp_path / "evil.pt")
    for command in (("sample", "--ckpt", tmp_path / "evil.pt", "--data", data),
                    ("train", "--data", data, "--run", tmp_path / "r", "--stage", "flow",
                     "--ae", tmp_path / "evil.pt")):
        one_line_error(river_cli(*command), "pickled", "--trust-checkpoint")
    assert not marker.exists()


def test_a_trusted_file_with_pickled_objects_loads_with_the_opt_in_flag(data, trained, tmp_path):
    import argparse
    ckpt = torch.load(trained / "flow.pt", weights_only=True)
    ckpt["hyper_parameters"] = argparse.Namespace(lr=1e-4)  # as Lightning files often carry
    torch.save(ckpt, tmp_path / "lightning.pt")
    args = ("sample", "--ckpt", tmp_path / "lightning.pt", "--data", data, "--num", "1",
            "--frames", "2", "--steps", "1", "--out", tmp_path / "p.gif")
    one_line_error(river_cli(*args), "pickled", "--trust-checkpoint")
    assert river_cli(*args, "--trust-checkpoint").returncode == 0
    assert (tmp_path / "p.gif").exists()


# ----------------------------------------------------------------------------- memory

def test_training_streams_a_split_larger_than_the_cache(data, tmp_path):
    river.main(["train", "--data", data, "--run", str(tmp_path), "--ae-steps", "2",
                "--flow-steps", "2", "--batch-size", "2", "--cache-mb", "0"])
    assert torch.load(tmp_path / "flow.pt", weights_only=False)["step"] == 2
    clips = river.ClipDataset(data, 16, cache_bytes=0)
    assert not clips.in_ram and clips.batch(3).shape == (3, 16, 3, 32, 32)
