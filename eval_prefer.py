r"""The preference evaluation of Diffusion-RPO (Gu et al. 2024, arXiv 2406.06382): automated human-preference
scores. The base model and each tuned run draw the same prompts from the same initial noise; PickScore,
HPSv2.1, the LAION aesthetic predictor and CLIP score (the toy world: its judge) score every image; the report
gives each model's mean and each run's win rate against the base with the sign test's p, and a comparison
sheet (PNG) shows the images side by side.

    python rpo.py --loss dpo --out out_dpo && python rpo.py --out out_rpo   # tiny-drawn, the toy world
    python eval_prefer.py --runs out_dpo out_rpo --n 16 --out prefer.json   # offline, CPU

With --model sd15 or sdxl the same command uses the real scorers, Pick-a-Pic and Stable Diffusion. Drawing
with a run's weights, CLIP and the comparison sheet live here; eval_style.py uses them too.
"""
import argparse
import functools
import html
import io
import itertools
import json
import math
import os
import sys
import textwrap
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

import rpo

SCRIPT = "eval_prefer.py"  # the one-line errors' prefix


def fail(msg, script=SCRIPT):  # eval_style.py passes its own name, also to the helpers it uses
    sys.exit(f"{script}: {msg}")


# -------------------------------------------------------------------------- scores and statistics
def cosine(a, b):  # row by row; a [1, D] pairs with every row of the other
    a, b = (F.normalize(torch.as_tensor(x).double(), dim=-1) for x in (a, b))
    return (a * b).sum(-1)


# CLIP score = 100 * max(cos(image features, text features), 0), per image
def clip_scores(image_features, text_features):
    return 100 * cosine(image_features, text_features).clamp(min=0)


# PickScore = exp(logit_scale) * cos(image, prompt)   (its authors' inference code)
def pickscore(image_features, text_features, logit_scale):
    return float(np.exp(logit_scale)) * cosine(image_features, text_features)


# HPSv2 = cos(image, prompt)   (hpsv2's img_score: the diagonal of normalised image @ text features)
def hps(image_features, text_features):
    return cosine(image_features, text_features)


# aesthetic = MLP(image / |image|), image: CLIP ViT-L/14 image features   (LAION's aesthetic predictor v2)
def aesthetic(mlp, image_features):
    return mlp(F.normalize(torch.as_tensor(image_features).float(), dim=-1)).squeeze(-1).double()


