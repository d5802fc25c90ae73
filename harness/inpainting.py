"""Stable Diffusion inpainting on latents of any width.

diffusers' ``StableDiffusionInpaintPipeline`` accepts 4- and 9-channel UNets only (Stable Diffusion's 4-channel
latents); the embedded world's autoencoder has 16 latent channels, so its inpainting UNet has 33 inputs. This
module recognises an inpainting UNet by its ``2c + 1`` inputs and serves it with the same sampler. It imports
nothing from the rest of the harness (``harness.models`` and ``harness.diffusion`` both use it).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["is_inpainting_unet", "latent_inpaint_pipeline"]


def is_inpainting_unet(unet: Any, vae: Any) -> bool:
    """Whether ``unet`` is an inpainting UNet for ``vae``'s latents: its input is the noisy latents, the mask
    and the masked image's latents, ``2 * latent_channels + 1`` channels (9 for Stable Diffusion's 4-channel
    latents, 33 for the embedded world's 16-channel ones)."""
    return unet.config.in_channels == 2 * vae.config.latent_channels + 1


def latent_inpaint_pipeline(pipe: Any) -> Any:
    """``pipe`` (a ``StableDiffusionInpaintPipeline``) as a :class:`LatentInpaintPipeline` over the same
    components, for inpainting UNets on latents of other than 4 channels, which diffusers' pipeline refuses
    (it accepts 4- and 9-channel UNets only)."""
    return _latent_inpaint_class()(**pipe.components)


@functools.lru_cache(maxsize=1)
def _latent_inpaint_class() -> type:
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    class LatentInpaintPipeline(StableDiffusionInpaintPipeline):
        """Stable Diffusion inpainting for a UNet with ``2c + 1`` inputs on ``c``-channel latents, any ``c``.

        The sampling is diffusers' inpainting pipeline's, step for step, built from that pipeline's own
        methods (prompt encoding, timesteps truncated by ``strength``, initial latents, mask and masked-image
        latents, scheduler steps), with the randomness drawn in the same order: on a 9-channel UNet it gives the
        images diffusers' pipeline gives (tested). Supports the arguments the harness passes; anything else
        (latents, embeddings, callbacks, IP adapters) raises ``TypeError``.
        """

        @torch.no_grad()
        def __call__(
            self,
            prompt: str | list[str],
            image: Any,
            mask_image: Any,
            height: int | None = None,
            width: int | None = None,
            strength: float = 1.0,
            num_inference_steps: int = 50,
            guidance_scale: float = 7.5,
            negative_prompt: str | list[str] | None = None,
            generator: Any = None,
            output_type: str = "pil",
            return_dict: bool = True,
            **unsupported: Any,
        ) -> Any:
            given = sorted(k for k, v in unsupported.items() if v is not None)
            if given:
                raise TypeError(f"{type(self).__name__} does not support {given}")
            if not is_inpainting_unet(self.unet, self.vae):
                raise ValueError(
                    f"the UNet has {self.unet.config.in_channels} input channels; an inpainting UNet on "
                    f"{self.vae.config.latent_channels}-channel latents has {2 * self.vae.config.latent_channels + 1}"
                )
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            n = len(prompts)
            height = height or self.unet.config.sample_size * self.vae_scale_factor
            width = width or self.unet.config.sample_size * self.vae_scale_factor
            device = self._execution_device
            guided = guidance_scale > 1.0
            cond, uncond = self.encode_prompt(prompts, device, 1, guided, negative_prompt)
            embeddings = torch.cat([uncond, cond]) if guided else cond
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps, steps = self.get_timesteps(num_inference_steps, strength, device)
            if steps < 1:
                raise ValueError(f"strength {strength} leaves no step of {num_inference_steps}")
            init = self.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
            latents, _ = self.prepare_latents(
                n,
                self.vae.config.latent_channels,
                height,
                width,
                embeddings.dtype,
                device,
                generator,
                None,
                image=init,
                timestep=timesteps[:1].repeat(n),
                is_strength_max=strength == 1.0,
                return_noise=True,
                return_image_latents=False,
            )
            mask_condition = self.mask_processor.preprocess(mask_image, height=height, width=width)
            mask, masked = self.prepare_mask_latents(
                mask_condition,
                init * (mask_condition < 0.5),
                n,
                height,
                width,
                embeddings.dtype,
                device,
                generator,
                guided,
            )
            step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
            for t in timesteps:
                z = torch.cat([latents] * 2) if guided else latents
                z = torch.cat([self.scheduler.scale_model_input(z, t), mask, masked], dim=1)
                eps = self.unet(z, t, encoder_hidden_states=embeddings, return_dict=False)[0]
                if guided:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = self.scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=[True] * n)
            self.maybe_free_model_hooks()
            if not return_dict:
                return (images, None)
            return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)

    return LatentInpaintPipeline
