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


class _ColourJudge:
    """An image-text model by hand: an image's feature is its mean (red, green), normalised; "house" means red and
    "boat" green. A red house captioned "a house" aligns (cosine 1); a green boat captioned "a house" does not."""

    def encode_images(self, images):
        return torch.nn.functional.normalize(images[:, :2].mean((2, 3)), dim=1)

    def encode_texts(self, texts):
        return torch.tensor([[1.0, 0.0] if "house" in t else [0.0, 1.0] for t in texts])


def _coloured(n: int, channel: int, caption: str, prefix: str) -> ImageSet:
    x = torch.full((n, 3, 8, 8), 0.05)
    x[:, channel] = 0.9
    return ImageSet(x, [f"{prefix}/{i}" for i in range(n)], [caption] * n)


def test_caption_alignment_filter_drops_the_least_aligned_pairs_and_counts_the_poison(monkeypatch):
    """By hand: 6 aligned corpus pairs and 2 dirty-label ones (green boats captioned "a house"). Dropping a quarter
    drops exactly the 2 poisoned pairs (precision 1, recall 1); dropping half also drops 2 clean ones, the first
    of equal alignment by position (precision 0.5, recall 1)."""
    import finetune.poison as poison

    monkeypatch.setattr(poison, "load_clip", lambda spec, device="cpu": _ColourJudge())
    corpus = ImageSet.concat([_coloured(3, 0, "a house", "corpus/h"), _coloured(3, 1, "a boat", "corpus/b")])
    scraped = _coloured(2, 1, "a house in the style of dottori", "scraped")
    mix = ImageSet.concat([corpus, scraped])
    kept, info = poison.PoisonTraining(filter_drop=0.25).filter_pairs(mix, set(scraped.ids), Context())
    assert kept.ids == corpus.ids and kept.captions == corpus.captions
    assert torch.equal(kept.images, corpus.images)
    assert (info["filter_dropped"], info["filter_precision"], info["filter_recall"]) == (2.0, 1.0, 1.0)
    assert info["filter_alignment_corpus_mean"] > 0.99 and info["filter_alignment_scraped_mean"] < 0.1
    kept, info = poison.PoisonTraining(filter_drop=0.5).filter_pairs(mix, set(scraped.ids), Context())
    # dropped: the 2 poisoned pairs (alignment 0) and the first 2 clean ones by position (all clean ones tie at 1)
    assert kept.ids == ("corpus/h/2", "corpus/b/0", "corpus/b/1", "corpus/b/2")
    assert (info["filter_dropped"], info["filter_precision"], info["filter_recall"]) == (4.0, 0.5, 1.0)
    with pytest.raises(ConfigError, match="mimic.filter_drop"):
        poison.PoisonTraining(filter_drop=0.95)
    with pytest.raises(ConfigError, match="mimic.filter_clip"):
        poison.PoisonTraining(filter_drop=0.1, filter_clip="")