# outcome of a against b on each prompt = [a > b] + [a = b] / 2;  win rate = the mean outcome
def outcomes(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return (a > b) + 0.5 * (a == b)


# two-sided sign test over prompts: p = min(1, 2 P(X <= min(w, l))), X ~ Binomial(w + l, 1/2), from per-prompt
# outcomes (w: above 1/2, l: below 1/2; ties dropped)
def sign_test(won):
    won = np.asarray(won)
    w, l = int((won > 0.5).sum()), int((won < 0.5).sum())
    return min(1.0, 2 * sum(math.comb(w + l, k) for k in range(min(w, l) + 1)) / 2 ** (w + l))


def bootstrap_ci(values, draws=2000, seed=0):
    """The 95 % percentile bootstrap interval of the mean of per-prompt values, prompts resampled."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(scores):
    """Each model's mean score with its 95 % interval, each run's win rate against the base, and every pair of
    runs' win rates with the sign test's p, from per-prompt scores {model: {scorer: [P]}}."""
    def rate(a, b):
        won = outcomes(a, b)
        return dict(rate=float(won.mean()), ci=bootstrap_ci(won), p=sign_test(won))
    runs = [name for name in scores if name != "base"]
    return dict(
        runs={name: {s: dict(mean=float(np.mean(v)), ci=bootstrap_ci(v)) for s, v in by.items()}
              for name, by in scores.items()},
        win_rate_vs_base={name: {s: rate(scores[name][s], scores["base"][s]) for s in scores[name]}
                          for name in runs},
        win_rates={f"{a} vs {b}": {s: rate(scores[a][s], scores[b][s]) for s in scores[a]}
                   for a, b in itertools.combinations(runs, 2)})


# ----------------------------------------------------------------------------- preference scorers
# Each scorer loads from the hub as its authors publish it (or from the local hub cache, HF_HUB_OFFLINE=1).
PICKSCORE = "yuvalkirstain/PickScore_v1"  # a CLIP ViT-H/14 fine-tune
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor, the tokenizer of HPSv2's OpenCLIP
HPS = ("xswu/HPSv2", "HPS_v2.1_compressed.pt")  # an OpenCLIP ViT-H/14 state dict
AESTHETIC = ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")
CLIP_L14 = "openai/clip-vit-large-patch14"  # the aesthetic predictor's features; the CLIP score
SCORERS = ("pickscore", "hps", "aesthetic", "clip", "judge")  # judge: the toy world's


def hub_file(repo_id, filename, repo_type=None):
    """A hub file, downloaded once into the hub cache; transient network failures retried as rpo.py retries."""
    from huggingface_hub import hf_hub_download
    try:
        return rpo.retried(f"{filename} of {repo_id}", lambda: hf_hub_download(repo_id, filename, repo_type=repo_type))
    except (Exception, rpo.Unreachable) as e:  # offline, a wrong id, a gated repo, the network down
        kind = f" --repo-type {repo_type}" if repo_type else ""
        fail(f"cannot fetch {filename!r} from {repo_id!r}: {rpo.first_line(e)}. Where the hub is reachable, "
             f"`hf download {repo_id} {filename}{kind}` puts it in the hub cache (HF_HOME); copied here, it "
             f"is read offline with HF_HUB_OFFLINE=1")


def openclip_as_clip(state):
    """An OpenCLIP CLIP state dict (HPSv2's checkpoint) as transformers' CLIPModel. The shapes give the
    config; heads are width / 80 (vision) and width / 64 (text), ViT-H/14's head widths."""
    from transformers import CLIPConfig, CLIPModel

    def tower(prefix, width, head_width):
        layers = sum(k.startswith(prefix) and k.endswith(".ln_1.weight") for k in state)
        return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // head_width,
                    intermediate_size=len(state[prefix + "resblocks.0.mlp.c_fc.bias"]), hidden_act="gelu")
    width, _, _, patch = state["visual.conv1.weight"].shape
    grid = round((len(state["visual.positional_embedding"]) - 1) ** 0.5)
    vision = dict(tower("visual.transformer.", width, 80), image_size=grid * patch, patch_size=patch)
    vocab, width = state["token_embedding.weight"].shape
    text = dict(tower("transformer.", width, 64), vocab_size=vocab, bos_token_id=vocab - 2,
                eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                max_position_embeddings=len(state["positional_embedding"]))
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision,
                                projection_dim=state["visual.proj"].shape[1]))
    clip.load_state_dict(openclip_keys(state))  # strict: every weight of both, no more
    return clip.eval()


OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                  "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
OPENCLIP_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                "visual.class_embedding": "vision_model.embeddings.class_embedding",
                "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
                "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                "positional_embedding": "text_model.embeddings.position_embedding.weight",
                "ln_final": "text_model.final_layer_norm", "logit_scale": "logit_scale"}


def openclip_keys(state):
    """OpenCLIP's names for transformers' CLIPModel's: fused q, k, v split in three, the projections (used as
    x @ proj) transposed."""
    mapped = {"visual_projection.weight": state["visual.proj"].T,
              "text_projection.weight": state["text_projection"].T}
    towers = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
              "transformer.resblocks.": "text_model.encoder.layers."}
    for key, value in state.items():
        tower = next((t for t in towers if key.startswith(t)), None)
        n, name = key[len(tower):].split(".", 1) if tower else ("", key)
        module, _, param = name.rpartition(".")
        if tower and name.startswith("attn.in_proj_"):
            for part, chunk in zip("qkv", value.chunk(3)):
                mapped[f"{towers[tower]}{n}.self_attn.{part}_proj.{param.removeprefix('in_proj_')}"] = chunk
        elif tower and module in OPENCLIP_BLOCK:
            mapped[f"{towers[tower]}{n}.{OPENCLIP_BLOCK[module]}.{param}"] = value
        elif not tower and key in OPENCLIP_TOP:
            mapped[OPENCLIP_TOP[key]] = value
        elif not tower and module in OPENCLIP_TOP:
            mapped[f"{OPENCLIP_TOP[module]}.{param}"] = value
        elif key not in ("visual.proj", "text_projection"):
            fail(f"the OpenCLIP checkpoint holds {key!r}, which has no place in CLIPModel")
    return mapped


def aesthetic_mlp(state):
    """LAION's aesthetic predictor v2: five linear layers, dropout between (its ReLUs are commented out)."""
    width = state["layers.0.weight"].shape[1]
    mlp = torch.nn.Sequential(torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return mlp.eval()


# OpenCLIP's caption cleaning before tokenizing: ftfy, HTML unescaped twice, whitespace collapsed, lowercase
def openclip_clean(caption):
    import ftfy
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(caption))).split()).lower()


