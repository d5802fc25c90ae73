"""The embedded world v2 (issue 16): the autoencoder's training and install, its card's measurements (the
encoder attack's reach on a case with a known answer, the TAEF2 reference), the held-out photos, and the
components a shipped pipeline borrows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.types import ImageSet

ZOO = Path(__file__).resolve().parent.parent / "harness" / "zoo"
TAEF2 = Path(__file__).resolve().parents[2] / "shared" / "assets" / "taef2"


def test_held_out_photos_are_whole_photos_no_training_crop_comes_from():
    from harness.data import HELD_OUT_PHOTOS, SAMPLE_PHOTOS, TRAIN_PHOTOS
    from harness.zoo.evaluate import held_out_photos

    assert set(HELD_OUT_PHOTOS).isdisjoint(TRAIN_PHOTOS)
    assert set(HELD_OUT_PHOTOS) | set(TRAIN_PHOTOS) == set(SAMPLE_PHOTOS)
    photos = held_out_photos(32)
    assert list(photos.ids) == list(HELD_OUT_PHOTOS) and photos.images.shape == (len(HELD_OUT_PHOTOS), 3, 32, 32)


def _patch_mean_encoder(x: torch.Tensor) -> torch.Tensor:
    """A linear 'encoder': the mean of each 8 x 8 patch per channel, so the attack's optimum is known."""
    return F.avg_pool2d(x, 8)


def test_encoder_susceptibility_reaches_the_hand_computed_optimum_and_noise_does_not():
    """Patches at distance a = 0.3 from grey, budget eps = 0.03: every pixel can move eps toward grey, so the
    latent distance shrinks by the factor 1 - eps / a exactly; uniform noise averages out over a patch."""
    from harness.pgd import PGDSettings
    from harness.zoo.evaluate import encoder_susceptibility

    g = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(3, 3, 4, 4, generator=g) < 0.5, -1.0, 1.0)
    x = (0.5 + 0.3 * signs).repeat_interleave(8, -1).repeat_interleave(8, -2)  # (3, 3, 32, 32) in {0.2, 0.8}
    images = ImageSet(images=x, ids=["a", "b", "c"], captions=[""] * 3)
    settings = PGDSettings(eps=0.03, steps=10, step_size=0.01, random_start=True, eval_samples=1)
    out = encoder_susceptibility(_patch_mean_encoder, images, settings)
    expected_distance = 0.03 / 0.3
    assert out["attack_closed_distance"] == pytest.approx(expected_distance, abs=1e-4)
    assert out["attack_closed_squared"] == pytest.approx(1 - (1 - expected_distance) ** 2, abs=1e-4)
    assert abs(out["noise_closed_squared"]) < 0.01 and out["realised_linf"] <= 0.03 + 1e-6
    # a wrong attack cannot pass: with no steps and no random start nothing moves
    still = encoder_susceptibility(
        _patch_mean_encoder, images, PGDSettings(eps=0.03, steps=0, step_size=0.01, random_start=False)
    )
    assert still["attack_closed_squared"] == pytest.approx(0.0, abs=1e-6)


def test_photoguard_encoder_settings_are_the_defense_config():
    from omegaconf import OmegaConf

    from harness.zoo.evaluate import PHOTOGUARD_ENCODER_CONFIG, photoguard_encoder_settings

    cfg = OmegaConf.load(PHOTOGUARD_ENCODER_CONFIG)
    s = photoguard_encoder_settings()
    assert (s.eps, s.steps, s.step_size, s.schedule) == (cfg.eps, cfg.steps, cfg.step_size, cfg.schedule)
    assert photoguard_encoder_settings(steps=5).steps == 5


@pytest.mark.skipif(not TAEF2.is_dir(), reason="needs ../shared/assets/taef2 (a reference for tests only)")
def test_taef2_reference_reconstructs_the_held_out_photos():
    from harness.zoo.evaluate import _psnr, held_out_photos
    from harness.zoo.reference import load_taef2

    model = load_taef2(TAEF2)
    photos = held_out_photos(64)
    with torch.no_grad():
        z = model.encode(photos.images)
        rec = model.decode(z)
    assert z.shape == (len(photos), 32, 8, 8)
    assert float(_psnr(rec, photos.images).mean()) > 20.0  # a real autoencoder, not a random network


