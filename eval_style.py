r"""Style alignment, an evaluation of Diffusion-RPO (Gu et al. 2024, arXiv 2406.06382).

make-data: preference pairs whose winner is a source image edited into a style by InstructPix2Pix and whose
loser is the original. score: how close a tuned model's generations come to held-out images of that style, by
the Frechet distance of their CLIP embeddings, the Gram distance of CLIP's vision features and the CLIP score.

    python eval_style.py make-data --model tiny --style "van gogh" --n 64 --out style.parquet  # offline, CPU
    python toy.py model tiny --out tiny  # the tiny shape's random weights, as eval_style.py's --model tiny
    python rpo.py --model tiny --pretrained tiny --data style.parquet --eval_data style_test.parquet \
        --eval_pairs 7 --out out_style
    python eval_style.py score --model tiny --unet out_style --prompts style_test.parquet --style "van gogh"

With --model sd15 or sdxl the same commands use InstructPix2Pix, Pick-a-Pic, Stable Diffusion and CLIP
ViT-L/14. The preference evaluation is eval_prefer.py; this file draws, loads CLIP and writes its comparison
sheet with eval_prefer.py's functions.
"""
import argparse
import glob
import io
import itertools
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import eval_prefer
import rpo

# style -> (InstructPix2Pix instruction, the phrase the CLIP score compares generations with)
STYLES = {"van gogh": ("turn it into a Van Gogh painting", "a painting in the style of Van Gogh"),
          "sketch": ("make it a pencil sketch", "a pencil sketch"),
          "winter": ("make it winter", "a snowy winter scene")}
IP2P = "timbrooks/instruct-pix2pix"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SCRIPT = "eval_style.py"  # the one-line errors' prefix, also of the eval_prefer.py helpers it calls


def fail(msg):
    eval_prefer.fail(msg, SCRIPT)


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


# the style's CLIP score: the mean over images of their CLIP scores against the style phrase
def clip_score(image_features, text_features):
    return float(eval_prefer.clip_scores(image_features, text_features).mean())


# ------------------------------------------------------------------------------------------- CLIP
@torch.no_grad()
def clip_stats(clip, images, batch):
    """CLIP image embeddings [N, D], and per layer the mean Gram matrix of the vision blocks' patch tokens."""
    feats, grams = [], None
    for i in range(0, len(images), batch):
        x = eval_prefer.clip_inputs(images[i:i + batch], clip.config.vision_config.image_size, clip.device)
        out = clip.get_image_features(pixel_values=x, output_hidden_states=True)
        feats.append(out.pooler_output.float().cpu().numpy())
        # every block's output, patch tokens only: the class token summarises content, not texture
        g = [s * len(x) for s in mean_grams([h[:, 1:] for h in out.hidden_states[1:]])]
        grams = g if grams is None else [a + b for a, b in zip(grams, g)]
    return np.concatenate(feats), [g / len(images) for g in grams]


# -------------------------------------------------------------------------------------- make-data
def style_of(args):
    instruction, phrase = STYLES.get(args.style.lower(), (None, args.style))
    return getattr(args, "instruction", None) or instruction, args.phrase or phrase


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def source_images(args, cfg):
    """(caption, original image) for each new caption of the source, in order; the original is the row's
    preferred image."""
    seen, counts = set(), {k: 0 for k in rpo.SKIP_KEYS}
    # a data folder (the toy world's too), a parquet or Pick-a-Pic, ties dropped
    for _, row in rpo.rows_in_order(cfg, args.source, args.split, counts):
        if row["caption"] in seen or not row["caption"].strip():
            continue
        # decode, short side to resolution, centre crop
        pair = rpo.prepare_pair((row, 0, args.resolution, False, None))
        if isinstance(pair, str):
            continue
        seen.add(row["caption"])
        yield row["caption"], Image.fromarray(pair["winner"].transpose(1, 2, 0))


