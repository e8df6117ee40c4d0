r"""Style alignment for Diffusion-RPO (Gu et al. 2024, arXiv 2406.06382): preference pairs whose winner is
a source image edited into a style by InstructPix2Pix and whose loser is the original, then a score of how
close a tuned model's generations come to held-out images of that style.

    python eval_style.py make-data --model tiny --style "van gogh" --n 64 --out style.parquet  # offline, CPU
    python rpo.py --model tiny --data style.parquet --eval_data style_test.parquet --eval_pairs 7 \
        --out out_style
    python eval_style.py score --model tiny --unet out_style/unet --prompts style_test.parquet \
        --style "van gogh"

Without --model tiny the same commands use the real InstructPix2Pix, Pick-a-Pic, Stable Diffusion and
CLIP ViT-L/14.
"""
import argparse
import glob
import io
import itertools
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import rpo

# style -> (InstructPix2Pix instruction, the phrase the CLIP score compares generations with)
STYLES = {"van gogh": ("turn it into a Van Gogh painting", "a painting in the style of Van Gogh"),
          "sketch": ("make it a pencil sketch", "a pencil sketch"),
          "winter": ("make it winter", "a snowy winter scene")}
IP2P = "timbrooks/instruct-pix2pix"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fail(msg):
    sys.exit(f"eval_style.py: {msg}")


# ---------------------------------------------------------------------------------------- metrics
def covariance(x):  # unbiased; one sample has no spread, not NaN
    d = x - x.mean(0)
    return d.T @ d / max(len(x) - 1, 1)


def psd_sqrt(s):  # symmetric square root; rounding makes tiny negative eigenvalues, which are 0
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)),
# where Tr (S_a S_b)^(1/2) = sum sqrt eig(S_a^(1/2) S_b S_a^(1/2))
def gaussian_frechet(mu_a, s_a, mu_b, s_b):
    root = psd_sqrt(s_a)
    m = root @ s_b @ root  # symmetric PSD even when S_a, S_b are singular (N < D): eigh, no complex sqrtm
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return max(float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_root), 0.0)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two [N, D] feature arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return gaussian_frechet(a.mean(0), covariance(a), b.mean(0), covariance(b))


# G = H^T H / T per image and layer (H: [T, C] token states), averaged over the images -> one [C, C] per layer
def mean_grams(layers):
    return [(h.float().transpose(1, 2) @ h.float()).sum(0).double().cpu().numpy() / (h.shape[0] * h.shape[1])
            for h in layers]


# d = mean over layers of |G_a - G_b|_F / (|G_a|_F + |G_b|_F)
# 0 for the same style, at most 1, and scale-free per layer, so no layer's magnitude dominates
def gram_distance(grams_a, grams_b):
    return float(np.mean([np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-12)
                          for a, b in zip(grams_a, grams_b)]))


# CLIP score = 100 * mean over images of max(cos(image features, text features of the style phrase), 0)
def clip_score(image_features, text_features):
    image, text = (F.normalize(torch.as_tensor(x).double(), dim=-1) for x in (image_features, text_features))
    return float(100 * (image @ text.T).clamp(min=0).mean())


def clip_inputs(images, size, device):
    """CLIP's preprocessing: short side to size, centre crop, then CLIP's mean and std."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (rpo.CLIP_MEAN, rpo.CLIP_STD))
    x = np.stack([np.asarray(ImageOps.fit(im.convert("RGB"), (size, size), Image.BICUBIC)) for im in images])
    return (torch.from_numpy(x).permute(0, 3, 1, 2).to(device).float() / 255 - mean) / std


@torch.no_grad()
def clip_stats(clip, images, batch):
    """CLIP image embeddings [N, D], and per layer the mean Gram matrix of the vision blocks' patch tokens."""
    feats, grams = [], None
    for i in range(0, len(images), batch):
        x = clip_inputs(images[i:i + batch], clip.config.vision_config.image_size, clip.device)
        out = clip.get_image_features(pixel_values=x, output_hidden_states=True)
        feats.append(out.pooler_output.float().cpu().numpy())
        # every block's output, patch tokens only: the class token summarises content, not texture
        g = [s * len(x) for s in mean_grams([h[:, 1:] for h in out.hidden_states[1:]])]
        grams = g if grams is None else [a + b for a, b in zip(grams, g)]
    return np.concatenate(feats), [g / len(images) for g in grams]


# ---------------------------------------------------------------------------------------- helpers
def device_dtype():
    cuda = torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32


