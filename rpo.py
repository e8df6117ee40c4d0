"""Diffusion-RPO (Gu et al. 2024, arXiv 2406.06382) in one file: preference fine-tuning of a Stable Diffusion
1.5 / SDXL UNet (or an SD3.5 / FLUX.1 transformer) that contrasts every winner with every loser of a micro-batch,
each pair weighted by how alike the two prompt-image pairs are in CLIP space.

    python rpo.py                                  # toy-drawn/ on toy-data/ (shipped): CPU, 75 to 85 s
    python rpo.py --model sdxl --data pickapic     # the real thing
    torchrun --nproc_per_node=8 rpo.py --model sd15 --data /data/pickapic --global_contrast

Top to bottom: the method (from "copy from here" to "copy to here"); config; the training step and loop
(preference_step, train); models; main; below the divider, the machinery. Every field of Config is a flag: --key
value (booleans: --key, or --key false). toy.py writes the toy world's data and tiny models as ordinary folders.
"""

# ================================================================================= copy from here
# The method: the paper's equations as functions of tensors, torch alone, for one micro-batch of M pairs
# (winner x_w, loser x_l, caption c). Copy this block into your own training script as it is; the rest of this
# file feeds it (README: RPO in your own training script).
import torch
import torch.nn.functional as F


# f(c, x) = normalize(normalize(text(c)) + normalize(image(x))): a pair in CLIP space (or text or image alone)
def pair_embedding(text_features=None, image_features=None):
    parts = [F.normalize(x.float(), dim=-1) for x in (text_features, image_features) if x is not None]
    return F.normalize(sum(parts), dim=-1)


# d_ij = 1 - cos(f(c_i, x_w_i), f(c_j, x_l_j));  w_ij = exp(-d_ij / tau) / sum_j' exp(-d_ij' / tau)
def contrast_weights(f_w, f_l, tau):
    d = 1 - F.cosine_similarity(f_w.float()[:, None], f_l.float()[None, :], dim=-1)  # fp32 under autocast too
    return torch.softmax(-d / tau, dim=1)


# eps_i ~ N(0, I) and t_i from pair i's own seed: its winner and its loser share them. Drawn on the CPU, so a
# pair gets the same draw on any device, in any batch, after any resume. t_i ~ U{0..T-1}, or with a table of
# flow sigmas (SD3's logit-normal): t_i = sigmas[floor(sigmoid(n_i) T)], n_i ~ N(0, 1)
def pair_noise(seeds, shape, num_timesteps, sigmas=None):
    noise, t = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(shape, generator=g))
        if sigmas is None:
            t.append(torch.randint(0, num_timesteps, (1,), generator=g))
        else:
            u = torch.sigmoid(torch.randn(1, generator=g))
            t.append(sigmas[(u * num_timesteps).long().clamp(max=num_timesteps - 1)])
    return torch.stack(noise), torch.cat(t)


# x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and what an eps-prediction model is trained to output: eps
def noise_target(x0, noise, t, alphas_cumprod):
    abar = alphas_cumprod.to(x0.device, x0.dtype)[t.to(x0.device)]  # in x0's dtype, as diffusers' add_noise
    abar = abar.view(-1, *[1] * (x0.ndim - 1))
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise, noise


# flow matching (SD3, FLUX.1): x_t = (1 - sigma) x_0 + sigma eps, and its target, the velocity v = eps - x_0
def velocity_target(x0, noise, sigma):
    sigma = sigma.to(x0.device, x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    return (1 - sigma) * x0 + sigma * noise, noise - x0


# err = mean over every latent element of (prediction - target)^2, one number per sample
def per_sample_error(prediction, target):
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


# err_w, err_l of one denoiser (the policy, or the frozen reference) in one batched call: each pair's winner
# and loser noised with the pair's eps at the pair's t. denoise(x_t, t) -> prediction, winners then losers;
# noised(x_0, eps, t) -> (x_t, target): noise_target or velocity_target. Without losers (SFT): (err_w, None).
def denoiser_errors(denoise, latents_w, latents_l, noise, t, noised):
    sides = [latents_w] if latents_l is None else [latents_w, latents_l]
    noise, t = noise.to(latents_w.device, latents_w.dtype), t.to(latents_w.device)
    each_t = torch.cat([t] * len(sides))
    x_t, target = noised(torch.cat(sides), torch.cat([noise] * len(sides)), each_t)
    err = per_sample_error(denoise(x_t, each_t), target)
    return (err, None) if latents_l is None else err.chunk(2)


# s = err - ref_err (policy minus reference: lower is preferred);  weights None: the diagonal, Diffusion-DPO
# L = -mean_{i,j} log sigmoid(-(beta/2) w_ij (s_w[i] - s_l[j]))
def rpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta, weights=None):
    s_w, s_l = err_w - ref_err_w, err_l - ref_err_l
    if weights is None:
        return -F.logsigmoid(-(beta / 2) * (s_w - s_l)).mean()
    return -F.logsigmoid(-(beta / 2) * weights * (s_w[:, None] - s_l[None, :])).mean()


# accuracy = mean_i [s_w[i] < s_l[i]] (ties 1/2), margin = mean_i (beta/2)(s_l[i] - s_w[i]), w_diag = mean_i w_ii
def preference_metrics(err_w, err_l, ref_err_w, ref_err_l, beta, weights=None):
    """What metrics.jsonl logs of a micro-batch: those, beta x w_diag (the diagonal's effective beta), policy and
    reference MSE."""
    s_w, s_l = (err_w - ref_err_w).detach().float(), (err_l - ref_err_l).detach().float()
    w_diag = weights.diagonal().mean() if weights is not None else s_w.new_ones(())
    return dict(accuracy=((s_w < s_l).float() + 0.5 * (s_w == s_l).float()).mean(),
                margin=(beta / 2 * (s_l - s_w)).mean(), w_diag=w_diag, beta_w_diag=beta * w_diag,
                mse=torch.cat([err_w, err_l]).detach().mean(),
                ref_mse=torch.cat([ref_err_w, ref_err_l]).mean())
# =================================================================================== copy to here


# ---------------------------------------------------------------------------- what the rest needs
import argparse
import copy
import ctypes
import dataclasses
import datetime
import fcntl
import functools
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import sys
import time
import warnings
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import diffusers
import numpy as np
import torch.distributed as dist
import transformers
from PIL import Image
from tqdm import tqdm


# ----------------------------------------------------------------------------------------- config
HERE = os.path.dirname(os.path.abspath(__file__))  # the default run's model and data ship beside rpo.py


@dataclass
class Config:
    model: str = "tiny-drawn"  # sd15 | sdxl | sd3 | flux | toy.py's shapes (PRESETS): tiny-drawn, tiny, ...
    pretrained: str = None  # hub id or local diffusers folder; default from the preset (tiny, tiny-xl: none)
    init_unet: str = None  # start policy and reference from this UNet (transformer) folder: an SFT run's DIR/unet
    lora_rank: int = None  # > 0: LoRA adapters of this rank on a frozen UNet; 0: the whole; default: preset's
    lora_modules: str = None  # the layers that get adapters; default from the preset
    init_lora: str = None  # start the adapters from a previous run's DIR/lora, for policy and reference
    data: str = os.path.join(HERE, "toy-data")  # pickapic (a hub id) | a file, folder or glob of data files
    layout: str = None  # --data's layout (LAYOUTS: pickapic, pickapic-wds, hpdv3, ...); default: recognised
    image_root: str = None  # where hpdv2/hpdv3 image paths resolve; default the JSON file's folder
    data_id: str = "yuvalkirstain/pickapic_v2"
    split: str = "train"
    eval_data: str = None  # held-out pairs: default --data's validation_unique (pickapic, a local copy)
    eval_split: str = None  # default: validation_unique, else validation (a folder's), else train
    eval_pairs: int = 64
    eval_draws: int = 8  # fixed (noise, t) draws averaged per held-out pair
    max_pairs: int = 0  # 0 = all
    loss: str = "rpo"  # rpo | dpo | sft
    beta: float = None  # default from the preset
    tau: float = 0.5
    embed: str = "both"  # text | image | both
    clip: str = None  # CLIP for the pair weights; default from the preset
    global_contrast: bool = False  # the M x M matrix spans all ranks
    resolution: int = None
    batch: int = None  # M pairs per micro-batch per rank
    grad_accum: int = None
    lr: float = None  # set outright; None: lr_per_pair x effective batch (batch x grad_accum x world size)
    lr_per_pair: float = None  # Diffusion-DPO's --scale_lr: the learning rate per pair of the effective batch
    optimizer: str = None  # adamw | adafactor
    warmup_steps: int = None
    max_steps: int = None
    precision: str = None  # bf16 | fp16 | fp32; default bf16 on a GPU that has it, fp32 on CPU
    grad_checkpointing: bool = None
    compile: bool = False
    drop_prompt: float = 0.2  # Diffusion-DPO's share of empty conditioning captions
    random_crop: bool = False
    no_flip: bool = False
    time_ids: str = "constant"  # SDXL size and crop conditioning: constant (res, res, 0, 0, res, res) | image
    no_t5: bool = False  # SD3 without T5-XXL (its tokens zeros, as SD3 allows): 9 GB less, weaker prompts
    guidance: float = 3.5  # FLUX.1-dev's guidance embedding in training: its pipeline's default (docs/flow.md)
    workers: int = 4  # processes decoding JPEGs
    shuffle_buffer: int = 1000
    io_tries: int = 10  # a data read the network fails is tried this often (with backoff, 1 s doubling to 60 s)
    io_wait: float = 600.0  # ... and for at most this many seconds; then the run stops, to be resumed
    cache: str = ""  # folder of encoded pairs (VAE latents, text states, CLIP features)
    out: str = None  # the run's folder; default out/run-N, a new N per fresh run, the newest N under --resume
    report_to: str = "tensorboard"  # tensorboard | wandb | none: live curves of metrics.jsonl and the grids
    save_every: int = None  # steps between save points: checkpoint, weights, held-out metrics, samples
    save_every_minutes: float = 30.0  # also a checkpoint this long after the last one; 0 = off
    keep: int = 2
    resume: bool = False
    seed: int = 0
    max_nonfinite: int = 10  # this many non-finite steps in a row stop the run
    sample_steps: int = None  # denoising steps of the sample grid saved with each checkpoint; 0 = none


HUB_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
HUB_SD3 = "stabilityai/stable-diffusion-3.5-medium"  # SD3.5 Large: --pretrained stabilityai/stable-diffusion-3.5-large
UNET_LORA = "to_q,to_k,to_v,to_out.0"  # the attention projections, as Diffusion-DPO's and diffusers' SD scripts
# SD3's joint blocks: image and text attention projections (diffusers' SD3 LoRA scripts' defaults)
SD3_LORA = "attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out"
HUB_FLUX = "black-forest-labs/FLUX.1-dev"  # FLUX.1 [schnell]: --pretrained black-forest-labs/FLUX.1-schnell
# FLUX.1: the same, plus both streams' feed-forward layers (diffusers' Flux LoRA script's defaults; the single
# blocks' attn.to_q, to_k, to_v match too)
FLUX_LORA = SD3_LORA + ",ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"
BETA_EPS, BETA_FLOW = 5000.0, 100.0  # Diffusion-DPO's for eps errors; the Flow-DPO runs' (docs/flow.md)
# Diffusion-DPO's recipe: lr 1e-8 per pair times the effective batch (2048 pairs on 8 GPUs: 2.048e-5), 2000
# steps, 500 warmup. The tiny models' rate is 1e-5 at their 8 pairs a step.
PRESETS = {
    "tiny": dict(resolution=32, batch=8, grad_accum=1, lr_per_pair=1e-5 / 8, optimizer="adamw",
                 warmup_steps=10, max_steps=300, grad_checkpointing=False, save_every=150, sample_steps=8),
    "sd15": dict(pretrained=HUB_SD15, clip="openai/clip-vit-large-patch14", resolution=512, batch=8,
                 grad_accum=32, lr_per_pair=1e-8, optimizer="adamw", warmup_steps=500, max_steps=2000,
                 grad_checkpointing=False, save_every=200, sample_steps=30),
    "sdxl": dict(pretrained=HUB_SDXL, clip="openai/clip-vit-large-patch14", resolution=1024, batch=4,
                 grad_accum=64, lr_per_pair=1e-8, optimizer="adafactor", warmup_steps=500, max_steps=2000,
                 grad_checkpointing=True, save_every=200, sample_steps=30),
}
PRESETS["tiny-xl"] = PRESETS["tiny"]
PRESETS["sd3"] = dict(pretrained=HUB_SD3, clip="openai/clip-vit-large-patch14", resolution=1024, batch=4,
                      grad_accum=64, lr_per_pair=1e-8, optimizer="adamw", warmup_steps=500, max_steps=2000,
                      grad_checkpointing=True, save_every=200, sample_steps=28, beta=BETA_FLOW)
PRESETS["tiny-sd3"] = dict(PRESETS["tiny"], beta=BETA_FLOW)
# FLUX.1-dev's 12B transformer with a reference copy fits no single GPU whole: LoRA by default, at the low end of
# the Flow-DPO LoRA runs' rates (docs/flow.md); 256 pairs a step, as sd3
PRESETS["flux"] = dict(PRESETS["sd3"], pretrained=HUB_FLUX, batch=2, grad_accum=128, lora_rank=64, lr=1e-5)
PRESETS["tiny-flux"] = dict(PRESETS["tiny-sd3"])
# the default run: 300 steps at 1e-4 move toy.py's drawing model visibly towards the preferred style
PRESETS["tiny-drawn"] = dict(PRESETS["tiny"], pretrained=os.path.join(HERE, "toy-drawn"),
                             lr_per_pair=1e-4 / 8, sample_steps=30)
# its flow twin, toy.py's tiny SD3-shaped model that draws the toy world (toy-drawn-sd3/)
PRESETS["tiny-sd3-drawn"] = dict(PRESETS["tiny-sd3"], pretrained=os.path.join(HERE, "toy-drawn-sd3"),
                                 lr_per_pair=1e-4 / 8, sample_steps=30)
# What may change on --resume: the rest shapes the data order, the model or the loss, and must match.
FREE_ON_RESUME = ("max_steps", "save_every", "save_every_minutes", "keep", "workers", "eval_data",
                  "eval_split", "eval_pairs", "eval_draws", "sample_steps", "max_nonfinite", "compile",
                  "grad_checkpointing", "cache", "out", "resume", "image_root", "report_to", "io_tries",
                  "io_wait")
FAMILY = {"tiny": "sd15", "tiny-drawn": "sd15", "sd15": "sd15", "tiny-xl": "sdxl", "sdxl": "sdxl",
          "tiny-sd3": "sd3", "tiny-sd3-drawn": "sd3", "sd3": "sd3", "tiny-flux": "flux", "flux": "flux"}  # its pipeline
FLOW = ("sd3", "flux")  # the flow-matching families: velocity target, sigmas for timesteps, a transformer
for name, preset in PRESETS.items():
    preset.setdefault("beta", BETA_EPS)
    preset.setdefault("lora_rank", 0)
    preset.setdefault("lora_modules", dict(sd3=SD3_LORA, flux=FLUX_LORA).get(FAMILY[name], UNET_LORA))
CHOICES = dict(model=FAMILY, loss=("rpo", "dpo", "sft"), embed=("text", "image", "both"),
               precision=(None, "bf16", "fp16", "fp32"), optimizer=(None, "adamw", "adafactor"),
               time_ids=("constant", "image"), report_to=("tensorboard", "wandb", "none"))
# what each numeric flag may be, checked before any work ("0..1": a share)
RANGES = dict(lora_rank=">= 0", eval_pairs=">= 0", eval_draws=">= 1", max_pairs=">= 0", beta="> 0",
              tau="> 0", resolution=">= 8", batch=">= 1", grad_accum=">= 1", lr="> 0", lr_per_pair="> 0",
              warmup_steps=">= 0", max_steps=">= 1", drop_prompt="0..1", workers=">= 0",
              shuffle_buffer=">= 1", save_every=">= 1", save_every_minutes=">= 0", keep=">= 1", seed=">= 0",
              max_nonfinite=">= 1", sample_steps=">= 0", io_tries=">= 1", io_wait=">= 0", guidance=">= 0")
