"""Diffusion-RPO (Gu et al. 2024, arXiv 2406.06382) in one file: preference fine-tuning of a
Stable Diffusion 1.5 / SDXL UNet that contrasts every winner with every loser of a micro-batch,
each pair weighted by how alike the two prompt-image pairs are in CLIP space.

    python rpo.py                                  # tiny random model, toy data, offline, CPU, ~1 min
    python rpo.py --model sdxl --data pickapic     # the real thing
    torchrun --nproc_per_node=8 rpo.py --model sd15 --data /data/pickapic --global_contrast

Any field of Config is a flag: --key value (booleans: --key, or --key false).
"""
import argparse
import copy
import dataclasses
import datetime
import functools
import glob
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import sys
import time
import warnings
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import diffusers
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw
from tqdm import tqdm

# ----------------------------------------------------------------------------------------- config


@dataclass
class Config:
    model: str = "tiny"  # tiny | tiny-xl | tiny-drawn | sd15 | sdxl
    pretrained: str = None  # hub id or local diffusers folder; default from the preset
    random_init: bool = False  # sd15/sdxl shapes with random weights, no download (benchmarks)
    init_unet: str = None  # start policy and reference from this UNet folder (e.g. an SFT run's DIR/unet)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen UNet instead of the whole UNet
    lora_modules: str = "to_q,to_k,to_v,to_out.0"  # UNet layers that get adapters: the attention projections
    init_lora: str = None  # start the adapters from a previous run's DIR/lora, for policy and reference
    data: str = "toy"  # toy | toy-subject | pickapic | parquet file, folder or glob
    data_id: str = "yuvalkirstain/pickapic_v2"
    split: str = "train"
    eval_data: str = None  # held-out pairs: default toy's held-out captions, pickapic's validation_unique
    eval_split: str = None  # default: heldout (toy; its halves: validation, test), validation_unique, train
    eval_pairs: int = 64
    eval_draws: int = 8  # fixed (noise, t) draws averaged per held-out pair
    max_pairs: int = 0  # 0 = all
    toy_pairs: int = 4000
    loss: str = "rpo"  # rpo | dpo | sft
    beta: float = 5000.0
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
    workers: int = 4  # processes decoding JPEGs
    shuffle_buffer: int = 1000
    cache: str = ""  # folder of encoded pairs (VAE latents, text states, CLIP features)
    out: str = None  # the run's folder; default out/run-N, a new N per fresh run, the newest N under --resume
    save_every: int = None
    keep: int = 2
    resume: bool = False
    seed: int = 0
    max_nonfinite: int = 10  # this many non-finite steps in a row stop the run
    sample_steps: int = None  # denoising steps of the sample grid saved with each checkpoint; 0 = none


HUB_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
# Diffusion-DPO's recipe: lr 1e-8 per pair times the effective batch (2048 pairs on 8 GPUs: 2.048e-5), 2000
# steps, 500 warmup. The toy's rate is 1e-5 at its 8 pairs a step.
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
# What may change on --resume: the rest shapes the data order, the model or the loss, and must match.
FREE_ON_RESUME = ("max_steps", "save_every", "keep", "workers", "eval_data", "eval_split", "eval_pairs",
                  "eval_draws", "sample_steps", "max_nonfinite", "compile", "grad_checkpointing", "cache",
                  "out", "resume")
PRESETS["tiny-xl"] = PRESETS["tiny-drawn"] = PRESETS["tiny"]
IS_XL = {"tiny": False, "tiny-xl": True, "tiny-drawn": False, "sd15": False, "sdxl": True}
CHOICES = dict(model=IS_XL, loss=("rpo", "dpo", "sft"), embed=("text", "image", "both"),
               precision=(None, "bf16", "fp16", "fp32"), optimizer=(None, "adamw", "adafactor"),
               time_ids=("constant", "image"))
for lib in (diffusers, transformers):  # their load-time chatter would bury the training log
    lib.utils.logging.set_verbosity_error()
    lib.utils.logging.disable_progress_bar()
RPO_HOME = os.environ.get("RPO_HOME", os.path.expanduser("~/.cache/rpo"))  # random-init model folders


def as_bool(text):
    return str(text).lower() in ("1", "true", "yes", "on")


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
    for k, v in PRESETS[cfg.model].items():
        if cfg.random_init and k in ("pretrained", "clip"):  # random weights: the build's CLIP too
            continue
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.lora_rank < 0:
        sys.exit(f"rpo.py: --lora_rank must be 0 (the whole UNet) or a positive rank, got {cfg.lora_rank}")
    if cfg.random_crop and cfg.cache:
        sys.exit("rpo.py: --random_crop cannot be cached (a cache stores one crop); drop one of them")
    return cfg


# ----------------------------------------------------------------------------------------- models
# tiny, tiny-xl (and sd15, sdxl with --random_init) are built from these configs with random weights,
# saved as an ordinary diffusers folder, then loaded by the same from_pretrained code as the hub models.

def clip_text_config(hidden, layers, heads, proj, act="quick_gelu", vocab=49408):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, projection_dim=proj, hidden_act=act,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def vae_config(channels, scaling):
    n = len(channels)
    return dict(block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, layers_per_block=2 if n > 2 else 1,
                latent_channels=4, norm_num_groups=min(32, channels[0]), scaling_factor=scaling)


TINY_VOCAB = 514  # 256 byte symbols, the same with '</w>', start and end tokens
TINY_TEXT = clip_text_config(32, 2, 2, 32, vocab=TINY_VOCAB)
TINY_UNET = dict(sample_size=16, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                 attention_head_dim=8, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14)
SHAPES = {
    "tiny": dict(unet=dict(TINY_UNET, cross_attention_dim=32), vae=vae_config([16, 32], 0.18215),
                 text=[TINY_TEXT], clip_vision=TINY_VISION),
    "tiny-xl": dict(
        unet=dict(TINY_UNET, cross_attention_dim=64, transformer_layers_per_block=[1, 2],
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + 32),
        vae=vae_config([16, 32], 0.13025), clip_vision=TINY_VISION,
        text=[TINY_TEXT, clip_text_config(32, 2, 2, 32, act="gelu", vocab=TINY_VOCAB)]),
    "sd15": dict(  # the UNet's other fields: diffusers' defaults, which are SD1.x's
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        vae=vae_config([128, 256, 512, 512], 0.18215), text=[clip_text_config(768, 12, 12, 768)],
        clip_vision=VIT_L14),
    "sdxl": dict(
        unet=dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                  cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        vae=vae_config([128, 256, 512, 512], 0.13025),
        text=[clip_text_config(768, 12, 12, 768), clip_text_config(1280, 32, 20, 1280, act="gelu")],
        clip_vision=VIT_L14),
}
SHAPES["tiny-drawn"] = SHAPES["tiny"]  # with a VAE and UNet trained to draw the toy world


def byte_level_tokenizer():
    """CLIP's BPE tokenizer with single-byte symbols and no merges: built in code, nothing downloaded."""
    from transformers import CLIPTokenizer
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    words = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[], model_max_length=77)


def build_random_pipeline(model, folder):
    """Random-weight pipeline of the given shape, saved as a diffusers folder with a CLIP in folder/clip."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    shape, tmp = SHAPES[model], f"{folder}.tmp{os.getpid()}"  # runs started together each build their own
    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    vae = AutoencoderKL(**shape["vae"])
    if model == "tiny-drawn":
        train_toy_vae(vae)
    if model.startswith("tiny"):  # as SD chose 0.18215: unit-variance latents, else x_t is noise at every t
        vae.register_to_config(scaling_factor=unit_variance_scale(vae))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, steps_offset=1)
    parts = dict(unet=UNet2DConditionModel(**shape["unet"]), vae=vae, scheduler=scheduler,
                 text_encoder=CLIPTextModel(CLIPTextConfig(**shape["text"][0])), tokenizer=tokenizer)
    if model == "tiny-drawn":
        train_toy_unet(parts)
    if IS_XL[model]:
        from diffusers import StableDiffusionXLPipeline
        encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**shape["text"][1]))
        pipeline = StableDiffusionXLPipeline(**parts, text_encoder_2=encoder_2, tokenizer_2=tokenizer)
        pipeline.save_pretrained(tmp)
    else:
        from diffusers import StableDiffusionPipeline
        StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(tmp)
    save_random_clip(model, shape, tokenizer, os.path.join(tmp, "clip"))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first; its folder is the same model (seed 0)
        shutil.rmtree(tmp)


def save_random_clip(model, shape, tokenizer, folder):
    """The pair-weight CLIP of a random-init folder: for the tiny models, trained on the toy world."""
    from transformers import CLIPConfig, CLIPModel
    clip = CLIPModel(CLIPConfig(text_config=shape["text"][0], vision_config=shape["clip_vision"],
                                projection_dim=shape["text"][0]["projection_dim"]))
    if model.startswith("tiny"):
        train_toy_clip(clip, tokenizer)
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def unit_variance_scale(vae):
    """The latent scaling factor that gives 64 toy training images unit-variance latents."""
    rows = toy_rows("train", 64)
    jobs = [PairJob(row, 0, PRESETS["tiny"]["resolution"]) for row in rows]
    pixels = torch.stack([torch.from_numpy(prepare_pair(job)["winner"]) for job in jobs])
    return 1 / vae.encode(pixels / 127.5 - 1).latent_dist.mode().std().item()


def toy_images(rng, captions, size):
    """One toy image per caption, flat, striped, outlined or both at random, as the data resizes it: uint8
    [N,3,size,size]."""
    images = [draw_toy(c, rng, rng.random() < 0.5, rng.random() < 0.5).resize((size, size), Image.BICUBIC)
              for c in captions]
    return torch.from_numpy(np.stack([np.asarray(image).transpose(2, 0, 1) for image in images]))


def train_toy_vae(vae, steps=600, batch=32):
    """tiny-drawn's VAE: reconstructs toy images (about 1 min on 2 cores)."""
    rng, captions = random.Random(0), toy_captions("train")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for _ in range(steps):
        chosen = [rng.choice(captions) for _ in range(batch)]
        x = toy_images(rng, chosen, PRESETS["tiny"]["resolution"]) / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()


