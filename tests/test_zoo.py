"""The shipped models (tiny-sd, tiny-sd-inpaint, tiny-clip): offline loading, fixed-seed outputs, quality
smoke checks, model cards; and the training scripts on a toy-sized world (resume included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.metrics.clip import ClipSpec, load_clip, style_classifier, tiny_clip_path
from harness.models import ModelNotFoundError, ModelSpec, load_pipeline, shipped_model_path
from harness.world import ProceduralArt, artwork_caption

TINY_SD = ModelSpec(source="tiny-sd", resolution=128)
TINY_SD_INPAINT = ModelSpec(source="tiny-sd-inpaint", resolution=128)
ZOO = Path(__file__).resolve().parent.parent / "harness" / "zoo"


def _generate(pipe, prompts, seed=0, steps=10, **kwargs):
    from harness.zoo.evaluate import generate

    return generate(pipe, prompts, seed, steps=steps, **kwargs)


# ------------------------------------------------------------------------------------------ shipped files


def test_shipped_weights_are_fp16_and_under_40_mb():
    from safetensors import safe_open

    files = sorted(ZOO.rglob("*.safetensors"))
    names = {f.relative_to(ZOO).parts[0] for f in files}
    assert names == {"tiny-vae", "tiny-sd", "tiny-sd-inpaint", "tiny-clip"}
    assert sum(f.stat().st_size for f in files) < 40 * 2**20
    for f in files:
        with safe_open(str(f), "pt") as st:
            dtypes = {st.get_slice(k).get_dtype() for k in st.keys()}
        assert dtypes <= {"F16", "I64"}, (f, dtypes)


@pytest.mark.parametrize("model", ["tiny-vae", "tiny-sd", "tiny-sd-inpaint", "tiny-clip"])
def test_model_cards_carry_training_record_and_measured_figures(model):
    folder = ZOO / model
    card = (folder / "README.md").read_text()
    training = json.loads((folder / "training.json").read_text())
    figures = json.loads((folder / "figures.json").read_text())
    assert training and all("seconds" in r and "seed" in r and "steps" in r for r in training)
    assert "evaluation" in figures
    assert "## Measured quality" in card and "## Training" in card
    for record in training:
        assert f"| steps | {record['steps']} |" in card
        more = record.get("second_stage")
        if more:  # the warm restart's steps are part of the shipped weights' training: the card shows them
            block = card.split(f"### stage `{record['stage']}`")[1].split("### stage")[0]
            assert f"| steps | {more['steps']} |" in block and f"| lr | {more['lr']} |" in block
    # the card is the one cards.card() writes from these files (never edited by hand)
    from harness.zoo.cards import card as write_card

    assert card == write_card(model)


def test_shipped_spec_hashes_the_weights():
    key = TINY_SD.key_dict()
    assert TINY_SD.kind == "shipped"
    assert len(key["weights_sha256"]) == 64
    assert key["weights_sha256"] != TINY_SD_INPAINT.key_dict()["weights_sha256"]


def test_missing_shipped_model_names_the_folder_and_the_fix(monkeypatch, tmp_path):
    import harness.models as models

    monkeypatch.setattr(models, "shipped_model_path", lambda name: tmp_path / name)
    models.clear_model_cache()
    with pytest.raises(ModelNotFoundError, match="python -m harness.zoo train tiny-sd") as info:
        load_pipeline(ModelSpec(source="tiny-sd", resolution=128), "text2img")
    assert str(tmp_path / "tiny-sd") in str(info.value)
    models.clear_model_cache()


def test_missing_clip_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="open_clip_config.json"):
        load_clip(ClipSpec(source=f"local-dir:{tmp_path}"))


# -------------------------------------------------------------------------------------------- tiny-clip


def test_tiny_clip_loads_with_open_clip_and_classifies_fresh_styles():
    clip = load_clip("tiny-clip")
    assert clip.image_size == 128
    art = ProceduralArt(per_pair=1, subjects=["house", "fish", "star"], seed=123, split="eval").load()
    labels = [i.split("/")[0] for i in art.ids]
    acc = style_classifier(clip).accuracy(art.images, labels)
    assert acc >= 0.8, acc
    feats = clip.encode_images(art.images[:2].images if hasattr(art.images, "images") else art.images[:2])
    assert feats.shape == (2, 128)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_tiny_clip_tokenizer_matches_the_training_tokenizer():
    import open_clip
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_clip_path()))
    oc = open_clip.get_tokenizer(f"local-dir:{tiny_clip_path()}")
    text = "a boat in the style of vitralis"
    expected = hf(text, padding="max_length", max_length=32, truncation=True).input_ids
    assert oc([text])[0].tolist() == expected


# ---------------------------------------------------------------------------------------------- tiny-sd


def test_tiny_sd_loads_offline_and_generates_deterministically():
    pipe = load_pipeline(TINY_SD, "text2img")
    assert pipe.unet.config.in_channels == 16 and pipe.vae_scale_factor == 8
    # the VAE is tiny-vae's folder, borrowed (no copy shipped)
    from harness.models import shipped_weight_files

    vae_file = shipped_model_path("tiny-vae") / "diffusion_pytorch_model.safetensors"
    assert shipped_weight_files("tiny-sd")["vae/diffusion_pytorch_model.safetensors"] == vae_file
    assert not (shipped_model_path("tiny-sd") / "vae").exists()
    a = _generate(pipe, ["a house in the style of neonika"], seed=3)
    b = _generate(pipe, ["a house in the style of neonika"], seed=3)
    assert a.shape == (1, 3, 128, 128)
    assert torch.equal(a, b)
    # pinned: the per-channel means of this fixed-seed sample (guards the shipped weights and the sampler)
    means = a.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor(PINNED_TEXT2IMG_MEANS), atol=0.005), means.tolist()


PINNED_TEXT2IMG_MEANS = [0.1543, 0.1313, 0.2106]


def test_tiny_sd_paints_the_prompted_style():
    """One tree per training artist: most come out in the prompted style (the card: 0.865 over 20 samples each)."""
    from harness.world import TRAIN_ARTISTS

    pipe = load_pipeline(TINY_SD, "text2img")
    clf = style_classifier(load_clip("tiny-clip"))
    artists = list(TRAIN_ARTISTS)
    images = _generate(pipe, [artwork_caption("tree", a) for a in artists], seed=1, steps=20)
    pred = clf.predict(images)
    assert sum(p == a for p, a in zip(pred, artists, strict=True)) >= 0.7 * len(artists), pred


def test_tiny_sd_inpaint_repaints_the_centre_in_the_prompted_style():
    import torch.nn.functional as F

    from harness.zoo.evaluate import centre_mask

    pipe = load_pipeline(TINY_SD_INPAINT, "inpaint")
    clf = style_classifier(load_clip("tiny-clip"))
    art = ProceduralArt(artists=["opticor", "aquarela"], subjects=["moon"], split="eval", size=128).load()
    mask = centre_mask(128, 88).expand(2, 1, 128, 128).contiguous()
    prompts = ["a moon in the style of neonika", "a moon in the style of pixelmo"]
    out = _generate(pipe, prompts, seed=0, image=art.images, mask_image=mask, strength=1.0)
    assert out.shape == (2, 3, 128, 128)
    centre = F.interpolate(out[..., 20:108, 20:108], size=(128, 128), mode="bicubic", antialias=True).clamp(0, 1)
    assert clf.predict(centre) == ["neonika", "pixelmo"]
    border = (1 - mask).bool().expand_as(out)
    inside = mask.bool().expand_as(out)
    # the kept border stays nearer the input than the repainted centre (measured border PSNR: 13.5 dB, see card)
    assert (out - art.images)[border].abs().mean() < (out - art.images)[inside].abs().mean()


# -------------------------------------------------------------------------------------- training scripts


def test_training_stages_run_resume_and_install(toy_world, tmp_path):
    from diffusers import DiffusionPipeline

    from harness.zoo.__main__ import _install_pipeline, install_clip

    train = toy_world
    work = tmp_path / "work"
    with pytest.raises(FileNotFoundError, match="train tiny-vae first"):
        train.train_sd(work, steps=1, batch=4)
    rec = train.train_autoencoder(work, steps=1, batch=2)
    assert (work / "tiny-vae" / "config.json").is_file() and rec["scaling_factor"] > 0
    train.train_sd(work, steps=2, batch=4, more_steps=0, text_steps=1, text_batch=8)
    first = torch.load(work / "sd.ckpt", weights_only=False)["step"]
    assert first == 2
    # the text encoder: a CLIP trained on the training artists only, its text tower frozen in the pipeline
    from harness.world import HELD_OUT_ARTISTS

    tower = json.loads((work / "sd-clip_record.json").read_text())
    assert tower["steps"] == 1 and not set(tower["artists"]) & set(HELD_OUT_ARTISTS)
    sd = DiffusionPipeline.from_pretrained(work / "tiny-sd")
    assert sd.unet.config.cross_attention_dim == sd.text_encoder.config.hidden_size == 128
    clip_state = torch.load(work / "sd-clip_final.pt", weights_only=True)
    token_embedding = sd.text_encoder.get_input_embeddings().weight.float()
    torch.testing.assert_close(token_embedding, clip_state["token_embedding.weight"].half().float())
    rec = train.train_sd(work, steps=3, batch=4, more_steps=0)  # resumes at step 2, runs one more
    assert rec["history"][-1]["step"] == 3 and rec["image_px"] == 128 and rec["resumed_from_step"] == 2
    again = train.train_sd(work, steps=3, batch=4, more_steps=0)  # nothing left to train: the record stays
    assert again["resumed_from_step"] == 2 and again["history"] == rec["history"]
    ema = torch.load(work / "sd.ckpt", weights_only=False)["ema"]
    rec = train.train_sd(work, steps=3, batch=4, more_steps=2)  # the warm restart continues the first stage
    assert rec["second_stage"]["steps"] == 2 and rec["second_stage"]["history"][-1]["step"] == 2
    restarted = torch.load(work / "sd-more.ckpt", weights_only=False)
    assert restarted["step"] == 2 and set(restarted["ema"]) == set(ema)
    assert not torch.equal(restarted["ema"]["conv_in.weight"], ema["conv_in.weight"])  # it trained on
    train.train_inpaint(work, steps=1, batch=4)
    rec = train.train_clip(work, steps=1, batch=8)
    assert rec["image_px"] == 128 and "skimage/astronaut" not in rec["train_photos"]
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    _install_pipeline(work, "tiny-sd", ["tiny-vae_record.json", "sd_record.json"], zoo=zoo)
    _install_pipeline(work, "tiny-sd-inpaint", ["inpaint_record.json"], zoo=zoo)
    install_clip(work, zoo=zoo)
    pipe = DiffusionPipeline.from_pretrained(zoo / "tiny-sd-inpaint")
    # 16 noisy latents, the mask, 16 masked-image latents; 128 px images to 16 x 16 latents
    assert pipe.unet.config.in_channels == 33 and pipe.vae.config.latent_channels == 16
    assert pipe.unet.config.sample_size * 8 == 128
    clip = load_clip(ClipSpec(source=f"local-dir:{zoo / 'tiny-clip'}"))
    assert clip.encode_texts(["a photo of a cat"]).shape == (1, 128)


def test_random_masks_cover_full_and_partial():
    from harness.zoo.train import random_masks

    masks = random_masks(64, 32, torch.Generator().manual_seed(0))
    frac = masks.mean(dim=(1, 2, 3))
    assert masks.shape == (64, 1, 32, 32)
    assert set(np.unique(masks.numpy()).tolist()) == {0.0, 1.0}  # binary: 1 repaints, 0 keeps
    assert (frac == 1).sum() >= 5 and ((frac > 0) & (frac < 1)).sum() >= 30


def test_lora_finetune_changes_only_a_copy(ctx):
    from finetune.lora import train_lora
    from harness.models import ModelSpec as Spec

    pipe = load_pipeline(Spec(source="tiny-random", resolution=32), "text2img")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    art = ProceduralArt(artists=["cyanora"], subjects=["sun", "moon"], size=32).load()
    tuned, record = train_lora(pipe, art, rank=2, steps=2, batch_size=2, seed=0)
    assert record["trainable_params"] > 0 and np.isfinite(record["final_loss"])
    assert tuned.unet is not pipe.unet and tuned.vae is pipe.vae
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    a = _generate(pipe, ["a sun"], seed=0, steps=2)
    b = _generate(tuned, ["a sun"], seed=0, steps=2)
    assert not torch.equal(a, b)


def test_lora_positive_control_finds_the_mimic_finetune_at_run_time():
    """evaluate_lora runs the LoRA mimic's own finetune, resolved from experiments/mimic/lora.yaml (that the core
    imports no component package is tests/test_structure.py's check)."""
    import finetune.lora
    from harness.zoo.evaluate import lora_finetune

    assert lora_finetune() is finetune.lora.train_lora


