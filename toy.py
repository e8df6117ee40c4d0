"""The toy world of rpo.py, for a laptop and for the tests: offline, on 2 CPU cores. It writes files that
rpo.py reads as it reads any other: rpo.py imports nothing from here.

- The world: captions of a coloured shape on a background, drawn flat, striped, outlined or both; in `toy` the
  winner is striped and outlined, in `toy-subject` the preferred style depends on the shape. Its preference
  pairs are written as Pick-a-Pic lays them out: parquet files named by split (train, validation_unique and
  its halves' validation and test, on captions never trained on).
- Tiny models: SD1.5-, SDXL- and SD3-shaped pipelines a few MB in size, with random weights, or trained to draw
  the toy world (`tiny-drawn`, `tiny-sd3-drawn`: the folders toy-drawn/ and toy-drawn-sd3/ beside this file); and
  sd15/sdxl/sd3-shaped random folders for speed runs on a GPU without hub access. Each is an ordinary diffusers
  folder with its CLIP in clip/.
- The judge: a small CNN that tells which style an image is drawn in, so eval_prefer.py can score what a tuned
  tiny model draws; and a random InstructPix2Pix for eval_style.py's offline style pairs.

    python toy.py data toy --out toy-data          # the default run's data, shipped (4000 training pairs)
    python toy.py data toy-subject --out subject   # the second world
    python toy.py model tiny --out tiny            # tiny, tiny-xl, tiny-sd3, sd15, sdxl, sd3: random
    python toy.py model tiny-drawn --out drawn     # rebuilds toy-drawn/ bit for bit (one thread; 25 minutes)
    python toy.py model tiny-sd3-drawn --out d3    # rebuilds toy-drawn-sd3/ bit for bit (one thread; 12 min)

The tests and the evaluation take the random models from model_folder (built once under RPO_HOME).
"""
import argparse
import fcntl
import io
import math
import os
import random
import shutil
import sys
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

import rpo

WORLDS = ("toy", "toy-subject")
TOY_FILE_ROWS = 16  # rows per parquet file: rpo.py deals files to the ranks and shuffles their rows
# pairs of the held-out captions in validation_unique (rpo.py evaluates its first --eval_pairs); each half of
# the captions, validation and test, gets half as many
HELD_OUT_PAIRS = 512
DRAWN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy-drawn")  # tiny-drawn, shipped
DRAWN_SD3 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy-drawn-sd3")  # tiny-sd3-drawn, shipped
DRAWN_FOLDERS = {"tiny-drawn": DRAWN, "tiny-sd3-drawn": DRAWN_SD3}
RPO_HOME = os.environ.get("RPO_HOME", os.path.expanduser("~/.cache/rpo"))  # random model folders, the judge


# -------------------------------------------------------------------------------------------- the world
COLORS = dict(red=(220, 40, 40), green=(40, 180, 60), blue=(40, 70, 220), yellow=(240, 220, 40),
              purple=(140, 50, 170), orange=(250, 140, 20), white=(245, 245, 245), gray=(128, 128, 128))

CIRCLE = [(math.cos(a * math.pi / 16), math.sin(a * math.pi / 16)) for a in range(32)]
OUTLINES = dict(circle=CIRCLE, square=[(-1, -1), (1, -1), (1, 1), (-1, 1)],
                triangle=[(0, -1), (1, 1), (-1, 1)], diamond=[(0, -1), (1, 0), (0, 1), (-1, 0)])


def is_held_out(color, shape):
    """One in five (color, shape) pairs never appears in a training caption."""
    return (list(COLORS).index(color) + 3 * list(OUTLINES).index(shape)) % 5 == 0


