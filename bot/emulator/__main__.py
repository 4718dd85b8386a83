"""python -m bot.emulator [--host H] [--port P]"""

from bot.emulator.cli import sandbox_command

if __name__ == "__main__":
    sandbox_command(prog_name="python -m bot.emulator")
