"""CLIP-style image-text models for metrics: a loader (open_clip) and a zero-shot classifier.

One code path serves the shipped ``tiny-clip`` and real CLIP checkpoints:

- ``"tiny-clip"``: the embedded world's small image-text model (``harness/zoo/tiny-clip``), trained by the
  project on procedural artworks and sample photos. Its scores are about the embedded world only; they are
  *not* CLIP scores and must never be compared with published CLIP numbers (metric names carry the model name).
- ``"local-dir:/path"``: an open_clip folder (``open_clip_config.json`` + weights, as tiny-clip is stored).
- ``"hf-hub:org/repo"``: an open_clip model in the Hugging Face cache (offline unless the user goes online).
- an open_clip architecture name (``"ViT-L-14"``) with ``pretrained`` a local weights file or a cached tag.

Images follow the harness convention, (N, 3, H, W) float32 in [0, 1]; they are resized (shorter side,
bicubic, anti-aliased) and centre-cropped to the model's input size, then normalised with its mean and std.
Features come back L2-normalised, float32, on the CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import ModelNotFoundError
from harness.protocols import ConfigError, Metric
from harness.types import ImageSet

__all__ = [
    "ArtistProbability",
    "ClipImageSimilarity",
    "ClipPromptSimilarity",
    "ClipModel",
    "ClipSpec",
    "ConceptAccuracy",
    "ConceptRate",
    "StyleMatch",
    "ZeroShotClassifier",
    "load_clip",
    "style_classifier",
    "subject_classifier",
    "tiny_clip_path",
]

SHIPPED_CLIP = ("tiny-clip",)


def tiny_clip_path() -> Path:
    """The folder of the shipped tiny-clip (open_clip local-dir layout)."""
    return Path(__file__).resolve().parent.parent / "zoo" / "tiny-clip"


@dataclass(frozen=True)
class ClipSpec:
    """Which image-text model a metric uses.

    Attributes:
        source: ``"tiny-clip"``, ``"local-dir:/path"``, ``"hf-hub:org/repo"`` or an open_clip model name.
        pretrained: for an open_clip model name, a local weights file or a pretrained tag already in the cache.
        name: display label (defaults to ``source``); metric names include it.
    """

    source: str = "tiny-clip"
    pretrained: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"clip.source must be a non-empty string, got {self.source!r}")
        if not self.name:
            object.__setattr__(self, "name", self.source)

    def open_clip_name(self) -> str:
        if self.source in SHIPPED_CLIP:
            return f"local-dir:{tiny_clip_path()}"
        return self.source


class ClipModel:
    """A loaded open_clip model with its tokenizer and input geometry."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: str = "cpu",
        name: str = "",
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.device = torch.device(device)
        self.name = name

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (N, 3, H, W) -> normalised model input (N, 3, S, S)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"CLIP images must be (N, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top : top + s, left : left + s].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image features (N, D), float32 on CPU."""
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = self.preprocess(images[i : i + batch_size]).to(self.device)
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text features (N, D), float32 on CPU."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)


_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str | None, str], ClipModel] = {}


