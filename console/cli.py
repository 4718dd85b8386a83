"""`skinbridge clinician ...`: console accounts from the command line (registered by skinbridge.cli)."""

from __future__ import annotations

import sys

import click

from clinic_db import clinicians


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        # one line, without its newline: lets scripts pipe a secret without it showing in `ps`
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@click.group("clinician")
def clinician_command() -> None:
    """Review console accounts (dermatologists and admins)."""


@clinician_command.command("add")
@click.argument("username")
@click.option("--name", "display_name", required=True, help="Name shown to colleagues, e.g. 'Dr. Ada Weber'.")
@click.option("--role", type=click.Choice(clinicians.ROLES), default="dermatologist", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.option("--totp", is_flag=True, help="Require an authenticator code; prints the enrolment URI once.")
def add(username: str, display_name: str, role: str, password_stdin: bool, totp: bool) -> None:
    """Create an account."""
    from clinic_db.db import get_clinic

    password = _read_password(password_stdin)
    clinic = get_clinic()
    with clinic.session() as session:
        try:
            clinician, uri = clinicians.create(clinic, session, username, display_name=display_name, role=role,
                                               password=password, totp=totp)
        except clinicians.AccountError as exc:
            raise click.ClickException(str(exc)) from exc
        session.commit()
        click.echo(f"created {clinician.role} {clinician.username} ({clinician.id})")
        if uri:
            click.echo("add this to an authenticator app now (it is not shown again):")
            click.echo(uri)


@clinician_command.command("list")
def list_() -> None:
    """List accounts with role and lock state."""
    from clinic_db.db import get_clinic

    clinic = get_clinic()
    with clinic.session() as session:
        rows = clinicians.all_clinicians(session)
        if not rows:
            click.echo("no clinician accounts")
        for c in rows:
            state = "inactive" if not c.active else ("locked" if clinicians.is_locked(c) else "active")
            click.echo(f"{c.username}\t{c.role}\t{state}\t{'totp' if c.totp_secret else 'password'}\t{c.display_name}")


@clinician_command.command("lock")
@click.argument("username")
def lock(username: str) -> None:
    """Lock and deactivate an account (its sessions end at the next request)."""
    _change(username, lambda session, c: clinicians.lock(session, c))
    click.echo(f"locked {username}")


@clinician_command.command("unlock")
@click.argument("username")
def unlock(username: str) -> None:
    """Unlock an account (after a lockout or a manual lock)."""
    _change(username, lambda session, c: clinicians.unlock(session, c))
    click.echo(f"unlocked {username}")


def _change(username: str, action) -> None:  # type: ignore[no-untyped-def]
    from clinic_db.db import get_clinic

    clinic = get_clinic()
    with clinic.session() as session:
        clinician = clinicians.by_username(session, username)
        if clinician is None:
            raise click.ClickException(f"no account {username!r}")
        action(session, clinician)
        session.commit()


@clinician_command.command("link-telegram")
@click.argument("username")
@click.argument("telegram_user_id", type=int)
def link_telegram(username: str, telegram_user_id: int) -> None:
    """Link a dermatologist's Telegram account: urgent cases are pushed there and can be viewed,
    accepted or amended with inline buttons (the account must send /start to the bot once)."""
    from clinic_db.db import get_clinic
    from console import telegram_review

    clinic = get_clinic()
    _change(username, lambda session, c: telegram_review.link(clinic, session, c, telegram_user_id))
    click.echo(f"linked {username} to Telegram user {telegram_user_id}")