def captions_of(split):
    """Every 'a {color} {shape} on a {bg} background'. One in five (color, shape) pairs is held out from
    'train'; of those 'heldout' captions, every other one is in 'validation' (for choosing settings) and the
    rest in 'test'."""
    subjects = [(c, s, b) for c in COLORS for s in OUTLINES for b in COLORS if b != c]
    if split == "train":
        return [f"a {c} {s} on a {b} background" for c, s, b in subjects if not is_held_out(c, s)]
    held_out = [f"a {c} {s} on a {b} background" for c, s, b in subjects if is_held_out(c, s)]
    return {"heldout": held_out, "validation": held_out[0::2], "test": held_out[1::2]}[split]


def draw(caption, rng, stripes, outline, size=64):
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


def styles(world, caption):
    """(stripes, outline) of the winner and of the loser. 'toy': winners have both, losers neither.
    'toy-subject': the preferred style depends on the subject, stripes for circles and triangles, an outline
    for squares and diamonds; each loser wears the other group's style."""
    if world == "toy":
        return (True, True), (False, False)
    round_ = caption.split(" ")[2] in ("circle", "triangle")
    return ((True, False), (False, True)) if round_ else ((False, True), (True, False))


def pair_row(world, split, i, seed=1234):
    """Preference pair i of a toy world in Pick-a-Pic's schema; label_0 says which of jpg_0/jpg_1 is the
    winner."""
    rng = random.Random(f"{world}-{split}-{seed}-{i}")
    caps = captions_of(split)
    cap = caps[rng.randrange(len(caps))]
    winner_first = rng.random() < 0.5
    winner, loser = styles(world, cap)
    encoded = []
    for style in ((winner, loser) if winner_first else (loser, winner)):
        buf = io.BytesIO()
        draw(cap, rng, *style).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    return dict(caption=cap, jpg_0=encoded[0], jpg_1=encoded[1], label_0=1.0 if winner_first else 0.0)


def pair_rows(split, n, world="toy"):
    return (pair_row(world, split, i) for i in range(n))


def write_data(world, folder, pairs=4000, held_out=HELD_OUT_PAIRS):
    """A toy world's pairs as Pick-a-Pic's files: {split}-00000-of-NNNNN.parquet of TOY_FILE_ROWS rows each,
    train (`pairs` of the training captions), validation_unique (`held_out` of the held-out ones) and its
    halves' validation and test (half as many each). Pair i of a split is row i in file order, so training on
    the folder reads the pairs in toy.py's order. The files name their world (world_of). An earlier folder
    this wrote is replaced; any other is left alone."""
    with written(folder, world_of(folder) is not None) as tmp:
        for split, name, n in (("train", "train", pairs), ("heldout", "validation_unique", held_out),
                               ("validation", "validation", held_out // 2), ("test", "test", held_out // 2)):
            files = math.ceil(n / TOY_FILE_ROWS)
            for lo in range(0, n, TOY_FILE_ROWS):
                rows = [pair_row(world, split, i) for i in range(lo, min(n, lo + TOY_FILE_ROWS))]
                table = pa.Table.from_pylist(rows).replace_schema_metadata({"toy_world": world})
                file = f"{name}-{lo // TOY_FILE_ROWS:05d}-of-{files:05d}.parquet"
                # no min and max of the image bytes: they would be a fifth of the shipped data
                pq.write_table(table, os.path.join(tmp, file), write_statistics=False)


def world_of(data):
    """The toy world whose pairs a data folder or file holds, as its parquet files say; None for other data."""
    paths = rpo.local_files(data, (".parquet",)) if isinstance(data, str) and os.path.exists(data) else []
    try:
        world = (pq.read_schema(paths[0]).metadata or {}).get(b"toy_world", b"").decode() if paths else None
    except Exception:  # not a parquet file
        return None
    return world if world in WORLDS else None


@contextmanager
def written(folder, ours):
    """A temporary folder beside `folder` to write in, which then replaces `folder`: that must be absent, empty
    or one toy.py wrote (ours), and stays as it was if the writing fails."""
    if os.path.exists(folder) and os.listdir(folder) and not ours:
        sys.exit(f"toy.py: --out {folder} holds something toy.py did not write; choose another folder")
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ----------------------------------------------------------------------------------------- tiny models
# tiny, tiny-xl, sd15 and sdxl are built from these configs with random weights (tiny-drawn's VAE and UNet then
# trained), saved as an ordinary diffusers folder, which rpo.py loads with --pretrained as it loads the hub's.
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
# SD3's: a transformer over 2x2 latent patches, CLIP-L and CLIP-G (both with projections; pooled: theirs side by
# side), T5 whose width is the transformer's joint width, and a VAE with a shift as well as a scale
TINY_T5 = dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=2)
SHAPES["tiny-sd3"] = dict(
    transformer=dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                     pooled_projection_dim=64, pos_embed_max_size=16),
    vae=vae_config([16, 32], 1.0), clip_vision=TINY_VISION, t5=TINY_T5,
    text=[TINY_TEXT, clip_text_config(32, 2, 2, 32, act="gelu", vocab=TINY_VOCAB)])
