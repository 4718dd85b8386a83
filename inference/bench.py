"""``skinbridge bench inference``: latency, throughput and memory of every engine architecture.

Models are built at their REAL sizes with random weights (speed does not depend on the weight
values): the LLaVA-1.5-7B-size VLM (CLIP ViT-L/14-336 + Llama-2-7B dims), an SD-1.5-size pipeline,
and the project's own classifier and generator. A 7B model does not fit a CPU worker's budget, so on
CPU the command requires ``--quick``, which scales the two large models down and records that in the
JSON (``scaled_down``: true, with the dims used). ``--tiny`` shrinks everything (smoke tests).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

SCHEMA = "skinbridge.bench.inference/1"
MODELS = ("classifier", "generator", "vlm", "sd")


# --- measurement ----------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory_mb(device: str) -> dict[str, float]:
    import torch

    if device.startswith("cuda"):
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "memory_kind": "cuda_allocated"}
    # Linux reports ru_maxrss in KiB; it is the whole process's high-water mark
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "memory_kind": "process_peak_rss"}


def measure(fn: Callable[[], Any], *, device: str, iterations: int, warmup: int, items: int,
            unit: str) -> dict[str, Any]:
    """Time ``fn`` (after warm-up runs); ``items`` is how many ``unit``s one call produces."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    ordered = sorted(times)

    def pct(q: float) -> float:  # nearest-rank percentile: honest for a handful of samples
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    mean = statistics.fmean(times)
    return {
        "iterations": iterations,
        "latency_ms": {k: round(v * 1000, 3) for k, v in
                       {"p50": statistics.median(times), "p95": pct(0.95), "mean": mean, "min": ordered[0]}.items()},
        "throughput_per_s": round(items / mean, 3),
        "unit": unit,
        **_peak_memory_mb(device),
    }


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# --- per-model benchmarks ---------------------------------------------------------------------
def bench_classifier(device: str, batch_sizes: list[int], scale: str, iterations: int, warmup: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    from inference.engines.classifier import ClassifierEngine
    from inference.engines.classifier_net import ClassifierConfig, SkinClassifierNet

    if scale == "tiny":
        width, size, classes = 8, 32, 4
        config = ClassifierConfig(num_classes=classes, class_codes=[f"c{i}" for i in range(classes)],
                                  image_size=size, width=width, model_id="bench-classifier")
        torch.manual_seed(0)
        engine = ClassifierEngine(SkinClassifierNet(classes, width=width), config, device, "random")
    else:  # the shipped default model, exactly as it serves patients (incl. its test-time views)
        from inference.engines.paths import DEFAULT_CLASSIFIER

        engine = ClassifierEngine.load(DEFAULT_CLASSIFIER, device)
        config = engine.config
        width, size, classes = config.width, config.image_size, config.num_classes
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(max(batch_sizes))]
    results = []
    for b in batch_sizes:
        row = {"batch_size": b, "what": "predict (photo type + preprocess + forward over the views + softmax)"}
        row |= measure(lambda: engine.predict(photos[:b], saliency=False), device=device,
                       iterations=iterations, warmup=warmup, items=b, unit="images")
        results.append(row)
    cam = {"batch_size": 1, "what": "Grad-CAM saliency PNG"}
    cam |= measure(lambda: engine.saliency_png(photos[0], "clinical", 0), device=device, iterations=iterations,
                   warmup=warmup, items=1, unit="images")
    results.append(cam)
    return {"name": "classifier", "architecture": type(engine.model).__name__, "params": _params(engine.model),
            "dtype": "float32", "scaled_down": scale == "tiny", "model_id": config.model_id,
            "dims": {"width": width, "image_size": size, "num_classes": classes, "tta_views": config.tta_views,
                     "members": config.members},
            "results": results}


