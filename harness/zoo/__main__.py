"""Train, install, evaluate and document the shipped models: ``python -m harness.zoo <command>``.

Commands:
    train MODEL     train ``vae``, ``tiny-clip``, ``tiny-sd`` (needs the vae), ``tiny-sd-inpaint`` (needs tiny-sd)
                    or ``all`` (in that order) in a work folder (resumes from checkpoints), then install the
                    result into the package (``harness/zoo/<model>``, fp16 safetensors).
    evaluate        measure the quality figures of the installed models (``figures.json`` in each folder) and
                    write the model cards; ``--skip-lora`` skips the (minutes-long) LoRA positive control.
    cards           rewrite the model cards from the saved training records and figures.
    grid            save a PNG grid of procedural artworks, one row per artist.

Examples:
    python -m harness.zoo train all --work zoo-work --threads 2
    python -m harness.zoo evaluate
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.report import save_grid
from harness.zoo import cards

ZOO = Path(__file__).resolve().parent
MODELS = ("tiny-clip", "tiny-sd", "tiny-sd-inpaint")


def _install_pipeline(work: Path, name: str, record_files: list[str], zoo: Path = ZOO) -> Path:
    """Copy the trained pipeline folder ``work/name`` into ``zoo/name`` (atomically), with its training records."""
    dest = zoo / name
    tmp = zoo / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / name, tmp)
    records = [json.loads((work / f).read_text()) for f in record_files if (work / f).is_file()]
    (tmp / "training.json").write_text(json.dumps(records, indent=2) + "\n")
    if (dest / "figures.json").is_file():
        shutil.copy2(dest / "figures.json", tmp / "figures.json")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def install_clip(work: Path, zoo: Path = ZOO) -> Path:
    """Write tiny-clip as an open_clip ``local-dir`` folder: config, fp16 safetensors, tokenizer."""
    from safetensors.torch import save_file

    from harness.zoo import architectures as arch
    from harness.zoo.tokenizer import save_world_tokenizer
    from harness.zoo.train import OPENAI_MEAN, OPENAI_STD

    dest = zoo / "tiny-clip"
    tmp = zoo / ".tiny-clip.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tokenizer = save_world_tokenizer(tmp)
    cfg = arch.clip_config(len(tokenizer))
    cfg["text_cfg"]["hf_tokenizer_name"] = "tiny-clip-world-bpe"  # open_clip reads the tokenizer from this folder
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": {
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
            "image_size": arch.RESOLUTION,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = torch.load(work / "clip_final.pt", map_location="cpu")
    save_file(
        {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()},
        str(tmp / "open_clip_model.safetensors"),
    )
    record = json.loads((work / "clip_record.json").read_text())
    (tmp / "training.json").write_text(json.dumps([record], indent=2) + "\n")
    if (dest / "figures.json").is_file():
        shutil.copy2(dest / "figures.json", tmp / "figures.json")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def cmd_train(args: argparse.Namespace) -> None:
    from harness.zoo import train

    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"seed": args.seed, "device": args.device}
    if args.steps:
        kw["steps"] = args.steps
    todo = ["vae", "tiny-clip", "tiny-sd", "tiny-sd-inpaint"] if args.model == "all" else [args.model]
    for model in todo:
        t0 = time.time()
        if model == "vae":
            train.train_vae(work, **kw)
        elif model == "tiny-clip":
            train.train_clip(work, **kw)
            install_clip(work)
        elif model == "tiny-sd":
            if not (work / "vae" / "config.json").is_file():
                train.train_vae(work, **{k: v for k, v in kw.items() if k != "steps"})
            train.train_sd(work, **kw)
            _install_pipeline(work, "tiny-sd", ["vae_record.json", "sd_record.json"])
        elif model == "tiny-sd-inpaint":
            if not (work / "tiny-sd" / "model_index.json").is_file():
                raise SystemExit(f"train tiny-sd first: {work / 'tiny-sd'} is missing")
            train.train_inpaint(work, **kw)
            _install_pipeline(work, "tiny-sd-inpaint", ["vae_record.json", "sd_record.json", "inpaint_record.json"])
        print(f"{model}: done in {time.time() - t0:.0f} s", flush=True)
    cards.write_all()


def _save_figures(model: str, figures: dict[str, Any]) -> None:
    path = ZOO / model / "figures.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(figures)
    path.write_text(json.dumps(old, indent=2) + "\n")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from harness.metrics.clip import load_clip, style_classifier
    from harness.models import ModelSpec, load_pipeline
    from harness.zoo import evaluate as ev

    torch.set_num_threads(args.threads)
    out = Path(args.grids)
    clip = load_clip("tiny-clip", device=args.device)
    stamp = {"measured_on": time.strftime("%Y-%m-%d"), "device": args.device, "threads": torch.get_num_threads()}
    if "tiny-clip" in args.models:
        t0 = time.time()
        figures = ev.evaluate_clip(clip)
        print("tiny-clip", json.dumps(figures), flush=True)
        _save_figures("tiny-clip", {"evaluation": {**figures, **stamp, "seconds": round(time.time() - t0, 1)}})
    clf = style_classifier(clip)
    if "tiny-sd" in args.models:
        spec = ModelSpec(source="tiny-sd", resolution=64)
        t2i = load_pipeline(spec, "text2img", args.device)
        sd: dict[str, Any] = {**stamp}
        sd["vae_reconstruction"] = ev.evaluate_vae(t2i.vae)
        print("vae", json.dumps(sd["vae_reconstruction"]), flush=True)
        sd["text2img"], samples = ev.evaluate_text2img(t2i, clf)
        print("text2img", json.dumps(sd["text2img"]), flush=True)
        from harness.world import ARTISTS, SUBJECTS

        # one row per artist: the first seed of every subject
        first = samples.view(len(ARTISTS), len(SUBJECTS), -1, *samples.shape[1:])[:, :, 0].flatten(0, 1)
        save_grid(first, len(ARTISTS), out / "tiny-sd-text2img.png", labels=list(ARTISTS))
        sd["img2img"] = ev.evaluate_img2img(load_pipeline(spec, "img2img", args.device), clf)
        print("img2img", json.dumps(sd["img2img"]), flush=True)
        if not args.skip_lora:
            sd["lora_positive_control"] = ev.evaluate_lora(t2i, clf, steps=args.lora_steps)
            print("lora", json.dumps(sd["lora_positive_control"]), flush=True)
        _save_figures("tiny-sd", {"evaluation": sd})
    if "tiny-sd-inpaint" in args.models:
        spec = ModelSpec(source="tiny-sd-inpaint", resolution=64)
        figures = ev.evaluate_inpaint(load_pipeline(spec, "inpaint", args.device), clf)
        print("inpaint", json.dumps(figures), flush=True)
        _save_figures("tiny-sd-inpaint", {"evaluation": {**figures, **stamp}})
    cards.write_all()


def cmd_grid(args: argparse.Namespace) -> None:
    from harness.world import ARTISTS, SUBJECTS, ProceduralArt

    art = ProceduralArt(per_pair=1, seed=args.seed, split="eval").load()
    save_grid(art.images, len(ARTISTS), Path(args.out), labels=list(ARTISTS))
    print(f"wrote {args.out}: {len(ARTISTS)} artists x {len(SUBJECTS)} subjects")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="python -m harness.zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a shipped model and install it into the package")
    p.add_argument("model", choices=["vae", *MODELS, "all"])
    p.add_argument("--work", default="zoo-work", help="work folder for checkpoints and intermediate results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="override the stage's default number of steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="measure the installed models and write figures and model cards")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-lora", action="store_true")
    p.add_argument("--lora-steps", type=int, default=400)
    p.add_argument("--grids", default="docs/zoo", help="folder for the sample grids")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("cards", help="rewrite the model cards")
    p.set_defaults(func=lambda a: cards.write_all())
    p = sub.add_parser("grid", help="save a grid of procedural artworks")
    p.add_argument("--out", default="docs/zoo/world-artists.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_grid)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
