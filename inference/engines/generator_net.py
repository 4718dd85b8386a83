"""The project's class-conditional image generator (explanation images "what does X look like").

A small diffusers ``UNet2DModel`` conditioned on the condition class through ``num_class_embeds``,
sampled with DDIM. Folder layout (diffusers style, so standard tooling can read the parts)::

    <folder>/config.json                     GeneratorConfig (class codes, sampling settings)
    <folder>/unet/config.json + diffusion_pytorch_model.safetensors
    <folder>/scheduler/scheduler_config.json

With ``patch_size`` p > 1 the UNet works on p x p pixel patches (pixel unshuffle: a 64 x 64 x 3 image
is a 16 x 16 x 48 tensor for p=4), the patching of "simple diffusion" (Hoogeboom et al., 2023). The
diffusion itself stays in pixel space; only the network is p*p times cheaper, which is what lets a
64 px generator train on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from inference.engines.base import JsonConfig


@dataclass
class GeneratorConfig(JsonConfig):
    class_codes: list[str]
    sample_size: int = 64
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    num_inference_steps: int = 50
    model_id: str = "skinbridge-generator"
    model_version: str = "0"
    patch_size: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.sample_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must be >= 1 and divide sample_size {self.sample_size}")

    def make_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            clip_sample=True,
        )


def build_generator_unet(
    num_classes: int,
    sample_size: int = 64,
    block_out_channels: tuple[int, ...] = (64, 128, 128, 256),
    layers_per_block: int = 2,
    attention_levels: tuple[bool, ...] | None = None,
    norm_num_groups: int = 32,
    patch_size: int = 1,
) -> UNet2DModel:
    """A class-conditional UNet for ``sample_size`` px images seen as ``patch_size`` px patches;
    ``attention_levels`` marks which resolutions get self-attention (default: only the lowest one,
    where attention is cheap)."""
    n = len(block_out_channels)
    if attention_levels is None:
        attention_levels = tuple(i == n - 1 for i in range(n))
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    return UNet2DModel(
        sample_size=sample_size // patch_size,
        in_channels=3 * patch_size**2,
        out_channels=3 * patch_size**2,
        layers_per_block=layers_per_block,
        block_out_channels=block_out_channels,
        down_block_types=down,
        up_block_types=up,
        num_class_embeds=num_classes,
        norm_num_groups=norm_num_groups,
    )


def save_generator(folder: str | Path, unet: UNet2DModel, config: GeneratorConfig) -> Path:
    folder = Path(folder)
    if unet.config.num_class_embeds != len(config.class_codes):
        raise ValueError("the UNet's class embeddings do not match the configured class codes")
    if unet.config.in_channels != 3 * config.patch_size**2:
        raise ValueError("the UNet's input channels do not match the configured patch size")
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    config.make_scheduler().save_pretrained(folder / "scheduler")
    config.save(folder)
    return folder


def load_generator_parts(folder: str | Path) -> tuple[UNet2DModel, DDIMScheduler, GeneratorConfig]:
    folder = Path(folder)
    config = GeneratorConfig.load(folder)
    unet = UNet2DModel.from_pretrained(folder / "unet", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    return unet, scheduler, config


def predict_noise(unet: UNet2DModel, config: GeneratorConfig, x: torch.Tensor, t: torch.Tensor | int,
                  labels: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction for pixel-space ``x`` (B x 3 x S x S), patching around it if configured;
    training and sampling both call this."""
    p = config.patch_size
    if p == 1:
        return unet(x, t, class_labels=labels).sample
    return F.pixel_shuffle(unet(F.pixel_unshuffle(x, p), t, class_labels=labels).sample, p)


@torch.inference_mode()
def ddim_sample(unet: UNet2DModel, config: GeneratorConfig, class_index: int, noise: torch.Tensor, *,
                guidance_scale: float | None = None, steps: int | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta=0) from ``noise`` for one class, in [0, 1] on the CPU.

    With a null class in the config (``extra.null_class_index``, trained by dropping labels),
    classifier-free guidance mixes conditional and unconditional predictions:
    eps = eps_u + g * (eps_c - eps_u). Serving and training evaluation both sample here.
    """
    scheduler = config.make_scheduler()
    scheduler.set_timesteps(steps or config.num_inference_steps)
    g = float(config.extra.get("guidance_scale", 0.0)) if guidance_scale is None else guidance_scale
    null = int(config.extra.get("null_class_index", -1))
    n = noise.shape[0]
    cond = torch.full((n,), class_index, dtype=torch.long, device=noise.device)
    uncond = torch.full((n,), null, dtype=torch.long, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        if g > 0 and null >= 0:
            e_c, e_u = predict_noise(unet, config, torch.cat([x, x]), t, torch.cat([cond, uncond])).chunk(2)
            eps = e_u + g * (e_c - e_u)
        else:
            eps = predict_noise(unet, config, x, t, cond)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return (x.float().clamp(-1, 1) / 2 + 0.5).cpu()