def load_editor(args, device, dtype):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    editor = args.editor or (eval_prefer.toy_world().tiny_editor() if args.model.startswith("tiny") else IP2P)
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
    test_out = args.test_out or args.out.removesuffix(".parquet") + "_test.parquet"
    if os.path.abspath(test_out) == os.path.abspath(args.out):
        fail(f"--test_out {test_out!r} is --out: the held-out pairs need a file of their own")
    device, dtype = eval_prefer.device_dtype()
    pipe = load_editor(args, device, dtype)
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
def generate_sets(args, base, captions, weights, device, dtype):
    """The base model's images for the captions, then the tuned run's in the same pipeline, same noise."""
    if not captions:
        fail(f"--prompts {args.prompts!r} has no captions")
    captions = captions[:args.n or None]
    pipe = eval_prefer.load_pipeline(args.model, base, device, dtype)
    sets = {"base": eval_prefer.generate(pipe, captions, args, device)}
    if weights:
        with eval_prefer.drawing_with(pipe, weights, device, dtype):
            sets["tuned"] = eval_prefer.generate(pipe, captions, args, device)
    return sets


def style_set(path, cfg, what):
    """Captions and style images from a Pick-a-Pic-schema parquet (the winners), a folder of images, or a .txt
    of captions."""
    if path.endswith(".txt"):
        return eval_prefer.text_lines(path, what, SCRIPT), None
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


@torch.no_grad()
def text_features(clip, tok, phrase):
    ids = tok([phrase], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return clip.get_text_features(input_ids=ids.to(clip.device)).pooler_output.float().cpu()


def style_scores(clip, text, ref, sets, batch):
    """The reference images' CLIP score, and each set's distances to them (FD, Gram), CLIP score and its
    images' own CLIP scores."""
    ref_feats, ref_grams = clip_stats(clip, ref, batch)
    scores = {"reference": dict(images=len(ref), clip_score=clip_score(ref_feats, text))}
    for name, images in sets.items():
        feats, grams = clip_stats(clip, images, batch)
        scores[name] = dict(images=len(images), fd=frechet_distance(feats, ref_feats),
                            gram=gram_distance(grams, ref_grams), clip_score=clip_score(feats, text),
                            clip_scores=eval_prefer.clip_scores(feats, text).tolist())
    return scores


def print_table(rows):
    print(f"{'':<16}{'FD (CLIP)':>12}{'Gram':>10}{'CLIP score':>12}{'images':>8}")
    for name, r in rows:
        print(f"{name[:16]:<16}{r['fd']:>12.4f}{r['gram']:>10.4f}{r['clip_score']:>12.2f}{r['images']:>8}")


def score(args, cfg):
    names = [os.path.basename(os.path.normpath(d)) for d in args.images or []]  # the report's keys
    if len(set(names)) < len(names) or {"reference", "style", "phrase"} & set(names):
        fail(f"--images {' '.join(names)}: the report names each folder by its last part, so these must differ "
             f"from each other and from reference, style and phrase")
    device, dtype = eval_prefer.device_dtype()
    _, phrase = style_of(args)
    base = args.base or cfg.pretrained
    captions, ref = style_set(args.prompts, cfg, "--prompts")
    if args.ref:
        ref = style_set(args.ref, cfg, "--ref")[1]
    if ref is None:
        fail("no style reference images: pass --ref, a parquet from make-data or a folder of images")
    weights = eval_prefer.run_weights(args.unet, SCRIPT) if args.unet else None
    if args.images:
        sets = {name: style_set(d, cfg, "--images")[1] for name, d in zip(names, args.images)}
    else:
        sets = generate_sets(args, base, captions, weights, device, dtype)
    if args.save:
        eval_prefer.save_images(sets, args.save)
    clip, tok = eval_prefer.load_clip(args.clip or cfg.clip or os.path.join(base, "clip"), device)
    result = {"style": args.style, "phrase": phrase,
              **style_scores(clip, text_features(clip, tok, phrase), ref, sets, args.batch)}
    print(f"style {args.style!r}, CLIP score against {phrase!r}; distances to {len(ref)} reference images")
    reference = dict(result["reference"], fd=0.0, gram=0.0)
    print_table([(k, result[k]) for k in sets] + [("style reference", reference)])
    print(json.dumps(result), flush=True)
    rpo.atomic_save(result, args.out)
    print(f"-> {args.out}", file=sys.stderr)
    rows = min(args.sheet, *map(len, sets.values()))
    if rows:
        columns = {name: eval_prefer.sheet_column(name, images, {"CLIP score": result[name]["clip_scores"]}, 1,
                                                  rows) for name, images in sets.items()}
        eval_prefer.save_sheet(args.out, columns, (captions or [f"image {k}" for k in range(rows)])[:rows])
    return result


# ------------------------------------------------------------------------------------------- main
def parse_args(argv):
    common = eval_prefer.model_flags()
    style = argparse.ArgumentParser(add_help=False)
    style.add_argument("--style", default="van gogh",
                       help=f"one of {list(STYLES)} or any, with --instruction")
    style.add_argument("--phrase",
                       help="text for the CLIP score; default from the style table, else the style")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-data", parents=[common, style],
                       help="edit source images into the style: style.parquet")
    m.add_argument("--instruction", help="InstructPix2Pix instruction; default from the style table")
    m.add_argument("--source",
                   help="pickapic | a data folder or parquet path; default rpo.py's default data (the toy "
                        "world) for tiny models, else pickapic")
    m.add_argument("--data_id", default=rpo.Config.data_id)
    m.add_argument("--split", default="train")
    m.add_argument("--n", type=int, default=1000, help="captions to edit, train and test together")
    m.add_argument("--test_every", type=int, default=10, help="every k-th caption is held out")
    m.add_argument("--image_guidance", type=float, default=1.5)
    m.add_argument("--editor", help=f"InstructPix2Pix id or folder; default {IP2P} (tiny: a random one)")
    m.add_argument("--out", default="style.parquet")
    m.add_argument("--test_out", help="held-out pairs; default OUT with _test")

    s = sub.add_parser("score", parents=[common, style],
                       help="FD, Gram distance and CLIP score of base and tuned models")
    s.add_argument("--unet", help="the tuned run: rpo.py's OUT (unet/, transformer/ or lora/), or the folder; "
                                   "without it only the base model is scored")
    s.add_argument("--base", help="base pipeline id or folder; default the run's own (its settings.json), else "
                                  "rpo.py's for --model")
    s.add_argument("--prompts", default="style_test.parquet",
                   help="held-out captions: make-data's test parquet or a .txt")
    s.add_argument("--ref",
                   help="style reference images: a parquet's winners or a folder; default --prompts")
    s.add_argument("--images", nargs="+",
                   help="score these folders of generated images instead of generating")
    s.add_argument("--clip", help="CLIP id or folder; default rpo.py's for --model")
    s.add_argument("--n", type=int, default=0, help="first n captions only; 0 = all")
    s.add_argument("--save", help="write the generated images to SAVE/base, SAVE/tuned")
    s.add_argument("--out", default="score.json",
                   help="the scores as JSON; the comparison sheet beside it, as .png")
    s.add_argument("--sheet", type=int, default=8, help="captions in the comparison sheet; 0 = no sheet")
    return p.parse_args(argv)


