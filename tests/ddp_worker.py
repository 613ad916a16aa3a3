"""Helper script (not a test) for test_robustness.py: five autoencoder steps on a fixed global
batch of 8 frames, under torchrun (each rank takes its rows) or as one process (all rows).

    python tests/ddp_worker.py OUT          # or: torchrun --nproc_per_node=2 tests/ddp_worker.py OUT
Writes OUT/rank<r>.pt (the weights each rank ends with) and OUT/loss.txt (the final loss of the
global batch, from rank 0).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import river  # noqa: E402

out = sys.argv[1]
device = river.setup_distributed(torch.device("cpu"))
rank, world = river.dist_info()
torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
cfg = river.Config(ae_channels=(8, 16, 16), codebook_size=32, warmup=1)
model = river.River(cfg)
model.ae.quantize.calls.fill_(1)  # no codebook restarts: the loss is a pure function of the batch
g = torch.Generator().manual_seed(1)
batches = [torch.rand(8, 3, 32, 32, generator=g) * 2 - 1 for _ in range(5)]


def loss_fn(ae, x):
    recon, vq_loss, stats = ae(x)
    return F.mse_loss(recon, x) + vq_loss, stats


os.makedirs(out, exist_ok=True)
river.train_stage("ae", model.ae, loss_fn, iter([b[rank::world] for b in batches]), 5, 1e-2, cfg,
                  out, device)
torch.save(model.ae.state_dict(), os.path.join(out, f"rank{rank}.pt"))
if rank == 0:
    with torch.no_grad():
        model.ae.eval()
        loss, _ = loss_fn(model.ae, batches[0])
    with open(os.path.join(out, "loss.txt"), "w") as f:
        f.write(f"{float(loss)}\n")