for lib in (diffusers, transformers):  # their load-time chatter would bury the training log
    lib.utils.logging.set_verbosity_error()
    lib.utils.logging.disable_progress_bar()


def as_bool(text):
    return str(text).lower() in ("1", "true", "yes", "on")


def resolution_step(model):
    """What --resolution must be a multiple of: the VAE's 8, times the flow transformers' 2 x 2 patches."""
    return 16 if FAMILY[model] in FLOW else 8


def in_range(value, rule):
    if not math.isfinite(value):
        return False
    if rule == "0..1":
        return 0 <= value <= 1
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def parse_config(argv=None):
    """Config from the command line: every field a flag, checked; the model's preset fills what is unset."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument("--" + f.name, nargs="?", const=True, default=f.default, type=as_bool)
        else:
            p.add_argument("--" + f.name, type=f.type, default=f.default)
    cfg = Config(**vars(p.parse_args(argv)))
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            sys.exit(f"rpo.py: --{name} must be one of {[a for a in allowed if a]}, "
                     f"got {getattr(cfg, name)!r}")
    own_clip = cfg.pretrained and os.path.isdir(os.path.join(cfg.pretrained, "clip"))
    for k, v in PRESETS[cfg.model].items():
        if k == "clip" and own_clip:  # a folder that brings its pair-weight CLIP (toy.py's) is weighted by it
            continue
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.pretrained is None:
        sys.exit(f"rpo.py: --model {cfg.model} has no weights of its own: pass --pretrained DIR, a diffusers "
                 f"folder of its shape (python toy.py model {cfg.model} --out DIR writes one)")
    for name, rule in RANGES.items():
        value = getattr(cfg, name)
        if value is not None and not in_range(value, rule):
            sys.exit(f"rpo.py: --{name} must be {rule.replace('..', ' to ')}, got {value}")
    if cfg.resolution % resolution_step(cfg.model):
        sys.exit(f"rpo.py: --resolution must be a multiple of {resolution_step(cfg.model)} for --model "
                 f"{cfg.model}, got {cfg.resolution}")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        sys.exit(f"rpo.py: --report_to {cfg.report_to} needs the {cfg.report_to} package: pip install "
                 f"{cfg.report_to}, or pass --report_to none")
    if cfg.layout not in (None, *LAYOUTS):
        sys.exit(f"rpo.py: --layout must be one of {list(LAYOUTS)}, got {cfg.layout!r}")
    if cfg.no_t5 and FAMILY[cfg.model] != "sd3":
        sys.exit(f"rpo.py: --no_t5 is for SD3 only; --model {cfg.model} needs its T5 (FLUX.1 has no T5-free mode)")
    if cfg.random_crop and cfg.cache:
        sys.exit("rpo.py: --random_crop cannot be cached (a cache stores one crop); drop one of them")
    IO_RETRY.update(tries=cfg.io_tries, wait=cfg.io_wait)  # for the data readers, which take no config
    return cfg


# ----------------------------------------------------------------- the training step and the loop
class Pairs(NamedTuple):
    """An encoded micro-batch of M pairs, on the training device: what the loss needs."""
    index: list  # pair ids: each seeds its pair's noise, timestep, flip and prompt dropout
    latents_w: torch.Tensor  # VAE latents of the winners [M, C, h, w] and of the losers
    latents_l: torch.Tensor
    prompt: torch.Tensor  # text-encoder states of the captions
    pooled: torch.Tensor  # SDXL's pooled text embedding (None for SD1.5)
    time_ids_w: torch.Tensor  # SDXL's size and crop conditioning [M, 6] of winners and losers
    time_ids_l: torch.Tensor
    f_w: torch.Tensor = None  # pair embeddings f(c, x_w), f(c, x_l) [M, D]: RPO's pair weights
    f_l: torch.Tensor = None


def preference_step(cfg, m, policy, pairs, epoch):
    """Loss and metrics of one micro-batch; prompt dropout blanks the conditioning, never the pair weights."""
    keys = [f"noise-{cfg.seed}-{epoch}-{i}" for i in pairs.index]
    dropped = [coin(cfg.seed, epoch, i, "drop") < cfg.drop_prompt for i in pairs.index]
    drop = torch.tensor(dropped, device=m.device)
    prompt = torch.where(drop[:, None, None], m.empty_prompt, pairs.prompt)
    pooled = torch.where(drop[:, None], m.empty_pooled, pairs.pooled) if pairs.pooled is not None else None
    if cfg.loss == "sft":
        err_w, _ = pair_errors(policy, m, pairs, keys, prompt, pooled, winners_only=True)
        return err_w.mean(), dict(mse=err_w.detach().mean())
    err_w, err_l = pair_errors(policy, m, pairs, keys, prompt, pooled)
    with torch.no_grad(), reference(m) as ref_unet:
        ref_err_w, ref_err_l = pair_errors(ref_unet, m, pairs, keys, prompt, pooled)
    errors, f = [err_w, err_l, ref_err_w, ref_err_l], [pairs.f_w, pairs.f_l]
    if cfg.global_contrast and dist.is_initialized():  # the M x M matrix spans every rank's pairs
        errors, f = [gather(e) for e in errors], [None if x is None else gather(x) for x in f]
    weights = contrast_weights(*f, cfg.tau) if cfg.loss == "rpo" else None
    return rpo_loss(*errors, cfg.beta, weights), preference_metrics(*errors, cfg.beta, weights)


def pair_errors(unet, m, pairs, keys, prompt=None, pooled=None, winners_only=False):
    """The method's denoiser_errors for a UNet or transformer on encoded pairs: each pair's noise and timestep
    from its key; the captions' conditioning (prompt, pooled: after prompt dropout, default the pairs' own) and
    SDXL's time ids."""
    if prompt is None:
        prompt, pooled = pairs.prompt, pairs.pooled
    seeds = [random.Random(key).getrandbits(63) for key in keys]
    noise, t = pair_noise(seeds, pairs.latents_w.shape[1:], m.scheduler.config.num_train_timesteps, m.sigmas)

    def denoise(x_t, t):  # winners, then losers: each side with the pairs' own conditioning
        sides = len(x_t) // len(prompt)
        time_ids = torch.cat([pairs.time_ids_w, pairs.time_ids_l][:sides])
        return predict(m, unet, x_t, t, torch.cat([prompt] * sides),
                       None if pooled is None else torch.cat([pooled] * sides), time_ids)
    losers = None if winners_only else pairs.latents_l
    if m.family in FLOW:  # a flow model: t is sigma
        noised = velocity_target
    else:
        noised = functools.partial(noise_target, alphas_cumprod=m.scheduler.alphas_cumprod)
    return denoiser_errors(denoise, pairs.latents_w, losers, noise, t, noised)


def predict(m, unet, x_t, t, prompt, pooled, time_ids):
    """One call of a UNet (eps) or SD3 or FLUX.1 transformer (velocity) at timesteps t (a flow model's: sigmas)."""
    if m.family == "flux":  # as FluxPipeline: 2 x 2 patches packed into tokens with their position ids; the
        # transformer takes sigma itself, and FLUX.1-dev the guidance value as an embedding (schnell has none)
        from diffusers import FluxPipeline
        b, c, h, w = x_t.shape
        guidance = torch.full((b,), m.guidance, device=x_t.device) if unet.config.guidance_embeds else None
        v = unet(hidden_states=FluxPipeline._pack_latents(x_t, b, c, h, w), timestep=t.to(x_t.dtype),
                 guidance=guidance, pooled_projections=pooled, encoder_hidden_states=prompt,
                 txt_ids=prompt.new_zeros(prompt.shape[1], 3),
                 img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)).sample
        return v.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)  # unpacked
    if m.family == "sd3":  # the transformer takes the timestep on its own scale: sigma x 1000, as its pipeline
        timestep = t * m.scheduler.config.num_train_timesteps
        return unet(hidden_states=x_t, timestep=timestep, encoder_hidden_states=prompt,
                    pooled_projections=pooled).sample
    extra = {}
    if m.family == "sdxl":  # SDXL's micro-conditioning: the pooled text embedding and the size and crop time ids
        extra = dict(added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids))
    return unet(x_t, t, prompt, **extra).sample


def gather(x):
    """All ranks' rows in rank order. Each rank computes the same global loss and DDP averages the ranks'
    gradients, so a rank's own rows take world x their gradient: the sum over the world copies of the loss."""
    world = dist.get_world_size()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    own = x.view_as(x)
    if own.requires_grad:
        def times_world(grad):
            return grad * world
        own.register_hook(times_world)
    parts[dist.get_rank()] = own
    return torch.cat(parts)


@torch.no_grad()
def evaluate(cfg, m, heldout, autocast):
    """Held-out implicit accuracy and margin, s averaged over eval_draws fixed (noise, t) draws per pair."""
    was_training = m.unet.training
    m.unet.eval()
    errs = []  # per micro-batch: err_w, err_l, ref_err_w, ref_err_l, each the mean over the draws
    with autocast:
        for pairs in heldout:
            draws = []
            for d in range(cfg.eval_draws):
                keys = [f"eval-{d}-{i}" for i in pairs.index]
                with reference(m) as ref_unet:
                    ref_errs = pair_errors(ref_unet, m, pairs, keys)
                draws.append([*pair_errors(m.unet, m, pairs, keys), *ref_errs])
            errs.append([torch.stack(e).mean(0) for e in zip(*draws)])
    m.unet.train(was_training)
    mean = [torch.cat(e) for e in zip(*errs)]
    metrics = preference_metrics(*mean, cfg.beta)
    return dict(accuracy=float(metrics["accuracy"]), margin=float(metrics["margin"]))


@dataclass
class Trainer:
    """What the optimizer step updates."""
    policy: torch.nn.Module  # m.unet as the step calls it: under DDP, compiled
    params: list  # the trained parameters: the whole UNet, or its LoRA adapters
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR  # linear warmup
    scaler: torch.amp.GradScaler  # enabled under fp16 only


def make_trainer(cfg, m, run):
    """The policy under DDP and --compile (the reference compiled too), its optimizer, warmup and scaler."""
    policy = m.unet
    if run.ddp:
        device_ids = [run.local_rank] if run.device.type == "cuda" else None
        # gradients as views of DDP's buckets, or each held twice (SDXL fp32: +10 GB); zero_grad zeroes them in place:
        # set_to_none would drop the views, and each step's no_sync micro-batches would make new gradients beside them
        policy = torch.nn.parallel.DistributedDataParallel(m.unet, device_ids=device_ids, gradient_as_bucket_view=True)
    if cfg.compile:
        policy = torch.compile(policy)
        m.ref_unet = torch.compile(m.ref_unet) if m.ref_unet is not None else None
    params = [p for p in m.unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, learning_rate(cfg, run.world), run.device)

    def warmup(step):
        return min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16")
    return Trainer(policy, params, optimizer, schedule, scaler)


# lr = lr_per_pair x batch x grad_accum x world size  (Diffusion-DPO's --scale_lr); --lr sets it outright
def learning_rate(cfg, world):
    return cfg.lr if cfg.lr is not None else cfg.lr_per_pair * cfg.batch * cfg.grad_accum * world


def make_optimizer(cfg, params, lr, device):
    if cfg.optimizer == "adafactor":  # Diffusion-DPO's choice for SDXL: no second-moment matrix per weight
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=device.type == "cuda")


def train(cfg, m, run, trainer, batches, heldout, step, nonfinite, tracker, asked):
    """The loop from `step` to --max_steps, one optimizer step per pass: a save point (checkpoint, weights, held-out
    metrics, samples) every --save_every steps and at the end; a checkpoint alone every --save_every_minutes and on
    a signal (`asked`, see stop_requests), which then stops it. nonfinite: non-finite steps so far, and in a row.
    Returns the records, the timing, the last micro-batch and what stopped it early (None: it ran to the end)."""
    (nonfinite_total, nonfinite_run), start_step, history, stopped_by = nonfinite, step, [], None
    asked["training"] = True
    last_checkpoint = time.monotonic()
    step_seconds, saving = [], 0.0  # saving: seconds of evaluation, checkpoints and samples: not throughput
    t0 = t_first = time.perf_counter()
    # closed however the loop ends: a one-line error that stops the run starts a line of its own
    with tqdm(total=cfg.max_steps, initial=step, disable=not run.master, dynamic_ncols=True) as bar, \
            pair_embedding_clock(m) as clip_seconds:
        while step < cfg.max_steps:
            t_step, lr = time.perf_counter(), trainer.schedule.get_last_lr()[0]
            # 1. forward and backward over --grad_accum micro-batches; DDP syncs the gradients on the last one
            sums = {}
            for micro in range(cfg.grad_accum):
                pairs, state = next(batches)
                sync = micro == cfg.grad_accum - 1 or not run.ddp
                with (nullcontext() if sync else trainer.policy.no_sync()), run.autocast:
                    loss, metrics = preference_step(cfg, m, trainer.policy, pairs, state["epoch"])
                trainer.scaler.scale(loss / cfg.grad_accum).backward()
                for k, v in dict(metrics, loss=loss.detach()).items():
                    sums[k] = sums.get(k, 0) + v.float() / cfg.grad_accum
            # 2. clip; then what the step logs, with the flags every rank acts on (step_record)
            trainer.scaler.unscale_(trainer.optimizer)
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
            due = run.master and 0 < 60 * cfg.save_every_minutes <= time.monotonic() - last_checkpoint
            logged, signalled, due = step_record(sums, state["counts"], asked, due, run)
            # 3. step unless loss or gradient is not finite: a NaN gradient under a finite loss (bf16 has no GradScaler
            #    to catch it) turns every weight NaN. fp16 overflows are the GradScaler's to absorb until its scale < 1
            finite = math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])
            absorbed = (not finite and math.isfinite(logged["loss"]) and trainer.scaler.is_enabled()
                        and trainer.scaler.get_scale() >= 1)
            if finite:
                trainer.scaler.step(trainer.optimizer)
            trainer.scaler.update()
            # torch warns when a skipped first step steps the schedule: intended
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before")
                trainer.schedule.step()  # every step, skipped or not: the warmup follows the step number
            trainer.optimizer.zero_grad(set_to_none=not run.ddp)
            nonfinite_run = 0 if finite or absorbed else nonfinite_run + 1
            nonfinite_total += not finite
            step += 1
            step_seconds.append(time.perf_counter() - t_step)
            if step == start_step + 1:  # the throughput leaves out the first step (compilation, warm-up)
                t_first = time.perf_counter()
            # 4. checkpoint first (nothing after it can lose it), then a save point's weights, metrics and samples; log
            record = dict(step=step, lr=lr, **logged, nonfinite=nonfinite_total)
            history.append(record)
            stop = nonfinite_run >= cfg.max_nonfinite
            save_point = step % cfg.save_every == 0 or step == cfg.max_steps or stop
            if save_point or signalled or due:
                t_save = time.perf_counter()
                save_checkpoint(cfg, m, trainer, step, (nonfinite_total, nonfinite_run), state, run, record, save_point)
                last_checkpoint = time.monotonic()
                if save_point:
                    record.update(finish_save_point(cfg, m, run, heldout, step))
                saving += time.perf_counter() - t_save
            if run.master:
                log_step(cfg, record, bar, tracker, save_point)
            if run.ddp and (stop or signalled):  # no rank leaves while rank 0 writes (torchrun would kill it)
                dist.barrier()
            if stop:
                sys.exit(f"rpo.py: {nonfinite_run} non-finite steps (loss or gradient) in a row at step "
                         f"{step}; stopped with a checkpoint of the last good weights in {cfg.out}. A resume "
                         f"would meet them again: start a new --out from those weights, {weights_flag(cfg)}, "
                         f"with a lower --lr or --beta, or --precision bf16 or fp32")
            if signalled and step < cfg.max_steps:
                stopped_by = asked["signal"] or "a signal to another rank"
                break
    asked["training"] = False
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # every pair-embedding interval is done
    end = time.perf_counter()
    timing = dict(steps=step - start_step, seconds=end - t0, timed=end - t_first - saving, saving=saving,
                  step_seconds=step_seconds, clip_seconds=clip_seconds())
    return history, timing, pairs if step > start_step else None, stopped_by