def test_taef2_reference_names_a_missing_or_wrong_file(tmp_path):
    from harness.errors import ModelNotFoundError
    from harness.zoo.reference import load_taef2

    with pytest.raises(ModelNotFoundError, match="taef2_encoder.pth does not exist"):
        load_taef2(tmp_path)
    torch.save({"nothing": torch.zeros(1)}, tmp_path / "taef2_encoder.pth")
    with pytest.raises(ModelNotFoundError, match="is not a TAEF2 weight file"):
        load_taef2(tmp_path)


def test_autoencoder_trains_with_its_discriminator_resumes_and_installs(toy_world, tmp_path):
    from diffusers import AutoencoderKL

    from harness.zoo.__main__ import install_autoencoder

    train = toy_world
    work = tmp_path / "work"
    recipe = train.AutoencoderRecipe(disc_start=1, adaptive_every=1)
    rec = train.train_autoencoder(work, steps=2, batch=2, recipe=recipe)
    state = torch.load(work / "tiny-vae.ckpt", weights_only=False)
    assert state["step"] == 2 and "disc" in state and "disc_opt" in state
    assert "d_loss" in rec["history"][-1] and rec["history"][-1]["adaptive"] >= 0
    rec = train.train_autoencoder(work, steps=3, batch=2, recipe=recipe)  # resumes at step 2
    assert rec["resumed_from_step"] == 2 and rec["history"][-1]["step"] == 3
    assert rec["image_px"] == 128 and rec["train_photos"]
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    dest = install_autoencoder(work, zoo=zoo)
    from safetensors import safe_open

    with safe_open(str(dest / "diffusion_pytorch_model.safetensors"), "pt") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F16"}
    vae = AutoencoderKL.from_pretrained(dest)
    assert vae.config.latent_channels == 16
    assert vae.config.scaling_factor == pytest.approx(rec["scaling_factor"])
    with torch.no_grad():
        z = vae.float().encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert z.shape == (1, 16, 16, 16)  # 8x downsampling
    assert json.loads((dest / "training.json").read_text())[0]["stage"] == "tiny-vae"