def test_shipped_model_path_points_into_the_package():
    assert shipped_model_path("tiny-sd") == ZOO / "tiny-sd"


def test_lora_positive_control_repeats_over_finetune_seeds_on_posted_artworks(monkeypatch):
    """Each finetune seed trains its own LoRA (different final losses) on the posted split at the pipeline's
    size; the target needs the mean over enough seeds and every finetune within the time limit."""
    import harness.zoo.evaluate as ev
    from harness.models import ModelSpec as Spec

    seen = []
    original = ev.lora_finetune()

    def spy(pipe, images, **kw):
        seen.append((images.ids[0], images.images.shape[-1], kw["seed"]))
        recipes.append({k: kw[k] for k in ("rank", "steps", "lr", "batch_size")})
        return original(pipe, images, **kw)

    recipes: list[dict] = []

    monkeypatch.setattr(ev, "lora_finetune", lambda: spy)
    monkeypatch.setattr(ev, "SAMPLE_STEPS", 2)

    class Always:
        def predict(self, images):
            return ["cyanora"] * len(images)

    pipe = load_pipeline(Spec(source="tiny-random", resolution=32), "text2img")
    out = ev.evaluate_lora(pipe, Always(), artists=["cyanora"], train_images=8, steps=2, seeds=1, finetune_seeds=2)
    row = out["cyanora"]
    assert [s[0] for s in seen] == ["cyanora/house/posted-0000"] * 2 and {s[1] for s in seen} == {32}
    assert seen[0][2] != seen[1][2] and len(set(row["final_loss_per_finetune_seed"])) == 2
    assert row["accuracy_after_per_finetune_seed"] == [1.0, 1.0] and out["settings"]["split"] == "posted"
    # the audits' recipe (experiments/mimic/lora.yaml) but for the steps given here, recorded as not the audits'
    audits = OmegaConf.load(ev.LORA_MIMIC_CONFIG)
    assert recipes[0] == {"rank": audits.rank, "steps": 2, "lr": audits.lr, "batch_size": audits.batch_size}
    assert out["settings"]["steps"] == 2 and out["settings"]["audit_recipe"] is False
    assert ev.lora_recipe(steps=None) == {k: audits[k] for k in ev.LORA_RECIPE_KEYS}
    with pytest.raises(ValueError, match="not a LoRA recipe option: alpha"):
        ev.lora_recipe(alpha=4)
    assert ev.lora_control_met(out, "cyanora") is False  # 2 seeds < the 3 the target needs
    three = {"accuracy_after": 0.93, "accuracy_after_per_finetune_seed": [1, 0.9, 0.9]}
    assert ev.lora_control_met({"a": {**three, "train_seconds_per_finetune_seed": [300, 310, 290]}}, "a") is True
    assert ev.lora_control_met({"a": {**three, "train_seconds_per_finetune_seed": [300, 610, 290]}}, "a") is False
    assert (
        ev.lora_control_met({"a": {**three, "accuracy_after": 0.85, "train_seconds_per_finetune_seed": [1] * 3}}, "a")
        is False
    )
    assert ev.lora_control_met(out, "halftonia") is None
    # seconds timed on a GPU do not answer "within 10 CPU minutes": unknown when the rest is met, else missed
    fast = {"a": {**three, "train_seconds_per_finetune_seed": [30, 31, 29]}}
    assert ev.lora_control_met(fast, "a", device="cuda") is None and ev.lora_control_met(fast, "a") is True
    low = {"a": {**three, "accuracy_after": 0.85, "train_seconds_per_finetune_seed": [30, 31, 29]}}
    assert ev.lora_control_met(low, "a", device="cuda") is False