def step_record(sums, counts, asked, due, run):
    """What a step logs, reduced across ranks (see step_vector): metrics averaged, skip counts summed (each rank
    reads its own rows), and the flags every rank acts on: a signal on any rank, rank 0's checkpoint clock."""
    names, vec = step_vector(sums, counts, [asked["signal"] is not None, due], run.device)
    if run.ddp:
        dist.all_reduce(vec)
        vec[:len(sums)] /= run.world
    logged = {k: int(v) if k in SKIP_KEYS else v for k, v in zip(names, vec.tolist())}
    return logged, logged.pop("signalled") > 0, logged.pop("due") > 0


def step_vector(sums, counts, flags, device):
    """What a step logs, as names and one float64 tensor on the training device (metrics, skip counts, then
    the flags `signalled` and `due`): one all-reduce, one copy to the host."""
    names = sorted(sums) + list(SKIP_KEYS) + ["signalled", "due"]
    counted = [float(counts[k]) for k in SKIP_KEYS] + [float(flag) for flag in flags]
    counted = torch.tensor(counted, dtype=torch.float64, device=device)
    return names, torch.cat([torch.stack([sums[k] for k in sorted(sums)]).double(), counted])


# ----------------------------------------------------------------------------------------- models
def pretrained(cls, name, **kw):
    """cls.from_pretrained, with one line instead of a traceback when the id or folder cannot be loaded."""
    try:  # a transient network failure is tried again (retried), as the data's
        return retried(repr(name), lambda: cls.from_pretrained(name, **kw))
    except (OSError, ValueError) as e:  # offline, a wrong id, a gated repo, not a diffusers/transformers one
        where = f"{name!r} / {kw['subfolder']}" if "subfolder" in kw else repr(name)
        sys.exit(f"rpo.py: cannot load {cls.__name__} from {where}: {first_line(e)}")


@dataclass
class Models:
    """What load_models gives the training step, and the sample grid its prompts."""
    base: str  # the pipeline's hub id or folder
    family: str  # sd15 | sdxl | sd3 | flux (FAMILY)
    device: torch.device
    dtype: torch.dtype  # the compute dtype of everything frozen
    scheduler: object
    unet: torch.nn.Module  # the policy: a UNet, or SD3's or FLUX.1's transformer
    ref_unet: torch.nn.Module  # None with LoRA: see `reference`
    lora: bool
    vae: torch.nn.Module
    tokenizers: list  # SDXL: two, with their text encoders; SD3: three (CLIP-L, CLIP-G, T5; no T5: two);
    # FLUX.1: CLIP-L and T5
    text_encoders: list
    clip: torch.nn.Module  # for the pair weights
    clip_tokenizer: object
    sigmas: torch.Tensor = None  # a flow model's training sigmas, which pair_noise draws t from
    guidance: float = None  # FLUX.1-dev's guidance embedding value
    empty_prompt: torch.Tensor = None  # what prompt dropout conditions on
    empty_pooled: torch.Tensor = None
    sample_prompts: list = None  # read at the first grid (see sample_prompts), the same at every save point


def load_models(cfg, device, dtype):
    """Policy and reference UNets, VAE, text encoders and the pair-weight CLIP, all but the policy frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPModel, CLIPTokenizer
    base, family = cfg.pretrained, FAMILY[cfg.model]
    scheduler = pretrained(FlowMatchEulerDiscreteScheduler if family in FLOW else DDPMScheduler, base,
                           subfolder="scheduler")
    if family not in FLOW and scheduler.config.prediction_type != "epsilon":
        sys.exit(f"rpo.py: {base} predicts {scheduler.config.prediction_type}; this script trains epsilon "
                 f"models")
    unet, ref_unet = load_unets(cfg, base, device, dtype)
    # SDXL's VAE overflows in fp16; the fix is the hub's, for the hub's SDXL: a folder keeps its own VAE
    if base == HUB_SDXL and dtype == torch.float16:
        vae = pretrained(AutoencoderKL, "madebyollin/sdxl-vae-fp16-fix")
    else:
        vae = pretrained(AutoencoderKL, base, subfolder="vae")
    parts = text_encoder_parts(family, cfg.no_t5)
    tokenizers = [pretrained(tokenizer, base, subfolder="tokenizer" + s) for s, tokenizer, _ in parts]
    text_encoders = [pretrained(encoder, base, subfolder="text_encoder" + s) for s, _, encoder in parts]
    clip_id = cfg.clip or os.path.join(base, "clip")
    clip, clip_tokenizer = pretrained(CLIPModel, clip_id), pretrained(CLIPTokenizer, clip_id)
    for frozen in [vae, clip, *text_encoders]:
        frozen.requires_grad_(False).eval().to(device, dtype)
    m = Models(base, family, device, dtype, scheduler, unet, ref_unet, bool(cfg.lora_rank or cfg.init_lora),
               vae, tokenizers, text_encoders, clip, clip_tokenizer)
    if family in FLOW:  # the sigmas the pipeline samples at this resolution: the scheduler's, shifted as it shifts
        m.sigmas, m.guidance = scheduler.sigmas[:scheduler.config.num_train_timesteps].cpu(), cfg.guidance
        if scheduler.config.use_dynamic_shifting:  # FLUX.1-dev: by the image's token count (SD3.5: shift 3 fixed)
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift
            tokens = (cfg.resolution // 2 ** len(vae.config.block_out_channels)) ** 2  # VAE factor x 2 x 2 patches
            c = scheduler.config
            mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            m.sigmas = scheduler.time_shift(mu, 1.0, m.sigmas)
    m.empty_prompt, m.empty_pooled = encode_prompts(m, [""])
    return m


def text_encoder_parts(family, no_t5=False):
    """(subfolder suffix, tokenizer class, encoder class) of each text encoder of a family's pipeline."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    # SD3's CLIP-L has a projection too: its pooled embedding is both CLIPs' side by side
    parts = [("", CLIPTokenizer, CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel)]
    if family == "flux":  # CLIP-L's pooled output, and T5-XXL
        return parts + [("_2", T5TokenizerFast, T5EncoderModel)]
    if family != "sd15":
        parts.append(("_2", CLIPTokenizer, CLIPTextModelWithProjection))
    if family == "sd3" and not no_t5:
        parts.append(("_3", T5TokenizerFast, T5EncoderModel))
    return parts


# bytes per parameter before any activation. Trained whole: the fp32 weight and its gradient (4 + 4), AdamW's two
# moments (8; Adafactor's factored ones next to nothing) and the reference copy in the compute dtype. With LoRA:
# the frozen model in the compute dtype (the adapters are a rounding error). Frozen models: the compute dtype.
def memory_need(counts, precision, lora, optimizer):
    compute = 4 if precision == "fp32" else 2
    trained = compute if lora else 4 + 4 + (8 if optimizer == "adamw" else 0) + compute
    return counts["denoiser"] * trained + counts["frozen"] * compute


def parameter_counts(cfg):
    """Parameters of the denoiser, and of the frozen models (VAE, text encoders, pair-weight CLIP) with every
    buffer (SD3's position table), counted from their configs on the meta device: nothing is loaded."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel
    base, family = cfg.pretrained, FAMILY[cfg.model]

    def count(cls, name, subfolder=None):
        try:
            if issubclass(cls, diffusers.ModelMixin):
                config = cls.load_config(name, **({"subfolder": subfolder} if subfolder else {}))
                build = functools.partial(cls.from_config, config)
            else:
                config = cls.config_class.from_pretrained(name, **({"subfolder": subfolder} if subfolder else {}))
                build = functools.partial(cls._from_config, config)
        except (OSError, ValueError) as e:
            where = f"{name!r} / {subfolder}" if subfolder else repr(name)
            sys.exit(f"rpo.py: cannot load {cls.__name__}'s config from {where}: {first_line(e)}")
        with torch.device("meta"):
            model = build()
        return sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())
    denoiser, buffers = count(denoiser_class(family), cfg.init_unet or base,
                              None if cfg.init_unet else DENOISER_FOLDER[family])
    frozen = [count(AutoencoderKL, base, "vae"), count(CLIPModel, cfg.clip or os.path.join(base, "clip"))]
    frozen += [count(encoder, base, "text_encoder" + s) for s, _, encoder in text_encoder_parts(family, cfg.no_t5)]
    return dict(denoiser=denoiser, frozen=buffers + sum(map(sum, frozen)))


def check_memory(cfg, precision, available, where):
    """Stop in one line, before anything loads, when the models alone cannot fit in `available` bytes (`where`
    names the device), saying what would fit; activations come on top of the estimate."""
    counts, lora = parameter_counts(cfg), bool(cfg.lora_rank or cfg.init_lora)
    need = memory_need(counts, precision, lora, cfg.optimizer)
    if need <= available:
        return need
    options = [("LoRA (--lora_rank 64)", memory_need(counts, precision, True, cfg.optimizer))]
    if not lora and cfg.optimizer == "adamw":
        options.append(("--optimizer adafactor", memory_need(counts, precision, False, "adafactor")))
    fits = [f"{name} needs about {n / 1e9:.0f} GB" for name, n in options if n <= available]
    mode = "LoRA" if lora else f"full fine-tuning with {cfg.optimizer}"
    sys.exit(f"rpo.py: {cfg.model} ({cfg.pretrained}) {mode} in {precision} needs about {need / 1e9:.0f} GB before "
             f"activations ({counts['denoiser'] / 1e9:.2f}B trained-model and {counts['frozen'] / 1e9:.2f}B frozen "
             f"parameters), more than the {available / 1e9:.0f} GB of {where}: "
             f"{'; '.join(fits) or 'nothing fits there; use a larger device'}")


def load_unets(cfg, base, device, dtype):
    """The policy UNet or transformer (fp32 master weights) and a frozen reference copy in the compute dtype.
    With LoRA it is frozen in the compute dtype, only its adapters train, and there is no copy (None): see
    `reference`."""
    family = FAMILY[cfg.model]
    cls = denoiser_class(family)
    if cfg.init_unet:
        unet = pretrained(cls, cfg.init_unet)
    else:
        unet = pretrained(cls, base, subfolder=DENOISER_FOLDER[family])
    unet.to(device).train()
    if cfg.lora_rank or cfg.init_lora:
        unet.requires_grad_(False).to(dtype)
        add_lora(cfg, unet)
        ref_unet = None
    else:
        ref_unet = copy.deepcopy(unet).requires_grad_(False).eval().to(dtype)
    if cfg.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    if device.type == "cuda" and family not in FLOW:
        for each in filter(None, (unet, ref_unet)):
            each.to(memory_format=torch.channels_last)
    return unet, ref_unet


# T5's prompt length: its pipeline's default max_sequence_length, so training sees what sampling sees
T5_TOKENS = dict(sd3=256, flux=512)
DENOISER_FOLDER = dict(sd15="unet", sdxl="unet", sd3="transformer", flux="transformer")  # in the pipeline, in DIR
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for it, saving and loading
SETTINGS_FILE = "settings.json"  # DIR/settings.json: the run's Config, for the evaluation scripts


def denoiser_class(family):
    return getattr(diffusers, dict(sd3="SD3Transformer2DModel", flux="FluxTransformer2DModel").get(
        family, "UNet2DConditionModel"))


def add_lora(cfg, unet):
    """Trainable LoRA adapters ('default', fp32) on the frozen UNet: new ones (a zero up-projection: the policy
    starts as the reference), or --init_lora's, with a frozen copy of them ('reference') as the reference."""
    from peft import LoraConfig
    if cfg.init_lora:
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter joins the first: intended
                warnings.simplefilter("ignore")
                for name in ("reference", "default"):
                    unet.load_lora_adapter(cfg.init_lora, prefix=DENOISER_FOLDER[FAMILY[cfg.model]],
                                           adapter_name=name, weight_name=LORA_FILE)
        except (OSError, ValueError) as e:
            sys.exit(f"rpo.py: cannot load LoRA adapters from {cfg.init_lora!r} (a run's DIR/lora): "
                     f"{first_line(e)}")
        unet.set_adapters("default")
    else:
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                    target_modules=cfg.lora_modules.split(",")))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


@contextmanager
def reference(m):
    """The frozen reference UNet: the full-training copy or, with LoRA, the policy UNet with its trained
    adapters switched off, or swapped for the frozen starting ones of --init_lora."""
    if not m.lora:
        yield m.ref_unet
        return
    starting = "reference" in m.unet.peft_config
    if starting:
        m.unet.set_adapters("reference")
    else:
        m.unet.disable_adapters()
    try:
        yield m.unet
    finally:
        if starting:
            m.unet.set_adapters("default")
        else:
            m.unet.enable_adapters()


@torch.no_grad()
def encode_prompts(m, captions):
    """SD1.5: last hidden states. SDXL: penultimate states of both CLIPs side by side, and the pooled output
    of the second. SD3: penultimate states of both CLIPs side by side, zero-padded to T5's width, then T5's
    states (256 tokens; zeros without T5) after them; pooled: both CLIPs' side by side (as SD3's pipeline).
    FLUX.1: T5's states (512 tokens); pooled: CLIP-L's pooled output (as FluxPipeline)."""
    if m.family == "flux":
        ids = [tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(m.device)
               for tokenizer, length in zip(m.tokenizers, (m.tokenizers[0].model_max_length, T5_TOKENS["flux"]))]
        return m.text_encoders[1](ids[1]).last_hidden_state, m.text_encoders[0](ids[0]).pooler_output
    states, pooled = [], []
    for tokenizer, encoder in zip(m.tokenizers[:2], m.text_encoders[:2]):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(m.device)
        out = encoder(ids, output_hidden_states=m.family != "sd15")
        states.append(out.last_hidden_state if m.family == "sd15" else out.hidden_states[-2])
        pooled.append(getattr(out, "text_embeds", None))
    if m.family == "sdxl":
        return torch.cat(states, dim=-1), pooled[1]
    if m.family == "sd15":
        return states[0], None
    width = m.unet.config.joint_attention_dim
    clip = F.pad(torch.cat(states, dim=-1), (0, width - sum(s.shape[-1] for s in states)))
    if len(m.text_encoders) == 3:
        ids = m.tokenizers[2](captions, padding="max_length", max_length=T5_TOKENS["sd3"], truncation=True,
                              return_tensors="pt").input_ids.to(m.device)
        t5 = m.text_encoders[2](ids).last_hidden_state.to(clip.dtype)
    else:
        t5 = clip.new_zeros(len(captions), T5_TOKENS["sd3"], width)
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


@torch.no_grad()
def encode_images(m, pixels):
    """uint8 [N,3,H,W] -> shifted (SD3, FLUX.1) and scaled VAE latents (posterior mean: deterministic, so cached
    latents are exact)."""
    x = pixels.to(m.device, non_blocking=True).to(m.dtype) / 127.5 - 1
    shift = m.vae.config.get("shift_factor") or 0.0
    return (m.vae.encode(x).latent_dist.mode() - shift) * m.vae.config.scaling_factor


