"""Train, install, evaluate and document the shipped models: ``python -m harness.zoo <command>``.

Commands:
    train MODEL     train ``tiny-vae``, ``tiny-clip``, ``tiny-sd`` (needs tiny-vae), ``tiny-sd-inpaint`` (needs
                    tiny-sd) or ``all`` (in that order) in a work folder (resumes from checkpoints), then install
                    the result into the package (``harness/zoo/<model>``, fp16 safetensors; ``--no-install``
                    keeps the shipped ones). All are the embedded world v2's (128 px, an 8x autoencoder).
    evaluate        measure the quality figures of the installed models (``figures.json`` in each folder) and
                    write the model cards; ``--skip-lora`` skips the (minutes-long) LoRA positive control;
                    ``--models concepts`` measures the poisoning threat model's figures (tiny-clip's subject
                    accuracy, how much tiny-sd's prompt's subject conditions it); ``--models lora`` the LoRA
                    positive control alone, at the audits' recipe or, with ``--lora-steps/--lora-lr/--lora-rank``,
                    at another (a trial, shown beside it on tiny-sd's card).
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
#: models of the embedded world v2 shipped so far (issue 16 moves the others to it)
MODELS_V2 = ("tiny-vae",)


def _install_pipeline(
    work: Path, name: str, record_files: list[str], zoo: Path = ZOO, dest_name: str | None = None
) -> Path:
    """Copy the trained pipeline folder ``work/name`` into ``zoo/<dest_name or name>`` (atomically), with its
    training records."""
    dest = zoo / (dest_name or name)
    tmp = zoo / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / name, tmp)
    records = [json.loads((work / f).read_text()) for f in record_files if (work / f).is_file()]
    (tmp / "training.json").write_text(json.dumps(records, indent=2) + "\n")
    if (dest / "figures.json").is_file():
        shutil.copy2(dest / "figures.json", tmp / "figures.json")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def drop_borrowed(folder: Path, name: str) -> None:
    """Remove the subfolders that shipped pipeline ``name`` borrows from another (``SHIPPED_BORROWED``), after
    checking that their weights are byte-identical to the lender's."""
    from harness.models import SHIPPED_BORROWED

    for component, (owner, sub) in SHIPPED_BORROWED.get(name, {}).items():
        mine, theirs = folder / component, folder.parent / owner / sub
        for f in mine.rglob("*.safetensors"):
            if f.read_bytes() != (theirs / f.relative_to(mine)).read_bytes():
                raise SystemExit(f"{f} differs from {theirs / f.relative_to(mine)}: {name} cannot borrow {component}")
        shutil.rmtree(mine)


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


def install_autoencoder(work: Path, zoo: Path = ZOO) -> Path:
    """Write ``tiny-vae`` (an AutoencoderKL folder, fp16 safetensors) with its training record."""
    from diffusers import AutoencoderKL

    tmp = work / "tiny-vae-fp16"
    shutil.rmtree(tmp, ignore_errors=True)
    AutoencoderKL.from_pretrained(work / "tiny-vae", dtype=torch.float16).save_pretrained(tmp)
    return _install_pipeline(tmp.parent, tmp.name, ["tiny-vae_record.json"], zoo, dest_name="tiny-vae")