def test_lora_command_writes_the_control_at_the_audits_recipe_and_a_trial_at_another(tmp_path, monkeypatch):
    """``evaluate --models lora``: at the audits' recipe the figures replace tiny-sd's positive control (the other
    figures kept); at another recipe they are a trial, listed once per recipe on the card beside the target; the
    --lora-* options without --models lora are an error naming them."""
    import harness.zoo.__main__ as zoo_main
    from harness.zoo import cards
    from harness.zoo import evaluate as ev

    zoo = tmp_path / "zoo"
    (zoo / "tiny-sd").mkdir(parents=True)
    (zoo / "tiny-sd" / "figures.json").write_text(json.dumps({"evaluation": {"text2img": {"samples": 1}}}))
    monkeypatch.setattr(zoo_main, "ZOO", zoo)
    monkeypatch.setattr(cards, "ZOO", zoo)
    monkeypatch.setattr(cards, "_ABOUT", {"tiny-sd": cards._ABOUT["tiny-sd"]})
    calls = []

    def fake(pipe, clf, artists=None, finetune_seeds=3, **recipe):
        calls.append(recipe)
        settings = {**ev.lora_recipe(**recipe), "finetune_seeds": finetune_seeds}
        score = 0.5 + 0.1 * len(calls)
        row = {
            "accuracy_after": score,
            "accuracy_after_per_finetune_seed": [score] * finetune_seeds,
            "train_seconds_per_finetune_seed": [1.0] * finetune_seeds,
        }
        return {
            "cyanora": row,
            "settings": {
                **settings,
                "audit_recipe": settings == {**ev.lora_recipe(), "finetune_seeds": finetune_seeds},
            },
        }

    monkeypatch.setattr(ev, "evaluate_lora", fake)
    run = ["evaluate", "--models", "lora", "--threads", "1"]
    zoo_main.main(run)
    zoo_main.main([*run, "--lora-steps", "1200", "--lora-lr", "0.001"])
    zoo_main.main([*run, "--lora-steps", "1200", "--lora-lr", "0.001"])  # measured again: replaces, not added
    zoo_main.main([*run, "--lora-steps", "1200"])
    assert calls[1] == {"steps": 1200, "rank": None, "lr": 0.001}
    figures = json.loads((zoo / "tiny-sd" / "figures.json").read_text())
    assert figures["evaluation"]["text2img"] == {"samples": 1}
    assert figures["evaluation"]["lora_positive_control"]["cyanora"]["accuracy_after"] == pytest.approx(0.6)
    trials = figures["lora_recipe_trials"]
    assert [(t["settings"]["steps"], t["settings"]["lr"]) for t in trials] == [(1200, 0.001), (1200, 0.003)]
    assert [t["cyanora"]["accuracy_after"] for t in trials] == [pytest.approx(0.8), pytest.approx(0.9)]
    card = (zoo / "tiny-sd" / "README.md").read_text()
    assert "### LoRA recipes beside the audits'" in card and card.count("| cyanora | 8 | 1200 |") == 2
    assert "lora_recipe_trials" not in card  # the trials are the table, not flattened figures
    with pytest.raises(SystemExit):
        zoo_main.main(["evaluate", "--models", "tiny-sd", "--lora-lr", "0.001"])
