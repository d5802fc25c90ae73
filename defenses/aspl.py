"""Anti-DreamBooth ASPL (Van Le et al., "Anti-DreamBooth: Protecting users from personalized text-to-image
synthesis", ICCV 2023, Alg. 2 "Alternating Surrogate and Perturbation Learning").

Each round: copy the surrogate and finetune the copy a few steps on the *clean* images (it imitates the
attacker's DreamBooth); run PGD on the protected images to maximise the copy's denoising loss; then finetune
the surrogate itself a few steps on the *protected* images. Published (SD 2.1-base): 50 rounds of 3 surrogate
steps and 6 PGD steps, step 5e-3 and eps 5e-2 in [-1, 1] units (2.5e-3 and 0.025 in [0, 1], about 6.4/255),
lr 5e-7 for a full-UNet surrogate, prior preservation. The harness's surrogate is a LoRA on the UNet (it
fits small GPUs, as the paper's code also offers); a LoRA needs a larger learning rate than a full finetune
(default 1e-4, the DreamBooth-LoRA rate).

Prior preservation: ``prior_images`` images of ``class_prompt`` are generated once by the base model and
their denoising loss is added to every surrogate step (weight ``prior_weight``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from harness.diffusion import denoising_loss, encode_sample, text_embeddings
from harness.pgd import Draws, PGDSettings, frozen, objective_report, run_pgd
from harness.protocols import ConfigError, Context, Defense, DefenseOutput, check_int, check_range
from harness.seeding import derive_seed, isolated_torch_rng, make_generator
from harness.types import ImageSet

__all__ = ["ASPL"]

#: UNet modules that get the surrogate's LoRA adapters (attention projections and ResNet convolutions).
SURROGATE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


class ASPL(Defense):
    """Anti-DreamBooth's ASPL with a LoRA surrogate.

    Args:
        eps: L-inf budget in [0, 1] pixel units (published 0.025).
        step_size: PGD sign step (published 0.0025).
        rounds: outer rounds (50); surrogate_steps: surrogate steps per phase (3); pgd_steps: PGD steps (6).
        lr: surrogate LoRA learning rate; rank: its rank.
        instance_prompt: DreamBooth's instance prompt (None: each image's caption).
        class_prompt: prompt of the prior-preservation images; prior_images: how many (0 turns it off);
        prior_weight: weight of the prior loss.
        surrogate_batch: images per surrogate step (sampled with replacement when fewer).
    """

    name = "aspl"
    version = "1"
    uses_model = True
    threat_models = ("mimicry",)

    def __init__(
        self,
        eps: float = 0.025,
        step_size: float = 0.0025,
        rounds: int = 50,
        surrogate_steps: int = 3,
        pgd_steps: int = 6,
        lr: float = 1e-4,
        rank: int = 8,
        instance_prompt: str | None = None,
        class_prompt: str | None = "an artwork",
        prior_images: int = 4,
        prior_weight: float = 1.0,
        surrogate_batch: int = 8,
    ):
        self.eps = check_range("defense.eps", eps, 0.0, 1.0)
        self.step_size = check_range("defense.step_size", step_size, 0.0, 1.0)
        self.rounds = check_int("defense.rounds", rounds, 0)
        self.surrogate_steps = check_int("defense.surrogate_steps", surrogate_steps, 0)
        self.pgd_steps = check_int("defense.pgd_steps", pgd_steps, 1)
        self.lr = check_range("defense.lr", lr, 1e-10, 1.0)
        self.rank = check_int("defense.rank", rank, 1)
        self.instance_prompt = instance_prompt or None
        if prior_images and not class_prompt:
            raise ConfigError("defense.class_prompt is needed when defense.prior_images > 0")
        self.class_prompt = class_prompt or None
        self.prior_images = check_int("defense.prior_images", prior_images, 0)
        self.prior_weight = check_range("defense.prior_weight", prior_weight, 0.0, 1e3)
        self.surrogate_batch = check_int("defense.surrogate_batch", surrogate_batch, 1)
        self.settings = PGDSettings(
            eps=self.eps,
            steps=self.pgd_steps,
            step_size=self.step_size,
            random_start=False,
            maximize=True,
            eval_samples=8,
        )

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        pipe = ctx.pipeline("text2img")
        device = torch.device(ctx.device)
        seed = derive_seed(generator.initial_seed(), "aspl")
        embed_list = text_embeddings(pipe, [self.instance_prompt or c for c in images.captions])
        embed = dict(zip(images.ids, embed_list, strict=True))
        prior_lat, prior_cond = self._prior(pipe, images.size, seed, device)
        surrogate = _Surrogate(self, pipe, images.ids, embed, prior_lat, prior_cond, seed, device)
        clean = images.images.float()
        delta = torch.zeros_like(clean)
        vanished = torch.zeros(len(images), dtype=torch.bool)
        losses = (float("nan"), float("nan"))
        with frozen(pipe.unet, pipe.vae, pipe.text_encoder):
            for _ in ctx.progress(range(self.rounds), desc=self.name, unit="round"):
                delta, round_vanished, losses = self._round(surrogate, clean, delta, images.ids, generator, ctx)
                vanished |= round_vanished
            protected = (clean + delta).clamp(0, 1)
            surrogate.set_trainable(False)
            info = self._report(pipe, embed, surrogate, clean, protected, images.ids, generator, ctx)
        info.update(
            {
                "surrogate_train_loss_clean": losses[0],
                "surrogate_train_loss_protected": losses[1],
                "vanished_gradient_images": float(vanished.sum()),
            }
        )
        return DefenseOutput(images.with_images(protected), info)

    def _prior(
        self, pipe: Any, size: tuple[int, int], seed: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Prior preservation's class images, generated once by the base model: (scaled latents, text embeddings)."""
        if not (self.prior_images and self.class_prompt):
            return None, None
        gens = [make_generator(derive_seed(seed, "prior", k)) for k in range(self.prior_images)]
        with torch.no_grad():
            prior = pipe(
                prompt=[self.class_prompt] * self.prior_images,
                generator=gens,
                output_type="pt",
                num_inference_steps=30,
                height=size[0],
                width=size[1],
            ).images.float()
            pd = Draws([make_generator(derive_seed(seed, "prior-enc", k)) for k in range(self.prior_images)], device)
            prior_lat = encode_sample(pipe.vae, prior.to(device), pd).float()
            prior_cond = text_embeddings(pipe, [self.class_prompt] * self.prior_images)
        return prior_lat, prior_cond

    def _round(
        self,
        surrogate: _Surrogate,
        clean: torch.Tensor,
        delta: torch.Tensor,
        ids: tuple[str, ...],
        generator: torch.Generator,
        ctx: Context,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
        """One ASPL round: (new delta, images whose gradient vanished, surrogate train losses clean/protected)."""
        saved = surrogate.snapshot()
        loss_clean = surrogate.train(clean, self.surrogate_steps)  # f' on clean images
        surrogate.set_trainable(False)
        res = run_pgd(
            clean, ids, surrogate.loss, self.settings, generator, ctx, init=delta, desc="aspl-pgd", measure=False
        )
        surrogate.set_trainable(True)
        delta = res.images - clean
        surrogate.restore(saved)  # back to f, then train f on protected images
        loss_protected = surrogate.train(clean + delta, self.surrogate_steps)
        return delta, res.vanished, (loss_clean, loss_protected)

    def _report(
        self,
        pipe: Any,
        embed: dict[str, torch.Tensor],
        surrogate: _Surrogate,
        clean: torch.Tensor,
        protected: torch.Tensor,
        ids: tuple[str, ...],
        generator: torch.Generator,
        ctx: Context,
    ) -> dict[str, Any]:
        """The base model's and the surrogate's denoising loss on clean, noised and protected images."""

        def base_loss(x: torch.Tensor, draws: Draws) -> torch.Tensor:
            cond = torch.stack([embed[i] for i in draws.ids])
            return denoising_loss(pipe, encode_sample(pipe.vae, x, draws), cond, draws)

        report_seed = derive_seed(generator.initial_seed(), "report")
        info = objective_report(base_loss, clean, protected, ids, self.settings, report_seed, ctx, "diffusion_loss")
        sur = objective_report(
            surrogate.loss, clean, protected, ids, self.settings, report_seed, ctx, name="surrogate_loss"
        )
        info.update(sur)
        return info


class _Surrogate:
    """ASPL's LoRA surrogate for one protect call: the UNet copy with adapters, its AdamW and its batch RNG."""

    def __init__(
        self,
        aspl: ASPL,
        pipe: Any,
        ids: tuple[str, ...],
        embed: dict[str, torch.Tensor],
        prior_lat: torch.Tensor | None,
        prior_cond: torch.Tensor | None,
        seed: int,
        device: torch.device,
    ):
        from peft import LoraConfig

        self.pipe, self.vae, self.ids, self.embed, self.device = pipe, pipe.vae, ids, embed, device
        self.prior_lat, self.prior_cond, self.prior_weight = prior_lat, prior_cond, aspl.prior_weight
        self.batch = aspl.surrogate_batch
        self.unet = copy.deepcopy(pipe.unet).float().requires_grad_(False)
        with isolated_torch_rng(derive_seed(seed, "lora-init")):  # peft initialises from the global RNG
            self.unet.add_adapter(
                LoraConfig(
                    r=aspl.rank,
                    lora_alpha=aspl.rank,
                    init_lora_weights="gaussian",
                    target_modules=list(SURROGATE_TARGETS),
                )
            )
        self.gen = make_generator(derive_seed(seed, "surrogate"))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=aspl.lr, weight_decay=0.0)

    def _draws(self, count: int, ids: Sequence[str] = ()) -> Draws:
        """Per-image generators seeded by draws from the surrogate's RNG."""
        gens = [make_generator(int(torch.randint(0, 2**62, (1,), generator=self.gen))) for _ in range(count)]
        return Draws(gens, self.device, ids)

    def train(self, x_all: torch.Tensor, steps: int) -> float:
        """``steps`` AdamW steps on batches of ``x_all`` (plus the prior loss); the last step's loss."""
        last = float("nan")
        self.unet.train()
        for _ in range(steps):
            idx = torch.randint(0, len(self.ids), (self.batch,), generator=self.gen).tolist()
            ids = [self.ids[i] for i in idx]
            draws = self._draws(len(idx), ids)
            with torch.no_grad():
                z = encode_sample(self.vae, x_all[idx].to(self.device), draws).float()
            cond = torch.stack([self.embed[i] for i in ids])
            loss = denoising_loss(self.pipe, z, cond, draws, unet=self.unet).mean()
            if self.prior_lat is not None:
                pdraws = self._draws(len(self.prior_lat))
                prior_loss = denoising_loss(self.pipe, self.prior_lat, self.prior_cond, pdraws, unet=self.unet).mean()
                loss = loss + self.prior_weight * prior_loss
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            last = float(loss.detach())
        self.unet.eval()
        return last

    def loss(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """The surrogate's denoising loss per image (the objective PGD maximises)."""
        cond = torch.stack([self.embed[i] for i in draws.ids])
        return denoising_loss(self.pipe, encode_sample(self.vae, x, draws), cond, draws, unet=self.unet)

    def set_trainable(self, flag: bool) -> None:
        for p in self.params:
            p.requires_grad_(flag)

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Copies of the adapter weights and the optimiser state."""
        from peft import get_peft_model_state_dict

        return copy.deepcopy(get_peft_model_state_dict(self.unet)), copy.deepcopy(self.opt.state_dict())

    def restore(self, saved: tuple[dict[str, Any], dict[str, Any]]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.unet, saved[0])
        self.opt.load_state_dict(saved[1])
