"""Peak memory of one training step of each stage of each preset (a script, not a test).

    python tests/bench_memory.py [--device cpu|cuda] [--presets tiny bair64 ...]

Each measurement runs in a fresh subprocess: on CPU the peak resident set size of the process
(ru_maxrss, so it includes torch itself: the first row, 'import torch', is that floor), on CUDA
torch.cuda.max_memory_allocated. Batches are the presets' own (ae_batch frames, flow_batch
clips), random data, one optimizer step after a warm-up step.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
import river
preset, stage, device = {preset!r}, {stage!r}, torch.device({device!r})
if stage != "import":
    cfg = river.PRESETS[preset]
    model = river.River(cfg).to(device)
    if stage == "ae":
        net, batch = model.ae, torch.rand(cfg.ae_batch, cfg.channels, cfg.image_size, cfg.image_size)
        def loss():
            recon, vq, _ = net(batch.to(device))
            return ((recon - batch.to(device)) ** 2).mean() + vq
    else:
        side = cfg.image_size // 2 ** (len(cfg.ae_channels) - 1)
        net = model.field
        z = torch.randn(cfg.flow_batch, cfg.clip_frames, cfg.latent_dim, side, side, device=device)
        def loss():
            return river.flow_loss(net, z, cfg)
    opt = torch.optim.AdamW(net.parameters())
    for _ in range(2):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            l = loss()
        opt.zero_grad()
        l.backward()
        opt.step()
peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({{"preset": preset, "stage": stage, "peak_mb": peak / 2**20}}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--presets", nargs="*", default=["tiny", "bair64", "kth64", "clevrer128"])
    args = p.parse_args()
    env = {**os.environ, "RIVER_KERNELS": "ref"}
    rows = []
    jobs = [("-", "import")] + [(pr, st) for pr in args.presets for st in ("ae", "flow")]
    print(f"{'preset':12}{'stage':8}{'peak MB':>10}   ({args.device})")
    for preset, stage in jobs:
        code = STEP.format(root=ROOT, preset=preset, stage=stage, device=args.device)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"{preset:12}{stage:8}{'failed':>10}   {out.stderr.strip().splitlines()[-1]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{preset:12}{stage:8}{row['peak_mb']:10.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