def style_of(args):
    instruction, phrase = STYLES.get(args.style.lower(), (None, args.style))
    return getattr(args, "instruction", None) or instruction, args.phrase or phrase


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tiny_editor():
    """A random InstructPix2Pix from rpo.py's tiny parts: its UNet takes 8 channels, noisy and source-image
    latents."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler,
                           StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer
    folder = os.path.join(rpo.RPO_HOME, "tiny-ip2p-random")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        base = rpo.model_folder(rpo.parse_config(["--model", "tiny"]))
        torch.manual_seed(0)
        shutil.rmtree(folder + ".tmp", ignore_errors=True)
        StableDiffusionInstructPix2PixPipeline(
            vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
            unet=UNet2DConditionModel(**dict(rpo.SHAPES["tiny"]["unet"], in_channels=8)),
            # as the real one
            scheduler=EulerAncestralDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).save_pretrained(folder + ".tmp")
        os.replace(folder + ".tmp", folder)
    return folder


def source_images(args, cfg):
    """(caption, original image) for each new caption of the source, in order; the original is the row's
    preferred image."""
    seen, counts = set(), {k: 0 for k in rpo.SKIP_KEYS}
    # toy rows, a parquet or Pick-a-Pic, ties dropped
    for _, row in rpo.rows_in_order(cfg, args.source, args.split, counts):
        if row["caption"] in seen or not row["caption"].strip():
            continue
        # decode, short side to resolution, centre crop
        pair = rpo.prepare_pair((row, 0, args.resolution, False, None))
        if isinstance(pair, str):
            continue
        seen.add(row["caption"])
        yield row["caption"], Image.fromarray(pair["winner"].transpose(1, 2, 0))


def style_set(path, cfg, what):
    """Captions and style images from a Pick-a-Pic-schema parquet (the winners), a folder of images, or a .txt
    of captions."""
    if path.endswith(".txt"):
        if not os.path.isfile(path):
            fail(f"{what} {path!r} does not exist")
        return [line.strip() for line in open(path) if line.strip()], None
    if os.path.isdir(path) and not glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            fail(f"{what} folder {path!r} has no images")
        return None, [Image.open(os.path.join(path, f)).convert("RGB") for f in files]
    if not glob.glob(path) and not os.path.isdir(path):
        fail(f"{what} {path!r} does not exist")
    rows = [row for _, row in rpo.rows_in_order(cfg, path, "train")]
    winners = [r["jpg_0"] if r["label_0"] == 1 else r["jpg_1"] for r in rows]
    return [r["caption"] for r in rows], [rpo.decode(w) for w in winners]


# -------------------------------------------------------------------------------------- make-data
def load_editor(args, device, dtype):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    editor = args.editor or (tiny_editor() if args.model.startswith("tiny") else IP2P)
    pipe = rpo.pretrained(StableDiffusionInstructPix2PixPipeline, editor, dtype=dtype, safety_checker=None,
                          requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edited_chunks(pipe, sources, instruction, args, device):
    """The first args.n (caption, image) of sources, edited args.batch at a time: per chunk the index of its
    first caption, its (caption, original) and the styled images."""
    bar, done = tqdm(total=args.n, desc=f"editing: {instruction}"), 0
    while done < args.n:
        chunk = list(itertools.islice(sources, min(args.batch, args.n - done)))
        if not chunk:
            break
        seeds = range(args.seed + done, args.seed + done + len(chunk))  # seed k for caption k
        styled = pipe([instruction] * len(chunk), image=[img for _, img in chunk],
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      image_guidance_scale=args.image_guidance,
                      generator=[torch.Generator(device).manual_seed(s) for s in seeds]).images
        yield done, chunk, styled
        bar.update(len(chunk))
        done += len(chunk)
    bar.close()


def write_pairs(chunks, train_path, test_path, test_every):
    """Streams the pairs into PATH.tmp, one row group per chunk and file, so any --n fits in memory.
    Returns the pairs written per path: {} (and no files) when there was no chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64())])
    writers, n = {}, {}
    for start, chunk, styled in chunks:
        rows = {train_path: [], test_path: []}
        for i, ((caption, original), edit) in enumerate(zip(chunk, styled)):
            # every test_every-th caption is held out: captions are unique, so no test caption is trained on
            rows[test_path if (start + i) % test_every == 0 else train_path].append(
                dict(caption=caption, jpg_0=jpeg(edit), jpg_1=jpeg(original), label_0=1.0))
        if not writers:
            writers, n = {p: pq.ParquetWriter(p + ".tmp", schema) for p in rows}, dict.fromkeys(rows, 0)
        for p, r in rows.items():
            if r:
                writers[p].write_table(pa.Table.from_pylist(r, schema))
                n[p] += len(r)
    for w in writers.values():
        w.close()
    return n


