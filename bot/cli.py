"""`skinbridge bot`: run the patient bot (long polling by default, webhook when configured)."""

from __future__ import annotations

import asyncio
import re
import sys
from urllib.parse import urlparse

import click

# Telegram's rule for setWebhook's secret_token: 1-256 characters of A-Z, a-z, 0-9, _ and -.
_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")


def webhook_secret_problem(secret: str | None) -> str | None:
    """Why this secret cannot protect a webhook, or None if it can.

    Without a secret anyone who learns the webhook URL can inject updates as any patient; an empty
    value (``SKINBRIDGE_WEBHOOK_SECRET=`` in an env file) would start a bot that refuses every update.
    """
    if secret is None or not secret.strip():
        return "webhook mode needs SKINBRIDGE_WEBHOOK_SECRET (Telegram's secret_token header); it is unset or empty"
    if not _SECRET_TOKEN.fullmatch(secret):
        return ("SKINBRIDGE_WEBHOOK_SECRET must be 1-256 characters of A-Z, a-z, 0-9, _ and - "
                "(Telegram refuses other secret tokens)")
    return None


@click.command("bot")
@click.option("--listen", default="0.0.0.0", show_default=True, help="Webhook mode: address to listen on.")
@click.option("--port", default=8443, show_default=True, type=int, help="Webhook mode: port to listen on.")
def bot_command(listen: str, port: int) -> None:
    """Run the Telegram bot for patients (webhook if SKINBRIDGE_WEBHOOK_URL is set, else polling)."""
    from bot.app import Webhook, build_application, connection, serve

    from skinbridge import logs
    from skinbridge.cli import checked_settings

    logs.setup()  # polls and per-request lines (with the token in the URL) only at DEBUG

    settings = checked_settings()
    if settings.webhook_url:  # checked before anything is opened or registered
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        if problem := webhook_secret_problem(secret):
            click.echo(problem, err=True)
            sys.exit(2)
    app = build_application(settings)
    _, base_url, _ = connection(settings)
    webhook = None
    if settings.webhook_url:
        assert settings.webhook_secret is not None  # checked above
        path = urlparse(settings.webhook_url).path.lstrip("/") or "telegram"
        webhook = Webhook(url=settings.webhook_url, secret=settings.webhook_secret.get_secret_value(),
                          listen=listen, port=port, path=path)
        click.echo(f"bot: webhook {settings.webhook_url} (listening on {listen}:{port})")
    else:
        click.echo(f"bot: polling {base_url.rsplit('/bot', 1)[0]}")
    asyncio.run(serve(app, webhook=webhook))


if __name__ == "__main__":
    bot_command()