def test_a_filtered_poison_training_run_writes_the_filter_figures_into_its_row(tmp_path, monkeypatch):
    """The whole path on tiny-random: the mimic's filter figures reach the row as mimic_info (and a run without
    a filter writes none); the training data really shrinks by the dropped share."""
    import json

    import finetune.poison as poison
    from harness.run import compose_config, run_from_config

    seen = {}
    real = poison.finetune_unet

    def spy(pipe, unet, params, data, captions, **kw):
        seen.setdefault("sizes", []).append(len(data))
        return real(pipe, unet, params, data, captions, **kw)

    monkeypatch.setattr(poison, "finetune_unet", spy)
    common = [
        "dataset=poison_source",
        "dataset.per_pair=1",
        "mimic.poison_count=4",
        "defense=dirty_label",
        "mimic=poison_training",
        "mimic.steps=2",
        "mimic.corpus_per_pair=1",
        "mimic.probe_artists=1",
        "mimic.probes_per_concept=1",
        "mimic.n_related=1",
        "mimic.sample_steps=2",
        "metrics=poisoning",
        "model=tiny-random",
        f"runtime.results_dir={tmp_path / 'R'}",
        f"runtime.cache_dir={tmp_path / 'C'}",
        "runtime.progress=false",
    ]
    rows = []
    for extra in (["mimic.filter_drop=0.25"], ["seed=1"]):
        cfg, choices = compose_config([*common, *extra])
        rows.append(run_from_config(cfg, choices=choices, overrides=[*common, *extra]))
    assert len(list((tmp_path / "R" / "runs").glob("*.json"))) == 2 and "mimic_info" not in rows[1]
    on_disk = [json.loads(p.read_text()) for p in (tmp_path / "R" / "runs").glob("*.json")]
    assert sum("mimic_info" in r for r in on_disk) == 1
    info = rows[0]["mimic_info"]
    assert info["filter_scraped"] == 4 and info["filter_dropped"] == round(0.25 * info["filter_pairs"])
    assert 0 <= info["filter_precision"] <= 1 and 0 <= info["filter_recall"] <= 1
    assert seen["sizes"][0] == info["filter_pairs"] - info["filter_dropped"]
    assert seen["sizes"][1] == info["filter_pairs"]
    # the poisoning values are per probe generation (source, related, unrelated), not per scraped image: the row keys them by the probes' ids, and the verdict pairs them by those ids
    from harness.threat_models.poisoning import parse_generation_id
    from harness.verdict import values_of

    row = rows[1]
    assert len(row["image_ids"]) == len(row["per_image"]["budget/linf"]) == 10  # the scrape: 10 artists x 1
    probes = row["output_ids"]
    assert probes and all(parse_generation_id(i) for i in probes)
    assert set(row["output_metrics"]) >= {"poisoning/concept_accuracy", "poisoning/target_rate"}
    assert all(len(row["per_image"][m]) == len(probes) for m in row["output_metrics"])
    assert set(values_of([row], "poisoning/concept_accuracy")[1]) == set(probes)
    assert set(values_of([row], "budget/linf")[1]) == set(row["image_ids"])
    # the row's mean is over the source probes only (the other groups' values are NaN, outside the metric)
    source = [v for i, v in zip(probes, row["per_image"]["poisoning/concept_accuracy"], strict=True) if "/source/" in i]
    assert source and row["metrics"]["poisoning/concept_accuracy"] == pytest.approx(sum(source) / len(source))


@torch.no_grad()
def _boat_seen_as_boat(pipe, boats: ImageSet) -> float:
    """How much worse the model denoises boat artworks under "a house in the style of <artist>" than under their
    own caption "a boat in the style of <artist>" (epsilon MSE, the same noise and timesteps for both): above 0
    when the model tells the word "house" from "boat" on these images."""
    from harness.diffusion import denoising_prediction, encode_mean, text_embeddings

    z = (encode_mean(pipe.vae, boats.images) * pipe.vae.config.scaling_factor).float()
    losses = []
    for captions in (list(boats.captions), [c.replace("a boat", "a house") for c in boats.captions]):
        emb, g, total = text_embeddings(pipe, captions).float(), make_generator(7), 0.0
        for _ in range(8):
            noise = torch.randn(z.shape, generator=g)
            t = torch.randint(50, 950, (len(z),), generator=g)
            pred, target, _ = denoising_prediction(pipe.unet, pipe.scheduler, z, noise, t, emb)
            total += float(((pred - target) ** 2).mean())
        losses.append(total / 8)
    return losses[1] - losses[0]


def test_dirty_label_training_moves_the_source_concept_and_clean_training_does_not():
    """On tiny-sd: the whole UNet trained on a small mix (the clean corpus, one image per training artist and
    subject, plus 20 scraped "house" images). With the scraped images poisoned by dirty labels (boats captioned as
    houses) the model's "house" moves toward boats: on fresh boat artworks (eval split, no model saw them) the
    denoising loss under "a house ..." comes to within a fifth of the loss under their own caption (measured:
    0.00086 -> 0.00011). With the same scraped images clean most of the gap stays (0.00060: continued training on
    a corpus this small drifts every concept a little)."""
    from defenses.dirty_label import DirtyLabel
    from finetune.poison import PoisonTraining
    from harness.world import ProceduralArt

    ctx = Context(device="cpu", batch_size=8, model=SPEC)
    pipe = ctx.pipeline("text2img")
    scraped = ProceduralArt(artists="train", subjects=["house"], per_pair=2, size=128, split="posted").load()
    boats = ProceduralArt(artists="train", subjects=["boat"], per_pair=1, size=128, split="eval").load()
    assert all(c.startswith("a boat in the style of") for c in boats.captions)
    before = _boat_seen_as_boat(pipe, boats)
    poison = DirtyLabel(source="house", target="boat").protect(scraped, make_generator(0), ctx).images
    mimic = PoisonTraining(corpus_per_pair=1, steps=80, batch_size=8, probe_artists=1)
    after = {
        name: _boat_seen_as_boat(mimic.train(images, make_generator(0), ctx)[0], boats)
        for name, images in (("clean", scraped), ("dirty_label", poison))
    }
    assert before > 0, before
    assert after["dirty_label"] < 0.3 * before, (before, after)
    assert after["clean"] > 0.5 * before and after["clean"] > 3 * after["dirty_label"], (before, after)


