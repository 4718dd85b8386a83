"""`skinbridge bench inference` runs every engine architecture and writes a well-formed report."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from inference.bench import MODELS, SCHEMA, bench_command


def test_bench_inference_quick_tiny_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_command, [
        "inference", "--quick", "--tiny", "--device", "cpu", "--batch-sizes", "1,2",
        "--iterations", "2", "--warmup", "0", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA
    assert report["quick"] is True and report["scaled_down"] is True and report["scale"] == "tiny"
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["versions"]["torch"] and report["versions"]["transformers"] and report["versions"]["diffusers"]
    assert [m["name"] for m in report["models"]] == list(MODELS)
    for model in report["models"]:
        assert model["params"] > 0 and model["scaled_down"] is True and model["dims"]
        batch_sizes = {r["batch_size"] for r in model["results"]}
        assert {1, 2} <= batch_sizes
        for row in model["results"]:
            lat = row["latency_ms"]
            assert row["iterations"] == 2
            assert 0 < lat["min"] <= lat["p50"] <= lat["p95"]
            assert row["throughput_per_s"] > 0 and row["unit"] and row["what"]
            assert row["peak_memory_mb"] > 0
    vlm = next(m for m in report["models"] if m["name"] == "vlm")
    assert vlm["reference"].startswith("LLaVA-1.5-7B")
    tokens = [r for r in vlm["results"] if r["unit"] == "tokens"]
    assert tokens and all("generate" in r["what"] for r in tokens)


def test_full_size_on_cpu_is_refused_and_bad_options_rejected() -> None:
    runner = CliRunner()
    refused = runner.invoke(bench_command, ["inference", "--device", "cpu", "--models", "vlm"])
    assert refused.exit_code == 2 and "--quick" in refused.output
    bad = runner.invoke(bench_command, ["inference", "--device", "cpu", "--quick", "--models", "gpt"])
    assert bad.exit_code == 2 and "unknown models" in bad.output
    bad_sizes = runner.invoke(bench_command, ["inference", "--device", "cpu", "--quick", "--batch-sizes", "0"])
    assert bad_sizes.exit_code == 2
