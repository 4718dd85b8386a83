"""A local, faithful Telegram Bot API emulator (getUpdates long-poll, files, keyboards) plus a sandbox
chat page where anyone can play the patient. See docs/emulator.md."""

from bot.emulator.app import create_app, run

__all__ = ["create_app", "run"]
