"""``skinbridge models``: prepare a clinic's own checkpoints for the workers (issue 21, build 1)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("models")
def models_command() -> None:
    """Prepare model checkpoints (conversions run offline, from local folders only)."""


@models_command.group("convert")
def convert_group() -> None:
    """Convert a seed project's checkpoint into a folder SKINBRIDGE_VLM_PATH can name."""


@convert_group.command("llava-med")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="LLaVA-Med checkpoint in LLaVA's llava_mistral layout")
@click.option("--lora", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="LoRA folder (adapter_config.json, adapter_model.*, non_lora_trainables.bin), e.g. SkinVL")
@click.option("--vision-tower", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="local copy of the CLIP vision tower the config names (openai/clip-vit-large-patch14-336)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def convert_llava_med_command(base: Path, lora: Path | None, vision_tower: Path, out: Path) -> None:
    """LLaVA-Med (+ an optional LoRA, merged) -> transformers LLaVA folder with processor and chat template."""
    from inference.engines.convert import convert_llava_med

    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty")
    try:
        folder = convert_llava_med(base, out, lora=lora, vision_tower=vision_tower)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"converted to {folder}; serve it with SKINBRIDGE_VLM_PATH={folder}")


@convert_group.command("skingpt4")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="SkinGPT-4's MiniGPT-4 checkpoint (.pth with the trained llama_proj), e.g. skinGPT_v1.pth")
@click.option("--blip2", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="BLIP-2's LAVIS checkpoint MiniGPT-4 loads (blip2_pretrained_flant5xxl.pth)")
@click.option("--eva-vit", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="LAVIS's eva_vit_g.pth, needed when neither checkpoint carries the vision encoder")
@click.option("--llama", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="local HF folder of the Llama SkinGPT-4 was trained with (Llama-2-13b-chat-hf)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def convert_skingpt4_command(checkpoint: Path, blip2: Path, eva_vit: Path | None, llama: Path, out: Path) -> None:
    """SkinGPT-4 (MiniGPT-4 layout) -> transformers BLIP-2 folder with MiniGPT-4's prompt as chat template."""
    from inference.engines.convert import convert_skingpt4

    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty")
    try:
        folder = convert_skingpt4(checkpoint, blip2, llama, out, eva_vit=eva_vit)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"converted to {folder}; serve it with SKINBRIDGE_VLM_PATH={folder}")