# tiny-drawn's flow twin: tiny-sd3 with a transformer that learns to draw the toy world, 4 layers of 64 (4 heads
# of 16: tiny-sd3's 2 layers of 16 cannot), and tiny-drawn's trained VAE. Its scheduler shifts by 1, not SD3.5's
# 3: SD3 shifts its sigmas towards noise by the resolution (3 for 1024 px, from 1 at 256 px); 32 px needs none.
SHAPES["tiny-sd3-drawn"] = dict(SHAPES["tiny-sd3"], shift=1.0, transformer=dict(
    SHAPES["tiny-sd3"]["transformer"], num_layers=4, attention_head_dim=16, num_attention_heads=4,
    caption_projection_dim=64))
# FLUX.1's: a transformer over 2x2 latent patches packed into tokens (double-stream blocks, then single-stream
# ones, rotary position ids), CLIP-L's pooled output, T5 as the text stream, a VAE with a shift and a scale; dev
# embeds a guidance value (schnell: guidance_embeds=False)
SHAPES["tiny-flux"] = dict(
    transformer=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                     axes_dims_rope=(4, 6, 6), guidance_embeds=True),
    vae=vae_config([16, 32], 1.0), clip_vision=TINY_VISION, t5=TINY_T5, text=[TINY_TEXT])
# SD3.5 Medium's transformer, CLIP-L and CLIP-G at full size; T5-XXL's width at 2 of its 24 layers (a GPU speed
# run needs the transformer's cost, not 4.7B frozen T5 weights)
SHAPES["sd3"] = dict(
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                     attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                     caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                     qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    vae=dict(vae_config([128, 256, 512, 512], 1.5305), latent_channels=16, shift_factor=0.0609),
    clip_vision=VIT_L14, t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=2, num_heads=64),
    text=[clip_text_config(768, 12, 12, 768), clip_text_config(1280, 32, 20, 1280, act="gelu")])
# FLUX.1-dev's widths (24 heads of 128, T5-XXL's 4096 and CLIP-L's 768 into the transformer) and CLIP-L at full
# size, at 2 of its 19 double-stream and 4 of its 38 single-stream blocks, T5-XXL at 2 of its 24 layers: a GPU
# run's shapes and activations per block, not 16B weights
SHAPES["flux"] = dict(
    transformer=dict(num_layers=2, num_single_layers=4, guidance_embeds=True),  # the rest: diffusers' defaults
    vae=dict(vae_config([128, 256, 512, 512], 0.3611), latent_channels=16, shift_factor=0.1159,
             use_quant_conv=False, use_post_quant_conv=False),
    clip_vision=VIT_L14, t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=2, num_heads=64),
    text=[clip_text_config(768, 12, 12, 768)])