def test_borrowed_components_count_in_the_digest_and_load():
    from harness.models import SHIPPED_BORROWED, ModelSpec, load_pipeline, shipped_weight_files

    files = shipped_weight_files("tiny-sd-inpaint")
    for component, (owner, sub) in SHIPPED_BORROWED["tiny-sd-inpaint"].items():
        assert not (ZOO / "tiny-sd-inpaint" / component).exists()  # no second copy is shipped
        borrowed = [k for k in files if k.startswith(component + "/")]
        assert borrowed and all(files[k].is_relative_to(ZOO / owner / sub) for k in borrowed)
    pipe = load_pipeline(ModelSpec(source="tiny-sd-inpaint", resolution=128), "inpaint")
    lender = load_pipeline(ModelSpec(source="tiny-sd", resolution=128), "text2img")
    for a, b in zip(pipe.vae.state_dict().values(), lender.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_drop_borrowed_refuses_a_component_that_differs(tmp_path):
    from harness.zoo.__main__ import drop_borrowed

    (tmp_path / "tiny-vae").mkdir()
    (tmp_path / "tiny-vae" / "w.safetensors").write_bytes(b"same")  # the lender of both pipelines' VAE
    for name in ("tiny-sd", "tiny-sd-inpaint"):
        for sub in ("vae", "text_encoder"):
            (tmp_path / name / sub).mkdir(parents=True)
            (tmp_path / name / sub / "w.safetensors").write_bytes(b"same")
    drop_borrowed(tmp_path / "tiny-sd", "tiny-sd")
    assert not (tmp_path / "tiny-sd" / "vae").exists() and (tmp_path / "tiny-sd" / "text_encoder").exists()
    drop_borrowed(tmp_path / "tiny-sd-inpaint", "tiny-sd-inpaint")
    assert not (tmp_path / "tiny-sd-inpaint" / "vae").exists()
    (tmp_path / "tiny-sd-inpaint" / "vae").mkdir()
    (tmp_path / "tiny-sd-inpaint" / "vae" / "w.safetensors").write_bytes(b"other")
    with pytest.raises(SystemExit, match="differs"):
        drop_borrowed(tmp_path / "tiny-sd-inpaint", "tiny-sd-inpaint")


def test_evaluate_autoencoder_reports_skimage_psnr_per_artist_and_per_held_out_photo():
    from skimage.metrics import peak_signal_noise_ratio

    from harness.data import HELD_OUT_PHOTOS, TRAIN_PHOTOS
    from harness.world import HELD_OUT_ARTISTS, TRAIN_ARTISTS
    from harness.zoo.evaluate import eval_art, evaluate_autoencoder, held_out_photos, training_photos

    def darker(x):
        return x * 0.8  # a reconstruction with a known, content-dependent error

    out = evaluate_autoencoder(darker, size=32, per_pair=1)
    assert out["size_px"] == 32
    assert list(out["train_artists"]["psnr_db_mean_per_artist"]) == list(TRAIN_ARTISTS)
    assert list(out["held_out_artists"]["psnr_db_mean_per_artist"]) == list(HELD_OUT_ARTISTS)
    assert list(out["held_out_photos"]["psnr_db_per_photo"]) == list(HELD_OUT_PHOTOS)
    assert list(out["training_photos"]["psnr_db_per_photo"]) == list(TRAIN_PHOTOS)
    art, who, _ = eval_art(["cyanora"], 1, size=32)
    expected = [peak_signal_noise_ratio(x.numpy(), darker(x).numpy(), data_range=1.0) for x in art.images]
    assert out["held_out_artists"]["psnr_db_mean_per_artist"]["cyanora"] == pytest.approx(sum(expected) / 10, abs=0.01)
    photo = held_out_photos(32).images[0]
    assert out["held_out_photos"]["psnr_db_per_photo"][HELD_OUT_PHOTOS[0]] == pytest.approx(
        peak_signal_noise_ratio(photo.numpy(), darker(photo).numpy(), data_range=1.0), abs=0.01
    )
    seen = training_photos(32)
    assert not set(seen.ids) & set(HELD_OUT_PHOTOS)
    expected = [peak_signal_noise_ratio(x.numpy(), darker(x).numpy(), data_range=1.0) for x in seen.images]
    assert out["training_photos"]["psnr_db_mean"] == pytest.approx(sum(expected) / len(expected), abs=0.01)


def test_edit_response_is_one_without_a_shift_and_falls_as_the_latent_moves(ctx):
    """On a tiny random pipeline: f = 0 reproduces the clean edit exactly (the patched encoder is exact and
    restored afterwards); moving the whole way to the grey target changes the edit more than a tenth does."""
    from finetune.editing import Img2ImgEdit
    from harness.world import WorldPhotos
    from harness.zoo.evaluate import edit_response

    photos = WorldPhotos(size=32, names=["skimage/camera", "sklearn/china"]).load()
    mimic = Img2ImgEdit(strength=0.6, steps=4, guidance_scale=1.0)
    encode = ctx.pipeline("img2img").vae.encode
    out = edit_response(mimic, photos, ctx, fractions=(0.0, 0.1, 1.0))
    assert out["fractions"]["0"] == 1.0
    assert out["fractions"]["1"] < out["fractions"]["0.1"] <= 1.0
    assert out["seed_floor"] < 1.0 and out["images"] == 2 and out["size_px"] == 32
    assert ctx.pipeline("img2img").vae.encode == encode  # the encoder is the model's own again


def test_evaluate_command_writes_the_tiny_vae_figures_and_its_targets_table(toy_world, tmp_path, monkeypatch):
    """The command's glue on a toy-trained autoencoder installed into a temporary zoo: figures.json gets the
    reconstruction and susceptibility figures, and the card a targets table saying what is met."""
    import harness.zoo.__main__ as zoo_main
    from harness.zoo import cards

    toy_world.train_autoencoder(tmp_path / "work", steps=1, batch=2)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    zoo_main.install_autoencoder(tmp_path / "work", zoo=zoo)
    monkeypatch.setattr(zoo_main, "ZOO", zoo)
    monkeypatch.setattr(cards, "ZOO", zoo)
    monkeypatch.setattr(cards, "_ABOUT", {"tiny-vae": cards._ABOUT["tiny-vae"]})
    from harness.zoo import evaluate as ev

    monkeypatch.setattr(ev, "TRAIN_ARTISTS", ("dottori",))  # one artist a group keeps the test short
    monkeypatch.setattr(ev, "HELD_OUT_ARTISTS", ("cyanora",))
    zoo_main.main(["evaluate", "--models", "tiny-vae", "--attack-steps", "2", "--threads", "1"])
    figures = json.loads((zoo / "tiny-vae" / "figures.json").read_text())["evaluation"]
    assert figures["reconstruction"]["size_px"] == 128 and figures["susceptibility"]["images"] == 4
    assert "2 steps" in figures["susceptibility"]["attack"]
    card = (zoo / "tiny-vae" / "README.md").read_text()
    assert "### Targets" in card and "reconstruction >= 25 dB per held-out artist" in card
    assert "**NOT met**" in card  # a one-step toy autoencoder cannot reconstruct at 25 dB
    assert "TAEF2 not measured (--taef2)" in card
    seen = card.split("### Seen and unseen images")[1].split("###")[0]
    assert "| training photos, whole (their crops were trained on) |" in seen and "| not measured | - |" in seen


def test_judge_augmentation_jitters_colour_but_adds_no_noise_or_blur():
    """tiny-clip's augmentation changes colours (some images greyscale) yet leaves a flat image flat and a
    sharp edge sharp: no noise, no blur, so the judge is not taught to overlook protection artifacts."""
    from harness.zoo.train import _clip_augment

    flat = torch.zeros(64, 3, 32, 32)
    flat[:] = torch.tensor([0.8, 0.3, 0.1]).view(1, 3, 1, 1)
    out = _clip_augment(flat, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    assert out.std(dim=(2, 3)).max() < 1e-5  # every output is still one flat colour
    colours = out[:, :, 0, 0]
    assert (colours - flat[:, :, 0, 0]).abs().max() > 0.1  # colours moved
    grey = (colours.max(1).values - colours.min(1).values) < 1e-5
    assert 3 <= int(grey.sum()) <= 30  # greyscale with probability 0.2
    again = _clip_augment(flat, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # every draw comes from the generator
    edge = torch.zeros(16, 3, 32, 32)
    edge[..., 16:] = 1.0
    cut = _clip_augment(edge, torch.Generator().manual_seed(1))
    # a crop resized up by at most 1/sqrt(0.5) spreads the edge over at most 2 pixels; a blur would spread it more
    row = cut[:, 0, 16]
    steps = ((row[:, 1:] - row[:, :-1]).abs() > 0.02).sum(1)
    assert steps.max() <= 3


def test_posted_split_is_disjoint_and_its_reference_set_is_the_eval_split():
    from harness.world import ProceduralArt

    sets = {
        s: ProceduralArt(artists=["cyanora"], subjects=["sun"], per_pair=2, size=32, split=s).load()
        for s in ("train", "eval", "posted")
    }
    for a in sets:
        for b in sets:
            if a != b:
                assert not np.array_equal(sets[a].to_uint8(), sets[b].to_uint8())
    posted = ProceduralArt(artists=["cyanora"], subjects=["sun"], per_pair=2, size=32, split="posted")
    assert np.array_equal(posted.held_out().to_uint8(), sets["eval"].to_uint8())
    assert posted.load().ids[0] == "cyanora/sun/posted-0000"


def test_card_edit_response_uses_the_configured_img2img_edit():
    """The tiny-sd card measures the edit that experiments/mimic/img2img.yaml configures (instantiated at run
    time: the core package imports no component package)."""
    from omegaconf import OmegaConf

    from finetune.editing import Img2ImgEdit
    from harness.zoo.evaluate import IMG2IMG_MIMIC_CONFIG, img2img_edit

    edit = img2img_edit()
    assert isinstance(edit, Img2ImgEdit)
    assert edit.strength == OmegaConf.load(IMG2IMG_MIMIC_CONFIG).strength


def test_inpaint_training_inputs_match_the_pipeline_for_flipped_copies(toy_world):
    """The inpainting stage pre-encodes the images and their mirror images; an index >= N is the mirror image,
    and its masked-image latents are what the inpainting pipeline computes for that mirrored image and mask."""
    from harness.diffusion import masked_image_latents
    from harness.models import ModelSpec, load_pipeline

    train = toy_world
    vae = load_pipeline(ModelSpec(source="tiny-random", resolution=32), "text2img").vae
    data = train.world_data(("cyanora",), 1, 1, 0, size=32)
    n = len(data)
    latents = train._encode_all(vae, data.images)
    idx = torch.tensor([0, n])
    z, (mask_lat, masked) = train._inpaint_inputs(
        vae, data, latents, idx, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    mask = train.random_masks(2, 32, torch.Generator().manual_seed(0))  # the same draws: the mask comes first
    image = train.to_float(data.images[:1])
    both = torch.cat([image, image.flip(-1)])
    assert torch.allclose(masked, masked_image_latents(vae, both, mask), atol=1e-5)
    assert mask_lat.shape == (2, 1, *z.shape[-2:]) and z.shape == masked.shape
    assert not torch.allclose(masked[0], masked[1])  # the mirror image is not the image


def test_encoded_latents_are_kept_per_images_and_vae(tmp_path, monkeypatch):
    """The posterior of every training image is kept in the work folder under a digest of the images and the
    VAE: the same pair reads the file; another VAE encodes afresh."""
    import harness.zoo.train as train
    from harness.models import ModelSpec, load_pipeline

    vae = load_pipeline(ModelSpec(source="tiny-random", resolution=32), "text2img").vae
    images = (torch.rand(3, 3, 32, 32) * 255).to(torch.uint8)
    means, stds = train._encoded(tmp_path, vae, images)
    assert means.shape[0] == 6 and torch.equal(means, train._encode_all(vae, images)[0])
    calls = []
    monkeypatch.setattr(train, "_encode_all", lambda v, x: calls.append(1) or (means, stds))
    again = train._encoded(tmp_path, vae, images)
    assert calls == [] and torch.equal(again[0], means) and torch.equal(again[1], stds)
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    train._encoded(tmp_path, vae, images)
    assert calls == [1]


def test_rendered_world_data_is_kept_and_read_back(tmp_path, monkeypatch):
    """A following stage reads the rendered training set from the work folder instead of rendering it again;
    other arguments render afresh."""
    import harness.zoo.train as train

    first = train.rendered_world_data(tmp_path, ("cyanora",), 1, 1, 0, size=32, photos=("skimage/camera",))
    calls = []
    monkeypatch.setattr(train, "world_data", lambda *a, **k: calls.append(a) or first)
    again = train.rendered_world_data(tmp_path, ("cyanora",), 1, 1, 0, size=32, photos=("skimage/camera",))
    assert calls == [] and len(list((tmp_path / "world_data").glob("*.pt"))) == 1
    assert torch.equal(again.images, first.images) and again.who == first.who and again.what == first.what
    train.rendered_world_data(tmp_path, ("cyanora",), 1, 1, 1, size=32, photos=("skimage/camera",))
    assert len(calls) == 1


def test_shipped_tiny_vae_loads_and_reconstructs_a_held_out_photo():
    """The shipped world v2 autoencoder: 128 px to 16 x 16 x 16 latents and back; on a held-out photo (never
    trained on) it reconstructs far better than a flat image would (the card has the measured figures)."""
    from diffusers import AutoencoderKL

    from harness.zoo.evaluate import _psnr, held_out_photos

    vae = AutoencoderKL.from_pretrained(ZOO / "tiny-vae", torch_dtype=torch.float32).eval()
    x = held_out_photos(128).select(slice(0, 1)).images
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean
        rec = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
    assert z.shape == (1, 16, 16, 16)
    flat = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    assert float(_psnr(rec, x)[0]) > float(_psnr(flat, x)[0]) + 5


def test_inpaint_border_ceilings_are_the_reconstruction_without_a_hole_and_fall_as_it_grows():
    """The card's bound on what any latent inpainter keeps of the border: with an empty mask the latent copy is the
    VAE's reconstruction exactly; the larger the hole, the more of the next image the decoder carries into the
    border around it (a lower PSNR than the reconstruction's)."""
    from diffusers import AutoencoderKL

    from harness.zoo.evaluate import _psnr, border_ceilings, centre_mask, held_out_photos

    vae = AutoencoderKL.from_pretrained(ZOO / "tiny-vae", torch_dtype=torch.float32).eval()
    x = held_out_photos(64).select(slice(0, 2)).images
    rec, copy = border_ceilings(vae, x, torch.zeros(1, 1, 64, 64))
    assert torch.equal(rec, copy)
    keep = centre_mask(64, 32) == 0

    def border(y: torch.Tensor) -> float:
        return float(_psnr(y * keep, x * keep).mean())

    _, small = border_ceilings(vae, x, centre_mask(64, 16))
    _, large = border_ceilings(vae, x, centre_mask(64, 32))
    assert border(large) < border(small) <= border(rec) + 1e-6


def test_subject_judge_accuracy_by_hand(monkeypatch):
    """evaluate_subject_judge on a judge that always answers "house": accuracy 1/10 (the share of houses among
    the world's 10 subjects), 1.0 on house and 0 on every other subject; on a perfect judge, 1.0 everywhere."""
    import harness.zoo.evaluate as ev
    from harness.world import SUBJECTS

    art, who, what = ev.eval_art(["dottori", "tessela"], 1)
    monkeypatch.setattr(ev, "eval_art", lambda artists, per_pair: (art, who, what))

    class Always:
        def __init__(self, answer=None):
            self.answer = answer

        def predict(self, images):
            return [self.answer] * len(images) if self.answer else list(what)

    monkeypatch.setattr(ev, "subject_classifier", lambda clip: Always("house"))
    out = ev.evaluate_subject_judge(None)
    assert out["zero_shot_subject_accuracy"] == round(1 / len(SUBJECTS), 4) == out["chance"]
    assert out["zero_shot_subject_accuracy_per_subject"]["house"] == 1.0
    assert all(v == 0.0 for s, v in out["zero_shot_subject_accuracy_per_subject"].items() if s != "house")
    monkeypatch.setattr(ev, "subject_classifier", lambda clip: Always())
    assert ev.evaluate_subject_judge(None)["zero_shot_subject_accuracy"] == 1.0


def test_subject_conditioning_measures_both_swaps_on_a_small_model():
    """On tiny-random (32 px): both swaps move the text encoder's output (a random encoder tells tokens apart),
    the own caption's loss is a positive finite number and the gaps are finite; a swap of the same word would
    move nothing (the helper refuses a word the caption lacks)."""
    import math

    from harness.models import ModelSpec, load_pipeline
    from harness.zoo import evaluate as ev

    pipe = load_pipeline(ModelSpec(source="tiny-random", resolution=32), "text2img")
    out = ev.subject_conditioning(pipe, per_pair=1, draws=1)
    assert out["images"] == len(ev.SUBJECTS) * len(ev.TRAIN_ARTISTS)
    assert out["text_embedding_moved_by_subject_swap"] > 0 and out["text_embedding_moved_by_artist_swap"] > 0
    assert out["denoising_loss_own_caption"] > 0
    assert math.isfinite(out["denoising_loss_gap_subject_swap"]) and math.isfinite(
        out["denoising_loss_gap_artist_swap"]
    )
    with pytest.raises(ValueError, match="not in the caption"):
        ev._swapped("a house in the style of dottori", "boat", "fish")


def test_clip_text_encoder_is_tiny_clips_text_tower_under_transformers_names():
    """The converted tower gives open_clip's token states (after the final layer norm) and, projected, its text
    features; it stays causal (a token changes no state before it)."""
    from harness.zoo import architectures as arch

    torch.manual_seed(0)
    clip = arch.build_clip(100).eval()
    for name, p in clip.named_parameters():  # away from the init, where layer norms are the identity
        if not name.startswith("visual."):
            p.data.normal_(0, 0.1)
    encoder = arch.clip_text_encoder(clip)
    ids = torch.randint(0, 98, (3, 32))
    ids[:, 0] = 98
    ids[0, 10:], ids[1, 5:], ids[2, 31] = 99, 99, 99  # end of text, then padding with it
    with torch.no_grad():
        out = encoder(ids)
        x = clip.ln_final(
            clip.transformer(clip.token_embedding(ids) + clip.positional_embedding, attn_mask=clip.attn_mask)
        )
        torch.testing.assert_close(out.last_hidden_state, x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            out.pooler_output @ clip.text_projection, clip.encode_text(ids), rtol=1e-5, atol=1e-5
        )
        changed = ids.clone()
        changed[0, 3] = (changed[0, 3] + 1) % 98
        moved = (encoder(changed).last_hidden_state[0] - out.last_hidden_state[0]).abs().amax(-1)
    assert moved[:3].max() == 0 and moved[3:].min() > 0


def test_judge_captions_name_the_subject_alone_and_match_it_across_artists():
    """tiny-clip's recipe: a share of captions names only the subject ("an artwork of a boat"), and such a caption
    is a positive for every artwork of that subject whatever its artist; a full caption only for its own artist
    and subject, a style prompt for every subject of its artist, a photo's caption for that photo only."""
    from harness.world import artwork_caption, style_prompt, subject_prompt
    from harness.zoo.train import WorldData, caption_matches, random_caption

    data = WorldData(
        images=torch.zeros(5, 3, 8, 8, dtype=torch.uint8),
        kind=["art", "art", "art", "art", "photo"],
        who=["dottori", "pixelmo", "dottori", "pixelmo", "astronaut"],
        what=["boat", "boat", "house", "house", "an astronaut"],
    )
    rng = np.random.default_rng(0)
    assert {random_caption(data, 0, rng, styleless=1.0) for _ in range(5)} == {"an artwork of a boat"}
    assert random_caption(data, 4, rng, styleless=1.0) == "an astronaut"
    assert subject_prompt("boat") == "an artwork of a boat"
    texts = [subject_prompt("boat"), artwork_caption("boat", "pixelmo"), style_prompt("dottori"), "x", "an astronaut"]
    texts[3] = artwork_caption("house", "pixelmo", 2)
    expected = torch.tensor(
        [
            # captions: boat (any artist), boat by pixelmo, dottori (any subject), house by pixelmo, the photo's
            [1, 0, 1, 0, 0],  # dottori's boat
            [1, 1, 0, 0, 0],  # pixelmo's boat
            [0, 0, 1, 0, 0],  # dottori's house
            [0, 0, 0, 1, 0],  # pixelmo's house
            [0, 0, 0, 0, 1],  # the photo
        ],
        dtype=torch.float32,
    )
    assert torch.equal(caption_matches(data, list(range(5)), texts), expected)
    # without style-free captions the draw is what the shipped sd-clip was trained with: the same random stream
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [random_caption(data, 1, a, 0.3) for _ in range(50)] == [
        random_caption(data, 1, b, 0.3, styleless=0.0) for _ in range(50)
    ]


def test_seen_and_unseen_table_gives_the_gap_to_the_reference_per_group():
    from harness.zoo.cards import _autoencoder_seen_and_unseen

    ours = {"size_px": 128, "training_photos": {"psnr_db_mean": 20.75}, "held_out_photos": {"psnr_db_mean": 20.63}}
    theirs = {"training_photos": {"psnr_db_mean": 27.08}}
    lines = _autoencoder_seen_and_unseen(ours, theirs)
    assert "| training photos, whole (their crops were trained on) | 20.75 | 27.08 | 6.33 |" in lines
    assert "| held-out photos, whole | 20.63 | not measured | - |" in lines
    assert not any("artists" in line and line.startswith("|") for line in lines)  # groups not measured: no row
    assert _autoencoder_seen_and_unseen({}, theirs) == []
