"""The poisoning threat model: Nightshade's poison and the dirty-label baseline, poisoned training and its probes,
the judge's concept metrics, and the floor that runs on dirty-label poison."""

import math

import pytest
import torch

from harness.errors import ConfigError
from harness.models import ModelSpec
from harness.protocols import Context
from harness.seeding import make_generator
from harness.threat_models.poisoning import generation_id, parse_generation_id, swap_concept
from harness.types import ImageSet

SPEC = ModelSpec(source="tiny-sd", resolution=128)


def test_swap_concept_replaces_the_word_and_its_article():
    assert swap_concept("a house in the style of dottori", "house", "boat") == "a boat in the style of dottori"
    assert swap_concept("a painting of a house by inkwell", "house", "owl") == "a painting of an owl by inkwell"
    assert swap_concept("dottori style artwork of a House", "house", "fish") == "dottori style artwork of a fish"
    assert swap_concept("a greenhouse, art by x", "house", "boat") == "a boat"  # whole words only
    assert swap_concept("houses", "house", "boat") == "a boat"


def test_generation_ids_round_trip_and_refuse_unknown_groups():
    gid = generation_id("related", "tree", "dottori", 3)
    assert gid == "gen/related/tree/dottori/003" and parse_generation_id(gid) == ("related", "tree")
    assert parse_generation_id("dottori/house/posted-0001") is None
    with pytest.raises(ValueError, match="group"):
        generation_id("nearby", "tree", "dottori", 0)


def test_concept_metrics_judge_each_group_and_leave_the_others_undefined(monkeypatch):
    """By hand: a judge that always answers "boat" scores the source probes of "house" 0 on accuracy and 1 on the
    target rate, a "boat" probe 1 on accuracy, and gives NaN outside each metric's group."""
    from harness.metrics.clip import ConceptAccuracy, ConceptRate

    ids = [
        generation_id("source", "house", "dottori", 0),
        generation_id("source", "house", "inkwell", 0),
        generation_id("related", "boat", "dottori", 0),
        generation_id("unrelated", "sun", "dottori", 0),
    ]
    out = ImageSet(torch.rand(4, 3, 32, 32), ids, ["p"] * 4)

    class AlwaysBoat:
        def predict(self, images):
            return ["boat"] * len(images)

    acc, rate, related = ConceptAccuracy("source"), ConceptRate("boat", "source"), ConceptAccuracy("related")
    for m in (acc, rate, related):
        monkeypatch.setattr(m, "classifier", lambda: AlwaysBoat())
    a, r, rel = acc(out, out).tolist(), rate(out, out).tolist(), related(out, out).tolist()
    assert a[:2] == [0.0, 0.0] and all(math.isnan(v) for v in a[2:])
    assert r[:2] == [1.0, 1.0] and all(math.isnan(v) for v in r[2:])
    assert math.isnan(rel[0]) and rel[2] == 1.0 and math.isnan(rel[3])
    with pytest.raises(ConfigError, match="gen/<group>"):
        photo = ImageSet(torch.rand(1, 3, 32, 32), ["photo/cat"], ["p"])
        acc(photo, photo)


def test_defense_options_are_checked():
    from defenses.dirty_label import DirtyLabel
    from defenses.nightshade import Nightshade

    with pytest.raises(ConfigError, match="defense.target must differ"):
        Nightshade(source="house", target="House")
    with pytest.raises(ConfigError, match="defense.source"):
        Nightshade(source="a house")
    with pytest.raises(ConfigError, match="defense.images"):
        DirtyLabel(images="camera")
    photos = ImageSet(torch.rand(1, 3, 32, 32), ["photo/cat/train-0000"], ["a cat"])
    with pytest.raises(ConfigError, match="defense.images=model"):
        DirtyLabel().protect(photos, make_generator(0), Context())


def test_dirty_label_paints_the_target_under_the_source_caption():
    """The embedded world's dirty-label poison: the same artist painting a boat (the world's own rendering),
    captioned "a house ..."; the judge's probability moves from house to boat. (tiny-clip's zero-shot subject
    accuracy is low, about 0.36 over the world's 10 subjects on its eval split, so the check is relative.)"""
    from defenses.dirty_label import DirtyLabel
    from harness.metrics.clip import load_clip, subject_classifier
    from harness.seeding import derive_seed
    from harness.world import ProceduralArt, render_artwork

    art = ProceduralArt(artists="train", subjects=["house"], per_pair=1, size=128, split="posted").load()
    out = DirtyLabel(source="house", target="boat").protect(art, make_generator(0), Context())
    assert out.images.captions == art.captions and out.images.ids == art.ids
    assert torch.equal(out.images.images, DirtyLabel().protect(art, make_generator(0), Context()).images.images)
    seed = derive_seed(derive_seed(0, "dirty_label"), art.ids[0])
    expected = torch.from_numpy(render_artwork(art.ids[0].split("/")[0], "boat", seed, 128)).permute(2, 0, 1) / 255
    assert torch.allclose(out.images.images[0], expected.float())
    clf = subject_classifier(load_clip("tiny-clip"))
    boat, house = clf.classes.index("boat"), clf.classes.index("house")
    before, after = clf.probabilities(art.images).mean(0), clf.probabilities(out.images.images).mean(0)
    assert after[boat] > before[boat] and after[house] < before[house], (before, after)


