"""Poisoning (Nightshade's threat model): a model trainer scrapes images with captions, some of them poison, and
continues training the model on the mix.

Here the harness's attacker is the **trainer**: can a poisoned scrape still be trained on? The defender (the
artist who poisons) wins when a model trained on the mix no longer draws the source concept when prompted with
it. Success is the trainer's: the judge's zero-shot accuracy on the source concept for generations prompted with
it (and, beside it, how often the judge sees the poison's target concept instead, and the accuracy on related
and unrelated concepts for bleed-through and collateral damage).

Controls: the positive control is training on the clean corpus with the source images unpoisoned (what the
trainer gets from a clean scrape); the floor is the same training with **dirty-label** poison of the same count
(images of the target concept captioned as the source, ``defense=dirty_label``), the plain poison every
poisoning result is compared with (Shan et al. compare Nightshade with it); the noise baseline is uniform noise
at the poison's realised L-inf budget on the same source images. So the protection effect reads 0 = as harmless
as noise of the same budget, 1 = as damaging as dirty-label poison of the same count.

The generations the mimic returns carry their concept and group in their ids (:func:`generation_id`): every
measure reads them there, and compares each generation with nothing else (``prepare``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from harness.errors import ConfigError
from harness.threat_models import ThreatModel
from harness.types import ImageSet

__all__ = [
    "THREAT_MODEL",
    "GROUPS",
    "check_concepts",
    "swap_concept",
    "generation_id",
    "parse_generation_id",
    "one_per_artist",
]

#: the prompt groups a poisoned model is probed with: the poisoned concept itself, concepts near it, the rest
GROUPS = ("source", "related", "unrelated")


def check_concepts(source: object, target: object, prefix: str = "defense") -> tuple[str, str]:
    """The source and target concepts as words; a ConfigError naming the option otherwise."""
    for option, value in ((f"{prefix}.source", source), (f"{prefix}.target", target)):
        if not isinstance(value, str) or not value.strip() or " " in value.strip():
            raise ConfigError(f"{option} must be one word naming a concept, got {value!r}")
    source, target = str(source).strip(), str(target).strip()
    if source.lower() == target.lower():
        raise ConfigError(f"{prefix}.target must differ from {prefix}.source, both are {source!r}")
    return source, target


def swap_concept(caption: str, source: str, target: str) -> str:
    """``caption`` with the word ``source`` replaced by ``target`` (whole words, any case; the article before
    it follows: "an owl" for "a house" -> "owl"). A caption that does not name ``source`` becomes "a <target>"."""
    pattern = re.compile(rf"\b(an?\s+)?{re.escape(source)}\b", re.IGNORECASE)
    if not pattern.search(caption):
        return f"{_article(target)} {target}"

    def repl(m: re.Match) -> str:
        return f"{_article(target)} {target}" if m.group(1) else target

    return pattern.sub(repl, caption)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def generation_id(group: str, concept: str, context: str, index: int) -> str:
    """The id of one probe generation: ``gen/<group>/<concept>/<context>/<index>`` (context: the artist, say)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {list(GROUPS)}, got {group!r}")
    return f"gen/{group}/{concept}/{context}/{index:03d}"


def parse_generation_id(image_id: str) -> tuple[str, str] | None:
    """(group, concept) of an id written by :func:`generation_id`, or None for any other id."""
    parts = image_id.split("/")
    if len(parts) != 5 or parts[0] != "gen" or parts[1] not in GROUPS:
        return None
    return parts[1], parts[2]


def one_per_artist(images: ImageSet, _: object = None, group: str = "source") -> ImageSet:
    """The first image of each artist, in order: among scraped artworks (ids ``<artist>/<subject>/<split>-<n>``),
    and among probe generations only those of ``group`` (ids :func:`generation_id` writes, the artist as their
    context). A report grid's transform (the second argument, the grid's first set, is not used)."""
    keep, seen = [], set()
    for i, image_id in enumerate(images.ids):
        parsed = parse_generation_id(image_id)
        if parsed is not None and parsed[0] != group:
            continue
        artist = image_id.split("/")[3] if parsed is not None else image_id.split("/")[0]
        if artist not in seen:
            seen.add(artist)
            keep.append(i)
    return ImageSet(images.images[keep], tuple(images.ids[i] for i in keep), tuple(images.captions[i] for i in keep))


def _prepare(outputs: ImageSet, references: ImageSet, _: Mapping[str, object] | None = None):
    # every measure judges a generation by the concept its id names: nothing to pair it with
    return outputs, outputs


THREAT_MODEL = ThreatModel(
    name="poisoning",
    reference="clean_images",
    success="concept_accuracy",
    attack="train on",
    floor="the same training with dirty-label poison of the same count (images of the target captioned as the source)",
    positive_control="the same training with the source images unpoisoned",
    baseline_text="noise of the same budget",
    prepare=_prepare,
    floor_defense="dirty_label",
    floor_defense_args=("source", "target"),
    own_output_ids=True,
    unseparated="dirty-label poison of this count does not clearly hurt the trainer more than the clean images do",
)
