"""What a careful read and a newcomer's run of the README found: each fix, checked."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tqdm.auto import tqdm

import river
from test_robustness import ENV, ROOT, checkpoint_step, one_line_error, river_cli


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A run whose two stages have finished (2 steps each)."""
    run = tmp_path_factory.mktemp("finished")
    river.main(["train", "--data", data, "--run", str(run), "--ae-steps", "2", "--flow-steps", "2",
                "--batch-size", "2"])
    return run


def last_steps(run):
    rows = river.RunLog(str(run)).rows()
    return {stage: max(r["step"] for r in rows if r["stage"] == stage) for stage in ("ae", "flow")}


def test_steps_on_resume_mean_the_stage_still_training(data, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    # the README's "for longer": the finished autoencoder keeps its steps, the flow trains on
    river.main(["train", "--data", data, "--run", str(run), "--resume", "--steps", "4"])
    assert last_steps(run) == {"ae": 2, "flow": 4}
    assert json.load(open(run / "config.json"))["ae_steps"] == 2
    assert "flow: resuming at step 2" in capsys.readouterr().out
    # raising the autoencoder's steps under a flow model names the way out, not --force alone
    one_line_error(river_cli("train", "--data", data, "--run", run, "--resume", "--ae-steps", "9"),
                   "--flow-steps")


def test_a_misspelt_conditioning_is_refused_from_python_too():
    with pytest.raises(river.RiverError, match="randon"):
        river.River(river.Config(conditioning="randon"))
    assert set(river.CONDITIONING) == {"random", "random+previous", "last", "fixed", "dense"}


@pytest.mark.parametrize("key", ["solver", "field", "ae_kind", "uvit_head"])
def test_a_misspelt_name_is_one_line_not_a_keyerror(key):
    with pytest.raises(river.RiverError, match=f"unknown {key} 'typo': use one of"):
        river.River(river.replace(river.Config(), **{key: "typo"}))


def test_checkpoints_keep_every_generator_a_resume_needs(finished):
    ckpt = torch.load(finished / "flow.pt", weights_only=True)
    assert [set(state) for state in ckpt["rng"]] == [{"cpu"}]  # the CPU run: its one generator
    # a checkpoint of an older river (the CPU state alone) still resumes
    torch.manual_seed(5)
    old = {"stage": "flow", "step": 2, "rng": [torch.get_rng_state()], "model": {}}
    expected = torch.rand(3)
    torch.manual_seed(6)
    net = torch.nn.Linear(1, 1)
    opt, sched = river.make_optimizer(net, 1e-3, river.Config(), 10)
    old.update(model=net.state_dict(), opt=opt.state_dict(), sched=sched.state_dict())
    river.resume(old, net, opt, sched, None, 1e-3, 0.0, 0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_saves_and_restores_its_cuda_generator():
    device = torch.device("cuda")
    torch.cuda.manual_seed(3)
    states = river.gather_rng_states(device)
    expected = torch.rand(3, device=device)
    net = torch.nn.Linear(1, 1)
    opt, sched = river.make_optimizer(net, 1e-3, river.Config(), 10)
    ckpt = {"stage": "flow", "step": 1, "rng": states, "model": net.state_dict(),
            "opt": opt.state_dict(), "sched": sched.state_dict()}
    torch.rand(5, device=device)
    river.resume(ckpt, net, opt, sched, None, 1e-3, 0.0, 0)
    assert torch.equal(torch.rand(3, device=device), expected)


def test_an_unknown_option_names_the_program_once():
    top = river_cli("--nope")
    assert "see python river.py --help" in top.stderr and "river.py river.py" not in top.stderr
    sub = river_cli("train", "--nope")
    assert "see python river.py train --help" in sub.stderr


def test_sigterm_saves_a_checkpoint_as_ctrl_c_does(data, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "river.py"), "train", "--data", data, "--run",
           str(tmp_path), "--stage", "ae", "--steps", "100000", "--batch-size", "4",
           "--ckpt-every", "100000"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)  # training runs (the first log line is at step 25)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "continue with --resume" in err and "Traceback" not in err
    assert checkpoint_step(tmp_path / "ae.pt") >= 25


def test_without_a_terminal_progress_is_printed_by_time_as_well(capsys):
    bar = tqdm(disable=True)
    row = {"stage": "flow", "step": 37, "loss": 0.5, "steps_per_s": 2.0}
    clock = {"printed": time.time()}
    river.show_progress(bar, row, 1000, 25, 0, clock)  # not a tenth of the stage: silent
    assert capsys.readouterr().out == ""
    clock["printed"] -= 31  # 31 s later
    river.show_progress(bar, row, 1000, 25, 0, clock)
    assert "flow step 37/1000" in capsys.readouterr().out


def test_bad_data_leaves_no_run_directory(tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5")
    for data in (tmp_path / "text.h5", tmp_path / "missing.h5"):
        one_line_error(river_cli("train", "--data", data, "--run", tmp_path / "run"))
        assert not (tmp_path / "run").exists()


def test_a_named_split_must_exist(data, finished):
    one_line_error(river_cli("sample", "--run", finished, "--data", data, "--split", "nosuch"),
                   "no split 'nosuch'", "test")
    one_line_error(river_cli("eval", "--run", finished, "--data", data, "--split", "nosuch"),
                   "no split 'nosuch'")


def test_sample_help_shows_its_defaults():
    text = river_cli("sample", "--help").stdout
    for default in ("default: 4", "default: pred.gif", "default: test"):
        assert default in text, default


def test_past_horizon_reaches_the_sampler_from_the_command_line(data, finished, tmp_path,
                                                                monkeypatch):
    seen = []
    past_frame = river.past_frame
    monkeypatch.setattr(river, "past_frame", lambda *a: seen.append(a[3]) or past_frame(*a))
    river.main(["eval", "--run", str(finished), "--data", data, "--frames", "2", "--videos", "1",
                "--past-horizon", "3", "--out", str(tmp_path / "ev")])
    assert seen and set(seen) == {3}
    assert json.load(open(tmp_path / "ev.json"))["protocol"]["past_horizon"] == 3