def fill_defaults(args, cfg):
    """The defaults that depend on --model, as the flags' help texts say."""
    tiny = args.model.startswith("tiny")
    args.steps = args.steps or cfg.sample_steps
    if args.command == "make-data":
        args.source = args.source or (rpo.Config.data if tiny else "pickapic")
        # InstructPix2Pix is an SD1.5 at 512
        args.resolution = args.resolution or (cfg.resolution if tiny else 512)
        args.guidance = 7.5 if args.guidance is None else args.guidance  # InstructPix2Pix's text guidance
    else:
        args.resolution = args.resolution or cfg.resolution
        args.guidance = eval_prefer.model_guidance(args)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "score":
        eval_prefer.check_report(args, SCRIPT)
    settings = eval_prefer.run_settings([args.unet] if getattr(args, "unet", None) else [], SCRIPT)
    eval_prefer.trained_as(args, settings, SCRIPT)  # --model and --base: the tuned run's by default
    eval_prefer.check_numbers(args, SCRIPT)
    cfg = eval_prefer.presets(args.model)
    fill_defaults(args, cfg)
    if args.command == "score":
        return score(args, cfg)
    if args.n < 2 or args.test_every < 2:
        fail("--n and --test_every must be at least 2")
    cfg.data_id = args.data_id  # the Pick-a-Pic that --source pickapic reads
    return make_data(args, cfg)


if __name__ == "__main__":
    main()
