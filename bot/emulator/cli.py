"""`skinbridge sandbox`: serve the Telegram emulator and its sandbox chat page."""

from __future__ import annotations

import ipaddress

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
def sandbox_command(host: str, port: int) -> None:
    """Run the local Telegram Bot API emulator with its sandbox chat page (a test double, not Telegram)."""
    from bot.emulator.app import run

    if not is_loopback(host):
        click.echo(f"warning: the emulator has no authentication; {host} exposes it beyond this machine", err=True)
    click.echo(f"sandbox page: http://{host}:{port}/")  # how to point a bot at it: docs/emulator.md
    run(host=host, port=port)