def bench_generator(device: str, batch_sizes: list[int], scale: str, iterations: int, warmup: int) -> dict[str, Any]:
    import tempfile

    import torch

    from inference.engines.explainer import ClassConditionalExplainer
    from inference.engines.generator_net import GeneratorConfig, build_generator_unet, save_generator

    from inference.engines.paths import DEFAULT_GENERATOR

    def run(explainer: Any, code: str, steps: int) -> list[dict[str, Any]]:
        results = []
        for b in batch_sizes:
            row = {"batch_size": b, "what": f"DDIM sampling, {steps} steps, + AI-marked PNG"}
            row |= measure(lambda: explainer.render(code, b, seed=0), device=device, iterations=iterations,
                           warmup=warmup, items=b, unit="images")
            results.append(row)
        return results

    if scale != "tiny" and DEFAULT_GENERATOR.exists():  # the shipped default model, as it serves patients
        explainer = ClassConditionalExplainer.load(DEFAULT_GENERATOR, device, vocabulary=False)
        config = explainer.config
        if scale == "quick":
            config.num_inference_steps = min(config.num_inference_steps, 10)
        steps = config.num_inference_steps
        return {"name": "generator", "architecture": "UNet2DModel (class-conditional, DDIM, patched)",
                "params": _params(explainer.unet), "dtype": str(explainer.unet.dtype).replace("torch.", ""),
                "scaled_down": False, "model_id": explainer.model_id,
                "dims": {"sample_size": config.sample_size, "patch_size": config.patch_size,
                         "num_inference_steps": steps, "guidance_scale": config.extra.get("guidance_scale")},
                "results": run(explainer, explainer.codes[0], steps)}
    if scale == "tiny":
        kwargs: dict[str, Any] = {"sample_size": 16, "block_out_channels": (8, 16), "layers_per_block": 1,
                                  "norm_num_groups": 4}
        steps = 2
    else:
        kwargs, steps = {"sample_size": 64}, (10 if scale == "quick" else 50)
    torch.manual_seed(0)
    unet = build_generator_unet(4, **kwargs)
    with tempfile.TemporaryDirectory() as folder:  # through the production loader
        save_generator(folder, unet, GeneratorConfig(class_codes=["a", "b", "c", "d"], sample_size=kwargs["sample_size"],
                                                     num_inference_steps=steps))
        explainer = ClassConditionalExplainer.load(folder, device, vocabulary=False)
        results = run(explainer, "a", steps)
    return {"name": "generator", "architecture": "UNet2DModel (class-conditional, DDIM)", "params": _params(unet),
            "dtype": "float32", "scaled_down": scale == "tiny", "dims": {**kwargs, "num_inference_steps": steps},
            "results": results}


def bench_vlm(device: str, batch_sizes: list[int], scale: str, iterations: int, warmup: int) -> dict[str, Any]:
    import torch
    from PIL import Image

    from inference.engines.synthetic import LLAVA_1_5_7B, TINY_LLAVA, LlavaDims, build_llava, train_tokenizer

    if scale == "tiny":
        dims, new_tokens = TINY_LLAVA, 4
    elif scale == "quick":  # same image pipeline (336 px, 576 image tokens), much smaller towers
        dims, new_tokens = LlavaDims(336, 14, 256, 4, 4, 1024, 512, 4, 8, 1376, 32064), 8
    else:
        dims, new_tokens = LLAVA_1_5_7B, 32
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model, processor = build_llava(dims, train_tokenizer(), dtype=dtype, device=device)
    model.eval()
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the skin lesion."}]}],
        add_generation_prompt=True, tokenize=False)
    single = processor(images=[Image.new("RGB", (640, 480), (180, 120, 100))], text=chat, return_tensors="pt")
    prompt_len = int(single["input_ids"].shape[1])
    tok = processor.tokenizer
    results = []
    for b in batch_sizes:
        inputs = {k: v.repeat(b, *([1] * (v.dim() - 1))).to(device) for k, v in single.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

        def run(max_new: int) -> None:
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                               pad_token_id=tok.pad_token_id)

        prefill = {"batch_size": b, "what": f"prefill + first token (prompt {prompt_len} tokens incl. image)"}
        prefill |= measure(lambda: run(1), device=device, iterations=iterations, warmup=warmup, items=b,
                           unit="requests")
        full = {"batch_size": b, "what": f"generate {new_tokens} new tokens"}
        full |= measure(lambda: run(new_tokens), device=device, iterations=iterations, warmup=warmup,
                        items=b * new_tokens, unit="tokens")
        results += [prefill, full]
    reference = "LLaVA-1.5-7B (CLIP ViT-L/14-336 + Llama-2-7B)"
    return {"name": "vlm", "architecture": "LlavaForConditionalGeneration", "reference": reference,
           "params": _params(model), "dtype": str(dtype).removeprefix("torch."), "scaled_down": scale != "full",
           "dims": asdict(dims), "results": results}


