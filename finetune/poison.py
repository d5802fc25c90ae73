"""Poisoned training (Nightshade's threat model, Shan et al. IEEE S&P 2024): the trainer continues training the
whole UNet on a clean corpus with the scraped, possibly poisoned, images mixed in, then is probed with prompts.

As in the paper, the whole model keeps training (not a LoRA or DreamBooth): the text encoder and VAE stay frozen
as in :mod:`finetune.full`. The clean corpus is the embedded world's training split (every training artist
painting every subject: the data the model was trained on), so that training on it alone leaves the model's
concepts where they were; the scraped images (the pipeline's purified protected set, of which the first
``poison_count`` are mixed in) are captioned as they come.

Probes: for every probe artist, ``probes_per_concept`` generations of the source concept, of each related
concept and of each unrelated concept, prompted with the world's caption ("a house in the style of dottori");
their ids name group and concept (:func:`harness.threat_models.poisoning.generation_id`), which the judge's
metrics read. ``related: auto`` takes the concepts whose prompts the model's own text encoder puts nearest the
source's (the paper measured bleed-through over concepts at growing text-embedding distance), ``unrelated:
auto`` the farthest (cosine similarity of the text encoder's pooled embeddings of "a <concept>").

The trainer's countermeasure on its training data (``filter_drop`` > 0): before training, every (image, caption)
pair of the mix is scored by the judge's image-text cosine similarity (tiny-clip by default: the model that judges
the probes) and the ``filter_drop`` share with the lowest alignment is dropped, whichever part of the mix it
comes from. Its detection figures go into the row's ``mimic_info``: of the dropped pairs, the share that were
scraped (precision, when the scraped images are the poison) and of the scraped pairs, the share dropped (recall).

The training samples latents from the VAE posteriors of the corpus and of the scraped images, each part encoded
as one batch of its own; the corpus's are kept for the next cell of the sweep (the same corpus in every cell).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from finetune.generate import progress_logger
from finetune.training import OPTIMIZERS, encode_posteriors, finetune_unet, pipeline_with_unet
from harness.diffusion import generate_seeded, tokenize
from harness.metrics.clip import ClipSpec, load_clip
from harness.protocols import ConfigError, Context, Mimic, check_int, check_range
from harness.seeding import derive_seed
from harness.threat_models.poisoning import generation_id
from harness.types import ImageSet

__all__ = ["PoisonTraining"]

#: VAE -> {(its weights' versions, corpus ids, shape): the corpus's posteriors}: the clean corpus is the same in
#: every cell of a sweep, and encoding it was about a tenth of each poisoned training on CPU
_CORPUS_POSTERIORS: weakref.WeakKeyDictionary[Any, dict[tuple, tuple[torch.Tensor, torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _concepts(option: str, value: Any) -> list[str] | str:
    if value == "auto":
        return "auto"
    if isinstance(value, str) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{option} must be 'auto' or a list of concepts, got {value!r}")
    return [str(v).strip() for v in value]


class PoisonTraining(Mimic):
    """Continued training of the whole UNet on the clean corpus plus the scraped images, then probe generations.

    Args:
        source: the concept the scraped images are captioned with (the one a poison attacks).
        related, unrelated: concept lists, or ``auto`` (``n_related`` nearest / farthest by the model's text
            embeddings, the source excluded).
        n_related: how many concepts ``auto`` takes for each.
        poison_count: how many of the scraped images join the corpus (None: all; at most their number).
        corpus_per_pair: clean corpus images per (training artist, subject) pair.
        steps, lr, batch_size, ema_decay, optimizer: the training recipe.
        probe_artists: how many training artists the probes are prompted with (the first ones).
        probes_per_concept: generations per concept and probe artist.
        sample_steps, guidance_scale: the probes' sampling.
        filter_drop: the share of the training pairs (corpus and scraped alike) the trainer drops before
            training, those with the lowest caption-image alignment under ``filter_clip``; 0: no filter.
        filter_clip, filter_pretrained: the image-text model that scores the alignment (an open_clip source,
            as the metrics' ``clip`` option).
    """

    name = "poison_training"
    # 2: the corpus and the scraped images are encoded as separate batches (the corpus's posteriors reused across
    # cells); in version 1 they were one batch. The experiment's 42 rows came out the same under both, but a
    # convolution library does not promise batch-independent results, so the version says the encoding changed
    version = "2"
    threat_model = "poisoning"
    uses_model = True

    def __init__(
        self,
        source: str = "house",
        related: Sequence[str] | str = "auto",
        unrelated: Sequence[str] | str = "auto",
        n_related: int = 2,
        poison_count: int | None = None,
        corpus_per_pair: int = 2,
        steps: int = 300,
        lr: float = 1e-4,
        batch_size: int = 16,
        ema_decay: float | None = None,
        optimizer: str = "adamw",
        probe_artists: int = 5,
        probes_per_concept: int = 2,
        sample_steps: int = 20,
        guidance_scale: float = 5.0,
        filter_drop: float = 0.0,
        filter_clip: str = "tiny-clip",
        filter_pretrained: str | None = None,
    ):
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"mimic.source must name a concept, got {source!r}")
        self.source = source.strip()
        self.related = _concepts("mimic.related", related)
        self.unrelated = _concepts("mimic.unrelated", unrelated)
        self.n_related = check_int("mimic.n_related", n_related, 1)
        self.poison_count = None if poison_count is None else check_int("mimic.poison_count", poison_count, 0)
        self.corpus_per_pair = check_int("mimic.corpus_per_pair", corpus_per_pair, 1)
        self.steps = check_int("mimic.steps", steps, 1)
        self.lr = check_range("mimic.lr", lr, 1e-10, 1.0)
        self.batch_size = check_int("mimic.batch_size", batch_size, 1)
        self.ema_decay = check_range("mimic.ema_decay", ema_decay, 0.0, 0.99999) if ema_decay else None
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"mimic.optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        self.optimizer = optimizer
        self.probe_artists = check_int("mimic.probe_artists", probe_artists, 1)
        self.probes_per_concept = check_int("mimic.probes_per_concept", probes_per_concept, 1)
        self.sample_steps = check_int("mimic.sample_steps", sample_steps, 1)
        self.guidance_scale = check_range("mimic.guidance_scale", guidance_scale, 0.0, 100.0)
        self.filter_drop = check_range("mimic.filter_drop", filter_drop, 0.0, 0.9)
        if not isinstance(filter_clip, str) or not filter_clip.strip():
            raise ConfigError(f"mimic.filter_clip must name an image-text model, got {filter_clip!r}")
        self.filter_spec = ClipSpec(source=filter_clip, pretrained=filter_pretrained)

    # ------------------------------------------------------------------------------------------ the probes
    def concept_groups(self, pipe: Any) -> dict[str, list[str]]:
        """group -> concepts: the source, the related and the unrelated ones (``auto`` resolved with ``pipe``'s
        text encoder: cosine similarity of the pooled embedding of "a <concept>")."""
        from harness.world import SUBJECTS

        groups: dict[str, list[str]] = {"source": [self.source]}
        ranked: list[str] = []
        if "auto" in (self.related, self.unrelated):
            others = [s for s in SUBJECTS if s != self.source]
            tokens = tokenize(pipe.tokenizer, [f"a {c}" for c in [self.source, *others]]).to(pipe.text_encoder.device)
            with torch.no_grad():  # the pooled (end-of-text) embedding: CLIP's text feature
                emb = pipe.text_encoder(tokens).pooler_output.float()
            emb = torch.nn.functional.normalize(emb, dim=1)
            sim = (emb[1:] @ emb[0]).tolist()
            ranked = [c for _, c in sorted(zip(sim, others, strict=True), key=lambda t: -t[0])]
        groups["related"] = ranked[: self.n_related] if self.related == "auto" else list(self.related)
        groups["unrelated"] = ranked[-self.n_related :] if self.unrelated == "auto" else list(self.unrelated)
        return groups

    def probes(self, pipe: Any) -> tuple[list[str], list[str]]:
        """(ids, prompts) of every probe generation."""
        from harness.world import TRAIN_ARTISTS, artwork_caption

        if self.probe_artists > len(TRAIN_ARTISTS):
            raise ConfigError(f"mimic.probe_artists must be at most {len(TRAIN_ARTISTS)}, got {self.probe_artists}")
        ids, prompts = [], []
        for group, concepts in self.concept_groups(pipe).items():
            for concept in concepts:
                for artist in TRAIN_ARTISTS[: self.probe_artists]:
                    for k in range(self.probes_per_concept):
                        ids.append(generation_id(group, concept, artist, k))
                        prompts.append(artwork_caption(concept, artist))
        return ids, prompts

    def _probe(self, pipe: Any, size: tuple[int, int], seed: int, ctx: Context, desc: str) -> ImageSet:
        ids, prompts = self.probes(pipe)
        images = generate_seeded(pipe, ids, prompts, seed, size, self.sample_steps, self.guidance_scale, ctx, desc)
        return ImageSet(images, ids, prompts)

    # ------------------------------------------------------------------------------------------ training
    def corpus(self, side: int) -> ImageSet:
        """The clean corpus: the world's training split, every training artist and subject, at ``side`` px."""
        from harness.world import ProceduralArt

        return ProceduralArt(artists="train", per_pair=self.corpus_per_pair, size=side, split="train").load()

    def corpus_posteriors(self, pipe: Any, corpus: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean corpus's VAE posteriors (:func:`finetune.training.encode_posteriors`, the corpus as one
        batch), kept per VAE object and its weights' versions for the cells after the first."""
        vae = pipe.vae
        memo = _CORPUS_POSTERIORS.setdefault(vae, {})
        key = (tuple(p._version for p in vae.parameters()), corpus.ids, tuple(corpus.images.shape))
        if key not in memo:
            memo.clear()
            memo[key] = encode_posteriors(pipe, corpus.images)
        return memo[key]

    def filter_pairs(self, mix: ImageSet, scraped_ids: set[str], ctx: Context) -> tuple[ImageSet, dict[str, float]]:
        """The trainer's caption-alignment filter: ``mix`` without the ``filter_drop`` share of its pairs whose
        caption the judge finds least aligned with the image, and the filter's figures (the positives being
        the pairs whose id is in ``scraped_ids``). Ties are broken by position, so the result is deterministic."""
        drop = round(self.filter_drop * len(mix))
        clip = load_clip(self.filter_spec, device=ctx.device)
        with torch.no_grad():
            alignment = (clip.encode_images(mix.images) * clip.encode_texts(list(mix.captions))).sum(1)
        order = sorted(range(len(mix)), key=lambda i: (float(alignment[i]), i))
        dropped = torch.zeros(len(mix), dtype=torch.bool)
        dropped[order[:drop]] = True
        scraped = torch.tensor([i in scraped_ids for i in mix.ids], dtype=torch.bool)
        caught, n_scraped = int((dropped & scraped).sum()), int(scraped.sum())
        info = {
            "filter_drop": self.filter_drop,
            "filter_pairs": float(len(mix)),
            "filter_dropped": float(drop),
            "filter_dropped_scraped": float(caught),
            "filter_scraped": float(n_scraped),
            # positives: the scraped pairs (the poison, in a run on poisoned images)
            "filter_precision": caught / drop if drop else float("nan"),
            "filter_recall": caught / n_scraped if n_scraped else float("nan"),
            "filter_alignment_scraped_mean": float(alignment[scraped].mean()) if n_scraped else float("nan"),
            "filter_alignment_corpus_mean": float(alignment[~scraped].mean()) if n_scraped < len(mix) else float("nan"),
        }
        keep = (~dropped).nonzero().flatten().tolist()
        kept = ImageSet(mix.images[keep], tuple(mix.ids[i] for i in keep), tuple(mix.captions[i] for i in keep))
        return kept, info

    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        return self.run_with_info(images, generator, ctx)[0]

    def run_with_info(
        self, images: ImageSet, generator: torch.Generator, ctx: Context
    ) -> tuple[ImageSet, dict[str, float]]:
        tuned, info = self.train(images, generator, ctx)
        base_seed = generator.initial_seed()
        return self._probe(tuned, images.size, derive_seed(base_seed, "probe"), ctx, "poisoned model probes"), info

    def train(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> tuple[Any, dict[str, float]]:
        """The trainer's model: the pipeline with its UNet trained on the corpus plus the first ``poison_count``
        scraped ``images`` (after the filter, if any), and the filter's figures (empty without one)."""
        if images.size[0] != images.size[1]:
            raise ConfigError(f"mimic=poison_training needs square images, got {images.size}")
        count = len(images) if self.poison_count is None else self.poison_count
        if count > len(images):
            raise ConfigError(f"mimic.poison_count is {count}, but the scraped set has {len(images)} images")
        pipe = ctx.pipeline("text2img")
        scraped = ImageSet(images.images[:count], images.ids[:count], images.captions[:count]) if count else None
        corpus = self.corpus(images.size[0])
        mix = corpus if scraped is None else ImageSet.concat([corpus, scraped])
        # the posteriors the training samples latents from: the corpus's (the same in every cell, so encoded once
        # per process) and the scraped images', each part always encoded as one batch of its own, so that a
        # cell's result does not depend on what ran before it
        parts = [self.corpus_posteriors(pipe, corpus)]
        if scraped is not None:
            parts.append(encode_posteriors(pipe, scraped.images))
        halves = [(m[: len(m) // 2], m[len(m) // 2 :], s[: len(s) // 2], s[len(s) // 2 :]) for m, s in parts]
        means, flip_means, stds, flip_stds = (torch.cat([h[k] for h in halves]) for k in range(4))
        info: dict[str, float] = {}
        if self.filter_drop > 0:
            position = {i: k for k, i in enumerate(mix.ids)}
            mix, info = self.filter_pairs(mix, set(scraped.ids) if scraped is not None else set(), ctx)
            keep = torch.tensor([position[i] for i in mix.ids], dtype=torch.long)
            means, flip_means, stds, flip_stds = (t[keep] for t in (means, flip_means, stds, flip_stds))
        unet = copy.deepcopy(pipe.unet).float().requires_grad_(True)
        finetune_unet(
            pipe,
            unet,
            list(unet.parameters()),
            mix,
            list(mix.captions),
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=derive_seed(generator.initial_seed(), "train"),
            ema_decay=self.ema_decay,
            log=progress_logger(ctx, self.steps, "poison training"),
            optimizer=self.optimizer,
            posteriors=(torch.cat([means, flip_means]), torch.cat([stds, flip_stds])),
        )
        return pipeline_with_unet(pipe, unet), info
