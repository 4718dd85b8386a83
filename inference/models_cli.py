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