def test_nightshade_moves_the_latent_toward_its_anchor_further_than_noise():
    """Nightshade's own objective (the VAE latent's distance to the anchor's) on tiny-sd: the poison closes it on
    every image, uniform noise of the same budget does not; the anchors are the model's boats in each style."""
    from defenses.nightshade import Nightshade
    from harness.world import ProceduralArt

    art = ProceduralArt(artists="train", subjects=["house"], per_pair=1, size=128, split="posted").load()
    art = ImageSet(art.images[:4], art.ids[:4], art.captions[:4])
    defense = Nightshade(steps=40)
    assert defense.anchor_prompts(art)[0] == art.captions[0].replace("house", "boat")
    out = defense.protect(art, make_generator(0), Context(batch_size=4, model=SPEC))
    per = out.info["anchor_latent_distance_per_image"]
    assert all(p < n for p, n in zip(per["protected"], per["noise"], strict=True)), per
    assert out.info["anchor_latent_distance_protected"] < 0.9 * out.info["anchor_latent_distance_noise"]
    assert (out.images.images - art.images).abs().max() <= 0.04 + 1e-6
    assert 0 < out.info["stlpips_mean"] < 1


def test_the_poisoning_floor_trains_on_dirty_label_poison_of_the_same_images():
    """control=floor in the poisoning threat model: the mimic's ordinary run on the dirty-label poison of the
    audited defense's concepts (not Mimic.floor), with no purifier; the row says so."""
    from harness.pipeline import planned_keys
    from harness.run import as_control, build_experiment, compose_config

    cfg, _ = compose_config(
        [
            "dataset=poison_source",
            "defense=nightshade",
            "defense.target=fish",
            "mimic=poison_training",
            "metrics=poisoning",
            "purifier=jpeg",
            "model=tiny-random",
        ]
    )
    exp = build_experiment(cfg)
    floor, info = as_control(cfg, exp, "floor", None, None)
    assert floor.control is None and floor.defense.name == "dirty_label" and floor.defense.target == "fish"
    assert floor.purifier.name == "none" and info["defense"] == "dirty_label" and info["defense_target"] == "fish"
    clean, _ = as_control(cfg, exp, "clean", None, None)
    assert planned_keys(floor)["protect"] != planned_keys(clean)["protect"]


def test_an_audit_of_nightshade_plans_the_poisoning_threat_model_with_its_controls():
    from harness.audit import audit_runs

    runs = audit_runs(["defense=nightshade", "audit.purifiers=[none,jpeg]"])
    assert runs and all("mimic=poison_training" in r and "dataset=poison_source" in r for r in runs)
    controls = [next((o for o in r if o.startswith("control=")), "protected") for r in runs]
    assert {"control=clean", "control=floor", "control=noise", "protected"} == set(controls)


def test_poison_training_probes_the_source_and_the_nearest_and_farthest_concepts():
    """The probes: every probe artist prompts the source, the 2 concepts the text encoder puts nearest to it and
    the 2 farthest, each concept once per group, the source in none of the others; explicit lists are kept."""
    from finetune.poison import PoisonTraining
    from harness.models import load_pipeline
    from harness.world import SUBJECTS

    pipe = load_pipeline(ModelSpec(source="tiny-random", resolution=32), "text2img")
    mimic = PoisonTraining(source="house", probe_artists=2, probes_per_concept=1)
    groups = mimic.concept_groups(pipe)
    assert groups["source"] == ["house"] and len(groups["related"]) == len(groups["unrelated"]) == 2
    assert (
        not set(groups["related"]) & set(groups["unrelated"]) and "house" not in groups["related"] + groups["unrelated"]
    )
    assert set(groups["related"] + groups["unrelated"]) <= set(SUBJECTS)
    ids, prompts = mimic.probes(pipe)
    assert len(ids) == 5 * 2 and all(parse_generation_id(i) for i in ids) and "a house in the style of" in prompts[0]
    fixed = PoisonTraining(related=["boat"], unrelated=["sun", "moon"]).concept_groups(pipe)
    assert fixed == {"source": ["house"], "related": ["boat"], "unrelated": ["sun", "moon"]}
    with pytest.raises(ConfigError, match="mimic.poison_count"):
        PoisonTraining(poison_count=5).run(
            ImageSet(torch.rand(2, 3, 32, 32), ["a", "b"], ["x", "y"]), make_generator(0), Context()
        )
