"""How a large model is put on its device: dtype, attention implementation and placement (issue 21, build 6).

The choices are pure functions of the device, the hardware's capabilities and the settings
(``SKINBRIDGE_VLM_DTYPE``, ``SKINBRIDGE_VLM_ATTN_IMPLEMENTATION``, ``SKINBRIDGE_VLM_DEVICE_MAP``), so they are
unit-tested on a CPU machine:

- dtype: bf16 on GPUs that support it, else fp16 (a 7B model in fp32 is 28 GB); fp32 on the CPU, which has
  no fast half precision;
- attention: FlashAttention-2 on a GPU when the ``flash_attn`` package is installed, else PyTorch's SDPA;
- placement: weights are loaded straight onto the GPU (``device_map``, low CPU memory) instead of being built
  on the CPU and moved; ``SKINBRIDGE_VLM_DEVICE_MAP=auto`` spreads a model over several GPUs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LoadPlan:
    device: str
    dtype: torch.dtype
    attn_implementation: str
    device_map: str | dict[str, str] | None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.dtype, "attn_implementation": self.attn_implementation}
        if self.device_map is not None:
            kwargs.update(device_map=self.device_map, low_cpu_mem_usage=True)
        return kwargs

    @property
    def placed_by_loader(self) -> bool:
        """Whether ``from_pretrained`` already put the weights on their device(s) (no ``.to()`` after it)."""
        return self.device_map is not None


def choose_dtype(device: str, setting: str = "auto", *, bf16_supported: bool | None = None) -> torch.dtype:
    if setting != "auto":
        if setting not in DTYPES:
            raise ValueError(f"unknown dtype {setting!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[setting]
    if not device.startswith("cuda"):
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def choose_attention(device: str, setting: str = "auto", *, flash_available: bool | None = None) -> str:
    if setting != "auto":
        return setting
    if flash_available is None:
        flash_available = importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if device.startswith("cuda") and flash_available else "sdpa"


def choose_device_map(device: str, setting: str | None = None) -> str | dict[str, str] | None:
    if setting:
        return setting
    return {"": device} if device.startswith("cuda") else None


def plan_load(device: str, *, dtype: str = "auto", attn_implementation: str = "auto",
              device_map: str | None = None, bf16_supported: bool | None = None,
              flash_available: bool | None = None) -> LoadPlan:
    chosen_dtype = choose_dtype(device, dtype, bf16_supported=bf16_supported)
    attention = choose_attention(device, attn_implementation, flash_available=flash_available)
    if attention == "flash_attention_2" and chosen_dtype == torch.float32:
        attention = "sdpa"  # FlashAttention runs in half precision only
    return LoadPlan(device, chosen_dtype, attention, choose_device_map(device, device_map))
