"""`taskomatic serve` (the HTTP API and the dashboard with a dispatcher in one process) and
`taskomatic tokens`.

Registered on the group of `taskomatic.cli`, which imports this module.
"""

from __future__ import annotations

import ipaddress
import threading

import click

from taskomatic import defaults, errors, logs
from taskomatic.cli import (
    App,
    _user,
    command,
    grace_option,
    log_format_option,
    main,
    on_stop_signals,
    service_queue,
)
from taskomatic.tokens import Role, Tokens


@main.group()
def tokens() -> None:
    """Manage the bearer tokens of the HTTP API (stored hashed; shown once)."""


@command(tokens, "create")
@click.option("--name", required=True, help="Who or what the token is for (unique among live).")
@click.option(
    "--role",
    required=True,
    type=click.Choice([r.value for r in Role]),
    help="viewer: read; operator: + submit, cancel, retry, collect; admin: + hosts, tokens.",
)
def tokens_create(app: App, name: str, role: str) -> None:
    """Create a token and print it, this once: it is stored only as a slow hash."""
    row, secret = Tokens(app.queue()).create(name, role, created_by=f"cli:{_user()}")
    app.out({**row.to_dict(), "token": secret}, lambda: click.echo(secret))


@command(tokens, "list")
@click.option("--all", "include_revoked", is_flag=True, help="Revoked tokens too.")
def tokens_list(app: App, include_revoked: bool) -> None:
    """The tokens, oldest first (never their secrets)."""
    found = Tokens(app.queue()).list(include_revoked=include_revoked)

    def human() -> None:
        click.echo(f"{'NAME':<24} {'ROLE':<9} {'ID':<12}  CREATED")
        for t in found:
            revoked = f"  revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else ""
            click.echo(
                f"{t.name:<24} {t.role.value:<9} {t.id:<12}  {t.created_at:%Y-%m-%d %H:%M}{revoked}"
            )

    app.out([t.to_dict() for t in found], human)


@command(tokens, "revoke")
@click.argument("name")
def tokens_revoke(app: App, name: str) -> None:
    """Revoke the live token NAME: requests with it are refused from now on."""
    row = Tokens(app.queue()).revoke(name)
    app.out(row.to_dict(), lambda: click.echo(f"revoked {row.name}"))


@command(main, "serve")
@click.option(
    "--bind",
    default=defaults.HTTP_BIND,
    show_default=True,
    metavar="HOST:PORT",
    help="Address to listen on (port 0: any free port, printed at start).",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate (chain).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key.")
@click.option(
    "--insecure-bind",
    is_flag=True,
    help="Allow plain HTTP on a non-loopback address (tokens then cross the network in clear).",
)
@click.option(
    "--dispatcher/--no-dispatcher",
    "with_dispatcher",
    default=True,
    show_default=True,
    help="Run a dispatcher in this process too (--no-dispatcher: beside separate ones).",
)
@click.option("--workers", type=click.IntRange(min=1), default=defaults.WORKERS, show_default=True)
@click.option(
    "--inventory/--no-inventory",
    default=True,
    show_default=True,
    help="The dispatcher keeps the inventory of hosts current.",
)
@grace_option
@log_format_option
def serve(
    app: App,
    bind: str,
    tls_cert: str | None,
    tls_key: str | None,
    insecure_bind: bool,
    with_dispatcher: bool,
    workers: int,
    inventory: bool,
    grace: float,
    log_format: str,
) -> None:
    """Serve the HTTP API and the dashboard (and run a dispatcher) until SIGTERM/SIGINT."""
    from taskomatic.dispatcher import Dispatcher
    from taskomatic.http import Server, tls_context

    host, port = _address(bind)
    if (tls_cert is None) != (tls_key is None):
        raise errors.ValidationError("give both --tls-cert and --tls-key, or neither")
    tls = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
    if tls is None and not insecure_bind and not _loopback(host):
        raise errors.ValidationError(
            f"refusing plain HTTP on {host}, which is not a loopback address: give "
            "--tls-cert and --tls-key, or --insecure-bind if something else encrypts the traffic"
        )
    logs.configure(log_format)
    queue = service_queue(app)
    try:
        server = Server(queue, (host, port), tls=tls)
    except OSError as exc:
        raise errors.ValidationError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    disp = (
        Dispatcher(queue, workers=workers, inventory=inventory).start() if with_dispatcher else None
    )

    def stop() -> None:
        # shutdown() waits for serve_forever(), which runs in this (the main) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()
        if disp is not None:
            disp.stop(grace=grace, wait=False)

    on_stop_signals(queue, stop)
    click.echo(f"serving {server.url}" + (" with a dispatcher" if disp else ""))
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if disp is not None:
            disp.stop(grace=grace)


def _address(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise errors.ValidationError(
            f"--bind {bind!r} is not HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080)", field="bind"
        )
    return host, int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