def make_data(args, cfg):
    instruction, _ = style_of(args)
    if not instruction:
        fail(f"unknown style {args.style!r} (known: {', '.join(STYLES)}); pass --instruction \"make it ...\"")
    device, dtype = device_dtype()
    pipe = load_editor(args, device, dtype)
    test_out = args.test_out or args.out.removesuffix(".parquet") + "_test.parquet"
    chunks = edited_chunks(pipe, source_images(args, cfg), instruction, args, device)
    n = write_pairs(chunks, args.out, test_out, args.test_every)
    if not n.get(args.out) or not n.get(test_out):
        for p in n:
            os.remove(p + ".tmp")
        fail(f"{args.source!r} gave {sum(n.values())} usable captions; need at least 2 (one train, one test)")
    for p in n:
        os.replace(p + ".tmp", p)
    print(f"{n[args.out]} train pairs -> {args.out}, "
          f"{n[test_out]} held-out pairs (style reference) -> {test_out}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ score
def unet_folder(unet):
    """The tuned UNet's folder from --unet (rpo.py's OUT/unet, or a folder holding unet/); None without it."""
    if not unet:
        return None
    folder = os.path.join(unet, "unet") if os.path.isdir(os.path.join(unet, "unet")) else unet
    if not os.path.isfile(os.path.join(folder, "config.json")):
        fail(f"--unet {unet!r} is not a UNet folder; pass rpo.py's OUT/unet")
    return folder


def load_pipeline(model, base, device, dtype):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    if rpo.IS_XL[model]:
        pipe = rpo.pretrained(StableDiffusionXLPipeline, base, dtype=dtype, add_watermarker=False)
    else:
        pipe = rpo.pretrained(StableDiffusionPipeline, base, dtype=dtype, safety_checker=None,
                              requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as rpo.py's samples
    pipe.to(device).set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, captions, args, device):
    images = []
    for i in tqdm(range(0, len(captions), args.batch), desc="generating"):
        # seed k for caption k, any model
        seeds = range(args.seed + i, args.seed + min(i + args.batch, len(captions)))
        images += pipe(captions[i:i + args.batch], num_inference_steps=args.steps,
                       guidance_scale=args.guidance, height=args.resolution, width=args.resolution,
                       generator=[torch.Generator(device).manual_seed(s) for s in seeds]).images
    return images


def generate_sets(args, base, captions, unet_dir, device, dtype):
    """The base model's images for the captions, then the tuned UNet's in the same pipeline, same seeds."""
    from diffusers import UNet2DConditionModel
    if not captions:
        fail(f"--prompts {args.prompts!r} has no captions")
    captions = captions[:args.n or None]
    pipe = load_pipeline(args.model, base, device, dtype)
    sets = {"base": generate(pipe, captions, args, device)}
    if unet_dir:
        pipe.unet = rpo.pretrained(UNet2DConditionModel, unet_dir, dtype=dtype).to(device)
        sets["tuned"] = generate(pipe, captions, args, device)
    return sets


def save_images(sets, folder):
    for name, images in sets.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for k, img in enumerate(images):
            img.save(os.path.join(folder, name, f"{k:05d}.png"))


def load_clip(clip_id, device):
    from transformers import CLIPModel, CLIPTokenizer
    return rpo.pretrained(CLIPModel, clip_id).to(device).eval(), rpo.pretrained(CLIPTokenizer, clip_id)


@torch.no_grad()
def text_features(clip, tok, phrase):
    ids = tok([phrase], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return clip.get_text_features(input_ids=ids.to(clip.device)).pooler_output.float().cpu()


def style_scores(clip, text, ref, sets, batch):
    """The reference images' CLIP score, and each set's distances to them (FD, Gram) and CLIP score."""
    ref_feats, ref_grams = clip_stats(clip, ref, batch)
    scores = {"reference": dict(images=len(ref), clip_score=clip_score(ref_feats, text))}
    for name, images in sets.items():
        feats, grams = clip_stats(clip, images, batch)
        scores[name] = dict(images=len(images), fd=frechet_distance(feats, ref_feats),
                            gram=gram_distance(grams, ref_grams), clip_score=clip_score(feats, text))
    return scores


def print_table(rows):
    print(f"{'':<16}{'FD (CLIP)':>12}{'Gram':>10}{'CLIP score':>12}{'images':>8}")
    for name, r in rows:
        print(f"{name[:16]:<16}{r['fd']:>12.4f}{r['gram']:>10.4f}{r['clip_score']:>12.2f}{r['images']:>8}")


def score(args, cfg):
    device, dtype = device_dtype()
    _, phrase = style_of(args)
    base = args.base or rpo.model_folder(cfg)
    captions, ref = style_set(args.prompts, cfg, "--prompts")
    if args.ref:
        ref = style_set(args.ref, cfg, "--ref")[1]
    if ref is None:
        fail("no style reference images: pass --ref, a parquet from make-data or a folder of images")
    unet_dir = unet_folder(args.unet)
    if args.images:
        sets = {os.path.basename(os.path.normpath(d)): style_set(d, cfg, "--images")[1] for d in args.images}
    else:
        sets = generate_sets(args, base, captions, unet_dir, device, dtype)
    if args.save:
        save_images(sets, args.save)
    clip, tok = load_clip(args.clip or cfg.clip or os.path.join(base, "clip"), device)
    result = {"style": args.style, "phrase": phrase,
              **style_scores(clip, text_features(clip, tok, phrase), ref, sets, args.batch)}
    print(f"style {args.style!r}, CLIP score against {phrase!r}; distances to {len(ref)} reference images")
    reference = dict(result["reference"], fd=0.0, gram=0.0)
    print_table([(k, result[k]) for k in sets] + [("style reference", reference)])
    print(json.dumps(result), flush=True)
    return result


# ------------------------------------------------------------------------------------------- main
def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="tiny", choices=list(rpo.IS_XL),
                        help="tiny: random models, offline")
    common.add_argument("--style", default="van gogh",
                        help=f"one of {list(STYLES)} or any, with --instruction")
    common.add_argument("--phrase",
                        help="text for the CLIP score; default from the style table, else the style")
    common.add_argument("--steps", type=int,
                        help="denoising steps; default rpo.py's sample_steps for --model")
    common.add_argument("--guidance", type=float, default=7.5)
    common.add_argument("--resolution", type=int,
                        help="default rpo.py's for --model (512 for make-data unless tiny)")
    common.add_argument("--batch", type=int, default=8)
    common.add_argument("--seed", type=int, default=0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-data", parents=[common], help="edit source images into the style: style.parquet")
    m.add_argument("--instruction", help="InstructPix2Pix instruction; default from the style table")
    m.add_argument("--source",
                   help="toy | pickapic | parquet path; default toy for tiny models, else pickapic")
    m.add_argument("--data_id", default=rpo.Config.data_id)
    m.add_argument("--split", default="train")
    m.add_argument("--n", type=int, default=1000, help="captions to edit, train and test together")
    m.add_argument("--test_every", type=int, default=10, help="every k-th caption is held out")
    m.add_argument("--image_guidance", type=float, default=1.5)
    m.add_argument("--editor", help=f"InstructPix2Pix id or folder; default {IP2P} (tiny: a random one)")
    m.add_argument("--out", default="style.parquet")
    m.add_argument("--test_out", help="held-out pairs; default OUT with _test")

    s = sub.add_parser("score", parents=[common],
                       help="FD, Gram distance and CLIP score of base and tuned models")
    s.add_argument("--unet",
                   help="tuned UNet folder (rpo.py's OUT/unet); without it only the base model is scored")
    s.add_argument("--base", help="base pipeline id or folder; default rpo.py's for --model")
    s.add_argument("--prompts", default="style_test.parquet",
                   help="held-out captions: make-data's test parquet or a .txt")
    s.add_argument("--ref",
                   help="style reference images: a parquet's winners or a folder; default --prompts")
    s.add_argument("--images", nargs="+",
                   help="score these folders of generated images instead of generating")
    s.add_argument("--clip", help="CLIP id or folder; default rpo.py's for --model")
    s.add_argument("--n", type=int, default=0, help="first n captions only; 0 = all")
    s.add_argument("--save", help="write the generated images to SAVE/base, SAVE/tuned")
    return p.parse_args(argv)


def fill_defaults(args, cfg):
    """The defaults that depend on --model, as the flags' help texts say."""
    tiny = args.model.startswith("tiny")
    args.steps = args.steps or cfg.sample_steps
    if args.command == "make-data":
        args.source = args.source or ("toy" if tiny else "pickapic")
        # InstructPix2Pix is an SD1.5 at 512
        args.resolution = args.resolution or (cfg.resolution if tiny else 512)
    else:
        args.resolution = args.resolution or cfg.resolution


def main(argv=None):
    args = parse_args(argv)
    cfg = rpo.parse_config(["--model", args.model, "--max_pairs", "0"])
    fill_defaults(args, cfg)
    if args.command == "score":
        return score(args, cfg)
    if args.n < 2 or args.test_every < 2:
        fail("--n and --test_every must be at least 2")
    cfg.data_id = args.data_id  # the Pick-a-Pic that --source pickapic reads
    return make_data(args, cfg)


if __name__ == "__main__":
    main()