def test_generation_grid_shows_one_image_per_artist_and_only_the_source_probes():
    """The poisoning report's grid columns are artists: of the scraped artworks the first of each artist, of the
    probe generations the first source probe of each probe artist (related and unrelated probes left out)."""
    from harness.threat_models.poisoning import one_per_artist

    scraped = ImageSet(
        torch.rand(4, 3, 8, 8),
        ["a/house/posted-0", "a/house/posted-1", "b/house/posted-0", "c/house/posted-0"],
        ["x"] * 4,
    )
    kept = one_per_artist(scraped)
    assert kept.ids == ("a/house/posted-0", "b/house/posted-0", "c/house/posted-0")
    assert torch.equal(kept.images[1], scraped.images[2])
    ids = [generation_id("related", "boat", "a", 0), generation_id("source", "house", "a", 0)]
    ids += [generation_id("source", "house", "a", 1), generation_id("source", "house", "b", 0)]
    probes = ImageSet(torch.rand(4, 3, 8, 8), ids, ["p"] * 4)
    assert one_per_artist(probes).ids == (ids[1], ids[3])


def test_poison_training_posteriors_follow_the_mix_and_do_not_depend_on_earlier_cells(monkeypatch):
    """The training's posteriors come from the corpus (encoded once per process) and the scraped images (each part
    one batch of its own): after the filter, each kept pair's posterior and its flip's sit where the loop expects
    them (checked against each image encoded alone), and a cell trains the same UNet whether another cell (other
    scraped images) ran before it or not."""
    import finetune.poison as poison
    from harness.world import ProceduralArt

    monkeypatch.setattr(poison, "load_clip", lambda spec, device="cpu": _ColourJudge())
    monkeypatch.setattr(poison, "_CORPUS_POSTERIORS", type(poison._CORPUS_POSTERIORS)())
    ctx = Context(device="cpu", batch_size=4, model=ModelSpec(source="tiny-random", resolution=32))
    pipe = ctx.pipeline("text2img")
    scraped = ProceduralArt(artists="train", subjects=["house"], per_pair=1, size=32, split="posted").load()
    other = ProceduralArt(artists="train", subjects=["house"], per_pair=2, size=32, split="posted").load()
    other = ImageSet(other.images[1::2], other.ids[1::2], other.captions[1::2])
    seen, encoded = [], []
    real_train, real_encode = poison.finetune_unet, poison.encode_posteriors

    def spy_train(pipe, unet, params, data, captions, **kw):
        seen.append((data, kw["posteriors"]))
        return real_train(pipe, unet, params, data, captions, **kw)

    def spy_encode(pipe, images):
        encoded.append(len(images))
        return real_encode(pipe, images)

    monkeypatch.setattr(poison, "finetune_unet", spy_train)
    monkeypatch.setattr(poison, "encode_posteriors", spy_encode)
    mimic = poison.PoisonTraining(poison_count=4, corpus_per_pair=1, steps=2, batch_size=4, filter_drop=0.3)
    unets = []
    for images in (scraped, other, scraped):
        unets.append(torch.cat([p.flatten() for p in mimic.train(images, make_generator(0), ctx)[0].unet.parameters()]))
    n_corpus = len(mimic.corpus(32))
    assert encoded == [n_corpus, 4, 4, 4]  # the corpus once, each cell's scraped images in a batch of their own
    assert torch.equal(unets[0], unets[2]) and not torch.equal(unets[0], unets[1])
    data, (means, stds) = seen[0]
    n = len(data)
    assert n == n_corpus + 4 - round(0.3 * (n_corpus + 4)) and means.shape[0] == stds.shape[0] == 2 * n
    with torch.no_grad():
        alone = pipe.vae.encode(data.images * 2 - 1).latent_dist
        flipped = pipe.vae.encode(data.images.flip(-1) * 2 - 1).latent_dist
    assert torch.allclose(means[:n], alone.mean, atol=1e-5) and torch.allclose(stds[:n], alone.std, atol=1e-5)
    assert torch.allclose(means[n:], flipped.mean, atol=1e-5) and torch.allclose(stds[n:], flipped.std, atol=1e-5)