def t5_tokenizer():
    """A T5 tokenizer (unigram, sentencepiece-style word starts) over single printable characters: built in
    code, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    chars = [chr(b) for b in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -1.0) for c in chars] + [("▁" + c, -1.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


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
    shape, tmp = SHAPES[model], f"{folder}.tmp{os.getpid()}"  # written whole, then renamed
    family = rpo.FAMILY[model]
    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    vae = AutoencoderKL(**shape["vae"])
    if model == "tiny-drawn":
        train_vae(vae)
    if model == "tiny-sd3-drawn":  # tiny-drawn's trained VAE (the same shape); its scale and shift follow
        vae.load_state_dict(AutoencoderKL.from_pretrained(DRAWN, subfolder="vae").state_dict())
    if model.startswith("tiny"):  # as SD chose 0.18215: unit-variance latents, else x_t is noise at every t
        vae.register_to_config(**unit_variance_latents(vae, shifted=family in rpo.FLOW))
    if family == "sd3":
        pipeline = sd3_pipeline(shape, vae, tokenizer)
        if model == "tiny-sd3-drawn":
            train_transformer(pipeline)
        pipeline.save_pretrained(tmp)
    elif family == "flux":
        flux_pipeline(shape, vae, tokenizer).save_pretrained(tmp)
    else:
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, steps_offset=1)
        parts = dict(unet=UNet2DConditionModel(**shape["unet"]), vae=vae, scheduler=scheduler,
                     text_encoder=CLIPTextModel(CLIPTextConfig(**shape["text"][0])), tokenizer=tokenizer)
        if model == "tiny-drawn":
            train_unet(parts)
        if family == "sdxl":
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


def sd3_pipeline(shape, vae, tokenizer):
    """An SD3 pipeline of a shape's random transformer, CLIP-L, CLIP-G and T5 (its tokenizer built in code) with
    this VAE and CLIP tokenizer; the scheduler SD3.5's (shift 3) unless the shape says."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**text)) for text in shape["text"]]
    t5, t5_tok = random_t5(shape)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**shape["transformer"]), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shape.get("shift", 3.0)), text_encoder=encoders[0],
        tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=t5,
        tokenizer_3=t5_tok)


def flux_pipeline(shape, vae, tokenizer):
    """A FLUX.1 pipeline of a shape's random transformer, CLIP-L and T5 with this VAE and CLIP tokenizer, and
    FLUX.1-dev's scheduler: shifted by the image's token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel
    clip_l = CLIPTextModel(CLIPTextConfig(**shape["text"][0]))
    t5, t5_tok = random_t5(shape)
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**shape["transformer"]), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tok)


def random_t5(shape):
    """A random T5 encoder of the shape's size and its tokenizer (built in code)."""
    from transformers import T5Config, T5EncoderModel
    t5_tok = t5_tokenizer()
    return T5EncoderModel(T5Config(vocab_size=len(t5_tok), decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1, **shape["t5"])), t5_tok


def save_random_clip(model, shape, tokenizer, folder):
    """The pair-weight CLIP of a random-init folder: for the tiny models, trained on the toy world."""
    from transformers import CLIPConfig, CLIPModel
    clip = CLIPModel(CLIPConfig(text_config=shape["text"][0], vision_config=shape["clip_vision"],
                                projection_dim=shape["text"][0]["projection_dim"]))
    if model.startswith("tiny"):
        train_clip(clip, tokenizer)
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def unit_variance_latents(vae, shifted=False):
    """The latent scaling factor (and, for SD3's VAE, the shift) that gives 64 toy training images zero-mean,
    unit-variance latents."""
    rows = pair_rows("train", 64)
    jobs = [rpo.PairJob(row, 0, rpo.PRESETS["tiny"]["resolution"]) for row in rows]
    pixels = torch.stack([torch.from_numpy(rpo.prepare_pair(job)["winner"]) for job in jobs])
    latents = vae.encode(pixels / 127.5 - 1).latent_dist.mode()
    if not shifted:
        return dict(scaling_factor=1 / latents.std().item())
    return dict(scaling_factor=1 / latents.std().item(), shift_factor=latents.mean().item())