def cmd_train(args: argparse.Namespace) -> None:
    from harness.zoo import train

    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"seed": args.seed, "device": args.device}
    if args.steps:
        kw["steps"] = args.steps
    todo = ["tiny-vae", "tiny-clip", "tiny-sd", "tiny-sd-inpaint"] if args.model == "all" else [args.model]
    for model in todo:
        t0 = time.time()
        dest = None
        if model == "tiny-vae":
            train.train_autoencoder(work, **kw)
            dest = None if args.no_install else install_autoencoder(work)
        elif model == "tiny-clip":
            train.train_clip(work, **kw)
            dest = None if args.no_install else install_clip(work)
        elif model == "tiny-sd":
            if not (work / "tiny-vae" / "config.json").is_file():
                raise SystemExit(f"train tiny-vae first: {work / 'tiny-vae'} is missing")
            train.train_sd(work, **kw)
            if not args.no_install:
                records = ["tiny-vae_record.json", "sd-clip_record.json", "sd_record.json"]
                dest = _install_pipeline(work, "tiny-sd", records)
        elif model == "tiny-sd-inpaint":
            if not (work / "tiny-sd" / "model_index.json").is_file():
                raise SystemExit(f"train tiny-sd first: {work / 'tiny-sd'} is missing")
            train.train_inpaint(work, **kw)
            if not args.no_install:
                records = ["tiny-vae_record.json", "sd-clip_record.json", "sd_record.json", "inpaint_record.json"]
                dest = _install_pipeline(work, "tiny-sd-inpaint", records)
        if dest is not None:
            drop_borrowed(dest, model)
        print(f"{model}: done in {time.time() - t0:.0f} s", flush=True)
    if not args.no_install:
        cards.write_all()


def _save_figures(model: str, figures: dict[str, Any]) -> None:
    path = ZOO / model / "figures.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(figures)
    path.write_text(json.dumps(old, indent=2) + "\n")


def _evaluate_concepts(args: argparse.Namespace, clip: Any, stamp: dict[str, Any]) -> None:
    """The poisoning threat model's world: tiny-clip's zero-shot subject accuracy (its card) and how much
    tiny-sd's prompt's subject conditions it beside its artist (its card), under ``concepts`` in each."""
    from harness.models import ModelSpec, load_pipeline
    from harness.zoo import architectures as arch
    from harness.zoo import evaluate as ev

    t0 = time.time()
    judge = ev.evaluate_subject_judge(clip)
    print("tiny-clip subjects", json.dumps(judge), flush=True)
    _save_figures("tiny-clip", {"concepts": {**judge, **stamp, "seconds": round(time.time() - t0, 1)}})
    t0 = time.time()
    pipe = load_pipeline(ModelSpec(source="tiny-sd", resolution=arch.RESOLUTION), "text2img", args.device)
    conditioning = ev.subject_conditioning(pipe)
    print("tiny-sd subject conditioning", json.dumps(conditioning), flush=True)
    _save_figures("tiny-sd", {"concepts": {**conditioning, **stamp, "seconds": round(time.time() - t0, 1)}})


def _evaluate_lora_recipe(args: argparse.Namespace, clf: Any, stamp: dict[str, Any]) -> None:
    """The LoRA positive control alone (``--models lora``), with the recipe options given on the command line.
    At the audits' recipe (``experiments/mimic/lora.yaml``) it replaces tiny-sd's ``lora_positive_control``
    (the figure the target is judged on); at another recipe it is a trial, kept in tiny-sd's
    ``lora_recipe_trials`` (one entry per recipe and artists, the latest measurement) for the card's table of
    recipes beside the audits'."""
    from harness.models import ModelSpec, load_pipeline
    from harness.zoo import architectures as arch
    from harness.zoo import evaluate as ev

    t0 = time.time()
    pipe = load_pipeline(ModelSpec(source="tiny-sd", resolution=arch.RESOLUTION), "text2img", args.device)
    control = ev.evaluate_lora(
        pipe,
        clf,
        artists=args.lora_artists,
        steps=args.lora_steps,
        rank=args.lora_rank,
        lr=args.lora_lr,
        finetune_seeds=args.lora_seeds,
    )
    print("lora", json.dumps(control), flush=True)
    path = ZOO / "tiny-sd" / "figures.json"
    figures = json.loads(path.read_text()) if path.is_file() else {}
    if control["settings"]["audit_recipe"]:
        evaluation = {**figures.get("evaluation", {}), "lora_positive_control": control}
        _save_figures("tiny-sd", {"evaluation": evaluation})
        return
    trial = {**control, **stamp, "seconds": round(time.time() - t0, 1)}

    def same(t: dict[str, Any]) -> bool:
        keys = (*ev.LORA_RECIPE_KEYS, "finetune_seeds")
        same_artists = sorted(ev.control_artists(t)) == sorted(ev.control_artists(trial))
        return same_artists and all(t["settings"].get(k) == trial["settings"][k] for k in keys)

    trials = [t for t in figures.get("lora_recipe_trials", []) if not same(t)] + [trial]
    trials.sort(key=lambda t: tuple(str(t["settings"].get(k)) for k in ev.LORA_RECIPE_KEYS))
    _save_figures("tiny-sd", {"lora_recipe_trials": trials})


