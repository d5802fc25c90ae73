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
        from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

        pipe = ctx.pipeline("text2img")
        vae = pipe.vae
        device = torch.device(ctx.device)
        seed = derive_seed(generator.initial_seed(), "aspl")
        embed_list = text_embeddings(pipe, [self.instance_prompt or c for c in images.captions])
        embed = dict(zip(images.ids, embed_list, strict=True))

        prior_lat = prior_cond = None
        if self.prior_images and self.class_prompt:
            gens = [make_generator(derive_seed(seed, "prior", k)) for k in range(self.prior_images)]
            with torch.no_grad():
                prior = pipe(
                    prompt=[self.class_prompt] * self.prior_images,
                    generator=gens,
                    output_type="pt",
                    num_inference_steps=30,
                    height=images.size[0],
                    width=images.size[1],
                ).images.float()
                pd = Draws(
                    [make_generator(derive_seed(seed, "prior-enc", k)) for k in range(self.prior_images)], device
                )
                prior_lat = encode_sample(vae, prior.to(device), pd).float()
                prior_cond = text_embeddings(pipe, [self.class_prompt] * self.prior_images)

        surrogate = copy.deepcopy(pipe.unet).float().requires_grad_(False)
        with isolated_torch_rng(derive_seed(seed, "lora-init")):  # peft initialises from the global RNG
            surrogate.add_adapter(
                LoraConfig(
                    r=self.rank,
                    lora_alpha=self.rank,
                    init_lora_weights="gaussian",
                    target_modules=list(SURROGATE_TARGETS),
                )
            )
        sgen = make_generator(derive_seed(seed, "surrogate"))
        n = len(images)

        def train_surrogate(x_all: torch.Tensor, steps: int, opt: torch.optim.Optimizer) -> float:
            last = float("nan")
            surrogate.train()
            for _ in range(steps):
                idx = torch.randint(0, n, (self.surrogate_batch,), generator=sgen).tolist()
                ids = [images.ids[i] for i in idx]
                draws = Draws(
                    [make_generator(int(torch.randint(0, 2**62, (1,), generator=sgen))) for _ in idx], device, ids
                )
                with torch.no_grad():
                    z = encode_sample(vae, x_all[idx].to(device), draws).float()
                cond = torch.stack([embed[i] for i in ids])
                loss = denoising_loss(pipe, z, cond, draws, unet=surrogate).mean()
                if prior_lat is not None:
                    pdraws = Draws(
                        [
                            make_generator(int(torch.randint(0, 2**62, (1,), generator=sgen)))
                            for _ in range(len(prior_lat))
                        ],
                        device,
                    )
                    loss = (
                        loss
                        + self.prior_weight * denoising_loss(pipe, prior_lat, prior_cond, pdraws, unet=surrogate).mean()
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last = float(loss.detach())
            surrogate.eval()
            return last

        params = [p for p in surrogate.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)

        def surrogate_loss(x: torch.Tensor, draws) -> torch.Tensor:
            cond = torch.stack([embed[i] for i in draws.ids])
            return denoising_loss(pipe, encode_sample(vae, x, draws), cond, draws, unet=surrogate)

        def base_loss(x: torch.Tensor, draws) -> torch.Tensor:
            cond = torch.stack([embed[i] for i in draws.ids])
            return denoising_loss(pipe, encode_sample(vae, x, draws), cond, draws)

        clean = images.images.float()
        delta = torch.zeros_like(clean)
        vanished = torch.zeros(n, dtype=torch.bool)
        loss_clean = loss_protected = float("nan")
        with frozen(pipe.unet, vae, pipe.text_encoder):
            for _ in ctx.progress(range(self.rounds), desc=self.name, unit="round"):
                saved = copy.deepcopy(get_peft_model_state_dict(surrogate))
                saved_opt = copy.deepcopy(opt.state_dict())
                loss_clean = train_surrogate(clean, self.surrogate_steps, opt)  # f' on clean images
                for p in params:
                    p.requires_grad_(False)
                res = run_pgd(
                    clean,
                    images.ids,
                    surrogate_loss,
                    self.settings,
                    generator,
                    ctx,
                    init=delta,
                    desc="aspl-pgd",
                    measure=False,
                )
                for p in params:
                    p.requires_grad_(True)
                vanished |= res.vanished
                delta = res.images - clean
                set_peft_model_state_dict(surrogate, saved)  # back to f, then train f on protected images
                opt.load_state_dict(saved_opt)
                loss_protected = train_surrogate(clean + delta, self.surrogate_steps, opt)
            protected = (clean + delta).clamp(0, 1)
            for p in params:
                p.requires_grad_(False)
            report_seed = derive_seed(generator.initial_seed(), "report")
            info = objective_report(
                base_loss, clean, protected, images.ids, self.settings, report_seed, ctx, name="diffusion_loss"
            )
            sur = objective_report(
                surrogate_loss, clean, protected, images.ids, self.settings, report_seed, ctx, name="surrogate_loss"
            )
        info.update(sur)
        info.update(
            {
                "surrogate_train_loss_clean": loss_clean,
                "surrogate_train_loss_protected": loss_protected,
                "vanished_gradient_images": float(vanished.sum()),
            }
        )
        return DefenseOutput(images.with_images(protected), info)
