"""`python -m bot`: the same as `skinbridge bot`."""

from bot.cli import bot_command

bot_command()