def _evaluate_autoencoder(args: argparse.Namespace, stamp: dict[str, Any]) -> None:
    """``tiny-vae``'s figures: reconstruction, and the encoder attack's reach beside uniform noise; with
    ``--taef2 DIR`` also the TAEF2 reference row on the same photos with the same attack."""
    from diffusers import AutoencoderKL

    from harness.diffusion import encode_mean
    from harness.zoo import architectures as arch
    from harness.zoo import evaluate as ev

    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(ZOO / "tiny-vae", torch_dtype=torch.float32).to(args.device).eval()
    vae.requires_grad_(False)
    photos = ev.held_out_photos(arch.RESOLUTION)
    settings = ev.photoguard_encoder_settings(args.attack_steps)
    recon = ev.evaluate_autoencoder(ev.vae_reconstruction(vae), arch.RESOLUTION)
    figures: dict[str, Any] = {**stamp, "reconstruction": recon}
    print("tiny-vae reconstruction", json.dumps(figures["reconstruction"]), flush=True)
    figures["susceptibility"] = ev.encoder_susceptibility(
        lambda x: encode_mean(vae, x), photos, settings, device=args.device
    )
    print("tiny-vae susceptibility", json.dumps(figures["susceptibility"]), flush=True)
    figures["seconds"] = round(time.time() - t0, 1)
    update: dict[str, Any] = {"evaluation": figures}
    if args.taef2:
        from harness.zoo.reference import load_taef2

        taef2 = load_taef2(args.taef2).to(args.device)
        update["reference_taef2"] = {
            "source": "TAEF2 (madebyollin, MIT), read with --taef2; not shipped",
            "measured_on": stamp["measured_on"],
            "reconstruction": ev.evaluate_autoencoder(
                lambda x: taef2.decode(taef2.encode(x.to(args.device))), arch.RESOLUTION
            ),
            "susceptibility": ev.encoder_susceptibility(taef2.encode, photos, settings, device=args.device),
        }
        print("taef2", json.dumps(update["reference_taef2"]), flush=True)
    _save_figures("tiny-vae", update)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from harness.metrics.clip import load_clip, style_classifier
    from harness.models import ModelSpec, load_pipeline
    from harness.zoo import architectures as arch
    from harness.zoo import evaluate as ev

    torch.set_num_threads(args.threads)
    out = Path(args.grids)
    stamp = {"measured_on": time.strftime("%Y-%m-%d"), "device": args.device, "threads": torch.get_num_threads()}
    if "tiny-vae" in args.models:
        _evaluate_autoencoder(args, stamp)
    if not set(args.models) & {*MODELS, "concepts", "lora"}:
        cards.write_all()
        return
    clip = load_clip("tiny-clip", device=args.device)  # the judge of the other models' figures
    if "concepts" in args.models:
        _evaluate_concepts(args, clip, stamp)
    if not set(args.models) & {*MODELS, "lora"}:
        cards.write_all()
        return
    if "tiny-clip" in args.models:
        t0 = time.time()
        figures = ev.evaluate_clip(clip)
        print("tiny-clip", json.dumps(figures), flush=True)
        _save_figures("tiny-clip", {"evaluation": {**figures, **stamp, "seconds": round(time.time() - t0, 1)}})
    clf = style_classifier(clip)
    if "tiny-sd" in args.models:
        from harness.protocols import Context

        spec = ModelSpec(source="tiny-sd", resolution=arch.RESOLUTION)
        t2i = load_pipeline(spec, "text2img", args.device)
        sd: dict[str, Any] = {**stamp}
        sd["text2img"], samples = ev.evaluate_text2img(t2i, clf)
        print("text2img", json.dumps(sd["text2img"]), flush=True)
        from harness.world import ARTISTS, SUBJECTS

        # one row per artist: the first seed of every subject
        first = samples.view(len(ARTISTS), len(SUBJECTS), -1, *samples.shape[1:])[:, :, 0].flatten(0, 1)
        save_grid(first, len(ARTISTS), out / "tiny-sd-text2img.png", labels=list(ARTISTS))
        sd["img2img"] = ev.evaluate_img2img(load_pipeline(spec, "img2img", args.device), clf)
        print("img2img", json.dumps(sd["img2img"]), flush=True)
        ctx = Context(device=args.device, batch_size=4, model=spec)
        sd["edit_response"] = ev.edit_response(ev.img2img_edit(), ev.held_out_photos(arch.RESOLUTION), ctx)
        print("edit response", json.dumps(sd["edit_response"]), flush=True)
        if not args.skip_lora:
            sd["lora_positive_control"] = ev.evaluate_lora(
                t2i, clf, artists=args.lora_artists, finetune_seeds=args.lora_seeds
            )
            print("lora", json.dumps(sd["lora_positive_control"]), flush=True)
        _save_figures("tiny-sd", {"evaluation": sd})
    if "lora" in args.models:
        _evaluate_lora_recipe(args, clf, stamp)
    if "tiny-sd-inpaint" in args.models:
        spec = ModelSpec(source="tiny-sd-inpaint", resolution=arch.RESOLUTION)
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
    from harness.world import HELD_OUT_ARTISTS

    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="python -m harness.zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a shipped model and install it into the package")
    p.add_argument("model", choices=[*MODELS_V2, *MODELS, "all"])
    p.add_argument("--work", default="zoo-work", help="work folder for checkpoints and intermediate results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="override the stage's default number of steps")
    p.add_argument(
        "--no-install",
        action="store_true",
        help="train (or resume) in the work folder only, leaving the shipped models as they are",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="measure the installed models and write figures and model cards")
    p.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=[*MODELS, *MODELS_V2, "concepts", "lora"],
        help="models to measure; concepts: the poisoning threat model's figures (tiny-clip's subject accuracy, "
        "tiny-sd's subject conditioning); lora: tiny-sd's LoRA positive control alone, at the audits' recipe or "
        "at the one the --lora-* options give (a trial, shown beside it on the card)",
    )
    p.add_argument("--taef2", default=None, help="a TAEF2 folder: measure the tiny-vae card's reference row")
    p.add_argument("--attack-steps", type=int, default=None, help="override the encoder attack's 1000 steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-lora", action="store_true")
    for opt, kind in (("steps", int), ("rank", int), ("lr", float)):
        p.add_argument(
            f"--lora-{opt}",
            type=kind,
            default=None,
            help=f"with --models lora: the LoRA's {opt} (default: the audits', experiments/mimic/lora.yaml)",
        )
    p.add_argument("--lora-seeds", type=int, default=3, help="finetune seeds of the LoRA positive control")
    p.add_argument(
        "--lora-artists",
        nargs="+",
        default=None,
        choices=list(HELD_OUT_ARTISTS),
        help="held-out artists of the LoRA positive control (default: the audited one, dataset=held_out_artist)",
    )
    p.add_argument("--grids", default="docs/zoo", help="folder for the sample grids")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("cards", help="rewrite the model cards")
    p.set_defaults(func=lambda a: cards.write_all())
    p = sub.add_parser("grid", help="save a grid of procedural artworks")
    p.add_argument("--out", default="docs/zoo/world-artists.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_grid)
    args = parser.parse_args(argv)
    if args.command == "evaluate" and "lora" not in args.models:
        given = [f"--lora-{o}" for o in ("steps", "rank", "lr") if getattr(args, f"lora_{o}") is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --models lora (the other models use the audits' recipe)")
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
