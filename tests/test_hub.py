"""Released models by name (fetch_official, load_official("bair64"), `sample --official NAME`
without --ckpt), with no network: the fixture models of tests/fixtures/official are laid out as
the Hugging Face Hub's own cache lays out what it downloads, and the Hub runs offline."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import river
from test_official import CASES, path, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any commit id: the cache only names it


def lay_out(cache, repo, source, filename="model.pth"):
    """Put the file `source` into the Hub cache `cache` as `filename` of `repo` at its main
    revision, in the layout huggingface_hub documents (hf_hub_download's docstring):
    models--OWNER--NAME/blobs/<sha256>, refs/main holding the commit id, and
    snapshots/<commit>/<filename> a symlink to the blob. Returns the snapshot's path."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    with open(source, "rb") as f:
        data = f.read()
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    return snapshot


def offline_env(home):
    """The environment of a fresh process whose Hub cache is home/hub, offline: HF_HOME alone
    says where (no HF_HUB_CACHE), as a user sets it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hub cache at tmp_path/hf/hub, offline: HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE=1
    set, and set too in huggingface_hub.constants, which read them when it was first imported."""
    pytest.importorskip("huggingface_hub", reason='the hub extra: pip install -e ".[hub]"')
    from huggingface_hub import constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", str(tmp_path / "hf")), ("HF_HUB_CACHE", str(cache)),
                        ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_name_resolves_to_its_file_in_the_cache(hub):
    snapshot = lay_out(hub, "cvg-unibe/river_bair_64", path("tiny-taming", "model.pth"))
    found = river.fetch_official("bair64")
    assert os.path.samefile(found, snapshot)
    assert river.OFFICIAL_HUB == {"bair64": "cvg-unibe/river_bair_64",
                                  "kth": "cvg-unibe/river_kth_64",
                                  "bair256": "cvg-unibe/river_bair_256",
                                  "clevrer": "cvg-unibe/river_clevrer_128"}
    assert set(river.OFFICIAL_HUB) == set(river.OFFICIAL)


@pytest.mark.parametrize("fixture", list(CASES))
def test_a_model_by_name_matches_the_official_outputs(hub, fixture):
    official, _, sizes = CASES[fixture]
    lay_out(hub, river.OFFICIAL_HUB[official], path(fixture, "model.pth"))
    model = river.load_official(official, **sizes)  # the fixture's widths, as test_official
    ref = reference(fixture)
    inputs = [ref[f"vf_in_{k}"] for k in ("input_latents", "timestamps", "reference_latents",
                                          "conditioning_latents", "index_distances")]
    with torch.no_grad():
        torch.testing.assert_close(model.field(*inputs), ref["vf_out"], atol=1e-4, rtol=0)
    torch.manual_seed(int(ref["gen_seed"]))
    out = model.generate_frames(ref["gen_initial_images"], int(ref["gen_num_frames"]),
                                steps=int(ref["gen_steps"]) - 1)
    torch.testing.assert_close(out, ref["gen_output"].clamp(-1, 1), atol=3e-3, rtol=0)


def test_what_arrives_is_checked_by_the_strict_loader(hub):
    """A file that does not fit the name's architecture (here CLEVRER's under bair64's name)
    stops with the loader's one line."""
    lay_out(hub, "cvg-unibe/river_bair_64", path("tiny-ours", "model.pth"))
    with pytest.raises(river.RiverError) as e:
        river.load_official("bair64", **CASES["tiny-taming"][2])
    assert "module.ae.backbone.encoder.conv_in.weight (16, 3, 3, 3) is no key of an official " \
           "bair64 model" in one_line(e)


def test_sample_by_name_on_the_command_line(hub, tmp_path, monkeypatch):
    """`sample --official bair64` with no --ckpt reads the cached model.pth."""
    lay_out(hub, "cvg-unibe/river_bair_64", path("tiny-taming", "model.pth"))
    real = river.official_config
    sizes = CASES["tiny-taming"][2]
    monkeypatch.setattr(river, "official_config", lambda n: river.replace(real(n), **sizes))
    np.save(tmp_path / "clip.npy", (torch.rand(4, 64, 64, 3) * 255).to(torch.uint8).numpy())
    river.main(["sample", "--official", "bair64", "--input", str(tmp_path / "clip.npy"),
                "--frames", "2", "--steps", "2", "--out", str(tmp_path / "p.gif")])
    assert (tmp_path / "p.gif").exists()


def test_offline_with_an_empty_cache_is_one_line(hub):
    with pytest.raises(river.RiverError) as e:
        river.load_official("kth")
    assert one_line(e) == (
        f"cvg-unibe/river_kth_64/model.pth is not in the Hugging Face cache {hub} and the Hub "
        "cannot be reached (HF_HUB_OFFLINE=1): fetch it once online, or download model.pth from "
        "https://huggingface.co/cvg-unibe/river_kth_64 and pass it (--ckpt)")


def test_without_the_hub_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub fails
    with pytest.raises(river.RiverError) as e:
        river.fetch_official("clevrer")
    assert one_line(e) == (
        'fetching the clevrer model by name needs huggingface_hub: pip install -e ".[hub]", or '
        "download model.pth from https://huggingface.co/cvg-unibe/river_clevrer_128 and pass it "
        "(--ckpt)")
    with pytest.raises(SystemExit) as stop:  # the command line: the same line, exit status 2
        river.main(["sample", "--official", "clevrer", "--input", "clip.npy", "--out", "p.gif"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {e.value}\n"


def test_names_that_are_not_released_models():
    with pytest.raises(river.RiverError) as e:
        river.fetch_official("ucf101")
    assert one_line(e).startswith("'ucf101' is no released RIVER model: use one of bair64, kth, ")
    with pytest.raises(river.RiverError) as e:  # a file needs its configuration's name
        river.load_official(path("tiny-taming", "model.pth"))
    assert "is not an official RIVER configuration" in one_line(e)


def test_a_fresh_process_follows_HF_HOME_and_offline_mode(tmp_path):
    """The Hub's own environment, read by a new process: HF_HOME says where the cache is, and
    HF_HUB_OFFLINE=1 keeps it off the network; on the command line an empty cache gives one
    line."""
    pytest.importorskip("huggingface_hub", reason='the hub extra: pip install -e ".[hub]"')
    snapshot = lay_out(tmp_path / "hf" / "hub", "cvg-unibe/river_bair_64",
                       path("tiny-taming", "model.pth"))
    env = offline_env(tmp_path / "hf")
    found = subprocess.run([sys.executable, "-c", "import river; print(river.fetch_official("
                            "'bair64'))"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert os.path.samefile(found.stdout.strip(), snapshot)
    cli = subprocess.run([sys.executable, "river.py", "sample", "--official", "bair256", "--input",
                          "clip.npy", "--out", str(tmp_path / "p.gif")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert cli.returncode == 2
    assert cli.stderr.count("\n") == 1 and cli.stderr.startswith(
        "error: cvg-unibe/river_bair_256/model.pth is not in the Hugging Face cache")
    assert "(HF_HUB_OFFLINE=1)" in cli.stderr