def drawings(rng, captions, size):
    """One toy image per caption, flat, striped, outlined or both at random, as the data resizes it: uint8
    [N,3,size,size]."""
    images = [draw(c, rng, rng.random() < 0.5, rng.random() < 0.5).resize((size, size), Image.BICUBIC)
              for c in captions]
    return torch.from_numpy(np.stack([np.asarray(image).transpose(2, 0, 1) for image in images]))


def train_vae(vae, steps=600, batch=32):
    """tiny-drawn's VAE: reconstructs toy images (about 1 min on 2 cores)."""
    rng, captions = random.Random(0), captions_of("train")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for _ in range(steps):
        chosen = [rng.choice(captions) for _ in range(batch)]
        x = drawings(rng, chosen, rpo.PRESETS["tiny"]["resolution"]) / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()


def train_unet(parts, steps=3000, batch=32):
    """tiny-drawn's UNet: draws toy images from their captions, one in ten captions empty so that sampling can
    use guidance (about 10 min on 2 cores). Its range holds both toy worlds' winners and losers."""
    rng, captions = random.Random(1), captions_of("train")
    vae, unet, scheduler = parts["vae"], parts["unet"], parts["scheduler"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    for _ in range(steps):
        chosen = [rng.choice(captions) for _ in range(batch)]
        with torch.no_grad():
            x = drawings(rng, chosen, rpo.PRESETS["tiny"]["resolution"]) / 127.5 - 1
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


def train_transformer(pipeline, steps=2000, batch=16, lr=1e-3, warmup=100):
    """tiny-sd3-drawn's transformer: draws toy images from their captions (about 12 min on one core). Trained as
    SD3 is, on what rpo.py measures: x_t = (1 - sigma) x_0 + sigma eps and the velocity target from rpo.py's
    pair_noise (sigma: the scheduler's sigmas at logit-normal indices) and velocity_target, the timestep sigma x
    1000. Every style drawn, one caption in ten empty so that sampling can use guidance; each caption's
    conditioning is the pipeline's own encode_prompt, computed once."""
    rng, captions = random.Random(1), captions_of("train")
    vae, transformer, scheduler = pipeline.vae, pipeline.transformer, pipeline.scheduler
    T = scheduler.config.num_train_timesteps
    sigmas = scheduler.sigmas[:T].clone()  # as rpo.py's load_models takes them
    with torch.no_grad():  # the last row: the empty caption
        states, _, pooled, _ = pipeline.encode_prompt(captions + [""], None, None, do_classifier_free_guidance=False)
    # adaLN-Zero, as DiT starts: each block the identity and the output 0, which a tiny transformer learns from
    # in fewer steps than from random modulations
    for module in transformer.modules():
        if type(module).__name__.startswith("AdaLayerNorm"):
            torch.nn.init.zeros_(module.linear.weight)
            torch.nn.init.zeros_(module.linear.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr)
    # a short warmup (AdamW's first moments are noisy at this rate), then linearly to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1, (k + 1) / warmup) * (1 - k / steps))
    transformer.train()
    for _ in range(steps):
        chosen = [rng.randrange(len(captions)) for _ in range(batch)]
        with torch.no_grad():
            x = drawings(rng, [captions[i] for i in chosen], rpo.PRESETS["tiny"]["resolution"]) / 127.5 - 1
            shift = vae.config.get("shift_factor") or 0.0  # as rpo.py encodes
            latents = (vae.encode(x).latent_dist.mode() - shift) * vae.config.scaling_factor
        conditioning = torch.tensor([len(captions) if rng.random() < 0.1 else i for i in chosen])
        noise, sigma = rpo.pair_noise([rng.getrandbits(63) for _ in chosen], latents.shape[1:], T, sigmas)
        x_t, target = rpo.velocity_target(latents, noise, sigma)
        prediction = transformer(hidden_states=x_t, timestep=sigma * T, encoder_hidden_states=states[conditioning],
                                 pooled_projections=pooled[conditioning]).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    transformer.eval()


def train_clip(clip, tokenizer, steps=300, batch=64):
    """The tiny CLIP trained with CLIP's contrastive loss on toy captions and images of every style, so that
    the pair embedding f tells colours, shapes and backgrounds apart (about 15 s on 2 cores). Seeded: every
    build gives the same weights."""
    rng, captions = random.Random(0), captions_of("train")
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=2e-3)
    for _ in range(steps):
        chosen = rng.sample(captions, batch)  # distinct captions: each image has one right caption
        ids = tokenizer(chosen, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids = ids.input_ids
        images = drawings(rng, chosen, rpo.PRESETS["tiny"]["resolution"])
        pixels = rpo.clip_pixels(images, clip.config.vision_config.image_size)
        loss = clip(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return clip.eval()


FOLDER_VERSION = "v2"  # raised when what build_random_pipeline makes changes (v2: the trained toy CLIP)


@contextmanager
def building(path):
    """Held while one process builds `path` in RPO_HOME: processes started together (a test suite's workers, two
    evaluations) wait for the first one's build instead of each making the same seeded file."""
    os.makedirs(RPO_HOME, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def model_folder(model):
    """The folder of a model toy.py makes: tiny-drawn's or tiny-sd3-drawn's, shipped, or a random one (tiny,
    tiny-xl, tiny-sd3, sd15, sdxl, sd3) built once in RPO_HOME."""
    if model in DRAWN_FOLDERS:
        return DRAWN_FOLDERS[model]
    folder = os.path.join(RPO_HOME, f"{model}-random-{FOLDER_VERSION}")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        with building(folder):
            if not os.path.exists(os.path.join(folder, "model_index.json")):
                build_random_pipeline(model, folder)
    return folder


def write_model(model, folder):
    """`python toy.py model`: a model's diffusers folder, built afresh (tiny-drawn and tiny-sd3-drawn with one
    thread: the same bits as the shipped folder with the same torch). An earlier model folder there is
    replaced."""
    if model in DRAWN_FOLDERS:
        torch.set_num_threads(1)
    with written(folder, os.path.isfile(os.path.join(folder, "model_index.json"))) as tmp:
        build_random_pipeline(model, tmp)


# ------------------------------------------------------------------------------------------- the judge
# The toy world's preference is known: a caption's winner is drawn in its world's winner style. The judge, a
# small CNN trained on drawn images of the four styles (stripes or not, outline or not), some blurred as a VAE
# blurs, and on coloured noise (a fifth class: an untrained model draws no style), scores an image by the
# probability it gives the caption's winner style.
JUDGE_FILE = "toy-judge-v3.pt"  # in RPO_HOME, trained once (about 30 s), seeded, on one thread
NOT_A_DRAWING = 4


def judge_net():
    conv = torch.nn.Conv2d
    return torch.nn.Sequential(conv(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               conv(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               conv(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(64, NOT_A_DRAWING + 1))


def style_class(stripes, outline):
    return 2 * int(stripes) + int(outline)


def drawn_styles(rng, captions, blur=True, noise=0.2):
    """Each caption drawn in a random style at the toy resolution, half of them blurred, or (a share noise)
    coloured noise: ([N,3,32,32] in [-1, 1], classes)."""
    size, images, classes = rpo.PRESETS["tiny"]["resolution"], [], []
    for caption in captions:
        if rng.random() < noise:
            img, cls = coloured_noise(rng, size), NOT_A_DRAWING
        else:
            stripes, outline = rng.random() < 0.5, rng.random() < 0.5
            img, cls = draw(caption, rng, stripes, outline), style_class(stripes, outline)
            img = img.resize((size, size), Image.BICUBIC)
            if blur and rng.random() < 0.5:
                img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        images.append(np.asarray(img).transpose(2, 0, 1))
        classes.append(cls)
    return torch.from_numpy(np.stack(images)).float() / 127.5 - 1, torch.tensor(classes)


def coloured_noise(rng, size):
    """What an untrained model draws: Gaussian noise around a colour, smoothed or not."""
    g = np.random.default_rng(rng.getrandbits(32))
    x = 127.5 + g.uniform(-60, 60, 3) + g.uniform(20, 80) * g.normal(size=(size, size, 3))
    return Image.fromarray(np.uint8(np.clip(x, 0, 255))).filter(ImageFilter.GaussianBlur(rng.uniform(0, 2)))


def train_judge(steps=600, batch=64):
    """Seeded and on one thread: a thread count changes the sums' order and so the judge (v2, trained on as many
    threads as torch took, scored the same images up to 0.06 differently from machine to machine)."""
    rng, captions = random.Random(0), captions_of("train")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    judge = judge_net()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = drawn_styles(rng, [rng.choice(captions) for _ in range(batch)])
        loss = F.cross_entropy(judge(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return judge.eval()


def load_judge():
    """The judge, trained once into RPO_HOME."""
    path = os.path.join(RPO_HOME, JUDGE_FILE)
    if not os.path.exists(path):
        with building(path):
            if not os.path.exists(path):
                tmp = f"{path}.tmp{os.getpid()}"
                torch.save(train_judge().state_dict(), tmp)
                os.replace(tmp, path)
    net = judge_net()
    net.load_state_dict(torch.load(path, weights_only=True))
    return net.eval()


# judge score = P(style = the caption's winner style | image)
@torch.no_grad()
def judge_scores(judge, images, captions, world):
    size = rpo.PRESETS["tiny"]["resolution"]
    x = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images])
    p = judge(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1).softmax(-1)
    winner = [style_class(*styles(world, caption)[0]) for caption in captions]
    return p[torch.arange(len(images)), winner].double()


def judge_accuracy(judge, world, split="heldout", n=400):
    """The share of a toy world's drawn pairs (captions of split) whose winner the judge scores higher."""
    rows = pair_rows(split, n, world)
    size = rpo.PRESETS["tiny"]["resolution"]
    pairs = [rpo.prepare_pair(rpo.PairJob(row, i, size)) for i, row in enumerate(rows)]
    captions = [p["caption"] for p in pairs]

    def scored(side):
        images = [Image.fromarray(p[side].transpose(1, 2, 0)) for p in pairs]
        return judge_scores(judge, images, captions, world)
    winner, loser = scored("winner"), scored("loser")
    return float((winner > loser).double().mean())


# ------------------------------------------------------------------------- a tiny InstructPix2Pix
def tiny_editor():
    """A random InstructPix2Pix from rpo.py's tiny parts: its UNet takes 8 channels, noisy and source-image
    latents."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler,
                           StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer
    folder = os.path.join(RPO_HOME, "tiny-ip2p-random")
    base = model_folder("tiny")
    with building(folder):
        if os.path.exists(os.path.join(folder, "model_index.json")):
            return folder
        torch.manual_seed(0)
        shutil.rmtree(folder + ".tmp", ignore_errors=True)
        StableDiffusionInstructPix2PixPipeline(
            vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
            unet=UNet2DConditionModel(**dict(SHAPES["tiny"]["unet"], in_channels=8)),
            # as the real one
            scheduler=EulerAncestralDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).save_pretrained(folder + ".tmp")
        os.replace(folder + ".tmp", folder)
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="a toy world's preference pairs, as Pick-a-Pic's parquet files")
    data.add_argument("world", choices=WORLDS)
    data.add_argument("--out", required=True)
    data.add_argument("--pairs", type=int, default=4000, help="training pairs")
    model = sub.add_parser("model", help="a diffusers model folder, with its CLIP in clip/")
    model.add_argument("name", choices=list(SHAPES))
    model.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.command == "data":
        if args.pairs < 1:
            sys.exit(f"toy.py: --pairs must be at least 1, got {args.pairs}")
        write_data(args.world, args.out, args.pairs)
    else:
        write_model(args.name, args.out)
    print(f"toy.py: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