# The step takes encoded pairs (VAE latents, text states, SDXL time ids, f): made on the fly, or once with --cache
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# f(c, x) = normalize(normalize(text(c)) + normalize(image(x)));  --embed text | image | both
@torch.no_grad()
def pair_embeddings(m, captions, pixels, embed):
    """The method's pair_embedding by the pair-weight CLIP; pixels uint8 [N,3,H,W], N k x len(captions)."""
    text = image = None
    if embed in ("text", "both"):
        ids = m.clip_tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        text = m.clip.get_text_features(ids.to(m.device)).pooler_output.repeat(len(pixels) // len(captions), 1)
    if embed in ("image", "both"):
        x = clip_pixels(pixels.to(m.device), m.clip.config.vision_config.image_size)
        image = m.clip.get_image_features(x).pooler_output
    return pair_embedding(text, image)


def clip_pixels(pixels, size):
    """uint8 images [N,3,H,W] -> CLIP's input: resized to size x size, scaled by CLIP's mean and std."""
    x = F.interpolate(pixels.float() / 255, size=(size, size), mode="bicubic", antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_pairs(m, pairs, embed, with_f=True):
    """Prepared pairs -> Pairs, the one place a micro-batch is encoded: cached ones (cached_pair) stacked as
    stored, decoded ones (prepare_pair) through the VAE, the text encoders and, with_f, the pair-weight CLIP."""
    index = [p["index"] for p in pairs]

    def stacked(key):  # [M, ...] on the device; cached pairs hold [winner, loser] in their second axis
        return torch.stack([torch.as_tensor(p[key]) for p in pairs]).to(m.device)
    if "latents" in pairs[0]:
        latents, time_ids, f = stacked("latents"), stacked("time_ids"), stacked("f")
        pooled = stacked("pooled") if m.family != "sd15" else None
        return Pairs(index, latents[:, 0], latents[:, 1], stacked("prompt"), pooled, time_ids[:, 0],
                     time_ids[:, 1], f[:, 0], f[:, 1])
    captions = [p["caption"] for p in pairs]
    pixels = torch.cat([stacked("winner"), stacked("loser")])
    latents = encode_images(m, pixels)
    prompt, pooled = encode_prompts(m, captions)
    time_ids_w, time_ids_l = (stacked(key).float() for key in ("winner_time_ids", "loser_time_ids"))
    f = pair_embeddings(m, captions, pixels, embed).chunk(2) if with_f else [None, None]
    return Pairs(index, *latents.chunk(2), prompt, pooled, time_ids_w, time_ids_l, *f)


# ------------------------------------------------------------------------------------------- main
@dataclass
class Run:
    """Where this process trains, set once by set_up."""
    device: torch.device
    rank: int
    world: int
    local_rank: int
    ddp: bool  # under torchrun, even with one process: one code path
    precision: str
    dtype: torch.dtype
    autocast: object  # the mixed-precision context of every forward
    lock: object  # rank 0: the open lock file of the run folder (see lock_run_folder)

    @property
    def master(self):
        return self.rank == 0


def set_up(cfg):
    """Device, process group (under torchrun), precision and the seeds."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and local_rank == 0:
        print("rpo.py: warning: torchrun restarted its workers and shares its rendezvous store with them: "
              "the new process group may read the old workers' addresses and fail to connect "
              "(pytorch#167288). Launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr)
    if ddp:  # NCCL takes only GPU tensors: everything the loop reduces or gathers is made on `device`
        backend = "nccl" if device.type == "cuda" else "gloo"
        wait = datetime.timedelta(minutes=30)  # while rank 0 evaluates and saves alone, the others wait
        dist.init_process_group(backend, timeout=wait, device_id=device if device.type == "cuda" else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    cfg.out, lock = run_folder(cfg, rank, ddp)
    cfg.precision = precision = cfg.precision or default_precision(device)  # the checkpoint keeps it
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if precision != "fp32" else nullcontext()
    # new LoRA adapters depend on the seed only
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return Run(device, rank, world, local_rank, ddp, precision, dtype, autocast, lock)


def default_precision(device):
    """bf16 on a GPU that computes it natively (Ampere and later), fp16 on one that only emulates it (V100,
    T4: slow), fp32 on the CPU."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def main(argv=None):
    cfg = parse_config(argv)
    # JPEG decoders are forked first, before a process group or CUDA state exists
    pool = Decoders(cfg.workers) if cfg.workers > 0 else None
    run = set_up(cfg)
    try:  # the run folder's lock and the decoders go with this call, however it ends
        with stop_requests() as asked:
            stopped = stages(cfg, run, pool, asked)
    except Unreachable as e:  # the network is down: stop, checkpoints as they are, and say how to go on
        sys.exit(f"{e}; nothing was skipped, the checkpoints in {cfg.out} are intact. Once the network is back, "
                 f"continue with: {resume_command(cfg, run, argv)}")
    finally:
        if pool:
            pool.shutdown()
        if run.lock:
            run.lock.close()
    if stopped:  # by a signal: the step it was in is checkpointed
        signal_name, step = stopped
        if run.master:
            print(f"rpo.py: stopped by {signal_name} at step {step} with a checkpoint in {cfg.out}; continue "
                  f"with: {resume_command(cfg, run, argv)}", file=sys.stderr)
        sys.exit(PREEMPTED)


def resume_command(cfg, run, argv):
    """The command line that continues this run: its own, with --out and --resume."""
    given = list(sys.argv[1:] if argv is None else argv)
    args = [a for i, a in enumerate(given) if not (a == "--resume" or i and given[i - 1] == "--resume"
                                                   and a.lower() in ("1", "0", "true", "false", "yes",
                                                                     "no", "on", "off"))]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", cfg.out]
    launch = "torchrun [the same options] " if run.ddp else "python "
    return f"{launch}{shlex.join(['rpo.py', *map(str, args), '--resume'])}"


def weights_flag(cfg):
    """The flag that starts a new run from this run's saved weights: DIR/lora, or DIR/unet (DIR/transformer)."""
    if cfg.lora_rank or cfg.init_lora:
        return f"--init_lora {cfg.out}/lora"
    return f"--init_unet {cfg.out}/{DENOISER_FOLDER[FAMILY[cfg.model]]}"


def stages(cfg, run, pool, asked):
    """The run, from the models to the summary line. Returns (signal, step) if a signal stopped it early."""
    # a source rpo.py cannot read stops here, in one line, before the models load: the data first, whose split
    # names the held-out default comes from
    files = source_files(cfg, cfg.data, cfg.split)
    heldout, split = heldout_source(cfg)
    files += source_files(cfg, heldout, split) if heldout else []
    if run.master:
        check_files(files)
    if run.device.type == "cuda":
        available, where = torch.cuda.get_device_properties(run.device).total_memory, torch.cuda.get_device_name()
    else:
        available, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    check_memory(cfg, run.precision, available, where)
    m = load_models(cfg, run.device, run.dtype)
    trainer = make_trainer(cfg, m, run)
    step, nonfinite, data_states, ckpt = resume(cfg, m, trainer, run)
    if run.master:  # the run's settings as plain JSON: what an evaluation reads, never the checkpoint
        atomic_save(dataclasses.asdict(cfg), os.path.join(cfg.out, SETTINGS_FILE))
    logged_to = cut_metrics_log(cfg.out, step) if run.master else step
    tracker = open_tracker(cfg, step) if run.master else None
    if cfg.cache:
        build_cache(cfg, m, run.rank, run.world, pool)
    heldout = heldout_pairs(cfg, m) if run.master else None
    if logged_to < step:  # the run died between its last checkpoint and that step's log line: finish them
        record = dict(ckpt["record"])
        if ckpt["save_point"]:
            record.update(finish_save_point(cfg, m, run, heldout, step))
        log_step(cfg, record, None, tracker, ckpt["save_point"])
    start = data_states[run.rank] if data_states else None
    batches = training_batches(cfg, m, run.rank, run.world, start, pool)
    if run.master:
        print(describe(cfg, m, run, trainer), file=sys.stderr)
    if run.master and step == 0 and cfg.sample_steps:  # the grid before any training, to compare with
        save_samples(cfg, m, samples_path(cfg, 0), run.autocast)
        if tracker:
            tracker.log(0, {}, samples_path(cfg, 0))

    history, timing, last_pairs, stopped_by = train(cfg, m, run, trainer, batches, heldout, step, nonfinite,
                                                    tracker, asked)

    if run.master and history and not stopped_by:
        summary = end_of_run(cfg, m, run, history, timing, last_pairs)
        print(json_line(summary), flush=True)
        if tracker:  # throughput, FLOPs and peak memory, at the last step
            tracker.log(history[-1]["step"], {"end/" + k: v for k, v in summary.items() if k != "steps"})
    if tracker:
        tracker.close()
    if run.ddp:
        # DDP's Reducer holds the process group: freed last, it would destroy gloo's group with the GIL held,
        # while a gloo worker thread may need the GIL to free a finished collective's tensors (a deadlock at
        # exit). Freed first, the group goes with destroy_process_group, which releases the GIL.
        if cfg.compile:
            torch.compiler.reset()  # compiled code may keep the module it was compiled from alive
        del trainer  # the only holder of the DDP module
        dist.destroy_process_group()
    return (stopped_by, history[-1]["step"]) if stopped_by else None


def describe(cfg, m, run, trainer):
    """The start-up line: what trains on what, the effective batch and the learning rate it gives, and how
    many pairs each row of w is normalised over (the diagonal's logit is scaled by w_ii: 1 / that number
    for uniform weights, more where the diagonal pair is the nearest; metrics.jsonl logs it as w_diag)."""
    ranks = f"{run.world} rank(s) ({dist.get_backend()})" if run.ddp else "1 process"
    trained = sum(p.numel() for p in trainer.params) / 1e6
    pairs = cfg.batch * cfg.grad_accum * run.world
    scaled = f" = {cfg.lr_per_pair:g} per pair x {pairs}" if cfg.lr is None else " (fixed, not per pair)"
    row = cfg.batch * (run.world if cfg.global_contrast else 1)
    weights = f", each row of w over {row} pairs" if cfg.loss == "rpo" else ""
    emulated = run.device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False)
    return (f"training {cfg.model} ({m.base}) with {cfg.loss} on {cfg.data} into {cfg.out}: {ranks} x "
            f"{cfg.batch} pairs x {cfg.grad_accum} accumulation = {pairs} pairs a step, lr "
            f"{learning_rate(cfg, run.world):g}{scaled}{weights}, {run.precision}"
            f"{' (this GPU has no native bf16)' if emulated else ''}, {trained:.1f}M trainable "
            f"parameters{' (LoRA)' if m.lora else ''}")


# ================================================================================================
# The machinery, which a reader of the method need not read: data layouts and decoding, sharding and exact
# resume, the cache, the run folder and its lock, signals, checkpoints, saving, tracking, the end-of-run line.
# ================================================================================================


# ----------------------------------------------------------------- data: layouts, reading, checks
# Rows follow Pick-a-Pic v2: caption, jpg_0, jpg_1 (encoded images, or {"path": file}), label_0 (1, 0.5, 0).
# A source is a list of DataFiles: parquet files or tar shards (local, or hf:// URLs), JSON files split into
# virtual files, cache files. Whatever the layout, rows go through the same sharding, shuffling, checks, decoding.
SKIP_KEYS = ("ties", "bad_caption", "bad_label", "bad_image", "missing_image", "unreadable", "small")
SPLIT_NAMES = ("train", "validation", "test")  # a local folder whose file or folder names hold one has splits
DATA_EXTENSIONS = (".parquet", ".tar", ".json")
JSON_FILE_ROWS = 4096  # pairs per virtual file of a JSON source: the unit dealt to the ranks
COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")  # Pick-a-Pic's, which every layout's rows are mapped to
# the layouts rpo.py reads, recognised by what their files hold (docs/data.md: Getting Pick-a-Pic today)
LAYOUTS = {"pickapic": ("parquet", COLUMNS),
           "pickapic-wds": ("tar", ("original_prompt.txt", "jpg_0.jpg", "jpg_1.jpg", "label_0.txt")),
           "chosen-rejected": ("parquet", ("prompt", "chosen", "rejected")),
           "hpdv3": ("json", ("prompt", "path1", "path2")),
           "hpdv2": ("json", ("prompt", "image_path|file_path", "human_preference"))}


class DataFile(NamedTuple):
    """One file of a source, and how to read it."""
    path: str  # JSON: path#first pair of the virtual file
    rows: int = None  # None: the whole file, counted when it is read to its end
    layout: str = "pickapic"  # a key of LAYOUTS, or cache
    image_root: str = None  # where an hpdv2/hpdv3 row's image paths resolve


def source_files(cfg, source, split, max_rows=0):
    """The DataFiles of a source, in a fixed order. max_rows keeps the first rows in file order."""
    paths = dataset_paths(cfg, source, split)
    layout = (cfg.layout if source == cfg.data else None) or detect_layout(paths, source)
    others = [p for p in paths if file_kind(p) != LAYOUTS[layout][0]]
    if others:
        sys.exit(f"rpo.py: dataset {source!r} is {layout} ({LAYOUTS[layout][0]} files) but also holds "
                 f"{len(others)} other file(s), e.g. {others[0]!r}: point --data at one kind")
    files = []
    for path in paths:
        if LAYOUTS[layout][0] == "json":
            n, root = len(json_pairs_or_none(path, layout)), cfg.image_root or os.path.dirname(path)
            files += [DataFile(f"{path}#{lo}", min(JSON_FILE_ROWS, n - lo) if n else 1, layout, root)
                      for lo in range(0, max(n, 1), JSON_FILE_ROWS)]  # an unreadable one: one lost row
        else:
            files.append(DataFile(path, None, layout))
    if not max_rows:
        return files
    if layout == "pickapic-wds":
        sys.exit("rpo.py: --max_pairs needs files whose length is known before reading them (parquet, JSON), "
                 "not tar shards")
    kept, left = [], max_rows
    for file in files:
        kept.append(file._replace(rows=min(left, file_length(file))))
        left -= kept[-1].rows
        if not left:
            break
    return kept


def dataset_paths(cfg, source, split):
    """The data files of a local source (a file, a folder searched recursively, or a glob; where names carry
    splits, the split's), or of a hub dataset's split (hub_data_files)."""
    where = cfg.data_id if source == "pickapic" else source
    try:
        if source == "pickapic":
            data_files = hub_data_files(cfg.data_id)
            if split not in data_files:
                raise KeyError(f"no split {split!r}, only {sorted(data_files)}")
            paths = list(data_files[split])
        else:
            paths, splits = local_files(source, DATA_EXTENSIONS), folder_splits(source)
            if {*SPLIT_NAMES, split} & set(splits):  # training never reads another split's files
                if split not in splits:
                    sys.exit(f"rpo.py: dataset {source!r} has no split {split!r}, only {sorted(splits)} (as "
                             f"its file and folder names say)")
                paths = splits[split]
        if not paths:
            raise FileNotFoundError(f"no {', '.join(DATA_EXTENSIONS)} files there")
    except (Exception, Unreachable) as e:  # any network, auth or format error: one line, with what to do instead
        sys.exit(f"rpo.py: cannot read dataset {where!r} (split {split!r}): {first_line(e)}. Pass a local "
                 f"copy with --data /path (a file, a folder or a glob), or another hub id with --data_id")
    return paths


@functools.lru_cache(maxsize=None)  # the start-up check, the training and held-out data: resolved once
def hub_data_files(data_id):
    """A hub dataset's data files by split, as `datasets` resolves them: hf:// URLs pinned to its commit."""
    import datasets
    return retried(f"hub dataset {data_id!r}", lambda: datasets.load_dataset_builder(data_id).config.data_files)


def local_files(source, extensions):
    """The files of a local source with these endings: a folder's, searched recursively, or a glob's."""
    pattern = os.path.join(source, "**", "*") if os.path.isdir(source) else source
    return sorted(p for p in glob.glob(pattern, recursive=True) if p.endswith(extensions))


def folder_splits(source):
    """{split: its data files, sorted} of a local folder ({} for anything else), named as `datasets` names them
    ({split}/, data/{split}-*, {split}-*): the first folder after a leading data/, else the file name up to its
    first '-' or '.' (validation_unique-00000-of-00001.parquet: validation_unique, not validation)."""
    splits = {}
    for path in local_files(source, DATA_EXTENSIONS) if os.path.isdir(source) else []:
        parts = os.path.relpath(path, source).split(os.sep)
        parts = parts[1:] if parts[0] == "data" and len(parts) > 1 else parts
        splits.setdefault(parts[0] if len(parts) > 1 else re.split(r"[-.]", parts[0])[0], []).append(path)
    return splits


def detect_layout(paths, where):
    """The layout of a source from its first file that reads: a parquet's columns, a JSON list's first
    record's keys, the member names of a tar shard's first sample. One line if none fits, or none reads."""
    errors = []
    for path in paths:
        kind = file_kind(path)
        try:
            if kind == "tar":
                found = list(next(tar_samples(path), {}))
            elif kind == "json":
                records = json_records(path)
                found = list(records[0]) if records else []
            else:
                found = parquet(path).schema_arrow.names
            break
        except Exception as e:
            errors.append(f"cannot read {path!r} of dataset {where!r}: {first_line(e)}")
    else:
        others = f" (nor any of its other {len(paths) - 1} files)" if paths[1:] else ""
        sys.exit(f"rpo.py: {errors[0]}{others}")
    for layout, (layout_kind, needs) in LAYOUTS.items():
        if layout_kind == kind and all(any(n in found for n in need.split("|")) for need in needs):
            return layout
    known = "; ".join(f"{name}: {k} with {', '.join(needs)}" for name, (k, needs) in LAYOUTS.items())
    sys.exit(f"rpo.py: dataset {where!r} is in no layout rpo.py reads: its {kind} {path!r} holds {found}. "
             f"Known (--layout): {known}")


def file_kind(path):
    return "tar" if path.endswith(".tar") else "json" if path.endswith(".json") else "parquet"


@functools.lru_cache(maxsize=8)
def parquet(path):
    """A parquet file, local or by URL (hf://: read by byte ranges, never downloaded whole), its footer fetched
    in one request."""
    import pyarrow.parquet as pq
    file = RangeFile(path)
    file.hold(max(0, file.size - FOOTER_BYTES), file.size, keep=True)
    parsed = pq.ParquetFile(file)
    parsed.range_file = file  # row_group fetches through it
    return parsed


@functools.lru_cache(maxsize=2)  # consecutive windows share a row group: it is read once
def row_group(path, g, columns):
    """A row group's columns, their bytes fetched in one request (pyarrow then reads them from memory)."""
    parsed = parquet(path)
    chunks = [c for c in map(parsed.metadata.row_group(g).column, range(parsed.metadata.num_columns))
              if c.path_in_schema.split(".")[0] in columns]
    starts = [min(c.data_page_offset, c.dictionary_page_offset or c.data_page_offset) for c in chunks]
    if chunks:
        parsed.range_file.hold(min(starts), max(a + c.total_compressed_size for a, c in zip(starts, chunks)))
    try:
        return parsed.read_row_group(g, columns=list(columns))
    finally:
        parsed.range_file.release()


@functools.lru_cache(maxsize=None)  # windows hop between a source's files: each is parsed once
def json_records(path):
    """A JSON file's list of records (HPDv2 and HPDv3 publish their pairs as one JSON list)."""
    records = json.loads(file_bytes(path))
    if not isinstance(records, list):
        raise ValueError("it holds no JSON list of records")
    return records


def json_pairs_or_none(path, layout):
    """json_pairs, or [] with a warning when the file cannot be read (a JSON that does not parse)."""
    try:
        return json_pairs(path, layout)
    except Exception as e:
        warn_unreadable(path, first_line(e))
        return []


# ------------------------------------------------------------------ data: reading over a network
# A failed read is one of two things. Broken content (bytes that arrive whole but do not parse as parquet, JSON or
# an image) is a counted skip: no retry changes it. A transient I/O failure (a timeout, a reset, a 5xx or 429, a
# body cut short, a network filesystem's OSError) is tried again with backoff, within --io_tries and --io_wait; then
# the run stops, to be resumed. It never trains on with a hole that a resume would fill differently.
IO_RETRY = dict(tries=10, wait=600.0)  # --io_tries, --io_wait (parse_config sets them)
FOOTER_BYTES = 1 << 16  # a parquet footer's bytes fetched at once: pyarrow's own first read
TAR_AHEAD = 8 << 20  # a tar shard is read in requests of this size


class Unreachable(SystemExit):
    """Data the network would not deliver within --io_tries and --io_wait: the run stops (past the handlers that
    count broken content) and main tells how to resume."""


def transient(error):
    """Whether a failure is worth another try: an HTTP answer 5xx, 429 or 408, an HTTP client's timeout or reset,
    a connection's error, or another OSError the system raised (a network filesystem's EIO); not a missing file,
    refused access, or an error a library made up (errno None). Libraries wrap the HTTP error in their own
    (transformers in an OSError): the chain of causes is searched."""
    import huggingface_hub.constants
    if huggingface_hub.constants.HF_HUB_OFFLINE:  # offline by choice (HF_HUB_OFFLINE=1): no try reaches the hub
        return False
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for e in chain:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None:
            return status >= 500 or status in (408, 429)
        # the HTTP clients' own errors (httpx's, requests', aiohttp's) are not OSErrors
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3", "aiohttp"):
            return True
    last = chain[-1]
    if isinstance(last, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(last, (ConnectionError, TimeoutError)) or isinstance(last, OSError) and last.errno is not None


def retried(what, read):
    """read(), tried again after a transient failure: waits of 1 s doubling to 60 s (or a 429's Retry-After),
    up to --io_tries tries and --io_wait seconds. A client's own retries (huggingface_hub's: 5, about 23 s) run
    inside each try."""
    start, tries = time.monotonic(), 0
    while True:
        try:
            return read()
        except Exception as e:
            tries, waited = tries + 1, time.monotonic() - start
            if not transient(e):
                raise
            if tries >= IO_RETRY["tries"] or waited >= IO_RETRY["wait"]:
                raise Unreachable(f"rpo.py: cannot read {what}: {first_line(e)} (tries: {tries} in {waited:.0f} s; "
                                  f"--io_tries {IO_RETRY['tries']}, --io_wait {IO_RETRY['wait']:g})") from e
            after = getattr(getattr(e, "response", None), "headers", {}).get("Retry-After", "")
            pause = max(min(2.0 ** (tries - 1), 60.0), float(after) if after.isdigit() else 0.0)
            pause = min(pause, IO_RETRY["wait"] - waited)
            print(f"rpo.py: warning: {what}: {first_line(e)}; try {tries + 1} of {IO_RETRY['tries']} in "
                  f"{pause:.0f} s", file=sys.stderr)
            time.sleep(pause)


class RangeFile(io.RawIOBase):
    """A file (local, hf:// or any fsspec URL) read by byte ranges, each fetch retried. Spans held ahead (a parquet
    footer, a row group's columns) serve the many small reads a parser makes, so they cost one request each: the
    hub rate-limits clients that send many small ones."""

    def __init__(self, path, ahead=0):
        import fsspec
        self.path, self.ahead, self.pos, self.held, self.handle = path, ahead, 0, {}, None
        self.fs, self.fs_path = fsspec.core.url_to_fs(path)
        self.size = retried(path, lambda: self.fs.size(self.fs_path))

    def fetch(self, a, b):
        """Bytes a..b-1, whole or not at all: a body cut short is a transient failure, not a short file."""
        def read():
            try:
                self.handle = self.handle or self.fs.open(self.fs_path, "rb", cache_type="none")
                self.handle.seek(a)
                data = self.handle.read(b - a)
            except Exception:
                self.handle = None  # the next try opens the file anew
                raise
            if len(data) != b - a:
                self.handle = None
                raise ConnectionError(f"a body cut short: {len(data)} of {b - a} bytes")  # transient
            return data
        return retried(f"{self.path} (bytes {a}-{b - 1})", read) if b > a else b""

    def hold(self, a, b, keep=False):
        """Fetch bytes a..b-1 and serve reads from them, until the next span is held (keep: for good, the footer)."""
        if not self.holding(a, b):
            self.held[keep] = (a, self.fetch(a, b))

    def holding(self, a, b):
        return next(((lo, data) for lo, data in self.held.values() if lo <= a and b <= lo + len(data)), None)

    def release(self):
        self.held.pop(False, None)

    def readinto(self, buffer):
        a = self.pos
        b = min(a + len(buffer), self.size)
        if not self.holding(a, b):  # outside what is held: fetched, with `ahead` more for a reader that reads on
            self.hold(a, min(max(b, a + self.ahead), self.size))
        lo, data = self.holding(a, b)
        buffer[:b - a] = data[a - lo:b - lo]
        self.pos = b
        return b - a

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = offset + (0, self.pos, self.size)[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readable(self):
        return True

    def seekable(self):
        return True


def file_bytes(path):
    """A whole file's bytes (a JSON list, an image by path, a prompt file), local or by URL, fetched retried."""
    file = RangeFile(path)
    return file.fetch(0, file.size)


# a row of a file, or of a row group, that cannot be read: a counted skip, in the place of the rows it held
UNREADABLE = dict(caption=None, jpg_0=None, jpg_1=None, label_0=None, unreadable=True)


@functools.lru_cache(maxsize=None)  # one warning per file and process
def warn_unreadable(where, error):
    print(f"rpo.py: warning: {where} cannot be read ({error}); what it holds is skipped and counted as "
          f"'unreadable'", file=sys.stderr)


def check_files(files):
    """Each local parquet file's footer (one small read): the broken ones are reported now, not hours in."""
    for path in sorted({f.path for f in files if f.layout in LAYOUTS and file_kind(f.path) == "parquet"}):
        if "://" not in path:
            try:
                parquet(path).metadata
            except Exception as e:
                warn_unreadable(path, first_line(e))


@functools.lru_cache(maxsize=None)
def json_pairs(path, layout):
    """A JSON source's pairs as (record, winner, loser) image indices. hpdv3: path1 wins. hpdv2, HPDv2's rule:
    each chosen image (human_preference 1) beats each one not chosen; all chosen, or none, is one tie."""
    pairs = []
    for r, record in enumerate(json_records(path)):
        if layout == "hpdv3":
            pairs.append((r, 0, 1))
            continue
        chosen = record.get("human_preference") if isinstance(record, dict) else None
        chosen = [bool(p) for p in chosen] if isinstance(chosen, list) else []  # not a list: counted as a tie
        winners = [i for i, c in enumerate(chosen) if c]
        losers = [i for i, c in enumerate(chosen) if not c]
        pairs += [(r, w, l) for w in winners for l in losers] or [(r, None, None)]
    return pairs


def tar_samples(path):
    """A webdataset tar shard's samples, in order, read sequentially (local or hf://, never unpacked to
    disk): {member suffix: bytes} per key, the key being a member's name up to its first dot."""
    import tarfile
    key, sample = None, {}
    try:
        with tarfile.open(fileobj=RangeFile(path, ahead=TAR_AHEAD), mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                stem, _, suffix = name.partition(".")
                if (folder, stem) != key and sample:
                    yield sample
                    sample = {}
                key, sample[suffix] = (folder, stem), tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as e:  # a truncated download: the shard ends where it breaks
        print(f"rpo.py: tar shard {path} breaks off ({first_line(e)}); its samples up to there are read",
              file=sys.stderr)
        sample = {}  # the sample it broke in may lack members
    if sample:
        yield sample


@functools.lru_cache(maxsize=4)
def tar_stream(path):
    """An open shard, read on from where the last read stopped: consecutive windows read it once."""
    return dict(next=0, samples=tar_samples(path))


def tar_records(path, a, b):
    """Samples a..b-1 of a tar shard (fewer at its end). A read that starts before where the stream stands (a
    resume, another epoch) reads the shard again from its start: at most that shard."""
    stream = tar_stream(path)
    if stream["next"] > a:
        stream.update(next=0, samples=tar_samples(path))
    records = []
    while stream["next"] < b:
        sample = next(stream["samples"], None)
        if sample is None:
            break
        if stream["next"] >= a:
            records.append(sample)
        stream["next"] += 1
    return records


def file_length(file):
    """A file's rows: known for parquet (its footer; 0 for one without), JSON and cache files, not tar shards."""
    if file.rows is not None:
        return file.rows
    try:
        return parquet(file.path).metadata.num_rows
    except Exception as e:
        warn_unreadable(file.path, first_line(e))
        return 0


def read_rows(file, a, b):
    """Rows a..b-1 of a file as Pick-a-Pic rows, fewer at its end. What cannot be read is UNREADABLE rows in its
    place (a row group's rows, or one row for a file that does not open: its length unknown), so the rows after
    it keep their places and a resume reads the same rows."""
    b = min(b, file.rows) if file.rows is not None else b
    if a >= b:
        return []
    if file.layout == "cache":  # see build_cache
        return [(cache_file(file.path), r) for r in range(a, b)]
    try:
        if file.layout == "pickapic-wds":
            return [pickapic_row(file, sample) for sample in tar_records(file.path, a, b)]
        if LAYOUTS[file.layout][0] == "json":
            path, lo = file.path.rsplit("#", 1)
            pairs, records = json_pairs(path, file.layout)[int(lo) + a:int(lo) + b], json_records(path)
            return [pickapic_row(file, (records[r], w, l)) for r, w, l in pairs]
        meta = parquet(file.path).metadata
    except Exception as e:
        warn_unreadable(file.path.split("#")[0], first_line(e))
        return [UNREADABLE]  # one counted row, and the file ends here
    rows, start = [], 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        lo, hi = max(a, start), min(b, start + n)
        if lo < hi:
            try:
                table = row_group(file.path, g, LAYOUTS[file.layout][1])
                rows += [pickapic_row(file, row) for row in table.slice(lo - start, hi - lo).to_pylist()]
            except Exception as e:  # a damaged row group, or one without the layout's columns
                warn_unreadable(f"{file.path} (row group {g})", first_line(e))
                rows += [UNREADABLE] * (hi - lo)
        start += n
    return rows


def pickapic_row(file, record):
    """A record of any layout as a Pick-a-Pic row; jpg_0 is the winner in all but Pick-a-Pic's own rows."""
    if file.layout == "pickapic":
        return record
    if file.layout == "chosen-rejected":
        return dict(caption=record["prompt"], jpg_0=record["chosen"], jpg_1=record["rejected"], label_0=1.0)
    if file.layout == "pickapic-wds":
        def text(suffix):
            return record[suffix].decode("utf-8", "replace").strip() if suffix in record else None
        try:
            label = float(text("label_0.txt"))
        except (TypeError, ValueError):
            label = None
        return dict(caption=text("original_prompt.txt"), jpg_0=record.get("jpg_0.jpg"),
                    jpg_1=record.get("jpg_1.jpg"), label_0=label)
    record, w, l = record  # hpdv2, hpdv3: images by path, relative to image_root
    if not isinstance(record, dict):  # counted as a bad caption
        return dict(caption=None, jpg_0=None, jpg_1=None, label_0=None)
    if file.layout == "hpdv3":
        paths = [record.get("path1"), record.get("path2")]
    else:
        paths = record.get("image_path") or record.get("file_path")
        paths = paths if isinstance(paths, list) else []
    tie = w is None  # hpdv2: every image chosen, or none
    w, l = (0, 1) if tie else (w, l)

    def image(i):  # read by the decoding worker; a missing file is counted there
        if i < len(paths) and isinstance(paths[i], str):
            return dict(bytes=None, path=os.path.join(file.image_root, paths[i]))
    return dict(caption=record.get("prompt"), jpg_0=image(w), jpg_1=image(l), label_0=0.5 if tie else 1.0)


def skip_reason(row):
    """Why a row cannot be trained on (a counter in SKIP_KEYS), or None."""
    if row.get("unreadable"):
        return "unreadable"
    if not isinstance(row["caption"], str):
        return "bad_caption"
    if row["label_0"] not in (0, 0.5, 1):
        return "bad_label"
    return "ties" if row["label_0"] == 0.5 else None


def rows_in_order(cfg, source, split, counts=None):
    """(pair id, row) of a source's usable rows in file order, skips counted (held-out pairs, eval_style)."""
    for k, file in enumerate(source_files(cfg, source, split)):
        for a, rows in chunks(file, 256):
            for r, row in enumerate(rows, a):
                reason = skip_reason(row)
                if reason is None:
                    yield f"{k}:{r}", row
                elif counts is not None:
                    counts[reason] += 1


def chunks(file, size):
    """(first row, rows) of a file, size rows at a time to its end."""
    a = 0
    while True:
        rows = read_rows(file, a, a + size)
        if rows:
            yield a, rows
        if len(rows) < size:
            return
        a += size


# --------------------------------------------------------- data: sharding, order and exact resume
def rank_rows(cfg, files, epoch, rank, world, at=None):
    """(pair id, row, where to resume after it) for this rank's share of an epoch: the epoch's shuffled file
    list dealt round-robin, so a rank reads only its own files, in windows of --shuffle_buffer rows, each
    shuffled and spread; resuming at (file, row, window, taken) reads one window."""
    mine = random.Random(f"{cfg.seed}-files-{epoch}").sample(range(len(files)), len(files))[rank::world]
    k, row, window, taken = at or (0, 0, 0, 0)  # the window starts at `row` of this rank's k-th file
    while k < len(mine):
        rows, ids, (k_next, row_next) = read_window(cfg, files, mine, k, row)
        shuffle = random.Random(f"{cfg.seed}-window-{epoch}-{rank}-{window}")
        order = spread(shuffle.sample(range(len(rows)), len(rows)), [caption_of(r) for r in rows], shuffle)
        for t, i in enumerate(order[taken:], taken + 1):
            after = (k, row, window, t) if t < len(rows) else (k_next, row_next, window + 1, 0)
            yield ids[i], rows[i], after
        k, row, window, taken = k_next, row_next, window + 1, 0


def read_window(cfg, files, mine, k, row):
    """--shuffle_buffer rows (fewer at the end) from `row` of this rank's k-th file on, running on into its
    next files: the rows, their pair ids and where the next window starts."""
    rows, ids = [], []
    while len(rows) < cfg.shuffle_buffer and k < len(mine):
        want = cfg.shuffle_buffer - len(rows)
        got = read_rows(files[mine[k]], row, row + want)
        rows += got
        ids += [f"{mine[k]}:{r}" for r in range(row, row + len(got))]
        k, row = (k + 1, 0) if len(got) < want else (k, row + want)  # fewer than asked: the file has ended
    return rows, ids, (k, row)


def spread(order, captions, rng):
    """The window's order with each caption's rows evenly spaced from a random phase (c rows in a window of n:
    about n / c apart), so they rarely share a micro-batch. Pick-a-Pic stores a prompt's pairs side by side (one
    user session), which shuffled windows alone keep close (docs/data.md: Which pairs meet)."""
    count, seen, phase, key = Counter(captions), Counter(), {}, {}
    for i in order:
        c = captions[i]
        phase.setdefault(c, rng.random())
        key[i] = (seen[c] + phase[c]) / count[c]
        seen[c] += 1
    return sorted(order, key=key.get)


def caption_of(row):
    """A row's caption, or None where it is not a string (a row skipped as bad_caption)."""
    caption = row[0]["caption"][row[1]] if isinstance(row, tuple) else row.get("caption")  # cache: (file, r)
    return caption if isinstance(caption, str) else None


def coin(seed, epoch, index, what):
    """A per-pair random number fixed by (seed, epoch, pair): the same with or without cache, ranks or resume."""
    return random.Random(f"{seed}-{epoch}-{index}-{what}").random()


def pair_batches(cfg, rank, world, start=None, pool=None):
    """Endless (M pairs, state after them) for this rank, decoded or from --cache; the state (epoch, place in the
    rank's share, skip counts) is where to resume. Rows decode ahead in --workers processes but are taken in order,
    so nothing depends on the workers. A rank that ends its share of an epoch starts its next: none waits."""
    if cfg.cache:  # cached pairs are read here, not decoded in the workers
        files, prepare, pool = cache_files(cfg), cached_pair, None
    else:
        files, prepare = source_files(cfg, cfg.data, cfg.split, cfg.max_pairs), prepare_pair
    if len(files) < world:
        sys.exit(f"rpo.py: {len(files)} data file(s) for {world} ranks; each rank reads its own files, so "
                 f"split the data into at least {world} files")
    state = copy.deepcopy(start) if start else dict(epoch=0, at=None, counts={k: 0 for k in SKIP_KEYS})
    while True:
        epoch, whole_epoch, batch, n_batches = state["epoch"], state["at"] is None, [], 0
        jobs = epoch_jobs(cfg, files, epoch, rank, world, state["at"])
        for at, pair in prepared_in_order(prepare, jobs, pool, ahead=4 * cfg.batch):
            state["at"] = at
            if isinstance(pair, str):  # a skip reason
                state["counts"][pair] += 1
                continue
            state["counts"]["small"] += pair.pop("small")
            batch.append(pair)
            if len(batch) == cfg.batch:
                yield batch, copy.deepcopy(state)
                n_batches, batch = n_batches + 1, []
        if n_batches == 0 and whole_epoch:  # not one micro-batch in a whole epoch, so in none
            where = f"cache {cfg.cache!r}" if cfg.cache else repr(cfg.data)
            sys.exit(f"rpo.py: {len(batch)} trainable pairs for rank {rank} in {where} (split {cfg.split!r}, "
                     f"epoch {epoch}), fewer than --batch {cfg.batch}, after dropping ties and bad rows: "
                     f"{state['counts']}")
        state.update(epoch=epoch + 1, at=None)


def epoch_jobs(cfg, files, epoch, rank, world, at):
    """(where to resume after the row, PairJob) for this rank's rows of an epoch; flip and crop fixed per pair."""
    for pid, row, after in rank_rows(cfg, files, epoch, rank, world, at):
        flip = not cfg.no_flip and coin(cfg.seed, epoch, pid, "flip") < 0.5
        crop_seed = f"{cfg.seed}-{epoch}-{pid}" if cfg.random_crop else None
        yield after, PairJob(row, pid, cfg.resolution, flip, crop_seed, cfg.time_ids)


def training_batches(cfg, m, rank, world, start, pool):
    """(Pairs, state to resume after them) forever, from the cache or from decoded rows."""
    for pairs, state in pair_batches(cfg, rank, world, start, pool):
        yield encode_pairs(m, pairs, cfg.embed, with_f=cfg.loss == "rpo"), state


def heldout_pairs(cfg, m):
    """Up to eval_pairs held-out pairs in file order, unflipped, encoded once in micro-batches of --batch (one
    VAE call over all does not fit a GPU at 1024 px); None without a held-out source or with --eval_pairs 0."""
    source, split = heldout_source(cfg)
    if not source or cfg.eval_pairs <= 0:
        return None
    rows = itertools.islice(rows_in_order(cfg, source, split), cfg.eval_pairs)
    prepared = decoded([PairJob(row, i, cfg.resolution, time_ids=cfg.time_ids) for i, row in rows])
    pairs = [p for p in prepared if not isinstance(p, str)]
    if not pairs:
        sys.exit(f"rpo.py: no usable held-out pairs in {source!r} (split {split!r})")
    return [encode_pairs(m, pairs[i:i + cfg.batch], cfg.embed, with_f=False) for i in range(0, len(pairs), cfg.batch)]


def heldout_source(cfg):
    """(source, split) of the held-out data, evaluated or not (the sample prompts come from it too); (None,
    None) without it. Default: the source's validation_unique split, else validation, else none (a hub dataset,
    or a local folder whose names carry splits); --eval_data whole (train) where its names carry none."""
    source = cfg.eval_data or cfg.data
    if source == "pickapic" and (cfg.eval_data or cfg.eval_split):  # asked for: a missing split stops the start
        return source, cfg.eval_split or "validation_unique"
    splits = hub_data_files(cfg.data_id) if source == "pickapic" else folder_splits(source)
    named = next((s for s in ("validation_unique", "validation") if s in splits), None)
    if cfg.eval_data:
        return source, cfg.eval_split or named or "train"
    split = cfg.eval_split or named
    return (source, split) if split and set(SPLIT_NAMES) & set(splits) else (None, None)


# --------------------------------------------------------------------------------- data: decoding
class PairJob(NamedTuple):
    """One row for a decoding worker, with how to prepare it."""
    row: dict
    index: object  # the pair id
    resolution: int
    flip: bool = False
    crop_seed: str = None  # None: a centre crop
    time_ids: str = "constant"  # SDXL's conditioning: see Config.time_ids


def decode(blob):
    if isinstance(blob, dict):  # datasets' Image feature stores {'bytes': ..., 'path': ...}; HPDv2/v3 a path
        if blob.get("bytes") is None and blob.get("path"):
            blob = dict(bytes=file_bytes(blob["path"]))  # FileNotFoundError: a missing image
        blob = blob.get("bytes")
    img = Image.open(io.BytesIO(blob))
    img.load()
    return img.convert("RGB")


def prepare_pair(job):
    """Check, decode, winner first, resize and crop, flip: in a worker process. Returns a pair or a skip reason."""
    row, index, resolution, flip, crop_seed, time_ids = PairJob(*job)
    reason = skip_reason(row)
    if reason:
        return reason
    try:
        first, second = decode(row["jpg_0"]), decode(row["jpg_1"])
    except FileNotFoundError:
        return "missing_image"
    except Exception:
        return "bad_image"
    winner, loser = (first, second) if row["label_0"] == 1 else (second, first)
    pair = dict(index=index, caption=row["caption"], small=int(min(*winner.size, *loser.size) < resolution))
    for name, img in (("winner", winner), ("loser", loser)):
        square, own_size_and_crop = resize_and_crop(img, resolution, crop_seed, flip)
        pair[name] = np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))
        # constant: as if every image were a res x res original, so winner and loser are conditioned alike
        uncropped = [resolution, resolution, 0, 0, resolution, resolution]
        pair[name + "_time_ids"] = own_size_and_crop if time_ids == "image" else uncropped
    return pair


def resize_and_crop(img, resolution, crop_seed, flip):
    """Short side to resolution, then a centre crop or one seeded by crop_seed, then the flip; with SDXL's
    micro-conditioning of the crop: original size, crop corner, target size."""
    w, h = img.size
    resized = img.resize(short_side_to(resolution, w, h), Image.BICUBIC)
    rng = random.Random(crop_seed) if crop_seed is not None else None
    top = rng.randint(0, resized.height - resolution) if rng else (resized.height - resolution) // 2
    left = rng.randint(0, resized.width - resolution) if rng else (resized.width - resolution) // 2
    square = resized.crop((left, top, left + resolution, top + resolution))
    time_ids = [h, w, top, left, resolution, resolution]
    if flip:
        return square.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mirrored(time_ids)
    return square, time_ids


def short_side_to(resolution, w, h):
    s = resolution / min(w, h)
    return max(resolution, round(w * s)), max(resolution, round(h * s))


def mirrored(time_ids):
    """SDXL's time ids of the flipped image, as SDXL trains: the crop's left edge counted from the right."""
    h, w, top, left, target_h, target_w = time_ids
    return [h, w, top, short_side_to(target_w, w, h)[0] - target_w - left, target_h, target_w]


class Decoders:
    """--workers processes that decode JPEGs, first forked at start, before any CUDA or process-group state; a pool
    whose worker died (the OOM killer) is forked anew, as DataLoader forks after CUDA starts: they never touch it."""

    def __init__(self, workers):
        self.workers, self.pool = workers, None
        self.restart()

    def restart(self):
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"), initializer=decoder_started)
        self.pool.submit(int).result()  # a fork pool starts its workers at the first task: now

    def submit(self, fn, job):
        return self.pool.submit(fn, job)

    def shutdown(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def decoder_started():
    """A decoding worker leaves the stop signals to the main process (which ends it), and dies with it."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if sys.platform == "linux":  # PR_SET_PDEATHSIG: a main process killed with -9 leaves no worker behind
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def prepared_in_order(prepare, jobs, pool, ahead):
    """(at, prepare(job)) for each (at, job), in order; with a pool, up to `ahead` jobs run in the workers. A
    worker's death breaks the pool: it starts anew and the pending jobs run again, with the same results (a job
    is a function of its row). Three deaths in a row, with no result between, stop the run."""
    if pool is None:
        for at, job in jobs:
            yield at, prepare(job)
        return
    pending, deaths = deque(), 0  # [at, job, future or None]
    for item in itertools.chain(jobs, [None]):
        if item is not None:
            pending.append([*item, None])
        while pending and (item is None or len(pending) > ahead):
            try:
                for p in pending:
                    p[2] = p[2] or pool.submit(prepare, p[1])
                result = pending[0][2].result()
            except BrokenProcessPool:
                deaths += 1
                if deaths == 3:
                    sys.exit("rpo.py: decoding workers died 3 times in a row (out of memory?); lower "
                             "--workers, or give the job more memory, and --resume")
                print(f"rpo.py: warning: a decoding worker died (out of memory?); {pool.workers} new workers "
                      f"decode its {len(pending)} pending pairs again", file=sys.stderr)
                pool.restart()
                for p in pending:
                    p[2] = None
                continue
            deaths = 0
            yield pending.popleft()[0], result


def decoded(jobs, pool=None):
    """prepare_pair over jobs, in order: pairs, or skip reasons for the rows that cannot be used."""
    return [pair for _, pair in prepared_in_order(prepare_pair, ((None, job) for job in jobs), pool, 64)]


# -------------------------------------------------------------------------------------- the cache
CACHE_CHUNK = 256  # rows decoded and encoded at a time while building the cache


def cache_meta(cfg, m, files):
    """What a cache was built from: settings, and the source's files with their sizes (a local file that
    grows, say a download that went on, makes it another source); hub URLs name their commit."""
    paths = sorted({f.path.split("#")[0] for f in files})
    sizes = [[p, os.path.getsize(p) if os.path.isfile(p) else None] for p in paths]
    # layout, image_root and no_t5 are None when unset, as a cache from before these keys reads them
    return dict(base=m.base, model=cfg.model, resolution=cfg.resolution, clip=cfg.clip, embed=cfg.embed,
                data=cfg.data, data_id=cfg.data_id if cfg.data == "pickapic" else None, split=cfg.split,
                max_pairs=cfg.max_pairs, time_ids=cfg.time_ids, dtype=str(m.dtype), files=sizes,
                layout=cfg.layout, image_root=cfg.image_root, no_t5=cfg.no_t5 or None,
                format=3)  # 2: keeps each row's caption, for spread; 3: a caption's text states once


def build_cache(cfg, m, rank, world, pool):
    """Encode every row of the source once, both flips: one cache file per source file, by rank k mod world,
    written atomically, so an interrupted build resumes at the missing files. Each row's skip reason is kept,
    so cached epochs skip and count exactly what uncached ones would."""
    os.makedirs(cfg.cache, exist_ok=True)
    files = source_files(cfg, cfg.data, cfg.split, cfg.max_pairs)
    meta, meta_path = cache_meta(cfg, m, files), os.path.join(cfg.cache, "meta.json")
    if cache_is_built(cfg, meta, meta_path, rank):
        for k in range(rank, len(files), world):  # a cache file that does not load stops here, before training
            cache_file(cache_path(cfg, k))
        return
    for k in tqdm(range(rank, len(files), world), desc="caching", disable=rank != 0):
        if not os.path.exists(cache_path(cfg, k)):
            atomic_save(encode_file(cfg, m, files[k], k, pool), cache_path(cfg, k))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        rows = [len(cache_file(cache_path(cfg, k))["skip"]) for k in range(len(files))]
        atomic_save(dict(meta, rows=rows), meta_path)
    if dist.is_initialized():
        dist.barrier()


def cache_is_built(cfg, meta, meta_path, rank):
    """Whether the cache folder holds a finished build for these settings; one built for others is an error.
    Rank 0 marks a new build by writing the settings."""
    if os.path.exists(meta_path):
        old = json.load(open(meta_path))
        if {k: old.get(k) for k in meta} != meta:
            differ = ", ".join(f"{k} {old.get(k)} (now {v})" for k, v in meta.items() if old.get(k) != v)
            sys.exit(f"rpo.py: cache {cfg.cache} was built for other settings: {differ[:2000]}; use another "
                     f"--cache folder")
        return "rows" in old
    if rank == 0:
        atomic_save(meta, meta_path)
    return False


def encode_file(cfg, m, file, k, pool):
    """The cache of source file k: every row's skip reason, and the usable rows' encodings under both flips
    as a few stacked tensors (opened with mmap, a pair costs only its own bytes). Text states are stored once
    per distinct caption (SD3's T5 states: 2.7 MB each), each usable row pointing at its caption's."""
    skip, small, parts, captions, text_of = [], [], [], [], {}
    for a, rows in chunks(file, CACHE_CHUNK):  # CACHE_CHUNK decoded rows in memory at a time
        captions += [row.get("caption") if isinstance(row.get("caption"), str) else None for row in rows]
        jobs = [PairJob(row, f"{k}:{r}", cfg.resolution, time_ids=cfg.time_ids) for r, row in enumerate(rows, a)]
        prepared = decoded(jobs, pool)
        skip += [p if isinstance(p, str) else None for p in prepared]
        usable = [p for p in prepared if not isinstance(p, str)]
        small += [p.pop("small") for p in usable]
        for i in range(0, len(usable), cfg.batch):  # each micro-batch to the host as it is made
            batch = usable[i:i + cfg.batch]
            part = {key: None if x is None else x.cpu() for key, x in encode_both_flips(cfg, m, batch).items()}
            new = []  # the rows whose caption the file has not stored yet
            for j, p in enumerate(batch):
                if p["caption"] not in text_of:
                    text_of[p["caption"]] = len(text_of)
                    new.append(j)
            part["text_index"] = torch.tensor([text_of[p["caption"]] for p in batch])
            part.update({key: part[key][new] for key in ("prompt", "pooled") if part[key] is not None})
            parts.append(part)
    tensors = {}
    for key in ("latents", "f", "prompt", "pooled", "time_ids", "text_index"):
        stored = parts and parts[0][key] is not None  # SD1.5 has no pooled states
        tensors[key] = torch.cat([p[key] for p in parts]) if stored else None
    return dict(skip=skip, small=small, caption=captions, **tensors)


def encode_both_flips(cfg, m, pairs):
    """Decoded pairs' encodings, unflipped and flipped (images and crop time ids mirrored), as the cache
    stores them: latents, f and time ids as [n, flip, winner/loser, ...]."""
    mirror = [dict(p, winner=p["winner"][:, :, ::-1].copy(), loser=p["loser"][:, :, ::-1].copy(),
                   winner_time_ids=mirrored(p["winner_time_ids"]),
                   loser_time_ids=mirrored(p["loser_time_ids"])) for p in pairs]
    plain, flipped = encode_pairs(m, pairs, cfg.embed), encode_pairs(m, mirror, cfg.embed)

    def by_flip_and_side(key):
        return torch.stack([torch.stack([getattr(e, key + "_w"), getattr(e, key + "_l")], 1)
                            for e in (plain, flipped)], 1)
    return dict(prompt=plain.prompt, pooled=plain.pooled,
                **{key: by_flip_and_side(key) for key in ("latents", "f", "time_ids")})


def cache_path(cfg, k):
    return os.path.join(cfg.cache, f"file-{k:06d}.pt")


def cache_files(cfg):
    """The cache as a source: (path, rows) per cache file, in the order of the source's files."""
    rows = json.load(open(os.path.join(cfg.cache, "meta.json")))["rows"]
    return [DataFile(cache_path(cfg, k), n, "cache") for k, n in enumerate(rows)]


@functools.lru_cache(maxsize=64)
def cache_file(path):
    """A cache file, memory-mapped and loaded safely: one rpo.py did not write stops the run in one line."""
    try:
        c = safe_load(path, mmap=True)
    except Exception as e:  # UnsafeFile, or a damaged file
        sys.exit(f"rpo.py: cache file {path} cannot be read as rpo.py writes it ({first_line(e)}); move the "
                 f"--cache folder away and start again to rebuild it")
    c["slot"] = np.cumsum([s is None for s in c["skip"]]) - 1  # a row's place among the file's usable rows
    return c


def cached_pair(job):
    """A cached row as prepare_pair would give it: its skip reason, or its encodings under the job's flip."""
    (c, r), index, flip = job.row, job.index, job.flip
    if c["skip"][r]:
        return c["skip"][r]
    s = c["slot"][r]
    text = c["text_index"][s]  # the row's caption's text states
    return dict(index=index, small=c["small"][s], latents=c["latents"][s, int(flip)], f=c["f"][s, int(flip)],
                prompt=c["prompt"][text], pooled=None if c["pooled"] is None else c["pooled"][text],
                time_ids=c["time_ids"][s, int(flip)])


# ---------------------------------------------------------------- the run folder, signals, resume
def run_folder(cfg, rank, ddp):
    """--out, or out/run-N as rank 0 picks it: a new N for a fresh run (claimed by creating it, so runs started
    together differ), under --resume the newest with a checkpoint. Rank 0 locks it and clears what a killed save
    left; a fresh run never writes into a folder that holds another run. Returns the folder and the lock."""
    out = cfg.out
    if out is None:
        if rank == 0:
            numbers = [p[len("out/run-"):] for p in glob.glob("out/run-*")]
            taken = sorted(int(n) for n in numbers if n.isdigit())
            if cfg.resume:
                resumable = [n for n in taken if checkpoints(f"out/run-{n}")]
                if not resumable:
                    sys.exit("rpo.py: --resume found no run with a checkpoint under out/; pass --out DIR")
                n = resumable[-1]
            else:
                n = (taken or [0])[-1] + 1
                while not claim(f"out/run-{n}"):
                    n += 1
            out = f"out/run-{n}"
        if ddp:
            picked = [out]
            dist.broadcast_object_list(picked, src=0)
            out = picked[0]
    lock = lock_run_folder(out) if rank == 0 else None
    ran = checkpoints(out) + glob.glob(os.path.join(out, "metrics.jsonl"))
    if not cfg.resume and any(os.path.getsize(p) for p in ran):
        if lock:
            lock.close()
        sys.exit(f"rpo.py: --out {out} holds a run (checkpoints or metrics.jsonl); pass --resume to continue "
                 f"it, or choose another --out")
    if rank == 0:
        clean_leftovers(out)
    return out, lock


def lock_run_folder(out):
    """An exclusive lock on DIR/rpo.lock for the run's life: a second launch into a live run's folder stops here,
    naming it. The kernel drops it when the process ends, kill -9 included, so a restart is never blocked."""
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, "rpo.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        sys.exit(f"rpo.py: {out} belongs to a run that is still going ({holder}); stop that one first, or "
                 f"choose another --out")
    except OSError as e:  # a filesystem without flock (docs/long-runs.md: How each fault is handled)
        print(f"rpo.py: warning: cannot lock {out} ({first_line(e)}); nothing stops a second launch into it",
              file=sys.stderr)
        return lock
    lock.truncate(0)
    lock.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    lock.flush()
    return lock


def clean_leftovers(out):
    """What a save killed mid-way left in DIR: temporary files and folders go, and a weights folder caught
    between its old and new versions gets the old one back."""
    for name in os.listdir(out):
        path = os.path.join(out, name)
        live = path[:-len(".old")]
        if name.endswith(".old") and not os.path.exists(live):
            os.replace(path, live)
        elif os.path.isdir(path) and not os.path.islink(path) and name.endswith((".tmp", ".old")):
            shutil.rmtree(path)
        elif name.endswith(".tmp"):
            os.remove(path)


def claim(folder):
    try:
        os.makedirs(folder)
        return True
    except FileExistsError:
        return False


# the exit status of a run that a signal stopped, with a checkpoint: EX_TEMPFAIL, "try again later"
PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@contextmanager
def stop_requests():
    """SIGTERM, SIGINT or SIGUSR1 stops the run: while training, after the step it is in, with its checkpoint (a
    second SIGINT: at once); before and after, at once (nothing to checkpoint; a cache file being written is
    written again), same exit status. Yields {"signal": the name or None, "training": whether the loop runs}."""
    asked = dict(signal=None, training=False)

    def ask(signum, frame):  # while training only a flag: the loop reads it once per step
        if signum == signal.SIGINT and asked["signal"]:
            raise KeyboardInterrupt
        asked["signal"] = signal.Signals(signum).name
        if not asked["training"]:
            print(f"rpo.py: stopped by {asked['signal']} outside the training loop; nothing to checkpoint",
                  file=sys.stderr)
            sys.exit(PREEMPTED)
    previous = {s: signal.signal(s, ask) for s in STOP_SIGNALS}
    try:
        yield asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume(cfg, m, trainer, run):
    """Under --resume, the newest checkpoint in --out restores the trained weights, optimizer, schedule,
    scaler and random states. Returns the step, the non-finite steps (so far, in a row), every rank's data
    state and the checkpoint (0, (0, 0), None, None without one)."""
    ckpt = load_checkpoint(cfg.out) if cfg.resume else None
    if cfg.resume and run.ddp:  # each rank reads --out itself: nodes that do not share it would diverge
        step = torch.tensor([ckpt["step"] if ckpt else 0], device=run.device)
        lowest, highest = step.clone(), step.clone()
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)
        if lowest != highest:
            sys.exit(f"rpo.py: the ranks found checkpoints of different steps in {cfg.out} ({int(lowest)} to "
                     f"{int(highest)}): --out (and --cache) must be on a filesystem every node sees")
    if ckpt is None:
        return 0, (0, 0), None, None
    if len(ckpt["data_states"]) != run.world:  # the data order depends on the world size
        n = len(ckpt["data_states"])
        sys.exit(f"rpo.py: {cfg.out} was trained on {n} rank(s), and its data order depends on that number: "
                 f"resume it on {n}, or start a new --out from its weights with {weights_flag(cfg)}")
    missing = [k for k in dataclasses.asdict(cfg) if k not in ckpt["config"] and k not in FREE_ON_RESUME]
    if missing:
        sys.exit(f"rpo.py: the checkpoint in {cfg.out} was written by an older rpo.py, without "
                 f"--{', --'.join(missing)}; resume it with that version, or start a new --out from its "
                 f"weights (--init_unet or --init_lora)")
    changed = changed_settings(ckpt["config"], cfg, run.world)
    if changed:
        sys.exit(f"rpo.py: {cfg.out} was trained with other settings: {', '.join(changed)}. They shape the "
                 f"data order, the model or the loss: resume with the run's values, or start a new --out")
    missing, unexpected = m.unet.load_state_dict(ckpt["unet"], strict=False)  # LoRA: adapters only
    missing = [k for k in missing if not m.lora or ".default." in k]
    if unexpected or missing:
        sys.exit(f"rpo.py: the checkpoint in {cfg.out} holds other weights than this run trains, such as "
                 f"{(unexpected or missing)[0]}")
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.schedule.load_state_dict(ckpt["lr_schedule"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"])
    if run.master and ckpt["step"]:
        print(f"resumed from step {ckpt['step']}", file=sys.stderr)
    return ckpt["step"], tuple(ckpt["nonfinite"]), ckpt["data_states"], ckpt


def changed_settings(saved, cfg, world):
    """'--flag saved (now new)' for each setting that differs from a checkpoint's config and may not. The
    learning rate is compared as the rate --lr or --lr_per_pair gives."""
    now = dataclasses.asdict(cfg)
    rates = learning_rate(Config(**{k: saved.get(k, v) for k, v in now.items()}), world), learning_rate(cfg, world)
    changed = []
    for k, v in now.items():
        if k == "lr" and not math.isclose(*rates, rel_tol=1e-9):
            changed.append(f"--lr {rates[0]:g} (now {rates[1]:g})")
        elif k not in (*FREE_ON_RESUME, "lr", "lr_per_pair") and saved[k] != v:
            changed.append(f"--{k} {saved[k]} (now {v})")
    return changed


def cut_metrics_log(out, step):
    """DIR/metrics.jsonl keeps the steps up to `step`: those after it (all, from step 0) are logged again, as
    is a last line that a kill cut short. Returns the last step it keeps (0 for none)."""
    path = os.path.join(out, "metrics.jsonl")
    kept = []
    for line in open(path).readlines() if os.path.exists(path) else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # only the last line can be cut short: nothing follows it
            break
        if record["step"] <= step:
            kept.append((record["step"], line))
    atomic_save("".join(line for _, line in kept), path)
    return kept[-1][0] if kept else 0


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(cfg, m, trainer, step, nonfinite, state, run, record, save_point):
    """DIR/ckpt-STEP.pt: what --resume needs, the step's record (a resume logs it if the run died before it did)
    and a content digest, checked on load. Written by atomic_save; the last `keep` stay; ckpt.pt links the newest."""
    if not weights_are_finite(m.unet):  # the same weights on every rank: every rank stops here
        sys.exit(f"rpo.py: the weights became non-finite by step {step} and were not saved; the newest "
                 f"checkpoint in {cfg.out}, if any, holds the last good ones. Start a new --out from the "
                 f"last saved weights, {weights_flag(cfg)}, with a lower --lr or --beta")
    states = [None] * run.world  # every rank's data state: epoch, place in its share, skip counts
    if dist.is_initialized():
        dist.all_gather_object(states, state)
    else:
        states = [state]
    if not run.master:
        return
    weights = m.unet.state_dict()
    if m.lora:  # the frozen UNet and the frozen starting adapters are rebuilt from the config on resume
        weights = {k: v for k, v in weights.items() if ".default." in k}
    ckpt = dict(unet=weights, optimizer=trainer.optimizer.state_dict(),
                lr_schedule=trainer.schedule.state_dict(), scaler=trainer.scaler.state_dict(), step=step,
                nonfinite=list(nonfinite), data_states=states, config=dataclasses.asdict(cfg),
                rng=rng_states(), record=dict(record), save_point=save_point)
    ckpt["digest"] = content_digest(ckpt)
    path = os.path.join(cfg.out, f"ckpt-{step:07d}.pt")
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as log:  # its lines before this step come first
        os.fsync(log.fileno())
    atomic_save(ckpt, path)
    link_newest(path, os.path.join(cfg.out, "ckpt.pt"))
    # never one of a later step: that is not this run's history (say, an unreadable one --resume passed over)
    own = [p for p in checkpoints(cfg.out) if checkpoint_step(p) <= step]
    for old in own[:-cfg.keep]:
        os.remove(old)


def content_digest(ckpt):
    """sha256 of a checkpoint's content, every tensor's bytes included: a file that changed after it was
    written (a failing disk, a copy cut short, a stray write) no longer matches it."""
    h = hashlib.sha256()

    def add(x):
        if isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype}{x.shape}".encode() + np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            for k, v in x.items():
                h.update(repr(k).encode())
                add(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__}{len(x)}".encode())
            for v in x:
                add(v)
        else:
            h.update(repr(x).encode())
    add({k: v for k, v in ckpt.items() if k != "digest"})
    return h.hexdigest()


def weights_are_finite(unet):
    return bool(torch.stack([p.isfinite().all() for p in unet.parameters()]).all())


def link_newest(path, link):
    """Point `link` at `path` in one rename: it always names a complete checkpoint."""
    if os.path.lexists(link + ".tmp"):
        os.remove(link + ".tmp")
    os.symlink(os.path.basename(path), link + ".tmp")
    os.replace(link + ".tmp", link)
    fsync_folder(os.path.dirname(link))


def checkpoints(out):
    """DIR/ckpt-STEP.pt, oldest first."""
    paths = glob.glob(os.path.join(out, "ckpt-*.pt"))
    return sorted([p for p in paths if checkpoint_step(p) is not None], key=checkpoint_step)


def checkpoint_step(path):
    step = os.path.basename(path)[len("ckpt-"):-len(".pt")]
    return int(step) if step.isdigit() else None


def rng_states():
    """The random states a resume restores, in types torch's weights-only loader reads."""
    return dict(python=random.getstate(), numpy=numpy_state(np.random.get_state()), torch=torch.get_rng_state())


def numpy_state(state):
    """numpy's random state with its keys as a tensor: an ndarray only the full unpickler can rebuild."""
    name, keys, pos, has_gauss, gauss = state
    return dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                has_gauss=int(has_gauss), gauss=float(gauss))


