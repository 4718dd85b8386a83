"""`skinbridge bot`: run the patient bot (long polling by default, webhook when configured)."""

from __future__ import annotations

import logging
import sys
from urllib.parse import urlparse

import click


@click.command("bot")
@click.option("--listen", default="0.0.0.0", show_default=True, help="Webhook mode: address to listen on.")
@click.option("--port", default=8443, show_default=True, type=int, help="Webhook mode: port to listen on.")
@click.option("--poll-interval", default=0.0, show_default=True, type=float, help="Polling: pause between requests.")
def bot_command(listen: str, port: int, poll_interval: float) -> None:
    """Run the Telegram bot for patients (webhook if SKINBRIDGE_WEBHOOK_URL is set, else polling)."""
    from telegram import Update

    from bot.app import build_application, connection
    from skinbridge.settings import UnsafeConfiguration, get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # every poll would be logged, token included
    settings = get_settings()
    try:
        settings.check_safe()
    except UnsafeConfiguration as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    app = build_application(settings)
    _, base_url, _ = connection(settings)
    if settings.webhook_url:
        if settings.webhook_secret is None:
            click.echo("webhook mode needs SKINBRIDGE_WEBHOOK_SECRET (Telegram's secret_token header)", err=True)
            sys.exit(2)
        path = urlparse(settings.webhook_url).path.lstrip("/") or "telegram"
        click.echo(f"bot: webhook {settings.webhook_url} (listening on {listen}:{port})")
        app.run_webhook(
            listen=listen, port=port, url_path=path, webhook_url=settings.webhook_url,
            secret_token=settings.webhook_secret.get_secret_value(), allowed_updates=Update.ALL_TYPES,
        )
        return
    click.echo(f"bot: polling {base_url.rsplit('/bot', 1)[0]}")
    app.run_polling(allowed_updates=Update.ALL_TYPES, poll_interval=poll_interval, timeout=10)


if __name__ == "__main__":
    bot_command()
