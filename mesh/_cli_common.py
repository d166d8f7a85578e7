"""Shared pieces of the ``mesh`` command line: the app, consoles, options, error handling."""


from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import nats.errors
import typer
from rich.console import Console
from rich.markup import escape

from plugin_sdk import (
    PluginError,
)
from plugin_sdk.host import NatsServerError, Retry, Subjects

from . import _loop
from ._connect import DEFAULT_URL, ENV, close, connect, default_prefix, default_url
from ._run_main import failure_line, setup_logging

#: A CLI command retries registry calls only briefly: an operator would rather hear at once that
#: no registry answers (MESH_RETRY_FOR does not apply; a long-running process retries for longer).
CLI_RETRY = Retry(within=3.0)

T = TypeVar("T")

app = typer.Typer(name="mesh", help="groundhog: a distributed plugin mesh over NATS.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
state_app = typer.Typer(help="Read and write a plugin's persisted state (JetStream KV).", no_args_is_help=True)
app.add_typer(state_app, name="state")

# Piped or captured output gets room for whole table rows (a terminal's own width otherwise).
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
err = Console(stderr=True, soft_wrap=True)

NatsOpt = Annotated[str | None, typer.Option("--nats", help=f"NATS URL (env MESH_NATS_URL; default {DEFAULT_URL}).",
                                             show_default=False)]
PrefixOpt = Annotated[str | None, typer.Option("--prefix", help="Subject prefix of the mesh (env MESH_PREFIX; "
                                               "default mesh).", show_default=False)]

# Connection security, options of `mesh` itself (`mesh --tls-ca ca.pem ls`): each a file path, never the
# secret itself. The root callback exports them (as absolute paths) into the environment, where every
# connect() reads them, and so do the processes the command starts (an agent's plugin hosts).
_SECURITY_PANEL = "Connection security (file paths; also for the processes a command starts)"
CredsOpt = Annotated[str | None, typer.Option("--creds", metavar="FILE", show_default=False,
                                              rich_help_panel=_SECURITY_PANEL,
                                              help="NATS credentials file (.creds: user JWT + nkey seed); env "
                                              "MESH_CREDS.")]
TlsCaOpt = Annotated[str | None, typer.Option("--tls-ca", metavar="FILE", show_default=False,
                                              rich_help_panel=_SECURITY_PANEL,
                                              help="CA certificate (PEM) to verify the server with; means TLS "
                                              "(tls://); env MESH_TLS_CA.")]
TlsCertOpt = Annotated[str | None, typer.Option("--tls-cert", metavar="FILE", show_default=False,
                                                rich_help_panel=_SECURITY_PANEL,
                                                help="Client certificate (PEM) for mTLS; env MESH_TLS_CERT.")]
TlsKeyOpt = Annotated[str | None, typer.Option("--tls-key", metavar="FILE", show_default=False,
                                               rich_help_panel=_SECURITY_PANEL,
                                               help="The client certificate's private key (PEM, unencrypted); "
                                               "env MESH_TLS_KEY.")]


def export_security(*, creds: str | None, tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Put the security options that were given into this process's environment (absolute paths),
    where connect() and every child process read them; options not given leave the environment be."""
    for field, value in (("creds", creds), ("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        if value:
            os.environ[ENV[field]] = str(Path(value).expanduser().absolute())


ReplicasOpt = Annotated[int | None, typer.Option(
    "--replicas", min=1, show_default="3 on a cluster of 3+ nodes, else 1", envvar="MESH_REPLICAS",
    help="Copies JetStream keeps of the registry's and plugins' buckets; more than the cluster's nodes is refused.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds to wait for replies.")]


class UserError(Exception):
    """A mistake in what the user typed; printed as one line."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    return typer.Exit(code)


def _run(coro: Coroutine[Any, Any, T], *, announce: int = logging.DEBUG) -> T:
    """Run a command's coroutine, turning every expected failure into one clear line.

    Every command runs on the loop :mod:`mesh._loop` chooses (uvloop when installed; ``MESH_LOOP``),
    logged at ``announce``: INFO for the long-running services (registry, agent), DEBUG elsewhere."""
    try:
        return _loop.run(coro, announce=announce)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (PluginError, UserError, NatsServerError, ValueError, nats.errors.Error) as exc:
        raise _fail(failure_line(exc) or str(exc)) from None


def _payload(raw: str | None) -> Any:
    if raw is None:
        return None
    if raw == "-":
        raw = sys.stdin.read()
    elif raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise _fail(f"cannot read payload file {raw[1:]}: {exc.strerror}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _fail(f"payload is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                    f"{raw[:80]!r}") from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")
    sys.stdout.flush()


async def _with_nc(nats_url: str | None, fn: Callable[[Any], Awaitable[T]]) -> T:
    nc = await connect(nats_url or default_url(), name="mesh cli")
    try:
        return await fn(nc)
    finally:
        await close(nc)


_setup_logging = setup_logging


def _prefix(p: str | None) -> str:
    prefix = p or default_prefix()
    Subjects(prefix)  # validates
    return prefix



OnOpt = Annotated[str | None, typer.Option("--on", help="Agent to act on (default: the only one running).")]
AgentTimeout = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the agent.")]


#: How a state looks in every table: an instance's health (``mesh ls``, ``stats``, ``top``) and a
#: placement's state (``mesh agents``). One map, so the same word has the same colour everywhere.
STATE_STYLE = {"healthy": "green", "running": "green", "degraded": "yellow", "starting": "yellow",
               "stopping": "yellow", "restarting": "yellow", "unhealthy": "red", "failed": "red",
               "exited": "dim", "stopped": "dim"}


def styled_state(state: str, reason: str = "") -> str:
    """``state`` in its colour (rich markup), with ``(reason)`` after it when there is one."""
    style = STATE_STYLE.get(state, "")
    shown = f"[{style}]{state}[/{style}]" if style else escape(state)
    return shown + (f" ({escape(reason)})" if reason else "")
