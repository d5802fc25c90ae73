"""Positive controls on the embedded world: the attacks the harness measures must work on clean images, or a
protection's "success" would mean nothing."""

import pytest
import torch

from harness.models import ModelSpec
from harness.protocols import Context
from harness.seeding import make_generator

SPEC = ModelSpec(source="tiny-sd", resolution=128)


def test_editing_clean_artworks_follows_the_prompt():
    from finetune.editing import Img2ImgEdit
    from harness.metrics.clip import ClipPromptSimilarity, StyleMatch, load_clip, style_classifier
    from harness.world import ProceduralArt

    art = ProceduralArt(artists=["dottori", "vitralis"], subjects=["house", "boat", "sun"], size=128).load()
    prompt = "a house in the style of opticor"
    edit = Img2ImgEdit(prompt=prompt, strength=0.7, steps=30, guidance_scale=7.5)
    out = edit.run(art, make_generator(0), Context(batch_size=6, model=SPEC))
    clf = style_classifier(load_clip("tiny-clip"))
    assert sum(p == "opticor" for p in clf.predict(out.images)) >= 4  # of 6
    assert sum(p == "opticor" for p in clf.predict(art.images)) == 0
    sim = ClipPromptSimilarity(prompt=prompt)
    assert sim(out, art).mean() > sim(art, art).mean() + 0.05
    assert StyleMatch()(out, art).mean() <= 0.34  # the edit left the original style


def test_lora_mimicry_beats_its_floor_in_ci():
    """The LoRA positive control, the mimic every mimicry verdict rests on, at a budget CI affords: LoRA on 8 clean
    artworks of the held-out artist cyanora paints that style, and the mimic's floor (the base model prompted the
    same way, no finetune) does not."""
    from finetune.lora import LoraMimic
    from harness.metrics.clip import StyleMatch
    from harness.world import ProceduralArt

    art = ProceduralArt(
        artists=["cyanora"], subjects=["house", "tree", "boat", "mountain"], per_pair=2, size=128, split="posted"
    ).load()
    ctx = Context(batch_size=8, model=SPEC)
    mimic = LoraMimic(steps=120, batch_size=8, sample_steps=20)
    after = StyleMatch()(mimic.run(art, make_generator(0), ctx), art).mean()
    floor = StyleMatch()(mimic.floor(art, make_generator(0), ctx), art).mean()
    assert after >= 0.6 and floor <= 0.25, (after, floor)


@pytest.mark.slow
def test_lora_mimicry_on_clean_held_out_artworks_succeeds():
    """The tiny-sd model card's positive control through the harness's mimic and metric (about 4 min, 1 core)."""
    from finetune.lora import LoraMimic
    from harness.metrics.clip import StyleMatch
    from harness.world import ProceduralArt

    art = ProceduralArt(
        artists=["impastel"],
        subjects=["house", "tree", "boat", "mountain", "flower", "fish", "sun", "star"],
        per_pair=2,
        size=128,
        split="posted",
    ).load()
    out = LoraMimic().run(art, make_generator(0), Context(batch_size=16, model=SPEC))
    before = StyleMatch()(art.with_images(torch.zeros_like(art.images) + 0.5), art).mean()
    assert StyleMatch()(out, art).mean() >= 0.6 > before


def test_full_finetune_mimicry_on_clean_held_out_artworks_succeeds():
    """Mimicry's positive control in CI: a short full finetune on 8 clean artworks of a held-out artist makes
    tiny-sd paint that style (7 of 8 when measured; the base model, prompted the same way, does not)."""
    from finetune.full import FullFinetuneMimic
    from finetune.generate import generate_per_image
    from harness.metrics.clip import StyleMatch
    from harness.models import load_pipeline
    from harness.world import ProceduralArt

    art = ProceduralArt(
        artists=["cyanora"], subjects=["house", "tree", "boat", "mountain"], per_pair=2, size=128, split="posted"
    ).load()
    ctx = Context(batch_size=8, model=SPEC)
    mimic = FullFinetuneMimic(steps=120, batch_size=8, ema_decay=None, sample_steps=20)
    out = mimic.run(art, make_generator(0), ctx)
    base = generate_per_image(load_pipeline(SPEC, "text2img"), art, list(art.captions), 0, 20, 5.0, ctx, "base")
    after, before = StyleMatch()(out, art).mean(), StyleMatch()(base, art).mean()
    assert after >= 0.6 and before <= 0.25, (after, before)