def set_rng_states(rng):
    n = rng["numpy"]
    random.setstate(rng["python"])
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(rng["torch"])


class UnsafeFile(Exception):
    pass


def safe_load(path, **kw):
    """torch.load that runs no code (weights_only): tensors and plain Python values only. A file that asks
    for anything else (a crafted file's os.system, say) raises UnsafeFile, before any of it is built."""
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols it may not read: it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError as e:  # torch's safe unpickler refused it; a damaged file fails otherwise
        reason = str(e).split("WeightsUnpickler error: ")[-1].split(". Please")[0].strip()
        raise UnsafeFile(f"{path} holds more than tensors and plain values, which a safe load refuses "
                         f"({first_line(reason)[:200]})") from None


def load_checkpoint(out):
    """The newest checkpoint that loads and matches its digest (one that does not is reported and passed over),
    memory-mapped so the ranks of one host share its pages. Loaded safely: one that needs more than tensors and
    plain values stops the run, saying how to convert an earlier rpo.py's checkpoint, never with an unsafe load."""
    for path in reversed(checkpoints(out)):
        try:
            ckpt = safe_load(path, mmap=True)
        except UnsafeFile as e:
            sys.exit(f"rpo.py: checkpoint {e}. If it is your own, written by an earlier rpo.py, convert it "
                     f"(converting loads it unsafely: never for a file from someone else): python -c \"import "
                     f"rpo; rpo.convert_checkpoint('{os.path.abspath(path)}')\" in rpo.py's folder, then "
                     f"--resume")
        except Exception as e:
            print(f"rpo.py: checkpoint {path} is unreadable ({type(e).__name__}); trying an older one",
                  file=sys.stderr)
            continue
        if "digest" in ckpt and content_digest(ckpt) != ckpt["digest"]:
            print(f"rpo.py: checkpoint {path} fails its content check (it changed after it was written); "
                  f"trying an older one", file=sys.stderr)
            continue
        return ckpt
    if checkpoints(out):  # storage that is not back yet, say: starting over would overwrite the run
        sys.exit(f"rpo.py: none of the {len(checkpoints(out))} checkpoints in {out} loads (each is named "
                 f"above); fix or move them, then --resume")
    print(f"rpo.py: no checkpoint in {out}; starting from step 0", file=sys.stderr)
    return None


