"""The embedded world's tokenizer: a CLIP-style byte-level BPE whose vocabulary the project learns itself.

The merges are learned with the BPE algorithm of Sennrich et al. (2016) on the words of the world's captions
and prompts (artists, subjects, caption templates, photo captions, common prompt words), until every one of
those words is a single token. Any other text still tokenizes, byte by byte, because all 256 byte
characters are in the vocabulary. The layout follows CLIP's files: byte characters, their ``</w>``
end-of-word forms, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id, so
models that pool at the arg-max token, as open_clip does, pool at the end of text).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.tiny_random import bytes_to_unicode

#: the context length of the world's text encoders (its captions are short).
CONTEXT_LENGTH = 32

_EXTRA_WORDS = (
    "a an the of in on at by with and or style styles art artwork artworks painting paintings drawing photo photos "
    "picture image portrait black white red green blue yellow orange purple pink brown grey gray dark light bright "
    "big small old new one two three sky ground sea water night day sunset snow rain field city street garden "
    "person man woman dog cat bird car house tree boat mountain flower fish sun star moon heart sks shown showing "
    "high quality low blurry noisy ugly detailed realistic abstract sketch print oil pencil"
)


def world_words() -> list[str]:
    """Every word the world's captions and prompts use, lowercased, in a fixed order."""
    from harness.data import SAMPLE_PHOTOS
    from harness.world import ARTISTS, CAPTION_TEMPLATES, SUBJECTS, style_prompt

    texts = [_EXTRA_WORDS, *ARTISTS, *SUBJECTS, *(style_prompt(a) for a in ARTISTS)]
    texts += [t.format(a="a", subject="x", artist="x") for t in CAPTION_TEMPLATES]
    texts += [caption for _, caption in SAMPLE_PHOTOS.values()]
    words: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[a-z]+", text.lower()):
            words[word] = None
    return list(words)


@lru_cache(maxsize=1)
def world_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Learn the merges on :func:`world_words` (each word counted once; ties broken alphabetically)."""
    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars)]
    words = [(*w[:-1], w[-1] + "</w>") for w in world_words()]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for w in words for p in zip(w[:-1], w[1:], strict=False))
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(tuple(out))
        words = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return tuple(vocab), tuple(merges)


def save_world_tokenizer(folder: str | Path) -> Any:
    """Write the world's ``CLIPTokenizer`` (vocab.json, merges.txt, configs) into ``folder`` and return it."""
    from transformers import CLIPTokenizer

    vocab, merges = world_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="world-tokenizer-") as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=CONTEXT_LENGTH)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"world tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return tokenizer