def bench_sd(device: str, batch_sizes: list[int], scale: str, iterations: int, warmup: int) -> dict[str, Any]:
    import torch

    from inference.engines.synthetic import SD_1_5, TINY_SD, SDDims, build_sd_pipeline, train_tokenizer

    if scale == "tiny":
        dims, steps = TINY_SD, 2
    elif scale == "quick":
        dims, steps = SDDims((64, 128, 256, 256), 1, 256, 8, (32, 64, 128, 128), 256, 4, 4, 1024, 49408, 256), 4
    else:
        dims, steps = SD_1_5, 25
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    pipe = build_sd_pipeline(dims, train_tokenizer(model_max_length=77), dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for b in batch_sizes:
        def run() -> None:
            pipe(prompt="dermatology atlas photograph of a melanoma", num_images_per_prompt=b,
                 num_inference_steps=steps, guidance_scale=7.0, height=dims.image_size, width=dims.image_size,
                 generator=torch.Generator().manual_seed(0), output_type="pil")

        row = {"batch_size": b, "what": f"text-to-image {dims.image_size}px, {steps} DDIM steps, CFG 7"}
        row |= measure(run, device=device, iterations=iterations, warmup=warmup, items=b, unit="images")
        results.append(row)
    params = {"unet": _params(pipe.unet), "vae": _params(pipe.vae), "text_encoder": _params(pipe.text_encoder)}
    return {"name": "sd", "architecture": "StableDiffusionPipeline", "reference": "Stable Diffusion 1.5",
            "params": sum(params.values()), "params_by_part": params, "dtype": str(dtype).removeprefix("torch."),
            "scaled_down": scale != "full", "dims": asdict(dims), "results": results}


BENCHES = {"classifier": bench_classifier, "generator": bench_generator, "vlm": bench_vlm, "sd": bench_sd}


# --- environment ------------------------------------------------------------------------------
def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "transformers", "diffusers", "peft", "safetensors", "numpy", "pillow"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    versions["cuda"] = torch.version.cuda
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        dev = {"type": "cuda", "name": props.name, "total_memory_mb": round(props.total_memory / 2**20),
               "capability": f"{props.major}.{props.minor}"}
    else:
        dev = {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return {"device": dev, "versions": versions}


def run_benchmarks(device: str, batch_sizes: list[int], scale: str, models: list[str],
                   iterations: int, warmup: int, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    import gc

    import torch

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scale": scale,
        "quick": scale != "full",
        "scaled_down": scale != "full",
        "note": {
            "full": "real-size architectures with random weights; the classifier is the shipped model",
            "quick": "VLM and SD scaled down (dims recorded per model); classifier (shipped) and generator at real size",
            "tiny": "every model tiny: a smoke test of the benchmark, not a measurement",
        }[scale],
        "batch_sizes": batch_sizes,
        **environment(device),
        "models": [],
    }
    for name in models:
        progress(f"benchmarking {name} on {device} ({scale})")
        report["models"].append(BENCHES[name](device, batch_sizes, scale, iterations, warmup))
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return report


# --- CLI --------------------------------------------------------------------------------------
@click.group("bench")
def bench_command() -> None:
    """Benchmarks."""


@bench_command.command("inference")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here (default: print it).")
@click.option("--device", default="auto", show_default=True, help='"auto", "cpu", "cuda", "cuda:1", ...')
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--quick", is_flag=True, help="Scale the VLM and SD down (required on CPU); fewer iterations.")
@click.option("--tiny", is_flag=True, hidden=True, help="Tiny models everywhere (smoke test of the benchmark).")
@click.option("--models", default=",".join(MODELS), show_default=True, help="Which engines to measure.")
@click.option("--iterations", type=int, default=None, help="Timed runs per measurement (default 3 quick, 10 full).")
@click.option("--warmup", type=int, default=1, show_default=True)
def bench_inference(json_path: Path | None, device: str, batch_sizes: str, quick: bool, tiny: bool, models: str,
                    iterations: int | None, warmup: int) -> None:
    """Latency p50/p95, throughput and peak memory of each engine at real size (random weights; the
    classifier is the shipped default model)."""
    from inference.engines.base import pick_device

    resolved = pick_device(device)
    sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes must be positive integers", param_hint="--batch-sizes")
    chosen = [m.strip() for m in models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        raise click.BadParameter(f"unknown models {unknown}; choose from {list(MODELS)}", param_hint="--models")
    scale = "tiny" if tiny else "quick" if quick else "full"
    if scale == "full" and resolved == "cpu" and {"vlm", "sd"} & set(chosen):
        raise click.UsageError("a 7B VLM and SD-1.5 at full size do not fit a CPU run: add --quick "
                               "(scales them down and says so in the report) or run on a GPU")
    report = run_benchmarks(resolved, sizes, scale, chosen, iterations or (3 if scale != "full" else 10), warmup,
                            progress=lambda m: click.echo(m, err=True))
    emit_report(report, json_path)


def emit_report(report: dict, json_path: Path | None) -> None:
    """A benchmark's JSON report: written to ``json_path`` (folders made), else printed."""
    text = json.dumps(report, indent=2)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n", encoding="utf-8")
        click.echo(f"wrote {json_path}", err=True)
    else:
        click.echo(text)