def train_toy_unet(parts, steps=3000, batch=32):
    """tiny-drawn's UNet: draws toy images from their captions, one in ten captions empty so that sampling can
    use guidance (about 10 min on 2 cores). Its range holds both toy worlds' winners and losers."""
    rng, captions = random.Random(1), toy_captions("train")
    vae, unet, scheduler = parts["vae"], parts["unet"], parts["scheduler"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    for _ in range(steps):
        chosen = [rng.choice(captions) for _ in range(batch)]
        with torch.no_grad():
            x = toy_images(rng, chosen, PRESETS["tiny"]["resolution"]) / 127.5 - 1
            latents = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
            conditioning = ["" if rng.random() < 0.1 else c for c in chosen]
            ids = parts["tokenizer"](conditioning, padding="max_length", max_length=77, truncation=True,
                                     return_tensors="pt").input_ids
            prompt = parts["text_encoder"](ids).last_hidden_state
        noise, t = torch.randn_like(latents), torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        loss = F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, prompt).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_toy_clip(clip, tokenizer, steps=300, batch=64):
    """The tiny CLIP trained with CLIP's contrastive loss on toy captions and images of every style, so that
    the pair embedding f tells colours, shapes and backgrounds apart (about 15 s on 2 cores). Seeded: every
    build gives the same weights."""
    rng, captions = random.Random(0), toy_captions("train")
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=2e-3)
    for _ in range(steps):
        chosen = rng.sample(captions, batch)  # distinct captions: each image has one right caption
        ids = tokenizer(chosen, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids = ids.input_ids
        images = toy_images(rng, chosen, PRESETS["tiny"]["resolution"])
        pixels = clip_pixels(images, clip.config.vision_config.image_size)
        loss = clip(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return clip.eval()


FOLDER_VERSION = "v2"  # raised when what build_random_pipeline makes changes (v2: the trained toy CLIP)


def model_folder(cfg):
    """Where the base pipeline lives: a hub id or folder, or a random-init folder built once in RPO_HOME."""
    if cfg.pretrained:
        return cfg.pretrained
    name = cfg.model if cfg.model == "tiny-drawn" else cfg.model + "-random"
    folder = os.path.join(RPO_HOME, f"{name}-{FOLDER_VERSION}")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        build_random_pipeline(cfg.model, folder)
    return folder


def first_line(error):
    """An exception's message cut to one line, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def pretrained(cls, name, **kw):
    """cls.from_pretrained, with one line instead of a traceback when the id or folder cannot be loaded."""
    try:
        return cls.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:  # offline, a wrong id, a gated repo, not a diffusers/transformers one
        where = f"{name!r} / {kw['subfolder']}" if "subfolder" in kw else repr(name)
        sys.exit(f"rpo.py: cannot load {cls.__name__} from {where}: {first_line(e)}")


@dataclass
class Models:
    """What load_models gives the training step."""
    base: str  # the pipeline's hub id or folder
    xl: bool
    device: torch.device
    dtype: torch.dtype  # the compute dtype of everything frozen
    scheduler: object
    unet: torch.nn.Module  # the policy
    ref_unet: torch.nn.Module  # None with LoRA: see `reference`
    lora: bool
    vae: torch.nn.Module
    tokenizers: list  # SDXL: two, with their text encoders
    text_encoders: list
    clip: torch.nn.Module  # for the pair weights
    clip_tokenizer: object
    empty_prompt: torch.Tensor = None  # what prompt dropout conditions on
    empty_pooled: torch.Tensor = None


def load_models(cfg, device, dtype):
    """Policy and reference UNets, VAE, text encoders and the pair-weight CLIP, all but the policy frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    base, xl = model_folder(cfg), IS_XL[cfg.model]
    scheduler = pretrained(DDPMScheduler, base, subfolder="scheduler")
    if scheduler.config.prediction_type != "epsilon":
        sys.exit(f"rpo.py: {base} predicts {scheduler.config.prediction_type}; this script trains epsilon "
                 f"models")
    unet, ref_unet = load_unets(cfg, base, device, dtype)
    if cfg.model == "sdxl" and dtype == torch.float16 and not cfg.random_init:  # SDXL's VAE overflows in fp16
        vae = pretrained(AutoencoderKL, "madebyollin/sdxl-vae-fp16-fix")
    else:
        vae = pretrained(AutoencoderKL, base, subfolder="vae")
    suffixes = ["", "_2"] if xl else [""]
    tokenizers = [pretrained(CLIPTokenizer, base, subfolder="tokenizer" + s) for s in suffixes]
    encoder_classes = dict(zip(suffixes, [CLIPTextModel, CLIPTextModelWithProjection]))
    text_encoders = [pretrained(encoder_classes[s], base, subfolder="text_encoder" + s) for s in suffixes]
    clip_id = cfg.clip or os.path.join(base, "clip")
    clip, clip_tokenizer = pretrained(CLIPModel, clip_id), pretrained(CLIPTokenizer, clip_id)
    for frozen in [vae, clip, *text_encoders]:
        frozen.requires_grad_(False).eval().to(device, dtype)
    m = Models(base, xl, device, dtype, scheduler, unet, ref_unet, bool(cfg.lora_rank or cfg.init_lora), vae,
               tokenizers, text_encoders, clip, clip_tokenizer)
    m.empty_prompt, m.empty_pooled = encode_prompts(m, [""])
    return m


def load_unets(cfg, base, device, dtype):
    """The policy UNet (fp32 master weights) and a frozen reference copy in the compute dtype. With LoRA the
    UNet is frozen in the compute dtype, only its adapters train, and there is no copy (None): the reference
    is the same UNet with its trained adapters switched off (see `reference`)."""
    from diffusers import UNet2DConditionModel
    if cfg.init_unet:
        unet = pretrained(UNet2DConditionModel, cfg.init_unet)
    else:
        unet = pretrained(UNet2DConditionModel, base, subfolder="unet")
    unet.to(device).train()
    if cfg.lora_rank or cfg.init_lora:
        unet.requires_grad_(False).to(dtype)
        add_lora(cfg, unet)
        ref_unet = None
    else:
        ref_unet = copy.deepcopy(unet).requires_grad_(False).eval().to(dtype)
    if cfg.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    if device.type == "cuda":
        for each in (unet, ref_unet or unet):
            each.to(memory_format=torch.channels_last)
    return unet, ref_unet


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for it, saving and loading


def add_lora(cfg, unet):
    """Trainable LoRA adapters ('default', fp32) on the frozen UNet: new ones, whose zero up-projection makes
    the policy equal the reference before the first step, or a previous run's (--init_lora), together with a
    frozen copy of them ('reference') that is then the reference model."""
    from peft import LoraConfig
    if cfg.init_lora:
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter joins the first: intended
                warnings.simplefilter("ignore")
                for name in ("reference", "default"):
                    unet.load_lora_adapter(cfg.init_lora, prefix="unet", adapter_name=name,
                                           weight_name=LORA_FILE)
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
    """SD1.5: last hidden states. SDXL: penultimate states of both encoders concatenated, and the pooled
    output of the second."""
    states = []
    for tokenizer, encoder in zip(m.tokenizers, m.text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(m.device)
        out = encoder(ids, output_hidden_states=m.xl)
        states.append(out.hidden_states[-2] if m.xl else out.last_hidden_state)
    pooled = out.text_embeds if m.xl else None  # out: the second encoder's
    return torch.cat(states, dim=-1), pooled


@torch.no_grad()
def encode_images(m, pixels):
    """uint8 [N,3,H,W] -> scaled VAE latents (posterior mean: deterministic, so cached latents are exact)."""
    x = pixels.to(m.device, non_blocking=True).to(m.dtype) / 127.5 - 1
    return m.vae.encode(x).latent_dist.mode() * m.vae.config.scaling_factor


# -------------------------------------------------------------------------------------------- data
# Rows follow Pick-a-Pic v2: caption, jpg_0, jpg_1 (encoded images), label_0 (1, 0.5, 0). A source is a list
# of files: parquet files (local, or a hub dataset's through hf:// URLs) or the toy data's virtual files of
# TOY_FILE_ROWS generated rows. Every source goes through the same sharding, shuffling, checks and decoding.
COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
SKIP_KEYS = ("ties", "bad_caption", "bad_label", "bad_image", "small")
TOY_FILE_ROWS = 16
TOY_WORLDS = ("toy", "toy-subject")
COLORS = dict(red=(220, 40, 40), green=(40, 180, 60), blue=(40, 70, 220), yellow=(240, 220, 40),
              purple=(140, 50, 170), orange=(250, 140, 20), white=(245, 245, 245), gray=(128, 128, 128))

CIRCLE = [(math.cos(a * math.pi / 16), math.sin(a * math.pi / 16)) for a in range(32)]
OUTLINES = dict(circle=CIRCLE, square=[(-1, -1), (1, -1), (1, 1), (-1, 1)],
                triangle=[(0, -1), (1, 1), (-1, 1)], diamond=[(0, -1), (1, 0), (0, 1), (-1, 0)])


def is_held_out(color, shape):
    """One in five (color, shape) pairs never appears in a training caption."""
    return (list(COLORS).index(color) + 3 * list(OUTLINES).index(shape)) % 5 == 0


def toy_captions(split):
    """Every 'a {color} {shape} on a {bg} background'. One in five (color, shape) pairs is held out from
    'train'; of those 'heldout' captions, every other one is in 'validation' (for choosing settings) and the
    rest in 'test'."""
    subjects = [(c, s, b) for c in COLORS for s in OUTLINES for b in COLORS if b != c]
    if split == "train":
        return [f"a {c} {s} on a {b} background" for c, s, b in subjects if not is_held_out(c, s)]
    held_out = [f"a {c} {s} on a {b} background" for c, s, b in subjects if is_held_out(c, s)]
    return {"heldout": held_out, "validation": held_out[0::2], "test": held_out[1::2]}[split]


def draw_toy(caption, rng, stripes, outline, size=64):
    """A shape on a background, with or without white stripes across it and a thick black outline."""
    _, color, shape, _, _, bg, _ = caption.split(" ")
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    points = [(cx + r * x, cy + r * y) for x, y in OUTLINES[shape]]
    img = Image.new("RGB", (size, size), COLORS[bg])
    ImageDraw.Draw(img).polygon(points, fill=COLORS[color])
    if stripes:
        mask, striped = Image.new("L", (size, size), 0), img.copy()
        ImageDraw.Draw(mask).polygon(points, fill=255)
        for k in range(-size, size, size // 8):
            ImageDraw.Draw(striped).line([(k, 0), (k + size, size)], fill=(255, 255, 255), width=size // 32)
        img = Image.composite(striped, img, mask)
    if outline:
        ImageDraw.Draw(img).polygon(points, outline=(0, 0, 0), width=size // 16)
    return img


def toy_styles(world, caption):
    """(stripes, outline) of the winner and of the loser. 'toy': winners have both, losers neither.
    'toy-subject': the preferred style depends on the subject, stripes for circles and triangles, an outline
    for squares and diamonds; each loser wears the other group's style."""
    if world == "toy":
        return (True, True), (False, False)
    round_ = caption.split(" ")[2] in ("circle", "triangle")
    return ((True, False), (False, True)) if round_ else ((False, True), (True, False))


def toy_row(world, split, i, seed=1234):
    """Preference pair i of a toy world in Pick-a-Pic's schema; label_0 says which of jpg_0/jpg_1 is the
    winner."""
    rng = random.Random(f"{world}-{split}-{seed}-{i}")
    caps = toy_captions(split)
    cap = caps[rng.randrange(len(caps))]
    winner_first = rng.random() < 0.5
    winner, loser = toy_styles(world, cap)
    encoded = []
    for style in ((winner, loser) if winner_first else (loser, winner)):
        buf = io.BytesIO()
        draw_toy(cap, rng, *style).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    return dict(caption=cap, jpg_0=encoded[0], jpg_1=encoded[1], label_0=1.0 if winner_first else 0.0)


def toy_rows(split, n, world="toy"):
    return (toy_row(world, split, i) for i in range(n))


def parquet_files(path):
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    else:
        files = sorted(glob.glob(path))
    if not files:
        sys.exit(f"rpo.py: no parquet files at {path!r}; pass a parquet file, a folder of them or a glob")
    return files


def source_files(cfg, source, split, max_rows=0):
    """(path, rows) of each file of a source, in a fixed order; rows None means the whole file, counted from
    its footer when a reader reaches it. max_rows keeps the first rows in file order."""
    if source in TOY_WORLDS:
        n = max_rows or cfg.toy_pairs
        return [(f"{source}:{split}:{lo}", min(TOY_FILE_ROWS, n - lo)) for lo in range(0, n, TOY_FILE_ROWS)]
    files, left = [], max_rows
    for path in dataset_paths(cfg, source, split):
        files.append((path, min(left, file_length((path, None))) if max_rows else None))
        left -= files[-1][1] or 0
        if max_rows and not left:
            break
    return files


def dataset_paths(cfg, source, split):
    """The parquet files of a local source, or of a hub dataset's split: the ones `datasets` resolves for it,
    as hf:// URLs pinned to the dataset's current commit. Checked for Pick-a-Pic's columns."""
    where = cfg.data_id if source == "pickapic" else source
    try:
        if source == "pickapic":
            import datasets
            data_files = datasets.load_dataset_builder(cfg.data_id).config.data_files
            if split not in data_files:
                raise KeyError(f"no split {split!r}, only {sorted(data_files)}")
            paths = list(data_files[split])
        else:
            paths = parquet_files(source)
        missing = [c for c in COLUMNS if c not in parquet(paths[0]).schema_arrow.names]
    except Exception as e:  # any network, auth or format error: one line, with what to do instead
        sys.exit(f"rpo.py: cannot read dataset {where!r} (split {split!r}): {first_line(e)}. Pass a local "
                 f"copy with --data /path/to/parquet, or another hub id with --data_id")
    if missing:
        sys.exit(f"rpo.py: dataset {where!r} lacks column(s) {missing}; rows need {list(COLUMNS)} "
                 f"(Pick-a-Pic v2 schema)")
    return paths


@functools.lru_cache(maxsize=8)
def parquet(path):
    import fsspec  # local paths and hf:// URLs alike: a hub file is read by byte ranges, not downloaded
    import pyarrow.parquet as pq
    return pq.ParquetFile(fsspec.open(path, "rb").open())


@functools.lru_cache(maxsize=2)  # consecutive windows share a row group: it is read once
def row_group(path, g):
    return parquet(path).read_row_group(g, columns=list(COLUMNS))


def file_length(file):
    path, rows = file
    return rows if rows is not None else parquet(path).metadata.num_rows


def read_rows(file, a, b):
    """Rows a..b-1 of a file, reading only the parquet row groups that hold them."""
    path, _ = file
    if path.split(":")[0] in TOY_WORLDS:
        world, split, lo = path.split(":")
        return [toy_row(world, split, int(lo) + i) for i in range(a, b)]
    if path.endswith(".pt"):  # a cache file (see build_cache)
        return [(cache_file(path), r) for r in range(a, b)]
    meta, rows, start = parquet(path).metadata, [], 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if start < b and a < start + n:
            lo = max(a, start)
            rows += row_group(path, g).slice(lo - start, min(b, start + n) - lo).to_pylist()
        start += n
    return rows


def skip_reason(row):
    """Why a row cannot be trained on (a counter in SKIP_KEYS), or None."""
    if not isinstance(row["caption"], str):
        return "bad_caption"
    if row["label_0"] not in (0, 0.5, 1):
        return "bad_label"
    return "ties" if row["label_0"] == 0.5 else None


def rows_in_order(cfg, source, split, counts=None):
    """(pair id, row) of a source's usable rows in file order, skips counted (held-out pairs, eval_style)."""
    for k, file in enumerate(source_files(cfg, source, split)):
        n = file_length(file)
        for a in range(0, n, 256):
            for r, row in enumerate(read_rows(file, a, min(n, a + 256)), a):
                reason = skip_reason(row)
                if reason is None:
                    yield f"{k}:{r}", row
                elif counts is not None:
                    counts[reason] += 1


def rank_rows(cfg, files, epoch, rank, world, at=None):
    """(pair id, row, where to resume after it) for this rank's share of an epoch. The epoch's shuffled file
    list is dealt round-robin to the ranks, so a rank reads only its own files. It reads them in windows of
    --shuffle_buffer rows, each shuffled on its own: resuming at (file, row, window, taken) reads one
    window."""
    mine = random.Random(f"{cfg.seed}-files-{epoch}").sample(range(len(files)), len(files))[rank::world]
    k, row, window, taken = at or (0, 0, 0, 0)  # the window starts at `row` of this rank's k-th file
    while k < len(mine):
        rows, ids, (k_next, row_next) = read_window(cfg, files, mine, k, row)
        shuffle = random.Random(f"{cfg.seed}-window-{epoch}-{rank}-{window}")
        order = shuffle.sample(range(len(rows)), len(rows))
        for t, i in enumerate(order[taken:], taken + 1):
            after = (k, row, window, t) if t < len(rows) else (k_next, row_next, window + 1, 0)
            yield ids[i], rows[i], after
        k, row, window, taken = k_next, row_next, window + 1, 0


def read_window(cfg, files, mine, k, row):
    """--shuffle_buffer rows (fewer at the end) from `row` of this rank's k-th file on, running on into its
    next files: the rows, their pair ids and where the next window starts."""
    rows, ids = [], []
    while len(rows) < cfg.shuffle_buffer and k < len(mine):
        file = files[mine[k]]
        n = file_length(file)
        stop = min(n, row + cfg.shuffle_buffer - len(rows))
        rows += read_rows(file, row, stop)
        ids += [f"{mine[k]}:{r}" for r in range(row, stop)]
        k, row = (k + 1, 0) if stop == n else (k, stop)
    return rows, ids, (k, row)


def coin(seed, epoch, index, what):
    """A per-pair random number fixed by (seed, epoch, pair): the same with or without cache, ranks or
    resume."""
    return random.Random(f"{seed}-{epoch}-{index}-{what}").random()


class PairJob(NamedTuple):
    """One row for a decoding worker, with how to prepare it."""
    row: dict
    index: object  # the pair id
    resolution: int
    flip: bool = False
    crop_seed: str = None  # None: a centre crop
    time_ids: str = "constant"  # SDXL's conditioning: see Config.time_ids


def decode(blob):
    if isinstance(blob, dict):  # datasets' Image feature stores {'bytes': ..., 'path': ...}
        blob = blob.get("bytes")
    img = Image.open(io.BytesIO(blob))
    img.load()
    return img.convert("RGB")


def prepare_pair(job):
    """Check, decode, winner first, resize and crop, flip: in a worker process. Returns a pair or a skip
    reason."""
    row, index, resolution, flip, crop_seed, time_ids = PairJob(*job)
    reason = skip_reason(row)
    if reason:
        return reason
    try:
        first, second = decode(row["jpg_0"]), decode(row["jpg_1"])
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


def pair_batches(cfg, rank, world, start=None, pool=None):
    """Endless (M pairs, state after them) for this rank: decoded pairs, or encoded ones from --cache. The
    state is where to resume: epoch, place in the rank's share (see rank_rows) and the skip counts so far.
    Rows are decoded ahead in --workers processes but taken in order, so pairs, counts and states never depend
    on the workers. A rank that ends its share of an epoch goes on with its next epoch: no rank waits for
    another."""
    if cfg.cache:  # cached pairs are read here, not decoded in the workers
        files, prepare, pool = cache_files(cfg), cached_pair, None
    else:
        files, prepare = source_files(cfg, cfg.data, cfg.split, cfg.max_pairs), prepare_pair
    if len(files) < world:
        sys.exit(f"rpo.py: {len(files)} data file(s) for {world} ranks; each rank reads its own files, so "
                 f"split the data into at least {world} parquet files")
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
    """(where to resume after the row, PairJob) for this rank's rows of an epoch, with each pair's flip and
    crop fixed by (seed, epoch, pair)."""
    for pid, row, after in rank_rows(cfg, files, epoch, rank, world, at):
        flip = not cfg.no_flip and coin(cfg.seed, epoch, pid, "flip") < 0.5
        crop_seed = f"{cfg.seed}-{epoch}-{pid}" if cfg.random_crop else None
        yield after, PairJob(row, pid, cfg.resolution, flip, crop_seed, cfg.time_ids)


def prepared_in_order(prepare, jobs, pool, ahead):
    """(at, prepare(job)) for each (at, job), in order; with a pool, up to `ahead` jobs run in the workers
    while the caller works on the results before them."""
    if pool is None:
        for at, job in jobs:
            yield at, prepare(job)
        return
    running = deque()
    for at, job in jobs:
        running.append((at, pool.apply_async(prepare, (job,))))
        if len(running) > ahead:
            done_at, result = running.popleft()
            yield done_at, result.get()
    for done_at, result in running:
        yield done_at, result.get()


def decoded(jobs, pool=None):
    """prepare_pair over jobs, in order: pairs, or skip reasons for the rows that cannot be used."""
    return list(pool.map(prepare_pair, jobs) if pool else map(prepare_pair, jobs))


def collate(pairs):
    return dict(index=[p["index"] for p in pairs], caption=[p["caption"] for p in pairs],
                winner=torch.from_numpy(np.stack([p["winner"] for p in pairs])),
                loser=torch.from_numpy(np.stack([p["loser"] for p in pairs])),
                time_ids_w=torch.tensor([p["winner_time_ids"] for p in pairs], dtype=torch.float32),
                time_ids_l=torch.tensor([p["loser_time_ids"] for p in pairs], dtype=torch.float32))


# ------------------------------------------------------------------------------- encoded pairs, cache
# The training step consumes encoded pairs: VAE latents, text-encoder states, SDXL time ids and the pair
# embeddings f. They are computed on the fly, or once per dataset with --cache and read back every epoch.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CACHE_CHUNK = 256  # rows decoded and encoded at a time while building the cache
WEIGHT_TIME = dict(seconds=0.0, in_flight=deque())  # pair-embedding time, for the end-of-run time share


# f(c, x) = normalize(normalize(text(c)) + normalize(image(x)));  --embed text | image | both
@torch.no_grad()
def pair_embeddings(m, captions, pixels, embed):
    """One CLIP vector per (caption, image); pixels uint8 [N,3,H,W] with N a multiple of len(captions)."""
    parts = []
    if embed in ("text", "both"):
        ids = m.clip_tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        text = F.normalize(m.clip.get_text_features(ids.to(m.device)).pooler_output.float(), dim=-1)
        parts.append(text.repeat(len(pixels) // len(captions), 1))
    if embed in ("image", "both"):
        x = clip_pixels(pixels.to(m.device), m.clip.config.vision_config.image_size)
        parts.append(F.normalize(m.clip.get_image_features(x).pooler_output.to(m.dtype).float(), dim=-1))
    return F.normalize(sum(parts), dim=-1)


def clip_pixels(pixels, size):
    """uint8 images [N,3,H,W] -> CLIP's input: resized to size x size, scaled by CLIP's mean and std."""
    x = F.interpolate(pixels.float() / 255, size=(size, size), mode="bicubic", antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (x - mean) / std


def clock(device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def add_weight_time(interval=None):
    """Adds a (start, end) of pair-embedding time to the running total, with any earlier ones now done:
    perf_counter seconds, or CUDA events, read once the GPU has passed them (a query, never a sync), so only
    the few intervals still in flight are kept. Returns the total so far."""
    in_flight = WEIGHT_TIME["in_flight"]
    if interval:
        in_flight.append(interval)
    while in_flight and (isinstance(in_flight[0][1], float) or in_flight[0][1].query()):
        start, end = in_flight.popleft()
        WEIGHT_TIME["seconds"] += end - start if isinstance(start, float) else start.elapsed_time(end) / 1000
    return WEIGHT_TIME["seconds"]


@torch.no_grad()
def encode_pairs(m, batch, embed, with_f=True):
    """Decoded pairs (see collate) -> the tensors the loss needs, all on the device."""
    M = len(batch["caption"])
    pixels = torch.cat([batch["winner"], batch["loser"]])
    latents = encode_images(m, pixels)
    prompt, pooled = encode_prompts(m, batch["caption"])
    enc = dict(index=batch["index"], latents_w=latents[:M], latents_l=latents[M:], prompt=prompt,
               pooled=pooled, time_ids_w=batch["time_ids_w"].to(m.device),
               time_ids_l=batch["time_ids_l"].to(m.device))
    if with_f:
        start = clock(m.device)
        f = pair_embeddings(m, batch["caption"], pixels, embed)
        add_weight_time((start, clock(m.device)))
        enc.update(f_w=f[:M], f_l=f[M:])
    return enc


def cache_meta(cfg, m):
    return dict(base=m.base, model=cfg.model, resolution=cfg.resolution, clip=cfg.clip, embed=cfg.embed,
                data=cfg.data, data_id=cfg.data_id if cfg.data == "pickapic" else None, split=cfg.split,
                max_pairs=cfg.max_pairs, time_ids=cfg.time_ids, dtype=str(m.dtype))


def atomic_save(obj, path):
    """Write then rename: a kill mid-write leaves the previous file whole. JSON for .json, else torch.save."""
    if path.endswith(".json"):
        with open(path + ".tmp", "w") as fh:
            json.dump(obj, fh)
    else:
        torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def build_cache(cfg, m, rank, world, pool):
    """Encode every row of the source once, both flips: one cache file per source file, written by rank
    k mod world (each rank reads its share of the data) under a temporary name, then renamed, so an
    interrupted build resumes at the files still missing. A cache file keeps each row's skip reason, so the
    cached epochs skip and count exactly what the uncached ones would."""
    os.makedirs(cfg.cache, exist_ok=True)
    meta, meta_path = cache_meta(cfg, m), os.path.join(cfg.cache, "meta.json")
    if cache_is_built(cfg, meta, meta_path, rank):
        return
    files = source_files(cfg, cfg.data, cfg.split, cfg.max_pairs)
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
            sys.exit(f"rpo.py: cache {cfg.cache} was built for {old}, not {meta}; use another --cache folder")
        return "rows" in old
    if rank == 0:
        atomic_save(meta, meta_path)
    return False


def encode_file(cfg, m, file, k, pool):
    """The cache of source file k: every row's skip reason, and the usable rows' encodings under both flips
    as a few stacked tensors (opened with mmap, a pair costs only its own bytes)."""
    n, skip, small, parts = file_length(file), [], [], []
    for a in range(0, n, CACHE_CHUNK):  # CACHE_CHUNK decoded rows in memory at a time
        rows = read_rows(file, a, min(n, a + CACHE_CHUNK))
        jobs = [PairJob(row, f"{k}:{r}", cfg.resolution, time_ids=cfg.time_ids)
                for r, row in enumerate(rows, a)]
        prepared = decoded(jobs, pool)
        skip += [p if isinstance(p, str) else None for p in prepared]
        usable = [p for p in prepared if not isinstance(p, str)]
        small += [p.pop("small") for p in usable]
        for i in range(0, len(usable), cfg.batch):
            parts.append(encode_both_flips(cfg, m, collate(usable[i:i + cfg.batch])))
    tensors = {}
    for key in ("latents", "f", "prompt", "pooled", "time_ids"):
        stored = parts and parts[0][key] is not None  # SD1.5 has no pooled states
        tensors[key] = torch.cat([p[key] for p in parts]).cpu() if stored else None
    return dict(skip=skip, small=small, **tensors)


def encode_both_flips(cfg, m, batch):
    """A micro-batch's encodings, unflipped and flipped (images and crop time ids mirrored), as the cache
    stores them: latents, f and time ids as [n, flip, winner/loser, ...]."""
    def flipped_ids(ids):
        rows = [mirrored(row) for row in ids.tolist()]
        return torch.tensor(rows, dtype=ids.dtype, device=ids.device)
    flip = dict(batch, winner=batch["winner"].flip(-1), loser=batch["loser"].flip(-1),
                time_ids_w=flipped_ids(batch["time_ids_w"]), time_ids_l=flipped_ids(batch["time_ids_l"]))
    plain, flipped = encode_pairs(m, batch, cfg.embed), encode_pairs(m, flip, cfg.embed)
    return dict(prompt=plain["prompt"], pooled=plain["pooled"],
                **{key: by_flip_and_side(plain, flipped, key) for key in ("latents", "f", "time_ids")})


def by_flip_and_side(plain, flipped, key):
    return torch.stack([torch.stack([e[key + "_w"], e[key + "_l"]], 1) for e in (plain, flipped)], 1)


def cache_path(cfg, k):
    return os.path.join(cfg.cache, f"file-{k:06d}.pt")


def cache_files(cfg):
    """The cache as a source: (path, rows) per cache file, in the order of the source's files."""
    rows = json.load(open(os.path.join(cfg.cache, "meta.json")))["rows"]
    return [(cache_path(cfg, k), n) for k, n in enumerate(rows)]


@functools.lru_cache(maxsize=64)
def cache_file(path):
    c = torch.load(path, mmap=True)
    c["slot"] = np.cumsum([s is None for s in c["skip"]]) - 1  # a row's place among the file's usable rows
    return c


def cached_pair(job):
    """A cached row as prepare_pair would give it: its skip reason, or its encodings under the job's flip."""
    (c, r), index, flip = job.row, job.index, job.flip
    if c["skip"][r]:
        return c["skip"][r]
    s = c["slot"][r]
    return dict(index=index, small=c["small"][s], latents=c["latents"][s, int(flip)], f=c["f"][s, int(flip)],
                prompt=c["prompt"][s], pooled=None if c["pooled"] is None else c["pooled"][s],
                time_ids=c["time_ids"][s, int(flip)])


def training_batches(cfg, m, rank, world, start, pool):
    """(encoded micro-batch, state to resume after it) forever, from the cache or from decoded rows."""
    for pairs, state in pair_batches(cfg, rank, world, start, pool):
        if cfg.cache:
            yield cached_batch(pairs, m), state
        else:
            yield encode_pairs(m, collate(pairs), cfg.embed, with_f=cfg.loss == "rpo"), state


def cached_batch(pairs, m):
    """Cached pairs (see cached_pair) -> the tensors the loss needs, all on the device."""
    latents, f, time_ids = (stack_on(m.device, pairs, key) for key in ("latents", "f", "time_ids"))
    return dict(index=[p["index"] for p in pairs], latents_w=latents[:, 0], latents_l=latents[:, 1],
                prompt=stack_on(m.device, pairs, "prompt"),
                pooled=stack_on(m.device, pairs, "pooled") if m.xl else None,
                time_ids_w=time_ids[:, 0], time_ids_l=time_ids[:, 1], f_w=f[:, 0], f_l=f[:, 1])


def stack_on(device, pairs, key):
    return torch.stack([p[key] for p in pairs]).to(device)


def heldout_pairs(cfg, m):
    """Up to eval_pairs held-out pairs in file order, unflipped, encoded once in micro-batches of --batch
    pairs (one VAE call over all of them does not fit a GPU at 1024 px); None without a held-out source."""
    source = cfg.eval_data or (cfg.data if cfg.data in (*TOY_WORLDS, "pickapic") else None)
    if not source or cfg.eval_pairs <= 0:
        return None
    split = cfg.eval_split or default_eval_split(source)
    rows = itertools.islice(rows_in_order(cfg, source, split), cfg.eval_pairs)
    prepared = decoded([PairJob(row, i, cfg.resolution, time_ids=cfg.time_ids) for i, row in rows])
    pairs = [p for p in prepared if not isinstance(p, str)]
    if not pairs:
        sys.exit(f"rpo.py: no usable held-out pairs in {source!r} (split {split!r})")
    return [encode_pairs(m, collate(pairs[i:i + cfg.batch]), cfg.embed, with_f=False)
            for i in range(0, len(pairs), cfg.batch)]


def default_eval_split(source):
    if source in TOY_WORLDS:
        return "heldout"
    return "validation_unique" if source == "pickapic" else "train"


# ------------------------------------------------------------------------------------- pair weights
# d_ij = 1 - cos(f(c_i, x_w_i), f(c_j, x_l_j));  w_ij = exp(-d_ij / tau) / sum_j' exp(-d_ij' / tau)
def contrast_weights(f_w, f_l, tau):
    d = 1 - F.cosine_similarity(f_w.float()[:, None], f_l.float()[None, :], dim=-1)  # fp32 under autocast too
    return torch.softmax(-d / tau, dim=1)


# -------------------------------------------------------------------------------------------- loss
# err = mean over C,H,W of (eps_pred - eps)^2,  per sample
def per_sample_error(eps_pred, eps):
    return (eps_pred.float() - eps.float()).pow(2).mean(dim=(1, 2, 3))


# L = -mean_{i,j} log sigmoid(-(beta/2) w_ij (s_w[i] - s_l[j])),  s = err - ref_err;  w = None: DPO's diagonal
def rpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta, weights=None):
    s_w, s_l = err_w - ref_err_w, err_l - ref_err_l
    if weights is None:
        return -F.logsigmoid(-(beta / 2) * (s_w - s_l)).mean()
    return -F.logsigmoid(-(beta / 2) * weights * (s_w[:, None] - s_l[None, :])).mean()


def preference_metrics(err_w, err_l, ref_err_w, ref_err_l, beta, weights=None):
    """Implicit accuracy (s_w < s_l, ties half), reward margin (beta/2)(s_l - s_w), mean w_ii and the
    diagonal's effective beta x w_ii, policy and reference MSE."""
    s_w, s_l = (err_w - ref_err_w).detach().float(), (err_l - ref_err_l).detach().float()
    w_diag = weights.diagonal().mean() if weights is not None else s_w.new_ones(())
    return dict(accuracy=((s_w < s_l).float() + 0.5 * (s_w == s_l).float()).mean(),
                margin=(beta / 2 * (s_l - s_w)).mean(), w_diag=w_diag, beta_w_diag=beta * w_diag,
                mse=torch.cat([err_w, err_l]).detach().mean(),
                ref_mse=torch.cat([ref_err_w, ref_err_l]).mean())


def pair_noise(keys, latents, T):
    """Noise and timestep of each pair from its own seeded generator: winner and loser share them. Drawn on
    the CPU and copied over, so a pair gets the same draw on any device."""
    noise, t = [], []
    for key in keys:
        g = torch.Generator().manual_seed(random.Random(key).getrandbits(63))
        noise.append(torch.randn(latents.shape[1:], generator=g))
        t.append(torch.randint(0, T, (1,), generator=g))
    return torch.stack(noise).to(latents.device, latents.dtype), torch.cat(t).to(latents.device)


def denoising_errors(unet, m, latents, noise, t, prompt, pooled, time_ids):
    noisy = m.scheduler.add_noise(latents, noise, t)
    extra = dict(added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids)) if m.xl else {}
    return per_sample_error(unet(noisy, t, prompt, **extra).sample, noise)


def pair_errors(unet, m, enc, keys, prompt=None, pooled=None, winners_only=False):
    """Policy (or reference) errors of winners and losers, batched in one forward."""
    if prompt is None:  # no prompt dropout: the pairs' own captions
        prompt, pooled = enc["prompt"], enc["pooled"]
    noise, t = pair_noise(keys, enc["latents_w"], m.scheduler.config.num_train_timesteps)
    if winners_only:
        return denoising_errors(unet, m, enc["latents_w"], noise, t, prompt, pooled, enc["time_ids_w"]), None
    err = denoising_errors(unet, m, torch.cat([enc["latents_w"], enc["latents_l"]]), twice(noise), twice(t),
                           twice(prompt), twice(pooled), torch.cat([enc["time_ids_w"], enc["time_ids_l"]]))
    return err.chunk(2)


def twice(x):
    """x for the winners, then again for the losers (SD1.5's pooled states stay None)."""
    return None if x is None else torch.cat([x, x])


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


def preference_step(cfg, m, policy, enc, epoch):
    """Loss and metrics of one micro-batch; prompt dropout blanks the conditioning, never the pair weights."""
    keys = [f"noise-{cfg.seed}-{epoch}-{i}" for i in enc["index"]]
    dropped = [coin(cfg.seed, epoch, i, "drop") < cfg.drop_prompt for i in enc["index"]]
    drop = torch.tensor(dropped, device=m.device)
    prompt = torch.where(drop[:, None, None], m.empty_prompt, enc["prompt"])
    pooled = torch.where(drop[:, None], m.empty_pooled, enc["pooled"]) if m.xl else None
    if cfg.loss == "sft":
        err_w, _ = pair_errors(policy, m, enc, keys, prompt, pooled, winners_only=True)
        return err_w.mean(), dict(mse=err_w.detach().mean())
    err_w, err_l = pair_errors(policy, m, enc, keys, prompt, pooled)
    with torch.no_grad(), reference(m) as ref_unet:
        ref_err_w, ref_err_l = pair_errors(ref_unet, m, enc, keys, prompt, pooled)
    errors, f = [err_w, err_l, ref_err_w, ref_err_l], [enc.get("f_w"), enc.get("f_l")]
    if cfg.global_contrast and dist.is_initialized():  # the M x M matrix spans every rank's pairs
        errors, f = [gather(e) for e in errors], [None if x is None else gather(x) for x in f]
    weights = contrast_weights(*f, cfg.tau) if cfg.loss == "rpo" else None
    return rpo_loss(*errors, cfg.beta, weights), preference_metrics(*errors, cfg.beta, weights)


@torch.no_grad()
def evaluate(cfg, m, heldout, autocast):
    """Held-out implicit accuracy and margin, s averaged over eval_draws fixed (noise, t) draws per pair; the
    held-out micro-batches go through the UNets one at a time."""
    was_training = m.unet.training
    m.unet.eval()
    errs = []  # per micro-batch: err_w, err_l, ref_err_w, ref_err_l, each the mean over the draws
    with autocast:
        for enc in heldout:
            draws = []
            for d in range(cfg.eval_draws):
                keys = [f"eval-{d}-{i}" for i in enc["index"]]
                with reference(m) as ref_unet:
                    ref_errs = pair_errors(ref_unet, m, enc, keys)
                draws.append([*pair_errors(m.unet, m, enc, keys), *ref_errs])
            errs.append([torch.stack(e).mean(0) for e in zip(*draws)])
    m.unet.train(was_training)
    mean = [torch.cat(e) for e in zip(*errs)]
    metrics = preference_metrics(*mean, cfg.beta)
    return dict(accuracy=float(metrics["accuracy"]), margin=float(metrics["margin"]))


# ---------------------------------------------------------------------------------------- training
PEAK_BF16_FLOPS = 989e12  # one H100 SXM, dense bf16; the end-of-run MFU on any CUDA device is against it


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

    @property
    def master(self):
        return self.rank == 0


def set_up(cfg):
    """Device, process group (under torchrun) and precision; then the random-init model folder, built once
    per machine, and the seeds."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp:  # NCCL takes only GPU tensors: everything the loop reduces or gathers is made on `device`
        backend = "nccl" if device.type == "cuda" else "gloo"
        wait = datetime.timedelta(minutes=30)  # while rank 0 evaluates and saves alone, the others wait
        dist.init_process_group(backend, timeout=wait, device_id=device if device.type == "cuda" else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    cfg.out = run_folder(cfg, rank, ddp)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = cfg.precision or ("bf16" if bf16 else "fp32")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if precision != "fp32" else nullcontext()
    if local_rank == 0:
        model_folder(cfg)  # builds the random-init folder once per machine
    if ddp:
        dist.barrier()
    # seeded after any folder build, which draws random weights: new LoRA adapters depend on the seed only
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return Run(device, rank, world, local_rank, ddp, precision, dtype, autocast)


def run_folder(cfg, rank, ddp):
    """--out, or out/run-N: a new N for a fresh run (claimed by creating it, so runs started together differ),
    under --resume the newest that holds a checkpoint; rank 0 picks and every rank takes its pick. A fresh run
    never writes into a folder that holds another run."""
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
    ran = checkpoints(out) + glob.glob(os.path.join(out, "metrics.jsonl"))
    if not cfg.resume and any(os.path.getsize(p) for p in ran):
        sys.exit(f"rpo.py: --out {out} holds a run (checkpoints or metrics.jsonl); pass --resume to continue "
                 f"it, or choose another --out")
    return out


def claim(folder):
    try:
        os.makedirs(folder)
        return True
    except FileExistsError:
        return False


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
        policy = torch.nn.parallel.DistributedDataParallel(m.unet, device_ids=device_ids)
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


def resume(cfg, m, trainer, run):
    """Under --resume, the newest checkpoint in --out restores the trained weights, optimizer, schedule,
    scaler and random states. Returns the step, the non-finite steps so far and every rank's data state
    (0, 0, None without one)."""
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
        return 0, 0, None
    missing = [k for k in dataclasses.asdict(cfg) if k not in ckpt["config"]]
    if missing:
        sys.exit(f"rpo.py: the checkpoint in {cfg.out} was written by an older rpo.py, without "
                 f"--{', --'.join(missing)}; resume it with that version, or start a new --out from its "
                 f"weights (--init_unet or --init_lora)")
    changed = changed_settings(ckpt["config"], cfg, run.world)
    if changed:
        sys.exit(f"rpo.py: {cfg.out} was trained with other settings: {', '.join(changed)}. They shape the "
                 f"data order, the model or the loss: resume with the run's values, or start a new --out")
    if len(ckpt["data_states"]) != run.world:  # the data order depends on the world size
        sys.exit(f"rpo.py: checkpoint was written by {len(ckpt['data_states'])} ranks; resume with as many")
    missing, unexpected = m.unet.load_state_dict(ckpt["unet"], strict=False)  # LoRA: adapters only
    missing = [k for k in missing if not m.lora or ".default." in k]
    if unexpected or missing:
        sys.exit(f"rpo.py: the checkpoint in {cfg.out} holds other weights than this run trains, such as "
                 f"{(unexpected or missing)[0]}")
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.schedule.load_state_dict(ckpt["lr_schedule"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if run.master and ckpt["step"]:
        print(f"resumed from step {ckpt['step']}", file=sys.stderr)
    return ckpt["step"], ckpt["nonfinite"], ckpt["data_states"]


def changed_settings(saved, cfg, world):
    """'--flag saved (now new)' for each setting that differs from a checkpoint's config and may not. The
    learning rate is compared as the rate --lr or --lr_per_pair gives."""
    now = dataclasses.asdict(cfg)
    rates = learning_rate(Config(**{k: saved[k] for k in now}), world), learning_rate(cfg, world)
    changed = []
    for k, v in now.items():
        if k == "lr" and not math.isclose(*rates, rel_tol=1e-9):
            changed.append(f"--lr {rates[0]:g} (now {rates[1]:g})")
        elif k not in (*FREE_ON_RESUME, "lr", "lr_per_pair") and saved[k] != v:
            changed.append(f"--{k} {saved[k]} (now {v})")
    return changed


def cut_metrics_log(out, step):
    """DIR/metrics.jsonl keeps the steps up to `step`: those after it (all, from step 0) are logged again."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.jsonl")
    lines = open(path).readlines() if os.path.exists(path) else []
    with open(path, "w") as fh:
        fh.writelines(line for line in lines if json.loads(line)["step"] <= step)


def describe(cfg, m, run, trainer):
    """The start-up line: what trains on what, the effective batch and the learning rate it gives, and how
    many pairs each row of w is normalised over (the diagonal's logit is scaled by w_ii: 1 / that number
    for uniform weights, more where the diagonal pair is the nearest; metrics.jsonl logs it as w_diag)."""
    ranks = f"{run.world} rank(s) ({dist.get_backend()})" if run.ddp else "1 process"
    trained = sum(p.numel() for p in trainer.params) / 1e6
    pairs = cfg.batch * cfg.grad_accum * run.world
    scaled = f" = {cfg.lr_per_pair:g} per pair x {pairs}" if cfg.lr is None else " (--lr)"
    row = cfg.batch * (run.world if cfg.global_contrast else 1)
    weights = f", each row of w over {row} pairs" if cfg.loss == "rpo" else ""
    return (f"training {cfg.model} ({m.base}) with {cfg.loss} on {cfg.data} into {cfg.out}: {ranks} x "
            f"{cfg.batch} pairs x {cfg.grad_accum} accumulation = {pairs} pairs a step, lr "
            f"{learning_rate(cfg, run.world):g}{scaled}{weights}, {run.precision}, {trained:.1f}M trainable "
            f"parameters{' (LoRA)' if m.lora else ''}")


def train(cfg, m, run, trainer, batches, heldout, step, nonfinite_total):
    """The training loop from `step` to --max_steps. Every --save_every steps and at the end: held-out
    metrics, a checkpoint and samples. Returns the logged records, the loop's timing, its last micro-batch."""
    start_step, nonfinite_run, history, enc = step, 0, [], None
    step_seconds, saving = [], 0.0  # saving: seconds of evaluation, checkpoints and samples: not throughput
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not run.master, dynamic_ncols=True)
    WEIGHT_TIME.update(seconds=0.0, in_flight=deque())  # count only the training loop's pair embeddings
    t0 = t_first = time.perf_counter()
    while step < cfg.max_steps:
        t_step, lr = time.perf_counter(), trainer.schedule.get_last_lr()[0]
        sums, enc, state = accumulate_gradients(cfg, m, trainer.policy, batches, run.autocast, trainer.scaler,
                                                run.ddp)
        logged, finite, absorbed = optimizer_step(trainer, sums, state["counts"], run)
        nonfinite_run = 0 if finite or absorbed else nonfinite_run + 1
        nonfinite_total += not finite
        step += 1
        step_seconds.append(time.perf_counter() - t_step)
        if step == start_step + 1:  # the throughput leaves out the first step (compilation, warm-up)
            t_first = time.perf_counter()
        record = dict(step=step, lr=lr, **logged, nonfinite=nonfinite_total)
        history.append(record)
        stop = nonfinite_run >= cfg.max_nonfinite
        if step % cfg.save_every == 0 or step == cfg.max_steps or stop:
            t_save = time.perf_counter()
            record.update(save_point(cfg, m, run, trainer, heldout, step, nonfinite_total, state))
            saving += time.perf_counter() - t_save
        if run.master:
            log_step(cfg, record, bar)
        if stop:
            sys.exit(f"rpo.py: {nonfinite_run} non-finite steps (loss or gradient) in a row at step {step}; "
                     f"stopped with a checkpoint of the last good weights in {cfg.out}. Lower --lr or "
                     f"--beta, or use --precision bf16/fp32")
    bar.close()
    end = time.perf_counter()
    timing = dict(steps=step - start_step, seconds=end - t0, timed=end - t_first - saving, saving=saving,
                  step_seconds=step_seconds)
    return history, timing, enc


def accumulate_gradients(cfg, m, policy, batches, autocast, scaler, ddp):
    """Forward and backward over --grad_accum micro-batches (DDP syncs gradients on the last one only).
    Returns the mean of each metric as tensors on the training device, and the last micro-batch with the data
    state after it."""
    sums = {}
    for micro in range(cfg.grad_accum):
        enc, state = next(batches)
        sync = micro == cfg.grad_accum - 1 or not ddp
        with (nullcontext() if sync else policy.no_sync()), autocast:
            loss, metrics = preference_step(cfg, m, policy, enc, state["epoch"])
        scaler.scale(loss / cfg.grad_accum).backward()
        for k, v in dict(metrics, loss=loss.detach()).items():
            sums[k] = sums.get(k, 0) + v.float() / cfg.grad_accum
    return sums, enc, state


def optimizer_step(trainer, sums, counts, run):
    """Clip the gradient, reduce what the step logs over the ranks, and step unless the loss or gradient is
    non-finite. Returns the logged values, whether they are finite, and whether the fp16 loss scaler absorbs
    the overflow."""
    trainer.scaler.unscale_(trainer.optimizer)
    sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
    names, vec = step_vector(sums, counts, run.device)
    values = (mean_over_ranks(names, vec, run.world) if run.ddp else vec).tolist()
    logged = {k: int(v) if k in SKIP_KEYS else v for k, v in zip(names, values)}
    # a NaN gradient under a finite loss (bf16 has no GradScaler to catch it) would turn every weight NaN
    finite = math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])
    # fp16: an overflow under a finite loss is the GradScaler's to absorb (it halves its scale), unless
    # the scale is already below 1; only then does it count towards --max_nonfinite
    overflow = not finite and math.isfinite(logged["loss"]) and trainer.scaler.is_enabled()
    absorbed = overflow and trainer.scaler.get_scale() >= 1
    if finite:
        trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    with warnings.catch_warnings():  # torch warns when a skipped first step steps the schedule: intended
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before")
        trainer.schedule.step()  # every step, skipped or not: the warmup follows the step number
    trainer.optimizer.zero_grad(set_to_none=True)
    return logged, finite, absorbed


def step_vector(sums, counts, device):
    """What a step logs, as names and one float64 tensor on the training device: one all-reduce, one copy to
    the host."""
    names = sorted(sums) + list(SKIP_KEYS)
    skipped = torch.tensor([float(counts[k]) for k in SKIP_KEYS], dtype=torch.float64, device=device)
    return names, torch.cat([torch.stack([sums[k] for k in sorted(sums)]).double(), skipped])


def mean_over_ranks(names, vec, world):
    """Metrics are averaged over ranks; skip counts are summed, since each rank reads its own rows."""
    dist.all_reduce(vec)
    summed = torch.tensor([k in SKIP_KEYS for k in names], device=vec.device)
    return torch.where(summed, vec, vec / world)


def save_point(cfg, m, run, trainer, heldout, step, nonfinite_total, state):
    """Held-out metrics (returned, to log), a checkpoint and a sample grid."""
    logged = {}
    if heldout is not None:
        logged = {"heldout_" + k: v for k, v in evaluate(cfg, m, heldout, run.autocast).items()}
    save_checkpoint(cfg, m, trainer, step, nonfinite_total, state, run)
    if run.master and cfg.sample_steps:
        save_samples(cfg, m, os.path.join(cfg.out, f"samples_{step}.png"), run.autocast)
    return logged


def json_line(record):
    """Strict JSON: a value that is not a finite number (a skipped step's loss, SFT's accuracy) is null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in record.items()}, allow_nan=False)


def log_step(cfg, record, bar):
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as fh:
        fh.write(json_line(record) + "\n")
    bar.update(1)
    skipped = sum(record[k] for k in SKIP_KEYS if k not in ("ties", "small"))
    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('accuracy', float('nan')):.2f}",
                    skipped=skipped)


# micro-step FLOPs = 4 x one UNet forward over its 2M images: policy forward + backward 3, reference 1
# (SFT: 1.5); LoRA: 3 (SFT: 1): the frozen UNet's backward computes activation gradients, not weight ones
@torch.no_grad()
def step_flops(cfg, m, enc):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    # the counter misses CPU's fused attention; on CUDA it counts the fused kernels (MATH would take GBs)
    math_attention = sdpa_kernel(SDPBackend.MATH) if m.device.type == "cpu" else nullcontext()
    with FlopCounterMode(display=False) as counter, math_attention, reference(m) as ref_unet:
        unet = getattr(ref_unet, "_orig_mod", ref_unet)  # the eager module under --compile
        pair_errors(unet, m, enc, [f"flops-{i}" for i in enc["index"]])
    policy = 1 + (1 if m.lora else 2)
    return counter.get_total_flops() * (policy / 2 if cfg.loss == "sft" else policy + 1)


def end_of_run(cfg, m, run, history, timing, enc):
    """The end-of-run summary: throughput, FLOPs and peak memory (what benchmarks read), final metrics."""
    n_timed = max(timing["steps"] - 1, 0)
    steps_per_s = n_timed / timing["timed"] if n_timed else timing["steps"] / timing["seconds"]
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # every pair-embedding interval is done
        peak = torch.cuda.max_memory_allocated(run.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    flops_per_s = step_flops(cfg, m, enc) * cfg.grad_accum * steps_per_s  # per rank; counted after the peak
    last = [r["accuracy"] for r in history[-10:] if "accuracy" in r]  # SFT has none
    step_ms = 1000 * statistics.median(timing["step_seconds"][1:] or timing["step_seconds"])
    return dict(steps=timing["steps"], seconds=round(timing["seconds"], 2), steps_per_s=round(steps_per_s, 4),
                pairs_per_s=round(steps_per_s * cfg.batch * cfg.grad_accum * run.world, 2),
                median_step_ms=round(step_ms, 2), tflops_per_s=round(flops_per_s / 1e12, 4),
                mfu=round(flops_per_s / PEAK_BF16_FLOPS, 4) if run.device.type == "cuda" else None,
                peak_mem_mb=round(peak / 2**20, 1),
                weight_time_share=round(add_weight_time() / (timing["seconds"] - timing["saving"]), 4),
                loss=history[-1]["loss"], train_accuracy=round(statistics.fmean(last), 4) if last else None,
                heldout_accuracy=history[-1].get("heldout_accuracy"),
                heldout_margin=history[-1].get("heldout_margin"),
                model=cfg.model, loss_type=cfg.loss, batch=cfg.batch, world=run.world,
                precision=run.precision)


def main(argv=None):
    cfg = parse_config(argv)
    # JPEG decoders are forked first, before a process group or CUDA state exists
    pool = multiprocessing.get_context("fork").Pool(cfg.workers) if cfg.workers > 0 else None
    run = set_up(cfg)
    m = load_models(cfg, run.device, run.dtype)
    trainer = make_trainer(cfg, m, run)
    step, nonfinite_total, data_states = resume(cfg, m, trainer, run)
    if run.master:
        cut_metrics_log(cfg.out, step)
    if cfg.cache:
        build_cache(cfg, m, run.rank, run.world, pool)
    heldout = heldout_pairs(cfg, m) if run.master else None
    start = data_states[run.rank] if data_states else None
    batches = training_batches(cfg, m, run.rank, run.world, start, pool)
    if run.master:
        print(describe(cfg, m, run, trainer), file=sys.stderr)

    history, timing, last_enc = train(cfg, m, run, trainer, batches, heldout, step, nonfinite_total)

    if run.master and history:
        print(json_line(end_of_run(cfg, m, run, history, timing, last_enc)), flush=True)
    if pool:
        pool.terminate()
    if run.ddp:
        # DDP's Reducer holds the process group. Freed after destroy_process_group, it would be the last
        # holder and destroy gloo's group with the GIL held, while a gloo worker thread may need the GIL to
        # free a finished collective's tensors: a deadlock at exit. Freed first, the group goes with
        # destroy_process_group, which releases the GIL.
        if cfg.compile:
            torch.compiler.reset()  # compiled code may keep the module it was compiled from alive
        del trainer  # the only holder of the DDP module
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ saving
def save_checkpoint(cfg, m, trainer, step, nonfinite, state, run):
    """DIR/ckpt-STEP.pt (resume state, written then renamed; the last `keep` kept, ckpt.pt links the newest)
    and DIR/unet (diffusers), or with LoRA DIR/lora (what a diffusers pipeline's load_lora_weights reads)."""
    if not weights_are_finite(m.unet):  # the same weights on every rank: every rank stops here
        sys.exit(f"rpo.py: the weights became non-finite by step {step} and were not saved; the newest "
                 f"checkpoint in {cfg.out}, if any, holds the last good ones. Lower --lr or --beta")
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
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    ckpt = dict(unet=weights, optimizer=trainer.optimizer.state_dict(),
                lr_schedule=trainer.schedule.state_dict(), scaler=trainer.scaler.state_dict(), step=step,
                nonfinite=nonfinite, data_states=states, config=dataclasses.asdict(cfg), rng=rng)
    path = os.path.join(cfg.out, f"ckpt-{step:07d}.pt")
    atomic_save(ckpt, path)
    link_newest(path, os.path.join(cfg.out, "ckpt.pt"))
    # never one of a later step: that is not this run's history (say, an unreadable one --resume passed over)
    own = [p for p in checkpoints(cfg.out) if checkpoint_step(p) <= step]
    for old in own[:-cfg.keep]:
        os.remove(old)
    save_weights(m, os.path.join(cfg.out, "lora" if m.lora else "unet"))


def weights_are_finite(unet):
    return bool(torch.stack([p.isfinite().all() for p in unet.parameters()]).all())


def link_newest(path, link):
    """Point `link` at `path` in one rename: it always names a complete checkpoint."""
    if os.path.lexists(link + ".tmp"):
        os.remove(link + ".tmp")
    os.symlink(os.path.basename(path), link + ".tmp")
    os.replace(link + ".tmp", link)


def save_weights(m, folder):
    """The UNet (diffusers) or its adapters (LoRA), written whole beside `folder`, then swapped in."""
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    if m.lora:
        save_lora(m, folder + ".tmp")
    else:
        m.unet.save_pretrained(folder + ".tmp")
    shutil.rmtree(folder + ".old", ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, folder + ".old")
    os.replace(folder + ".tmp", folder)
    shutil.rmtree(folder + ".old", ignore_errors=True)


def save_lora(m, folder):
    """The trained adapters in diffusers' LoRA format, with rank and alpha: pipe.load_lora_weights(folder)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(m.unet, adapter_name="default"))
    pipeline = StableDiffusionXLPipeline if m.xl else StableDiffusionPipeline
    pipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=LORA_FILE,
                               unet_lora_adapter_metadata=m.unet.peft_config["default"].to_dict())


def checkpoints(out):
    """DIR/ckpt-STEP.pt, oldest first."""
    paths = glob.glob(os.path.join(out, "ckpt-*.pt"))
    return sorted([p for p in paths if checkpoint_step(p) is not None], key=checkpoint_step)


def checkpoint_step(path):
    step = os.path.basename(path)[len("ckpt-"):-len(".pt")]
    return int(step) if step.isdigit() else None


def load_checkpoint(out):
    """The newest checkpoint that loads; a truncated or corrupt file is reported and passed over. It is
    memory-mapped: the ranks of one host share its pages instead of each holding a copy."""
    for path in reversed(checkpoints(out)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:
            print(f"rpo.py: checkpoint {path} is unreadable ({type(e).__name__}); trying an older one",
                  file=sys.stderr)
    print(f"rpo.py: no checkpoint in {out}; starting from step 0", file=sys.stderr)
    return None


SAMPLE_PROMPTS = ["a photo of a corgi wearing sunglasses on a beach",
                  "an oil painting of a lighthouse in a storm", "a bowl of ramen, studio lighting",
                  "a watercolor fox in a snowy forest"]


@torch.no_grad()
def save_samples(cfg, m, path, autocast):
    """A grid of images from fixed prompts and seeds with the current policy UNet."""
    prompts = toy_captions("heldout")[::7][:4] if cfg.data in TOY_WORLDS else SAMPLE_PROMPTS
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


def sample_pipeline(m):
    """A diffusers pipeline over the training models (no copies), with DDIM for few-step sampling."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    parts = dict(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
                 scheduler=DDIMScheduler.from_config(m.scheduler.config))
    if m.xl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=m.text_encoders[1],
                                         tokenizer_2=m.tokenizers[1], add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":
    main()
