"""The official RIVER files in river's classes: the two fixture models of
tests/fixtures/official (made by the official code, with its reference outputs; its README says
how), the official key listings of tests/fixtures/official/keys, and one-line errors for files
that do not fit."""
import argparse
import os

import pytest
import torch

import river

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "official")
KEYS = os.path.join(FIXTURES, "keys")

# fixture -> the official configuration it is a small version of, its autoencoder file, and
# the Config fields where it differs (fixtures/official/README.md)
UVIT = dict(uvit_width=32, uvit_depth=2, uvit_mid_depth=1)
CASES = {"tiny-taming": ("bair64", "vqvae.ckpt", dict(image_size=64, ae_channels=(32, 64, 64, 32),
                                                      ae_blocks=1, codebook_size=64, **UVIT)),
         "tiny-ours": ("clevrer", "vqvae.pth", dict(image_size=64, ae_channels=(16, 32, 64, 128),
                                                    ae_decoder_channels=(32, 64, 128, 256),
                                                    codebook_size=64, **UVIT))}


def path(fixture, name):
    return os.path.join(FIXTURES, fixture, name)


def reference(fixture):
    """The official code's outputs for the fixture (tensors only: safe to load)."""
    return torch.load(path(fixture, "reference.pt"), weights_only=True)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(fixture name, River loaded from its model.pth, reference outputs of the official code)."""
    name = request.param
    official, _, sizes = CASES[name]
    model = river.load_official(path(name, "model.pth"), official, **sizes)
    return name, model, reference(name)


def listing(tsv):
    """[(key, shape, dtype)] of a key listing (key, [shape], dtype per line)."""
    with open(tsv) as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    return [(k, tuple(int(n) for n in s.strip("[]").split(",") if n), getattr(torch, d))
            for k, s, d in rows]


def read_keys(tsv):
    """{key: shape} of a key listing; the loss.* keys left out."""
    return {k: shape for k, shape, _ in listing(tsv) if not k.startswith("loss.")}


def autoencoder_checkpoint(fixture):
    """The fixture's autoencoder file as the official code saved it, rebuilt from model.pth,
    which holds the same tensors (the repository carries them once: fixtures/official/README.md).
    Keys, their order, shapes and dtypes are those of the official file's listing,
    keys_autoencoder.tsv; taming's loss.* tensors (the discriminator and LPIPS of a training
    checkpoint, which loaders skip) are zeros."""
    model = torch.load(path(fixture, "model.pth"), weights_only=True)["model"]
    taming = CASES[fixture][1] == "vqvae.ckpt"
    state = {}
    for key, shape, dtype in listing(path(fixture, "keys_autoencoder.tsv")):
        if key.startswith("loss."):
            state[key] = torch.zeros(shape, dtype=dtype)
            continue
        # taming: encoder.* is module.ae.encoder.*; CLEVRER: module.encoder.* is
        # module.ae.backbone.encoder.*
        state[key] = model["module.ae." + key if taming else
                           "module.ae.backbone." + key[len("module."):]]
        assert (tuple(state[key].shape), state[key].dtype) == (shape, dtype), key
    if taming:  # Lightning's layout
        return {"epoch": 0, "global_step": 0, "state_dict": state}
    return {"model": state, "global_step": 0}


@pytest.fixture(scope="session")
def ae_path(tmp_path_factory):
    """fixture name -> the path of its autoencoder file (autoencoder_checkpoint), written once."""
    folder = tmp_path_factory.mktemp("official_autoencoders")

    def write(fixture):
        out = folder / fixture / CASES[fixture][1]
        if not out.exists():
            out.parent.mkdir()
            torch.save(autoencoder_checkpoint(fixture), out)
        return str(out)
    return write


def shapes(module, prefix="", rename=("", "")):
    """{key: shape} of a module's state dict without river's own buffers."""
    return {prefix + k.replace(*rename): tuple(v.shape) for k, v in module.state_dict().items()
            if k.split(".")[-1] not in river.RIVER_BUFFERS}


# ----------------------------------------------------------------------------- the fixtures

def test_encoder_and_quantizer_match_the_official_code(case):
    name, model, ref = case
    z = model.ae.encode(ref["ae_frames"])
    torch.testing.assert_close(z, ref["ae_encode"], atol=1e-4, rtol=0)
    _, codes, _, _ = model.ae.quantize(ref["ae_encode"])
    near_tie = ref["ae_quant_gap_float64"] < 1e-5  # float32 rounding may pick either code
    assert ((codes == ref["ae_quant_indices"]) | near_tie).all()


def test_decoder_matches_the_official_code(case):
    name, model, ref = case
    with torch.no_grad():
        unclamped = model.ae.post_quant(ref["ae_quantized"])
    torch.testing.assert_close(unclamped, ref["ae_decode"], atol=3e-3, rtol=0)
    torch.testing.assert_close(model.ae.decode(ref["ae_encode"]), ref["ae_decode"].clamp(-1, 1),
                               atol=3e-3, rtol=0)
    if "ae_decode_force_not_quantize" in ref:  # taming: the decoder on unquantized latents
        with torch.no_grad():
            direct = model.ae.post_quant(ref["ae_encode"])
        torch.testing.assert_close(direct, ref["ae_decode_force_not_quantize"], atol=3e-3, rtol=0)


@pytest.mark.parametrize("case_", ["vf", "vf2"])
def test_vector_field_matches_the_official_code(case, case_):
    name, model, ref = case
    inputs = [ref[f"{case_}_in_{k}"] for k in ("input_latents", "timestamps", "reference_latents",
                                                 "conditioning_latents", "index_distances")]
    with torch.no_grad():
        out = model.field(*inputs)
    torch.testing.assert_close(out, ref[f"{case_}_out"], atol=1e-4, rtol=0)


def test_official_settings_travel_with_the_model(case):
    name, model, _ = case
    cfg = model.cfg
    assert not model.training and cfg.field == "uvit" and cfg.official_history
    assert (cfg.solver, cfg.sample_steps, cfg.warm_start, cfg.sigma_min) == ("rk4", 99, 0.0, 1e-7)
    if name == "tiny-taming":  # bair64: 1 -> 15 frames
        assert (cfg.ae_kind, cfg.context, cfg.clip_frames, cfg.frame_skip) == ("vqgan", 1, 16, 1)
    else:  # clevrer: 2 -> 14 frames, every 5th
        assert (cfg.ae_kind, cfg.context, cfg.clip_frames, cfg.frame_skip) == ("clevrer", 2, 16, 5)


def test_generate_frames_matches_the_official_sampler(case):
    name, model, ref = case
    torch.manual_seed(int(ref["gen_seed"]))
    out = model.generate_frames(ref["gen_initial_images"], int(ref["gen_num_frames"]),
                                steps=int(ref["gen_steps"]) - 1, solver="rk4")
    torch.testing.assert_close(out, ref["gen_output"].clamp(-1, 1), atol=3e-3, rtol=0)


def test_autoencoder_files_load_on_their_own(case, ae_path):
    name, model, ref = case
    official, _, sizes = CASES[name]
    ae = river.AUTOENCODERS[model.cfg.ae_kind](model.cfg).train()
    ae = river.load_autoencoder_file(ae_path(name), ae)  # taming's: with loss.* keys
    assert not ae.training
    torch.testing.assert_close(ae.encode(ref["ae_frames"]), ref["ae_encode"], atol=1e-4, rtol=0)
    both = river.load_official(path(name, "model.pth"), official, ae_path=ae_path(name),
                               **sizes)
    for a, b in zip(both.ae.state_dict().values(), model.ae.state_dict().values()):
        assert torch.equal(a, b)  # the file's tensors land where model.pth's copy does


def test_river_autoencoder_has_the_taming_keys():
    taming = {key for key, _, _ in listing(path("tiny-taming", "keys_autoencoder.tsv"))}
    cfg = river.Config(ae_channels=(32, 64, 64, 32), ae_attention=(2,), codebook_size=64)
    keys = set(river.VQAutoencoder(cfg).state_dict())
    assert keys - taming == {"mean", "std", "quantize.usage", "quantize.calls"}
    assert {k for k in taming - keys if not k.startswith("loss.")} == set()


# ----------------------------------------------------------------------------- full size

@pytest.mark.parametrize("name", ["bair64", "bair256", "clevrer"])
def test_official_configs_build_exactly_the_official_tensors(name):
    with torch.device("meta"):  # shapes only: no memory for the 160M numbers
        model = river.River(river.official_config(name))
    if name == "clevrer":
        ae = shapes(model.ae, "module.ae.backbone.", ("quantize.", "vector_quantizer."))
        ae_file = shapes(model.ae, "module.", ("quantize.", "vector_quantizer."))
    else:
        ae, ae_file = shapes(model.ae, "module.ae."), shapes(model.ae)
    field = shapes(model.field, "module.vector_field_regressor.")
    assert {**ae, **field} == read_keys(os.path.join(KEYS, f"{name}-model.tsv"))
    assert ae_file == read_keys(os.path.join(KEYS, f"{name}-autoencoder.tsv"))


def test_norm_uses_32_groups_where_the_width_allows():  # the U-Net: 4 channels at least
    groups = [river.norm(ch).num_groups for ch in (512, 64, 32, 48, 16, 8, 6)]
    assert groups == [32, 32, 32, 12, 4, 2, 1]
    assert [river.norm(ch, group=4).num_groups for ch in (256, 128, 64, 32)] == [32, 32, 16, 8]
    assert river.norm(32).eps == 1e-6


def test_named_autoencoder_configs():
    assert river.PRESETS["bair256"].latent_dim == 8 and river.PRESETS["clevrer128"].frame_skip == 5
    assert river.ae_config("f16")["ae_channels"] == (128, 128, 256, 256, 512)
    with pytest.raises(river.RiverError, match="unknown autoencoder config 'f4'"):
        river.ae_config("f4")


# ----------------------------------------------------------------------------- errors

def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_file_of_another_architecture():
    with pytest.raises(river.RiverError) as e:  # a CLEVRER model read as taming's
        river.load_official(path("tiny-ours", "model.pth"), "bair64", **CASES["tiny-taming"][2])
    assert ("module.ae.backbone.encoder.conv_in.weight (16, 3, 3, 3) is no key of an official "
            "bair64 model") in one_line(e)
    with pytest.raises(river.RiverError) as e:  # other widths than the file's
        river.load_official(path("tiny-taming", "model.pth"), "bair64",
                            **{**CASES["tiny-taming"][2], "ae_channels": (32, 64, 64, 64)})
    assert ("module.ae.encoder.down.3.block.0.conv1.weight is (32, 64, 3, 3) where an official "
            "bair64 model has (64, 64, 3, 3)") in one_line(e)


def test_a_tensor_of_another_shape(tmp_path):
    ckpt = torch.load(path("tiny-taming", "model.pth"), weights_only=True)
    ckpt["model"]["module.vector_field_regressor.project_out.4.weight"] = torch.zeros(5, 32, 3, 3)
    torch.save(ckpt, tmp_path / "model.pth")
    with pytest.raises(river.RiverError) as e:
        river.load_official(str(tmp_path / "model.pth"), "bair64", **CASES["tiny-taming"][2])
    assert ("module.vector_field_regressor.project_out.4.weight is (5, 32, 3, 3) where an official "
            "bair64 model has (4, 32, 3, 3)") in one_line(e)


def test_a_truncated_file(tmp_path):
    with open(path("tiny-taming", "model.pth"), "rb") as f:
        data = f.read()
    (tmp_path / "model.pth").write_bytes(data[:len(data) // 2])
    with pytest.raises(river.RiverError) as e:
        river.load_official(str(tmp_path / "model.pth"), "bair64")
    assert "not a readable checkpoint" in one_line(e)


def test_an_unknown_name():
    with pytest.raises(river.RiverError) as e:
        river.load_official(path("tiny-taming", "model.pth"), "ucf101")
    assert "'ucf101' is not an official RIVER configuration" in one_line(e)


def test_pickled_objects_need_trust(tmp_path):
    ckpt = autoencoder_checkpoint("tiny-taming")
    ckpt["hyper_parameters"] = argparse.Namespace(embed_dim=4)  # as some Lightning files have
    torch.save(ckpt, tmp_path / "vqvae.ckpt")
    ae = river.VQAutoencoder(river.Config(ae_channels=(32, 64, 64, 32), ae_attention=(2,),
                                          codebook_size=64))
    with pytest.raises(river.RiverError) as e:
        river.load_autoencoder_file(str(tmp_path / "vqvae.ckpt"), ae)
    assert "--trust-checkpoint" in one_line(e)
    river.load_autoencoder_file(str(tmp_path / "vqvae.ckpt"), ae, trust=True)


# ----------------------------------------------------------------------------- command line

def test_sample_and_eval_run_a_released_model(tmp_path, monkeypatch, ae_path):
    """`sample --official NAME --ckpt model.pth` and `eval` with it; the fixture's small widths
    stand in for the official ones (a real model.pth needs no such patch)."""
    name, (official, _, sizes) = "tiny-taming", CASES["tiny-taming"]
    real = river.official_config
    monkeypatch.setattr(river, "official_config", lambda n: river.replace(real(n), **sizes))
    clip = (torch.rand(4, 64, 64, 3) * 255).to(torch.uint8).numpy()
    import numpy as np
    np.save(tmp_path / "clip.npy", clip)
    model = ("--official", official, "--ckpt", path(name, "model.pth"), "--steps", "2")
    river.main(["sample", *model, "--input", str(tmp_path / "clip.npy"), "--frames", "2",
                "--out", str(tmp_path / "p.gif")])
    assert (tmp_path / "p.gif").exists()
    import data_prep
    data = str(tmp_path / "d.h5")
    data_prep.main(["synthetic", "--out", data, "--videos", "30", "--frames", "8", "--size", "64"])
    river.main(["eval", *model, "--ae", ae_path(name), "--data", data, "--frames", "2",
                "--videos", "2", "--out", str(tmp_path / "ev")])
    import json
    result = json.loads((tmp_path / "ev.json").read_text())
    assert result["protocol"]["solver"] == "rk4" and result["nfe_per_frame"] == 8


def test_train_a_flow_on_a_taming_autoencoder(tmp_path, monkeypatch):
    """--ae with a Lightning .ckpt (a trusted one carrying pickled hyper-parameters): the flow
    trains on the official, unscaled latents, and the run refuses another autoencoder later."""
    import data_prep
    import json
    data = str(tmp_path / "d.h5")
    data_prep.main(["synthetic", "--out", data, "--videos", "30", "--frames", "8", "--size", "64"])
    ckpt = autoencoder_checkpoint("tiny-taming")
    ckpt["hyper_parameters"] = argparse.Namespace(embed_dim=4)  # as Lightning files carry
    torch.save(ckpt, tmp_path / "lightning.ckpt")
    cfg = river.replace(river.PRESETS["tiny"], **{k: v for k, v in CASES["tiny-taming"][2].items()
                                                  if not k.startswith("uvit")},
                        ae_attention=(2,), flow_steps=2, flow_batch=2, clip_frames=6)
    run, ae = str(tmp_path / "run"), str(tmp_path / "lightning.ckpt")
    with pytest.raises(river.RiverError, match="--trust-checkpoint"):
        river.train(data, run, cfg, "flow", ae=ae)
    model = river.train(data, run, cfg, "flow", ae=ae, trust=True)
    reads = []
    monkeypatch.setattr(river, "torch_load", lambda p, trust=False, load=river.torch_load:
                        reads.append(p) or load(p, trust))
    river.train(data, run, cfg, "flow", ae=ae, trust=True, resume=True)
    assert reads.count(ae) == 1  # official files can be gigabytes: one read serves every use
    monkeypatch.undo()
    assert json.loads(open(os.path.join(run, "config.json")).read())["latent_stats"] is False
    assert float(model.ae.std.min()) == float(model.ae.std.max()) == 1.0  # unscaled latents
    ref = reference("tiny-taming")
    torch.testing.assert_close(model.ae.encode(ref["ae_frames"]), ref["ae_encode"], atol=1e-4,
                               rtol=0)
    del ckpt["hyper_parameters"]
    ckpt["state_dict"]["quant_conv.bias"] += 0.01  # another autoencoder in the same format
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(river.RiverError, match="another autoencoder"):
        river.train(data, run, cfg, "flow", ae=str(tmp_path / "other.ckpt"), resume=True)