def load_scorers(names, world, clip_id):
    """name -> score(images, prompts, device, dtype, batch) -> one score per image; the models load now, on
    the CPU, and move to the device only while they score."""
    from transformers import CLIPModel, CLIPTokenizer
    scorers, clips = {}, {}

    def shared(clip_id):  # aesthetic and clip both use CLIP ViT-L/14 by default: it loads once
        if clip_id not in clips:
            clips[clip_id] = load_clip(clip_id, torch.device("cpu"))
        return clips[clip_id]
    for name in names:
        if name == "judge":
            if not world:
                fail("the judge scores toy-world prompts only: pass --prompts toy or toy-subject")
            scorers[name] = functools.partial(scored_by_judge, toy_world().load_judge(), world)
        elif name == "pickscore":
            clip = rpo.pretrained(CLIPModel, PICKSCORE).eval()
            formula = functools.partial(pickscore, logit_scale=clip.logit_scale.item())
            scorers[name] = functools.partial(scored_by_clip, clip, rpo.pretrained(CLIPTokenizer, CLIP_H14),
                                              formula)
        elif name == "hps":
            state = torch.load(hub_file(*HPS), map_location="cpu", weights_only=True)
            clip = openclip_as_clip(state.get("state_dict", state))
            tokenizer = rpo.pretrained(CLIPTokenizer, CLIP_H14)
            scorers[name] = functools.partial(scored_by_clip, clip, tokenizer, hps, hpsv2=True)
        elif name == "aesthetic":
            mlp = aesthetic_mlp(torch.load(hub_file(*AESTHETIC), map_location="cpu", weights_only=True))
            formula = functools.partial(aesthetic_of_images, mlp)
            scorers[name] = functools.partial(scored_by_clip, *shared(CLIP_L14), formula)
        elif name == "clip":
            scorers[name] = functools.partial(scored_by_clip, *shared(clip_id), clip_scores)
        else:
            fail(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return scorers


def aesthetic_of_images(mlp, image_features, _):
    return aesthetic(mlp, image_features)


@torch.no_grad()
def scored_by_clip(clip, tokenizer, formula, images, prompts, device, dtype, batch, hpsv2=False):
    """formula(image features, text features) of each (image, prompt), batch by batch on the device; hpsv2:
    images and captions prepared as HPSv2 prepares them."""
    clip.to(device, dtype)
    scores = []
    prompts = [openclip_clean(p) for p in prompts] if hpsv2 else prompts
    size = clip.config.vision_config.image_size
    for i in range(0, len(images), batch):
        x = clip_inputs(images[i:i + batch], size, device, hpsv2).to(dtype)
        ids = tokenizer(prompts[i:i + batch], padding="max_length", truncation=True, return_tensors="pt",
                        max_length=clip.config.text_config.max_position_embeddings).input_ids.to(device)
        image = clip.get_image_features(pixel_values=x).pooler_output.float().cpu()
        text = clip.get_text_features(input_ids=ids).pooler_output.float().cpu()
        scores.append(formula(image, text))
    clip.to("cpu")
    return torch.cat(scores).numpy()


def scored_by_judge(judge, world, images, prompts, device, dtype, batch):
    return np.concatenate([toy_world().judge_scores(judge, images[i:i + batch], prompts[i:i + batch], world).numpy()
                           for i in range(0, len(images), batch)])


# Below: CLIP, generation from a run's weights and the comparison sheet, which eval_style.py uses too.
# ------------------------------------------------------------------------------------------- CLIP
# the HPSv2 scorer sees its images as HPSv2's ResizeMaxSize makes them: each side to
# round(side x size / long side), then black padding to a square, pad // 2 before the content (left, top) and
# the rest after it (HPSv2 skips the padding when the long side is already size, leaving a non-square image
# its ViT cannot take; this pads it)
def hps_square(image, size):
    scale = size / max(image.size)
    if scale != 1:
        image = image.resize([round(side * scale) for side in image.size], Image.BICUBIC)
    square = Image.new(image.mode, (size, size))
    square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return square


def clip_inputs(images, size, device, hpsv2=False):
    """CLIP's preprocessing: short side to size, centre crop (hpsv2: HPSv2's padded square instead), then
    CLIP's mean and std."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (rpo.CLIP_MEAN, rpo.CLIP_STD))
    squares = [hps_square(im.convert("RGB"), size) if hpsv2 else
               ImageOps.fit(im.convert("RGB"), (size, size), Image.BICUBIC) for im in images]
    x = np.stack([np.asarray(im) for im in squares])
    return (torch.from_numpy(x).permute(0, 3, 1, 2).to(device).float() / 255 - mean) / std


def load_clip(clip_id, device):
    from transformers import CLIPModel, CLIPTokenizer
    return rpo.pretrained(CLIPModel, clip_id).to(device).eval(), rpo.pretrained(CLIPTokenizer, clip_id)


# ------------------------------------------------------------------------------------- generation
def device_dtype():
    cuda = torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32


def run_weights(path, script=SCRIPT):
    """("unet" | "transformer" | "lora", folder) of a tuned run: rpo.py's OUT (its unet/, transformer/ or
    lora/), or the folder itself."""
    kinds = ("unet", "transformer", "lora")
    for kind, folder in [(kind, os.path.join(path, kind)) for kind in kinds] + [(kind, path) for kind in kinds]:
        if os.path.isfile(os.path.join(folder, rpo.LORA_FILE if kind == "lora" else "config.json")):
            if kind != "lora" and folder == path:  # the folder itself: its config names its class
                kind = "transformer" if "Transformer" in json.load(open(os.path.join(folder, "config.json"))).get(
                    "_class_name", "") else "unet"
            return kind, folder
    fail(f"{path!r} is not a run: it holds neither a diffusers UNet (unet/) or transformer (transformer/) nor "
         f"LoRA adapters (lora/)", script)


@contextmanager
def drawing_with(pipe, weights, device, dtype):
    """The pipeline drawing with a run's weights (None: the base's own): its UNet or transformer swapped in, or
    its LoRA adapters loaded; the base's is back afterwards."""
    if weights is None:
        yield
        return
    kind, folder = weights
    if kind == "lora":
        pipe.load_lora_weights(folder, weight_name=rpo.LORA_FILE)
        try:
            yield
        finally:
            pipe.unload_lora_weights()
        return
    base = getattr(pipe, kind)
    setattr(pipe, kind, rpo.pretrained(type(base), folder, dtype=dtype).to(device))
    try:
        yield
    finally:
        setattr(pipe, kind, base)


