"""Where the shipped weights live (a ground-floor module: no torch, importable by the web console)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_CLASSIFIER = WEIGHTS_DIR / "classifier"
DEFAULT_GENERATOR = WEIGHTS_DIR / "generator"
