"""Tests of harness.models: the tiny random pipeline, the memoized loader and missing-checkpoint errors.

CPU only, offline (HF_HUB_OFFLINE=1), no downloads: everything runs on the generated tiny-random model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from harness import models, tiny_random  # noqa: E402
from harness.models import (  # noqa: E402
    ModelNotFoundError,
    ModelSpec,
    clear_model_cache,
    load_pipeline,
)
from harness.protocols import ConfigError  # noqa: E402
from harness.tiny_random import build_tiny_random, save_tiny_random  # noqa: E402

TINY = ModelSpec(source="tiny-random", resolution=32)
TINY_INPAINT = ModelSpec(source="tiny-random-inpaint", resolution=32)
PROMPT = "a photo of a cat"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the hub's offline mode even if huggingface_hub was imported before HF_HUB_OFFLINE was set."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module", autouse=True)
def _fresh_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _image(seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=_gen(seed))


def _img2img(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(
        PROMPT, image=_image(), strength=0.8, num_inference_steps=2, generator=_gen(seed), output_type="pt"
    ).images


def _state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name in ("unet", "vae", "text_encoder")
        for k, v in getattr(pipe, name).state_dict().items()
    }


# ---------------------------------------------------------------------------------------------- ModelSpec


def test_spec_defaults_and_key():
    spec = ModelSpec(source="org/model")
    assert spec.name == "org/model" and spec.resolution == 512 and spec.kind == "hub"
    assert spec.key_dict() == {
        "source": "org/model",
        "dtype": "float32",
        "revision": None,
        "variant": None,
        "resolution": 512,
    }
    named = ModelSpec(source="org/model", name="label")
    assert named.key_dict() == spec.key_dict()  # the display name is not part of the key
    assert TINY.kind == "tiny-random" and "path" not in TINY.key_dict()
    assert hash(TINY) == hash(ModelSpec(source="tiny-random", resolution=32))


def test_spec_local_path_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec(source="./weights")
    assert spec.kind == "local"
    assert spec.key_dict()["path"] == str((tmp_path / "weights").resolve())


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"dtype": "fp17"}, "model.dtype"),
        ({"dtype": "half"}, "model.dtype"),
        ({"resolution": 30}, "model.resolution"),
        ({"resolution": 0}, "model.resolution"),
        ({"resolution": "512"}, "model.resolution"),
        ({"revision": ""}, "model.revision"),
    ],
)
def test_spec_validation(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        ModelSpec(source="tiny-random", **kwargs)
    with pytest.raises(ConfigError, match="model.source"):
        ModelSpec(source="")


# ---------------------------------------------------------------------------------------------- tiny-random


def test_tiny_random_deterministic_and_keeps_global_rng():
    torch.manual_seed(1234)
    before = torch.rand(4)
    first = build_tiny_random(seed=0)
    after = torch.rand(4)
    torch.manual_seed(1234)
    assert torch.equal(torch.cat([before, after]), torch.rand(8))  # the build drew nothing globally

    second = build_tiny_random(seed=0)
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _state(build_tiny_random(seed=1))
    assert not torch.equal(a["unet.conv_in.weight"], other["unet.conv_in.weight"])

    n_params = sum(v.numel() for v in a.values())
    assert n_params < 5_000_000
    assert first.vae_scale_factor == 2 and first.unet.config.sample_size * first.vae_scale_factor == 32
    assert first.safety_checker is None


def test_tiny_tokenizer():
    pipe = load_pipeline(TINY, "text2img")
    tok = pipe.tokenizer
    assert tok.model_max_length == 77
    assert len(tok) == pipe.text_encoder.config.vocab_size
    ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    assert all(0 <= i < len(tok) for i in ids)
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids and ids[-1] == tok.pad_token_id
    assert "photo</w>" in tok.convert_ids_to_tokens(ids)  # a merge applies
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT


def test_tokenizer_files_load(tmp_path: Path):
    from transformers import CLIPTokenizer

    vocab_file, merges_file = tiny_random.write_tiny_tokenizer_files(tmp_path)
    assert merges_file.read_text().startswith("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tok) == len(tiny_random.tiny_clip_tokenizer())
    # every byte has a token, so any text encodes without unknowns
    ids = tok("Ünïcødé ☃ 123!").input_ids
    assert tok.unk_token_id not in ids[1:-1]


def test_text2img_and_img2img():
    t2i = load_pipeline(TINY, "text2img")
    out = t2i(PROMPT, height=32, width=32, num_inference_steps=2, generator=_gen(0), output_type="pt").images
    again = t2i(PROMPT, height=32, width=32, num_inference_steps=2, generator=_gen(0), output_type="pt").images
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, again)

    i2i = load_pipeline(TINY, "img2img")
    a, b, c = _img2img(i2i, 0), _img2img(i2i, 0), _img2img(i2i, 1)
    assert a.shape == (1, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_inpaint():
    pipe = load_pipeline(TINY_INPAINT, "inpaint")
    assert pipe.unet.config.in_channels == 9
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    out = pipe(
        PROMPT, image=_image(), mask_image=mask, num_inference_steps=2, generator=_gen(0), output_type="pt"
    ).images
    assert out.shape == (1, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ConfigError, match="inpaint"):
        load_pipeline(TINY_INPAINT, "img2img")


# ---------------------------------------------------------------------------------------------- loader


def test_memoized_and_shared():
    i2i = load_pipeline(TINY, "img2img")
    assert load_pipeline(TINY, "img2img") is i2i
    assert load_pipeline(ModelSpec(source="tiny-random", resolution=32, name="other label"), "img2img") is i2i
    t2i = load_pipeline(TINY, "text2img")
    assert t2i is not i2i
    assert t2i.unet is i2i.unet and t2i.vae is i2i.vae and t2i.text_encoder is i2i.text_encoder
    assert t2i.scheduler is not i2i.scheduler  # schedulers keep state; each task has its own
    assert i2i._progress_bar_config.get("disable") is True

    clear_model_cache()
    assert load_pipeline(TINY, "img2img") is not i2i


def test_float16_on_cpu_loads_float32(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models, "_warned_cpu_fp16", False)
    with caplog.at_level(logging.WARNING, logger="harness.models"):
        pipe = load_pipeline(ModelSpec(source="tiny-random", dtype="float16", resolution=32), "img2img")
    assert pipe.unet.dtype == torch.float32
    assert "float16" in caplog.text


def test_bad_task():
    with pytest.raises(ConfigError, match="task"):
        load_pipeline(TINY, task="video")


def test_save_and_load_local_folder(tmp_path: Path):
    folder = save_tiny_random(tmp_path / "tiny")
    assert (folder / "model_index.json").is_file()
    spec = ModelSpec(source=str(folder), resolution=32)
    assert spec.kind == "local"
    local = load_pipeline(spec, "img2img")
    assert type(local).__name__ == "StableDiffusionImg2ImgPipeline"
    assert local.safety_checker is None
    assert torch.equal(_img2img(local), _img2img(load_pipeline(TINY, "img2img")))


def test_missing_local_path(tmp_path: Path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(ModelSpec(source=str(missing)))
    assert str(missing) in str(info.value)
    assert "model.source=" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_folder_without_model_index(tmp_path: Path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json") as info:
        load_pipeline(ModelSpec(source=str(tmp_path)))
    assert str(tmp_path) in str(info.value)


def test_unknown_hub_id_offline():
    from huggingface_hub import constants

    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(ModelSpec(source="harness-tests/no-such-model-xyz"))
    message = str(info.value)
    assert constants.HF_HUB_CACHE in message
    assert "harness-tests/no-such-model-xyz" in message
    assert "HF_HUB_OFFLINE is set" in message and "model.source=" in message
    assert info.value.__cause__ is not None
