"""GPU loading choices (issue 21, build 6) as pure functions, checked on a CPU machine."""

from __future__ import annotations

import pytest
import torch

from inference.engines.loading import plan_load


@pytest.mark.parametrize(("device", "bf16", "flash", "dtype", "attention", "device_map"), [
    ("cpu", None, True, torch.float32, "sdpa", None),  # CPUs: fp32, no FlashAttention, no device map
    ("cuda", True, False, torch.bfloat16, "sdpa", {"": "cuda"}),  # A100/H100: bf16 straight onto the GPU
    ("cuda:1", False, False, torch.float16, "sdpa", {"": "cuda:1"}),  # T4/V100: no bf16 -> fp16, not fp32
    ("cuda", True, True, torch.bfloat16, "flash_attention_2", {"": "cuda"}),
])
def test_automatic_choices(device, bf16, flash, dtype, attention, device_map) -> None:  # type: ignore[no-untyped-def]
    plan = plan_load(device, bf16_supported=bf16, flash_available=flash)
    assert (plan.dtype, plan.attn_implementation, plan.device_map) == (dtype, attention, device_map)
    kwargs = plan.from_pretrained_kwargs()
    assert kwargs["dtype"] == dtype and kwargs["attn_implementation"] == attention
    assert plan.placed_by_loader == (device_map is not None) == kwargs.get("low_cpu_mem_usage", False)


def test_settings_override_and_flash_needs_half_precision() -> None:
    plan = plan_load("cuda", dtype="float16", attn_implementation="eager", device_map="auto", bf16_supported=True)
    assert (plan.dtype, plan.attn_implementation, plan.device_map) == (torch.float16, "eager", "auto")
    forced = plan_load("cuda", dtype="float32", flash_available=True, bf16_supported=True)
    assert forced.attn_implementation == "sdpa"  # FlashAttention-2 has no fp32 kernels
    with pytest.raises(ValueError, match="unknown dtype"):
        plan_load("cpu", dtype="int4")