def convert_checkpoint(path):
    """Rewrite an earlier rpo.py's checkpoint (numpy's random state as an ndarray) as safe_load reads it. It
    loads with the full unpickler, which runs whatever code the file holds: only for checkpoints you wrote."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # the one unsafe load: see the docstring
    if "digest" in ckpt and content_digest(ckpt) != ckpt["digest"]:
        sys.exit(f"rpo.py: checkpoint {path} fails its content check (it changed after it was written)")
    if not isinstance(ckpt["rng"]["numpy"], dict):
        ckpt["rng"]["numpy"] = numpy_state(ckpt["rng"]["numpy"])
    ckpt["digest"] = content_digest(ckpt)
    atomic_save(ckpt, path)
    safe_load(path)  # what --resume will do
    print(f"rpo.py: converted {path}; it now loads safely")


# ----------------------------------------------------------------------------------------- saving
def finish_save_point(cfg, m, run, heldout, step):
    """A save point after its checkpoint, on rank 0: the weights (DIR/unet or DIR/lora), the held-out metrics
    (returned, to log) and the sample grid."""
    if not run.master:
        return {}
    save_weights(m, os.path.join(cfg.out, "lora" if m.lora else DENOISER_FOLDER[m.family]))
    logged = {}
    if heldout is not None:
        logged = {"heldout_" + k: v for k, v in evaluate(cfg, m, heldout, run.autocast).items()}
    if cfg.sample_steps:
        save_samples(cfg, m, samples_path(cfg, step), run.autocast)
    return logged


def atomic_save(obj, path):
    """Write under a temporary name, fsync, rename, fsync the folder: a kill or power cut at any moment leaves
    the previous file whole, and the new one counts only once on disk. Text and bytes as they are, JSON for
    .json, else torch.save; a failed write (a full disk) leaves nothing behind and stops the run."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w" if isinstance(obj, str) or path.endswith(".json") else "wb") as fh:
            if isinstance(obj, (str, bytes)):
                fh.write(obj)
            elif path.endswith(".json"):
                json.dump(obj, fh)
            else:
                torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_folder(os.path.dirname(path))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        cannot_write(path, tmp, e)


