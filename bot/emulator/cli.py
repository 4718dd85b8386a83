"""`skinbridge sandbox`: serve the Telegram emulator and its sandbox chat page."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8081, show_default=True, type=click.IntRange(1, 65535))
@click.option("--state", "state_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File keeping the update/message id counters and users across restarts "
                   "[default: sandbox-state.json in the data folder].")
def sandbox_command(host: str, port: int, state_file: Path | None) -> None:
    """Run the local Telegram Bot API emulator with its sandbox chat page (a test double, not Telegram)."""
    from bot.emulator.app import run
    from skinbridge.settings import get_settings

    if not is_loopback(host):
        click.echo(f"warning: the emulator has no authentication; {host} exposes it beyond this machine", err=True)
    if state_file is None:
        folder = get_settings().resolved_var_dir
        folder.mkdir(parents=True, exist_ok=True)
        state_file = folder / "sandbox-state.json"
    click.echo(f"sandbox page: http://{host}:{port}/")  # how to point a bot at it: docs/emulator.md
    run(host=host, port=port, state_file=state_file)