def load_clip(spec: ClipSpec | str = "tiny-clip", device: str = "cpu") -> ClipModel:
    """Load (once per process, memoized) the image-text model ``spec`` on ``device``.

    Raises:
        ModelNotFoundError: the folder or weights are missing (the message names where it looked).
    """
    import open_clip

    if isinstance(spec, str):
        spec = ClipSpec(source=spec)
    key = (spec.source, spec.pretrained, str(device))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        name = spec.open_clip_name()
        if name.startswith("local-dir:"):
            folder = Path(name.removeprefix("local-dir:"))
            missing = [f for f in ("open_clip_config.json",) if not (folder / f).is_file()]
            if not folder.is_dir() or missing or not any(folder.glob("*.safetensors")):
                fix = (
                    "retrain it with `python -m harness.zoo train tiny-clip` or reinstall from a complete checkout"
                    if spec.source in SHIPPED_CLIP
                    else "point clip.source at an open_clip folder"
                )
                raise ModelNotFoundError(
                    f"CLIP checkpoint not found for clip.source={spec.source!r}: the folder {folder} needs "
                    f"open_clip_config.json and a .safetensors weights file; {fix}."
                )
        try:
            model, preprocess = open_clip.create_model_from_pretrained(name, pretrained=spec.pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(name)
        except (FileNotFoundError, RuntimeError) as error:
            raise ModelNotFoundError(
                f"CLIP checkpoint not found for clip.source={spec.source!r} (pretrained={spec.pretrained!r}): "
                f"{error}. Point clip.source at a local open_clip folder ('local-dir:/path') or give "
                "clip.pretrained a local weights file."
            ) from error
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        clip = ClipModel(model, tokenizer, size, mean, std, device=device, name=spec.name)
        _CACHE[key] = clip
        return clip


class ZeroShotClassifier:
    """CLIP zero-shot classification with prompt ensembling (Radford et al. 2021, section 3.1.4).

    Args:
        clip: the image-text model.
        prompts: class name -> prompts describing it; a class's text feature is the normalised mean of its
            prompts' features.
    """

    def __init__(self, clip: ClipModel, prompts: dict[str, Sequence[str]]) -> None:
        if not prompts or any(not p for p in prompts.values()):
            raise ConfigError("a zero-shot classifier needs at least one prompt per class")
        self.clip = clip
        self.classes = list(prompts)
        feats = [F.normalize(clip.encode_texts(list(p)).mean(0), dim=0) for p in prompts.values()]
        self.text_features = torch.stack(feats)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (N, classes)."""
        return self.clip.encode_images(images) @ self.text_features.T

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, classes): softmax of the cosine similarities times the model's logit scale
        (CLIP's learned temperature; 100 when the model has none)."""
        scale = getattr(self.clip.model, "logit_scale", None)
        scale = float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0
        return torch.softmax(self.logits(images).double() * scale, dim=1)

    def predict(self, images: torch.Tensor) -> list[str]:
        return [self.classes[i] for i in self.logits(images).argmax(1).tolist()]

    def accuracy(self, images: torch.Tensor, labels: Sequence[str]) -> float:
        if len(labels) != images.shape[0]:
            raise ConfigError(f"{len(labels)} labels for {images.shape[0]} images")
        pred = self.predict(images)
        return sum(p == t for p, t in zip(pred, labels, strict=False)) / max(1, len(labels))


def style_classifier(clip: ClipModel, artists: Sequence[str] | None = None) -> ZeroShotClassifier:
    """A zero-shot classifier over the embedded world's artists, with the world's caption templates as the
    prompt ensemble (every template, every subject, plus the subject-free style prompt)."""
    from harness.world import ARTISTS, CAPTION_TEMPLATES, SUBJECTS, style_prompt

    artists = list(artists or ARTISTS)
    prompts = {
        a: [style_prompt(a)] + [t.format(a="a", subject=s, artist=a) for t in CAPTION_TEMPLATES for s in SUBJECTS]
        for a in artists
    }
    return ZeroShotClassifier(clip, prompts)


def subject_classifier(clip: ClipModel, subjects: Sequence[str] | None = None) -> ZeroShotClassifier:
    """A zero-shot classifier over the embedded world's subjects (the concepts of the poisoning threat model),
    with the world's caption templates as the prompt ensemble (every template for every artist, so no style is
    favoured, plus the style-free subject prompt), as :func:`style_classifier` is built for artists."""
    from harness.world import ARTISTS, CAPTION_TEMPLATES, SUBJECTS, subject_prompt

    subjects = list(subjects or SUBJECTS)
    prompts = {
        s: [subject_prompt(s)] + [t.format(a="a", subject=s, artist=a) for t in CAPTION_TEMPLATES for a in ARTISTS]
        for s in subjects
    }
    return ZeroShotClassifier(clip, prompts)


class _ConceptJudge(Metric):
    """The judge of the poisoning threat model: tiny-clip's zero-shot subject classifier on generations whose ids
    name their probe group and concept (:func:`harness.threat_models.poisoning.generation_id`). A generation
    outside ``group`` gets NaN (no value: the intervals skip it)."""

    binary = True

    def __init__(self, group: str = "source", clip: str = "tiny-clip", pretrained: str | None = None):
        from harness.threat_models.poisoning import GROUPS

        if group not in GROUPS:
            raise ConfigError(f"metrics.group must be one of {list(GROUPS)}, got {group!r}")
        self.group = group
        self.spec = ClipSpec(source=clip, pretrained=pretrained)
        self._clf: ZeroShotClassifier | None = None

    def classifier(self) -> ZeroShotClassifier:
        if self._clf is None:
            self._clf = subject_classifier(load_clip(self.spec))
        return self._clf

    def judged(self, outputs: ImageSet) -> tuple[list[int], list[str], list[str]]:
        """Positions, prompted concepts and predicted concepts of the generations of this group."""
        from harness.threat_models.poisoning import parse_generation_id

        keep, concepts = [], []
        for k, image_id in enumerate(outputs.ids):
            parsed = parse_generation_id(image_id)
            if parsed is None:
                raise ConfigError(
                    f"metric {self.name} judges poisoning probes (ids gen/<group>/<concept>/...), got id {image_id!r}"
                )
            if parsed[0] == self.group:
                keep.append(k)
                concepts.append(parsed[1])
        predicted = self.classifier().predict(outputs.images[keep]) if keep else []
        return keep, concepts, predicted

    def _values(self, outputs: ImageSet, hit: Callable[[str, str], bool]) -> torch.Tensor:
        values = torch.full((len(outputs),), float("nan"), dtype=torch.float64)
        keep, concepts, predicted = self.judged(outputs)
        for k, c, p in zip(keep, concepts, predicted, strict=True):
            values[k] = float(hit(c, p))
        return values


class ConceptAccuracy(_ConceptJudge):
    """1 when the judge sees the prompted concept in a generation of ``group``, 0 otherwise (NaN outside the
    group). The poisoning threat model's success: the trainer's model still draws what it is asked for."""

    name = "concept_accuracy"
    version = "1"
    higher_is_better = True

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        return self._values(outputs, lambda concept, predicted: predicted == concept)


class ConceptRate(_ConceptJudge):
    """1 when the judge sees ``concept`` (the poison's target) in a generation of ``group``, else 0 (NaN outside
    the group): how often the poisoned model draws the target when prompted with the source."""

    name = "concept_rate"
    version = "1"
    higher_is_better = False  # the trainer's view: the target showing up is the poison working

    def __init__(self, concept: str, group: str = "source", clip: str = "tiny-clip", pretrained: str | None = None):
        super().__init__(group=group, clip=clip, pretrained=pretrained)
        if not isinstance(concept, str) or not concept.strip():
            raise ConfigError(f"metrics.concept must name a concept, got {concept!r}")
        self.concept = concept.strip()

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        return self._values(outputs, lambda _, predicted: predicted == self.concept)


class _StyleJudge(Metric):
    """The judge shared by :class:`StyleMatch` and :class:`ArtistProbability`: a zero-shot style classifier
    with an image-text model, and the reference's style as the classifier's prediction on the reference.

    Args:
        clip: ``"tiny-clip"`` or another source accepted by :func:`load_clip`.
        pretrained: weights for an open_clip model name.
        styles: style names (None: the embedded world's 13 artists).
        prompt_template: prompt per style when ``styles`` are given ("{style}" is replaced); the world's
            artists use the world's caption templates as an ensemble.
    """

    def __init__(
        self,
        clip: str = "tiny-clip",
        pretrained: str | None = None,
        styles: Sequence[str] | None = None,
        prompt_template: str = "an artwork in the style of {style}",
    ):
        self.spec = ClipSpec(source=clip, pretrained=pretrained)
        self.styles = list(styles) if styles else None
        if "{style}" not in prompt_template:
            raise ConfigError(f"metrics.prompt_template must contain {{style}}, got {prompt_template!r}")
        self.prompt_template = prompt_template
        self._clf: ZeroShotClassifier | None = None

    def classifier(self) -> ZeroShotClassifier:
        if self._clf is None:
            model = load_clip(self.spec)
            if self.styles is None:
                self._clf = style_classifier(model)
            else:
                self._clf = ZeroShotClassifier(model, {s: [self.prompt_template.format(style=s)] for s in self.styles})
        return self._clf

    def true_styles(self, references: ImageSet) -> torch.Tensor:
        """Index (N,) of each reference's style: the classifier's prediction on the reference image."""
        return self.classifier().logits(references.images).argmax(1)


class StyleMatch(_StyleJudge):
    """1 when a generated image is classified into the same style as its reference image, else 0.

    Zero-shot style classification with an image-text model over a list of styles (the embedded world's
    artists by default). The reference's style is the classifier's prediction on the artist's clean image,
    so the metric needs no labels; with tiny-clip that prediction is right for 99% of clean artworks.
    Higher means the mimic reproduced the style (the attacker succeeded). Options: see :class:`_StyleJudge`.
    """

    name = "style_match"
    version = "1"
    higher_is_better = True
    binary = True  # yes/no: tables and verdicts give it Jeffreys-smoothed intervals

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        got = self.classifier().logits(outputs.images).argmax(1)
        return (got == self.true_styles(references)).to(torch.float64)


class ArtistProbability(_StyleJudge):
    """The judge's probability for the true artist: the zero-shot classifier's softmax probability (logits:
    cosine similarities times the model's own logit scale) of each generated image for the style the
    classifier assigns to its reference image (as :class:`StyleMatch` finds it). A continuous companion of
    the yes/no style match: in [0, 1], the probabilities over the styles sum to 1, and style match is 1
    exactly when this style has the largest probability. Higher: closer to the artist (the attacker
    succeeded). Meaningful only for the judge's styles (the embedded world's artists by default).
    Options: see :class:`_StyleJudge`.
    """

    name = "artist_probability"
    version = "1"
    higher_is_better = True

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        probs = self.classifier().probabilities(outputs.images)
        return probs.gather(1, self.true_styles(references)[:, None]).squeeze(1).double()


class ClipPromptSimilarity(Metric):
    """Cosine similarity between each output image and a prompt (PhotoGuard's Fig. 6: does the edit follow
    the prompt?). The prompt is ``prompt``, or each reference's caption when None. Higher: the mimic followed
    the prompt (the attacker succeeded). With tiny-clip this is *not* a CLIP score."""

    name = "clip_prompt_similarity"
    version = "1"
    higher_is_better = True

    def __init__(self, clip: str = "tiny-clip", pretrained: str | None = None, prompt: str | None = None):
        self.spec = ClipSpec(source=clip, pretrained=pretrained)
        self.prompt = prompt or None

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        model = load_clip(self.spec)
        texts = [self.prompt or c for c in references.captions]
        img = model.encode_images(outputs.images)
        txt = model.encode_texts(texts)
        return (img * txt).sum(dim=1).double()


class ClipImageSimilarity(Metric):
    """Image-image style similarity: cosine between each output's image features and the mean feature of all
    reference images (the artist's clean works), as in CLIP-based style similarity. Higher: closer to the
    artist. With tiny-clip this is *not* a CLIP score."""

    name = "clip_image_similarity"
    version = "1"
    higher_is_better = True

    def __init__(self, clip: str = "tiny-clip", pretrained: str | None = None):
        self.spec = ClipSpec(source=clip, pretrained=pretrained)

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        model = load_clip(self.spec)
        centre = F.normalize(model.encode_images(references.images).mean(0), dim=0)
        return (model.encode_images(outputs.images) @ centre).double()