def fsync_folder(folder):
    """Sync a folder's entries: a rename counts once the folder that holds it is on disk."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cannot_write(path, tmp, error):
    """One line for a write that failed, after removing what it left. torch.save reports a full disk as a
    bare RuntimeError: the free space says it."""
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
        os.remove(tmp)
    folder = os.path.dirname(path) or "."
    free = shutil.disk_usage(folder).free / 2**20
    sys.exit(f"rpo.py: cannot write {path} ({first_line(error)}; {free:.0f} MB free there); nothing of it is "
             f"left, and what was there before is whole. Free space in {folder} and start again (a run: with "
             f"--resume)")


def first_line(error):
    """An exception's message cut to one line, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def save_weights(m, folder):
    """DIR/unet (diffusers) or, with LoRA, DIR/lora (for a pipeline's load_lora_weights): written and synced
    beside `folder`, then swapped in; a start after a kill mid-swap finishes it (clean_leftovers)."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if m.lora:
            save_lora(m, tmp)
        else:
            m.unet.save_pretrained(tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_folder(tmp)
    except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError (a full disk)
        cannot_write(folder, tmp, e)
    shutil.rmtree(folder + ".old", ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, folder + ".old")
    os.replace(tmp, folder)
    fsync_folder(os.path.dirname(folder))
    shutil.rmtree(folder + ".old", ignore_errors=True)


def save_lora(m, folder):
    """The trained adapters in diffusers' LoRA format, with rank and alpha: pipe.load_lora_weights(folder)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    layers = get_peft_model_state_dict(m.unet, adapter_name="default")
    if m.family not in FLOW:  # the UNet pipelines read diffusers' key names; SD3's and Flux's peft's (as their scripts)
        layers = convert_state_dict_to_diffusers(layers)
    name = DENOISER_FOLDER[m.family]  # unet | transformer
    pipeline_class(m.family).save_lora_weights(folder, weight_name=LORA_FILE, **{
        f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": m.unet.peft_config["default"].to_dict()})


def samples_path(cfg, step):
    return os.path.join(cfg.out, f"samples_{step}.png")


SAMPLE_PROMPTS = ["a photo of a corgi wearing sunglasses on a beach",
                  "an oil painting of a lighthouse in a storm", "a bowl of ramen, studio lighting",
                  "a watercolor fox in a snowy forest"]


def sample_prompts(cfg):
    """The sample grid's prompts: the first 4 distinct captions of the held-out data, which the run never
    trains on, whatever the source; SAMPLE_PROMPTS without held-out data."""
    source, split = heldout_source(cfg)
    captions = []
    for _, row in rows_in_order(cfg, source, split) if source else ():
        if row["caption"] not in captions:
            captions.append(row["caption"])
        if len(captions) == 4:
            break
    return captions or SAMPLE_PROMPTS


@torch.no_grad()
def save_samples(cfg, m, path, autocast):
    """A grid of images from fixed prompts and seeds with the current policy UNet."""
    m.sample_prompts = prompts = m.sample_prompts or sample_prompts(cfg)  # a hub file: read once, not each time
    pipe = sample_pipeline(m)
    m.unet.eval()
    with autocast:
        images = [pipe(prompt, num_inference_steps=cfg.sample_steps, height=cfg.resolution,
                       width=cfg.resolution, generator=torch.Generator(m.device).manual_seed(i)).images[0]
                  for i, prompt in enumerate(prompts)]
    m.unet.train()
    grid = Image.new("RGB", (cfg.resolution * len(images), cfg.resolution))
    for i, img in enumerate(images):
        grid.paste(img, (i * cfg.resolution, 0))
    grid.save(path)


def pipeline_class(family):
    return getattr(diffusers, dict(sd15="StableDiffusionPipeline", sdxl="StableDiffusionXLPipeline",
                                   sd3="StableDiffusion3Pipeline", flux="FluxPipeline")[family])


def sample_pipeline(m):
    """A diffusers pipeline over the training models (no copies): DDIM for few-step sampling of the eps
    models, the flow models' own flow-matching Euler sampler (a fresh copy: the training one's sigmas stay)."""
    from diffusers import DDIMScheduler
    parts = dict(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0])
    if m.family == "flux":
        pipe = pipeline_class("flux")(**parts, transformer=m.unet, text_encoder_2=m.text_encoders[1],
                                      tokenizer_2=m.tokenizers[1],
                                      scheduler=type(m.scheduler).from_config(m.scheduler.config))
    elif m.family == "sd3":
        t5 = dict(text_encoder_3=m.text_encoders[2], tokenizer_3=m.tokenizers[2]) if len(m.tokenizers) == 3 else \
            dict(text_encoder_3=None, tokenizer_3=None)
        pipe = pipeline_class("sd3")(**parts, transformer=m.unet, text_encoder_2=m.text_encoders[1],
                                     tokenizer_2=m.tokenizers[1], **t5,
                                     scheduler=type(m.scheduler).from_config(m.scheduler.config))
    else:
        parts.update(unet=m.unet, scheduler=DDIMScheduler.from_config(m.scheduler.config))
        if m.family == "sdxl":
            pipe = pipeline_class("sdxl")(**parts, text_encoder_2=m.text_encoders[1],
                                          tokenizer_2=m.tokenizers[1], add_watermarker=False)
        else:
            pipe = pipeline_class("sd15")(**parts, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------- tracking and the end-of-run line
class Tracker(NamedTuple):
    log: object  # log(step, values, grid path or None)
    close: object


def open_tracker(cfg, step):
    """--report_to's writer (rank 0), continuing at `step`: log(step, values, grid path) and close(). Each key
    of metrics.jsonl is a scalar of the same name; each sample grid an image; the config a text."""
    config = dataclasses.asdict(cfg)

    def numbers(values):  # a record's scalars: the step is the axis, strings and nulls have no curve
        return {k: v for k, v in values.items() if k != "step" and isinstance(v, (int, float))}
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard drops what an interrupted run logged after its checkpoint, as metrics.jsonl
        writer = SummaryWriter(os.path.join(cfg.out, "tensorboard"), purge_step=step + 1 if step else 0)
        if not step:
            writer.add_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "), 0)

        def log(step, values, grid=None):
            for k, v in numbers(values).items():
                writer.add_scalar(k, v, step)
            if grid:
                image = np.asarray(Image.open(grid).convert("RGB"))
                writer.add_image("samples", image, step, dataformats="HWC")
            writer.flush()  # the curves are current while the run goes on
        return Tracker(log, writer.close)
    if cfg.report_to == "wandb":
        import wandb
        # one W&B run per run folder (its id kept in DIR/wandb_id.json), so --resume continues it; W&B's steps
        # only go forward: what a run logged after its last checkpoint stays (docs/long-runs.md: Watching a run)
        id_path = os.path.join(cfg.out, "wandb_id.json")
        run_id = json.load(open(id_path)) if os.path.exists(id_path) else os.urandom(6).hex()
        atomic_save(run_id, id_path)
        wb = wandb.init(project=os.environ.get("WANDB_PROJECT", "diffusion-rpo"), id=run_id, resume="allow",
                        name=os.path.basename(cfg.out), dir=cfg.out, config=config)

        def log(step, values, grid=None):
            wb.log(dict(numbers(values), **({"samples": wandb.Image(grid)} if grid else {})), step=step)
        return Tracker(log, wb.finish)
    return None


def json_line(record):
    """Strict JSON: a value that is not a finite number (a skipped step's loss) is null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in record.items()}, allow_nan=False)


def log_step(cfg, record, bar, tracker, save_point):
    """A step's record in metrics.jsonl and the tracker (with a save point's sample grid), and the bar."""
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as fh:
        fh.write(json_line(record) + "\n")
    if tracker:
        step = record["step"]
        tracker.log(step, record, samples_path(cfg, step) if save_point and cfg.sample_steps else None)
    if bar:
        bar.update(1)
        skipped = sum(record[k] for k in SKIP_KEYS if k not in ("ties", "small"))
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('accuracy', float('nan')):.2f}",
                        skipped=skipped)


PEAK_BF16_FLOPS = 989e12  # one H100 SXM, dense bf16; the end-of-run MFU on any CUDA device is against it


def clock(device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_done(in_flight, interval=None):
    """Seconds of the done (start, end) intervals in in_flight (interval added), taken out of it: perf_counter
    ones at once, CUDA events once the GPU has passed them (a query, never a sync)."""
    if interval:
        in_flight.append(interval)
    seconds = 0.0
    while in_flight and (isinstance(in_flight[0][1], float) or in_flight[0][1].query()):
        start, end = in_flight.popleft()
        seconds += end - start if isinstance(start, float) else start.elapsed_time(end) / 1000
    return seconds


@contextmanager
def pair_embedding_clock(m):
    """Seconds the pair-weight CLIP computes in the body, for weight_time_share: its two towers timed by forward
    hooks (see seconds_done), so no batch or data path carries a timing. Yields a function: the seconds so far."""
    in_flight, started, total = deque(), [], [0.0]

    def start(module, args):
        started.append(clock(m.device))

    def end(module, args, output):
        total[0] += seconds_done(in_flight, (started.pop(), clock(m.device)))

    def so_far():
        total[0] += seconds_done(in_flight)
        return total[0]
    towers = (m.clip.text_model, m.clip.vision_model)
    hooks = [tower.register_forward_pre_hook(start) for tower in towers]
    hooks += [tower.register_forward_hook(end) for tower in towers]
    try:
        yield so_far
    finally:
        for hook in hooks:
            hook.remove()


# micro-step FLOPs = 4 x one UNet forward over its 2M images: policy forward + backward 3, reference 1
# (SFT: 1.5); LoRA: 3 (SFT: 1): the frozen UNet's backward computes activation gradients, not weight ones
@torch.no_grad()
def step_flops(cfg, m, pairs):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    # the counter misses CPU's fused attention; on CUDA it counts the fused kernels (MATH would take GBs)
    math_attention = sdpa_kernel(SDPBackend.MATH) if m.device.type == "cpu" else nullcontext()
    with FlopCounterMode(display=False) as counter, math_attention, reference(m) as ref_unet:
        unet = getattr(ref_unet, "_orig_mod", ref_unet)  # the eager module under --compile
        pair_errors(unet, m, pairs, [f"flops-{i}" for i in pairs.index])
    policy = 1 + (1 if m.lora else 2)
    return counter.get_total_flops() * (policy / 2 if cfg.loss == "sft" else policy + 1)


def end_of_run(cfg, m, run, history, timing, pairs):
    """The end-of-run summary: throughput, FLOPs and peak memory (what benchmarks read), final metrics."""
    n_timed = max(timing["steps"] - 1, 0)
    steps_per_s = n_timed / timing["timed"] if n_timed else timing["steps"] / timing["seconds"]
    if run.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(run.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    flops_per_s = step_flops(cfg, m, pairs) * cfg.grad_accum * steps_per_s  # per rank; counted after the peak
    last = [r["accuracy"] for r in history[-10:] if "accuracy" in r]  # SFT has none
    step_ms = 1000 * statistics.median(timing["step_seconds"][1:] or timing["step_seconds"])
    return dict(steps=timing["steps"], seconds=round(timing["seconds"], 2), steps_per_s=round(steps_per_s, 4),
                pairs_per_s=round(steps_per_s * cfg.batch * cfg.grad_accum * run.world, 2),
                median_step_ms=round(step_ms, 2), tflops_per_s=round(flops_per_s / 1e12, 4),
                mfu=round(flops_per_s / PEAK_BF16_FLOPS, 4) if run.device.type == "cuda" else None,
                peak_mem_mb=round(peak / 2**20, 1),
                weight_time_share=round(timing["clip_seconds"] / (timing["seconds"] - timing["saving"]), 4),
                loss=history[-1]["loss"], train_accuracy=round(statistics.fmean(last), 4) if last else None,
                heldout_accuracy=history[-1].get("heldout_accuracy"), heldout_margin=history[-1].get("heldout_margin"),
                model=cfg.model, loss_type=cfg.loss, batch=cfg.batch, world=run.world, precision=run.precision)


if __name__ == "__main__":
    main()
