"""--precision: bf16 autocast on request, fp32 on the CPU by default."""
import json
import warnings

import pytest
import torch

import river


def test_autocast_follows_the_precision_and_the_device():
    cpu, x = torch.device("cpu"), torch.randn(4, 4)
    with river.autocast(cpu):
        assert (x @ x).dtype == torch.float32  # the CPU default: the reference numerics
    with river.autocast(cpu, "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with river.autocast(cpu, "fp32"):
        assert (x @ x).dtype == torch.float32
    with warnings.catch_warnings():  # without CUDA, torch warns that it disables autocast
        warnings.simplefilter("ignore")
        assert river.autocast(torch.device("cuda")).fast_dtype == torch.bfloat16  # CUDA's default


@pytest.mark.slow
def test_bf16_trains_samples_and_evaluates_with_float32_weights(data, tmp_path):
    run = tmp_path / "run"
    river.main(["train", "--data", data, "--run", str(run), "--ae-steps", "3", "--flow-steps",
                "3", "--batch-size", "4", "--precision", "bf16"])
    ckpt = torch.load(run / "flow.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert all(r["bad_steps"] == 0 and r["loss"] == r["loss"] for r in rows if "loss" in r)
    river.main(["eval", "--run", str(run), "--data", data, "--frames", "3", "--videos", "2",
                "--precision", "bf16", "--out", str(tmp_path / "ev")])
    result = json.loads((tmp_path / "ev.json").read_text())
    assert 0 < result["model_mean"]["psnr"] < 100


def test_the_training_step_computes_in_bf16_when_asked():
    cfg = river.Config(ae_channels=(8, 16, 16), codebook_size=32, unet_channels=(16, 32))
    field, seen = river.River(cfg).field, []
    field.stem.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.AdamW(field.parameters())
    batches = iter([torch.randn(2, 6, 4, 8, 8)] * 2)

    def loss_fn(net, z):
        return river.flow_loss(net, z, cfg), {}

    for precision in ("fp32", "bf16"):
        river.train_step(field, field, opt, loss_fn, batches, 1, torch.device("cpu"), 1.0,
                         precision)
    assert seen == [torch.float32, torch.bfloat16]
