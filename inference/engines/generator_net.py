"""The project's class-conditional image generator (explanation images "what does X look like").

A small diffusers ``UNet2DModel`` conditioned on the condition class through ``num_class_embeds``,
sampled with DDIM. Folder layout (diffusers style, so standard tooling can read the parts)::

    <folder>/config.json                     GeneratorConfig (class codes, sampling settings)
    <folder>/unet/config.json + diffusion_pytorch_model.safetensors
    <folder>/scheduler/scheduler_config.json

With ``patch_size`` p > 1 the UNet works on p x p pixel patches (pixel unshuffle: a 64 x 64 x 3 image
is a 16 x 16 x 48 tensor for p=4), the patching of "simple diffusion" (Hoogeboom et al., 2023). The
diffusion itself stays in pixel space; only the network is p*p times cheaper, which is what lets a
64 px generator train on a CPU. A patched UNet's errors line up with the fixed patch borders and show
as a p-px grid; ``shift_patches`` moves the grid to another offset at every sampling step (a circular
shift of the image), so the errors no longer pile up at the same pixels.

Two more sampling settings, both off by default: ``dynamic_threshold`` (Imagen's dynamic thresholding
of the predicted clean image, which keeps strong guidance from saturating colours) and the
``prediction_type`` the UNet was trained for ("epsilon": the noise, or "v_prediction").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from inference.engines.base import JsonConfig

PREDICTION_TYPES = ("epsilon", "v_prediction")
# the cap on the dynamic threshold s (x0 is clipped to [-s, s] and divided by s), as DeepFloyd IF's
# pixel-space scheduler uses it: strong guidance is tamed without washing every picture out to grey
DYNAMIC_THRESHOLD_MAX = 1.5


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
    shift_patches: bool = False  # sample with the patch grid at a new offset every step
    dynamic_threshold: float = 0.0  # quantile of |x0| to threshold at (e.g. 0.95); 0 = plain clipping
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.sample_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must be >= 1 and divide sample_size {self.sample_size}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        if not 0.0 <= self.dynamic_threshold < 1.0:
            raise ValueError(f"dynamic_threshold {self.dynamic_threshold} must be a quantile in [0, 1) (0: off)")

    def make_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            clip_sample=not self.dynamic_threshold,
            thresholding=bool(self.dynamic_threshold),
            dynamic_thresholding_ratio=self.dynamic_threshold or 0.995,
            sample_max_value=DYNAMIC_THRESHOLD_MAX,
        )

    def sampling_settings(self) -> dict[str, Any]:
        """Every setting a sampled picture depends on besides the weights (what a clinical review binds)."""
        return {"guidance_scale": float(self.extra.get("guidance_scale", 0.0) or 0.0),
                "num_inference_steps": int(self.num_inference_steps),
                "shift_patches": bool(self.shift_patches and self.patch_size > 1),
                "dynamic_threshold": float(self.dynamic_threshold)}


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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x 3 x S x S in [0, 1] (what ``ddim_sample`` returns) -> B x S x S x 3 uint8, as photos are stored."""
    return (images.detach().cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def predict(unet: UNet2DModel, config: GeneratorConfig, x: torch.Tensor, t: torch.Tensor | int,
            labels: torch.Tensor, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The UNet's prediction (noise or v, per ``config.prediction_type``) for pixel-space ``x``
    (B x 3 x S x S), patching around it if configured, with the patch grid moved by ``shift`` px
    (rows, columns); training and sampling both call this."""
    p = config.patch_size
    if p == 1:
        return unet(x, t, class_labels=labels).sample
    if shift != (0, 0):
        x = torch.roll(x, shift, dims=(2, 3))
    out = F.pixel_shuffle(unet(F.pixel_unshuffle(x, p), t, class_labels=labels).sample, p)
    return torch.roll(out, (-shift[0], -shift[1]), dims=(2, 3)) if shift != (0, 0) else out


def patch_shifts(config: GeneratorConfig) -> list[tuple[int, int]]:
    """The grid offsets sampling cycles through, one per step: every (row, column) offset below the
    patch size with ``shift_patches``, else none. Fixed, so a seed always gives the same picture."""
    p = config.patch_size
    return list(product(range(p), range(p))) if config.shift_patches and p > 1 else [(0, 0)]


@torch.inference_mode()
def ddim_sample(unet: UNet2DModel, config: GeneratorConfig, class_index: int, noise: torch.Tensor, *,
                guidance_scale: float | None = None, steps: int | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta=0) from ``noise`` for one class, in [0, 1] on the CPU.

    With a null class in the config (``extra.null_class_index``, trained by dropping labels),
    classifier-free guidance mixes conditional and unconditional predictions:
    eps = eps_u + g * (eps_c - eps_u) (the same for v). Serving and training evaluation both sample here.
    """
    scheduler = config.make_scheduler()
    scheduler.set_timesteps(steps or config.num_inference_steps)
    g = float(config.extra.get("guidance_scale", 0.0)) if guidance_scale is None else guidance_scale
    null = int(config.extra.get("null_class_index", -1))
    n = noise.shape[0]
    cond = torch.full((n,), class_index, dtype=torch.long, device=noise.device)
    uncond = torch.full((n,), null, dtype=torch.long, device=noise.device)
    shifts = patch_shifts(config)
    x = noise
    for k, t in enumerate(scheduler.timesteps):
        shift = shifts[k % len(shifts)]
        if g > 0 and null >= 0:
            e_c, e_u = predict(unet, config, torch.cat([x, x]), t, torch.cat([cond, uncond]), shift).chunk(2)
            out = e_u + g * (e_c - e_u)
        else:
            out = predict(unet, config, x, t, cond, shift)
        x = scheduler.step(out, t, x, eta=0.0).prev_sample
    return (x.float().clamp(-1, 1) / 2 + 0.5).cpu()