def load_pipeline(model, base, device, dtype):
    from diffusers import DDIMScheduler
    family = rpo.FAMILY[model]
    extra = dict(sd15=dict(safety_checker=None, requires_safety_checker=False), sdxl=dict(add_watermarker=False),
                 sd3=dict(), flux=dict())[family]
    pipe = rpo.pretrained(rpo.pipeline_class(family), base, dtype=dtype, **extra)
    if family not in rpo.FLOW:  # the flow models sample with their own flow-matching Euler, as rpo.py's samples
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device).set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe):
    return getattr(pipe, "transformer", None) or pipe.unet


def initial_noise(pipe, seeds, resolution):
    """Image k's initial latents from its own seed, drawn on the CPU: the same for every model and device
    (FLUX.1's packed into 2 x 2 patch tokens, as its pipeline packs the noise it draws itself)."""
    scale, channels = pipe.vae_scale_factor, denoiser(pipe).config.in_channels
    flux = type(pipe).__name__ == "FluxPipeline"
    shape = (channels // 4 if flux else channels, resolution // scale, resolution // scale)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return pipe._pack_latents(noise, len(noise), *shape) if flux else noise


@torch.no_grad()
def generate(pipe, captions, args, device, desc="generating"):
    """One image per caption, caption k from the noise of seed args.seed + k, whatever the model."""
    images = []
    for i in tqdm(range(0, len(captions), args.batch), desc=desc):
        seeds = range(args.seed + i, args.seed + min(i + args.batch, len(captions)))
        latents = initial_noise(pipe, seeds, args.resolution).to(device, denoiser(pipe).dtype)
        images += pipe(captions[i:i + args.batch], num_inference_steps=args.steps, latents=latents,
                       guidance_scale=args.guidance, height=args.resolution, width=args.resolution).images
    return images


def save_images(sets, folder):
    for name, images in sets.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for k, img in enumerate(images):
            img.save(os.path.join(folder, name, f"{k:05d}.png"))


# ------------------------------------------------------------------------------- comparison sheet
SHEET_CELL, SHEET_LINE = 192, 16  # px: each image of the sheet is scaled to this width; one line of text


def comparison_sheet(columns, captions):
    """PNG bytes: a row per caption, under it each model's image, labelled with its lines; columns: {model:
    (images, labels)}, as sheet_column makes them."""
    font = ImageFont.load_default(size=13)
    cells = {name: [im.resize((SHEET_CELL, max(1, SHEET_CELL * im.height // im.width)),
                              Image.NEAREST if im.width < SHEET_CELL else Image.LANCZOS) for im in ims]
             for name, (ims, _) in columns.items()}
    labels = {name: lines for name, (_, lines) in columns.items()}
    width = SHEET_CELL * len(cells)

    def fitted(text, room):  # cut to the room it has, ending in ... where cut
        while font.getlength(text) > room and len(text) > 1:
            text = text[:-2] + "…"
        return text
    wrapped = []
    for caption in captions:
        lines = textwrap.wrap(str(caption), max(width // 7, 20)) or [""]
        wrapped.append([fitted(line, width - 8) for line in lines[:2]] +
                       [fitted(" ".join(lines[2:]), width - 8)] * (len(lines) > 2))
    label_height = SHEET_LINE * max(len(lines) for ls in labels.values() for lines in ls)
    heights = [SHEET_LINE * len(w) + max(cells[n][k].height for n in cells) + label_height + 8
               for k, w in enumerate(wrapped)]
    sheet = Image.new("RGB", (width, sum(heights)), "white")
    draw, y = ImageDraw.Draw(sheet), 0
    for k, (lines, height) in enumerate(zip(wrapped, heights)):
        for i, line in enumerate(lines):
            draw.text((4, y + SHEET_LINE * i), line, fill="black", font=font)
        top = y + SHEET_LINE * len(lines)
        below = top + max(cells[name][k].height for name in cells)  # the labels, in one line across the row
        for column, name in enumerate(cells):
            x = SHEET_CELL * column
            sheet.paste(cells[name][k], (x, top))
            for i, line in enumerate(labels[name][k]):
                draw.text((x + 4, below + SHEET_LINE * i), fitted(line, SHEET_CELL - 8), fill="black",
                          font=font)
        y += height
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def sheet_column(name, images, per_image, per_prompt, k):
    """A model's column of the sheet: image 0 of each of the first k prompts (per_prompt images each), and its
    label, the model's name and then each scorer's score of that image, in the order of the scorers."""
    first = images[::per_prompt][:k]
    return first, [[name, *(f"{s} {v[::per_prompt][j]:.4g}" for s, v in per_image.items())]
                   for j in range(len(first))]


def save_sheet(out, columns, captions):
    """The comparison sheet of these captions beside the report OUT.json, as OUT.png."""
    png = out.removesuffix(".json") + ".png"
    rpo.atomic_save(comparison_sheet(columns, captions), png)
    print(f"-> {png} (the first {len(captions)} prompts, image 0 of each)", file=sys.stderr)


# ---------------------------------------------------------------------------------------- prompts
PICKAPIC_TEST, PARTI = "test_unique", "nateraw/parti-prompts"  # Pick-a-Pic's 500 test prompts; PartiPrompts
TOY_SPLITS = ("test", "validation", "heldout", "train")  # toy.captions_of's
# HPSv2's benchmark: 800 prompts in each of four styles, the hub dataset's benchmark/STYLE.json
HPSV2_BENCHMARK, HPSV2_STYLES = "zhwang/HPDv2", ("anime", "concept-art", "paintings", "photo")


def prompt_sets(args):
    """{style: prompts}, the first --n of each: HPSv2's benchmark by its four styles; any other set is one
    style, "all"."""
    if args.prompts != "hpsv2":
        return {"all": prompt_set(args)[:args.n or None]}
    sets = {}
    for style in HPSV2_STYLES:
        path = hub_file(HPSV2_BENCHMARK, f"benchmark/{style}.json", repo_type="dataset")
        with open(path, encoding="utf-8") as fh:
            try:
                prompts = json.load(fh)
            except ValueError:
                prompts = None
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip()
                                                                   for p in prompts):
            fail(f"{HPSV2_BENCHMARK}'s benchmark/{style}.json is not a list of prompts")
        sets[style] = prompts[:args.n or None]  # as published, in order, duplicates kept
    return sets


def text_lines(path, what, script=SCRIPT):
    """A .txt file's lines, stripped, blank ones dropped: prompts or captions, one a line."""
    if not os.path.isfile(path):
        fail(f"{what} {path!r} does not exist", script)
    return [line.strip() for line in open(path, encoding="utf-8") if line.strip()]


def prompt_set(args):
    """The prompts, in order: a toy world's captions of --split, or unique captions read from Pick-a-Pic's
    --split (hub id --data_id), PartiPrompts, or a file: .txt (one per line), or .tsv (PartiPrompts' own), .csv
    or parquet files with a caption or Prompt column."""
    if args.prompts in toy_world().WORLDS:
        if (args.split or "test") not in TOY_SPLITS:
            fail(f"--split {args.split!r}: a toy world's prompts are one of {', '.join(TOY_SPLITS)}")
        return toy_world().captions_of(args.split or "test")
    if args.prompts.endswith(".txt"):
        return list(dict.fromkeys(text_lines(args.prompts, "--prompts")))  # unique, in order
    if args.prompts in ("pickapic", "parti"):
        data_id = args.data_id if args.prompts == "pickapic" else PARTI
        split = args.split or (PICKAPIC_TEST if args.prompts == "pickapic" else "train")
        try:
            paths = list(rpo.hub_data_files(data_id)[split])
        except Exception as e:  # offline, a wrong id, no such split
            fail(f"cannot read prompts from {data_id!r} (split {split!r}): {rpo.first_line(e)}; pass a local "
                 f"copy with --prompts PATH")
    else:
        paths = rpo.local_files(args.prompts, (".parquet", ".tsv", ".csv"))
        if not paths:
            fail(f"--prompts {args.prompts!r}: no such file, nor parquet files there")
    captions = [c for path in paths for c in prompt_column(path)]
    return list(dict.fromkeys(c for c in captions if isinstance(c, str) and c.strip()))  # unique, in order


def prompt_column(path):
    """The prompts of one file: the caption (Pick-a-Pic) or Prompt (PartiPrompts) column of a parquet, .tsv or
    .csv file."""
    if path.endswith((".tsv", ".csv")):
        import pyarrow.csv
        table = pyarrow.csv.read_csv(io.BytesIO(rpo.file_bytes(path)), parse_options=pyarrow.csv.ParseOptions(
            delimiter="\t" if path.endswith(".tsv") else ","))
        names = table.column_names
    else:
        names = rpo.parquet(path).schema_arrow.names
    column = next((c for c in ("caption", "Prompt") if c in names), None)
    if column is None:
        fail(f"{path!r} has no caption or Prompt column, only {names}")
    if not path.endswith((".tsv", ".csv")):  # the caption column only: Pick-a-Pic's images stay unread
        table = rpo.parquet(path).read(columns=[column])
    return table.column(column).to_pylist()


# ----------------------------------------------------------------------------------------- prefer
def print_report(report, protocol):
    p = protocol
    print(f"{p['prompts']} prompts x {p['per_prompt']} images, {p['steps']} steps, guidance {p['guidance']}, "
          f"{p['resolution']} px; mean score [95 % interval over prompts]")
    scorers = list(next(iter(report["runs"].values())))
    width = max(12, *(len(name) + 2 for name in report["runs"]))
    print(f"{'':<{width}}" + "".join(f"{s:>30}" for s in scorers))
    for name, by in report["runs"].items():
        cells = (f"{by[s]['mean']:.4g} [{by[s]['ci'][0]:.4g}, {by[s]['ci'][1]:.4g}]" for s in scorers)
        print(f"{name:<{width}}" + "".join(cell.rjust(30) for cell in cells))
    for title, table in (("win rate against the base [95 % interval] p", report["win_rate_vs_base"]),
                         ("win rate between runs [95 % interval] p", report["win_rates"])):
        if table:
            print(title)
            for name, by in table.items():
                cells = (f"{w['rate']:.3f} [{w['ci'][0]:.3f}, {w['ci'][1]:.3f}] p {w['p']:.2g}"
                         for w in (by[s] for s in scorers))
                print(f"{name:<{width}}" + "".join(cell.rjust(30) for cell in cells))
    for s in scorers if "styles" in report else ():  # HPSv2's benchmark table: each style, their mean
        header = [*report["styles"], "averaged"]
        print(f"{s + ': mean by style':<{width}}" + "".join(f"{c:>13}" for c in header))
        for name in report["runs"]:
            means = [report["styles"][style]["runs"][name][s]["mean"] for style in report["styles"]]
            print(f"{name:<{width}}" + "".join(f"{m:>13.4g}" for m in [*means, np.mean(means)]))


def run_settings(paths, script=SCRIPT):
    """The rpo.py settings of each run (its DIR/settings.json; None where it has none). Each path is checked to
    be a run first; nothing in it is loaded but that JSON file."""
    found = []
    for path in paths:
        run_weights(path, script)
        file = os.path.join(path, rpo.SETTINGS_FILE)
        if not os.path.isfile(file):
            found.append(None)
            continue
        try:
            settings = json.load(open(file))
            if not all(isinstance(settings[key], str) for key in ("model", "pretrained", "data")):
                raise TypeError("model, pretrained and data must be strings")
        except (ValueError, KeyError, TypeError) as e:
            fail(f"{file} is not the settings file rpo.py writes ({rpo.first_line(e)})", script)
        found.append(settings)
    return found


def trained_as(args, settings, script=SCRIPT):
    """--model and --base default to the runs' own: the model they were trained as and the base they were tuned
    from. A run whose family --model cannot draw is an error before any work."""
    known = [s for s in settings if s]
    for key, name in (("model", "model"), ("pretrained", "base")):
        values = sorted({s[key] for s in known})
        if getattr(args, name, None) is None and values:
            if len(values) > 1:
                fail(f"the runs differ in their {name} ({', '.join(values)}); pass --{name}", script)
            setattr(args, name, values[0])
    args.model = args.model or "tiny-drawn"
    for s in known:
        if rpo.FAMILY.get(s["model"]) != rpo.FAMILY[args.model]:
            fail(f"a run was trained as --model {s['model']}, which --model {args.model}'s pipeline cannot draw "
                 f"with: pass --model {s['model']}", script)


def trained_world(settings, default):
    """The toy world the runs were trained in, read from their settings (default without any)."""
    worlds = {toy_world().world_of(s["data"]) or s["data"] for s in settings if s}  # a world's data folder: it
    if len(worlds) > 1:
        fail(f"the runs were trained on different data ({', '.join(sorted(map(str, worlds)))}); pass --prompts")
    world = worlds.pop() if worlds else default
    return world if world in toy_world().WORLDS else default


def prefer(args, cfg):
    device, dtype = device_dtype()
    base = args.base or cfg.pretrained
    paths = [os.path.normpath(path) for path in args.runs]
    names = [os.path.basename(path) for path in paths]  # a run is named by its folder, or its path if need be
    tuned = [run_weights(path) for path in paths]
    runs = dict(zip(names if len(set(names)) == len(names) else paths, tuned))
    if len(runs) != len(paths) or "base" in runs:
        fail("--runs must name each run once, and none 'base'")
    sets = prompt_sets(args)
    prompts = [p for ps in sets.values() for p in ps]
    if not prompts:
        fail(f"--prompts {args.prompts!r} has no prompts")
    world = args.prompts if args.prompts in toy_world().WORLDS else None
    scorers = load_scorers(args.scorers, world, args.clip or cfg.clip or os.path.join(base, "clip"))
    pipe = load_pipeline(args.model, base, device, dtype)
    each = [p for p in prompts for _ in range(args.per_prompt)]  # prompt k, image j: seed k x per_prompt + j
    scores, sheet = {}, {}
    for name, weights in {"base": None, **runs}.items():
        with drawing_with(pipe, weights, device, dtype):
            images = generate(pipe, each, args, device, desc=name)
        if args.save:
            save_images({name.replace(os.sep, "_"): images}, args.save)
        per_image = {s: score(images, each, device, dtype, args.batch) for s, score in scorers.items()}
        scores[name] = {s: v.reshape(len(prompts), -1).mean(1) for s, v in per_image.items()}
        sheet[name] = sheet_column(name, images, per_image, args.per_prompt, args.sheet)
    protocol = dict(model=args.model, base=base, prompts=len(prompts), prompt_set=args.prompts,
                    per_prompt=args.per_prompt, steps=args.steps, guidance=args.guidance,
                    resolution=args.resolution, seed=args.seed, scorers=list(scorers))
    if "judge" in scorers:
        toy = toy_world()
        protocol["judge_accuracy"] = toy.judge_accuracy(toy.load_judge(), world)
    report = dict(protocol=protocol, **summarize(scores))
    if args.prompts == "hpsv2":  # each style on its own, as HPSv2's benchmark table
        protocol["styles"] = {style: len(ps) for style, ps in sets.items()}
        bounds = np.cumsum([0, *protocol["styles"].values()])
        report["styles"] = {style: summarize({name: {s: v[a:b] for s, v in by.items()}
                                              for name, by in scores.items()})
                            for style, a, b in zip(sets, bounds[:-1], bounds[1:])}
    report["scores"] = {name: {s: v.tolist() for s, v in by.items()} for name, by in scores.items()}
    print_report(report, protocol)
    rpo.atomic_save(report, args.out)
    print(f"-> {args.out}", file=sys.stderr)
    if args.sheet:
        save_sheet(args.out, sheet, prompts[:args.sheet])
    return report


# ------------------------------------------------------------------------------------------- main
def model_flags():
    """The flags of the model and how it draws, which eval_style.py takes too."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", choices=list(rpo.FAMILY),
                        help="default the tuned run's (its settings.json), else tiny-drawn; tiny-drawn, "
                             "tiny-sd3-drawn, tiny, tiny-xl, tiny-sd3, tiny-flux: toy.py's models, offline")
    common.add_argument("--steps", type=int, help="denoising steps; default 50 for eval_prefer.py, else "
                                                  "rpo.py's sample_steps for --model")
    common.add_argument("--guidance", type=float, help="default 7.5; FLUX.1: 3.5, its embedded guidance as "
                                                       "rpo.py trains it (schnell ignores it)")
    common.add_argument("--resolution", type=int,
                        help="default rpo.py's for --model (512 for make-data unless tiny)")
    common.add_argument("--batch", type=int, default=8)
    common.add_argument("--seed", type=int, default=0)
    return common


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[model_flags()])
    p.add_argument("--runs", nargs="*", default=[],
                   help="tuned runs: rpo.py's OUT folders (unet/, transformer/ or lora/); the base model is "
                        "always scored")
    p.add_argument("--prompts", help="toy | toy-subject | pickapic | parti | hpsv2 | a .txt, .tsv, .csv or "
                                     "parquet path; default pickapic, or for tiny models the runs' toy world")
    p.add_argument("--data_id", default=rpo.Config.data_id,
                   help="the Pick-a-Pic that --prompts pickapic reads")
    p.add_argument("--split", help=f"default test for toy, {PICKAPIC_TEST} for pickapic, train otherwise")
    p.add_argument("--n", type=int, default=500, help="the first n prompts (hpsv2: of each style); 0 = all")
    p.add_argument("--per_prompt", type=int, default=1, help="images per prompt, their scores averaged")
    p.add_argument("--scorers", nargs="+", choices=SCORERS,
                   help="default judge and clip for tiny models, else pickscore, hps, aesthetic and clip")
    p.add_argument("--base", help="base pipeline id or folder; default the runs' own (their settings.json), "
                                  "else rpo.py's for --model")
    p.add_argument("--clip", help="the CLIP of the CLIP score; default rpo.py's for --model")
    p.add_argument("--save", help="write the generated images to SAVE/<model>/")
    p.add_argument("--out", default="prefer.json",
                   help="the report as JSON; the comparison sheet beside it, as .png")
    p.add_argument("--sheet", type=int, default=8, help="prompts in the comparison sheet; 0 = no sheet")
    return p.parse_args(argv)


def check_report(args, script=SCRIPT):
    """--out and --sheet of a command that writes a report and its sheet (eval_prefer.py, eval_style.py score),
    before any work."""
    if not args.out.endswith(".json"):
        fail(f"--out {args.out!r}: the report is JSON, name it *.json (the sheet goes beside it, as .png)",
             script)
    if args.sheet < 0:
        fail(f"--sheet {args.sheet}: the number of prompts in the sheet, 0 for none", script)


TINY_RANDOM = ("tiny", "tiny-xl", "tiny-sd3", "tiny-flux")  # toy.py's random-weight shapes


def presets(model):
    """rpo.py's settings for --model: its base, CLIP, resolution and sample steps; the tiny shapes' base is
    toy.py's random one."""
    tiny_base = ["--pretrained", toy_world().model_folder(model)] if model in TINY_RANDOM else []
    return rpo.parse_config(["--model", model, "--max_pairs", "0", "--report_to", "none", *tiny_base])


def model_guidance(args):
    """--guidance, or its default for --model: FLUX.1-dev's embedded guidance as rpo.py trains it, else 7.5."""
    if args.guidance is not None:
        return args.guidance
    return rpo.Config.guidance if rpo.FAMILY[args.model] == "flux" else 7.5


def toy_world():
    """toy.py, imported on first use, not with this module: the toy world's judge, prompts and tiny models, and
    whether a name or a data folder is a toy world's."""
    import toy
    return toy


def check_numbers(args, script=SCRIPT):
    """The counts and sizes a command was given (those it has), before any work."""
    for name, rule in (("batch", ">= 1"), ("per_prompt", ">= 1"), ("steps", ">= 1"), ("resolution", ">= 8"),
                       ("n", ">= 0")):
        value = getattr(args, name, None)
        if value is not None and not rpo.in_range(value, rule):
            fail(f"--{name} must be {rule}, got {value}", script)
    step = rpo.resolution_step(args.model)
    if args.resolution and args.resolution % step:
        fail(f"--resolution must be a multiple of {step} for --model {args.model}, got {args.resolution}", script)


def fill_defaults(args, cfg, settings):
    """The defaults that depend on --model, as the flags' help texts say."""
    tiny = args.model.startswith("tiny")
    args.steps = args.steps or 50
    args.resolution = args.resolution or cfg.resolution
    args.guidance = model_guidance(args)
    # tiny models: the toy world their runs were trained in
    args.prompts = args.prompts or (trained_world(settings, "toy") if tiny else "pickapic")
    args.scorers = args.scorers or (["judge", "clip"] if tiny else list(SCORERS[:4]))


def main(argv=None):
    args = parse_args(argv)
    check_report(args)
    settings = run_settings(args.runs)
    trained_as(args, settings)
    check_numbers(args)
    cfg = presets(args.model)
    fill_defaults(args, cfg, settings)
    return prefer(args, cfg)


if __name__ == "__main__":
    main()
