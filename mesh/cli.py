"""The ``mesh`` command line. Thin: parse, call the library, print.

User errors print one line on stderr (``error: <what>``) and exit 1; no traceback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from plugin_sdk import (
    MessageKind,
    PluginError,
    PluginMessaging,
    PluginRegistry,
    StateNotFound,
    StateStore,
)
from plugin_sdk.host import NatsServerError, Subjects, check_event_type, open_bucket, validate_name

from . import _loop
from ._cli_common import (
    CLI_RETRY,
    CredsOpt,
    JsonOpt,
    NatsOpt,
    PrefixOpt,
    ReplicasOpt,
    TimeoutOpt,
    TlsCaOpt,
    TlsCertOpt,
    TlsKeyOpt,
    UserError,
    _fail,
    _payload,
    _prefix,
    _print_json,
    _run,
    _setup_logging,
    _with_nc,
    app,
    err,
    export_security,
    out,
    state_app,
    styled_state,
)
from ._cli_trace import root_span, show_trace, trace_cmd
from ._connect import close, connect, default_url
from ._run_main import ready_event
from ._service import stop_on_signals, wait_any


def _show_version(value: bool) -> None:
    if value:
        import platform

        from . import __version__

        out.print(f"groundhog-mesh {__version__} (Python {platform.python_version()})", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                          help="Print the version and exit.")] = False,
    creds: CredsOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """groundhog: a distributed plugin mesh over NATS."""
    export_security(creds=creds, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)


# --------------------------------------------------------------------------------------------
# Running things

@app.command()
def up(
    nats_url: Annotated[str | None, typer.Option("--nats", show_default=False,
                                                 help="Use this NATS server instead of starting one (default: "
                                                 "env MESH_NATS_URL, unless --port or --data-dir is given).")] = None,
    port: Annotated[int | None, typer.Option(help="Port of the embedded nats-server (starts it, whatever "
                                             "MESH_NATS_URL says).", show_default="4222")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="JetStream storage of the embedded server, and the agent's "
                                                  "data (starts the embedded server unless --nats is given).",
                                                  show_default=".mesh")] = None,
    file: Annotated[Path, typer.Option("--file", "-f", help="Plugins to run.")] = Path("mesh.toml"),
    prefix: Annotated[str | None, typer.Option("--prefix", envvar="MESH_PREFIX", show_default=False,
                                               help="Subject prefix (default: mesh.toml's, else mesh).")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="The embedded server requires TLS, with a CA made once under "
                                      "<data-dir>/pki (prints how to point the CLI at it).")] = False,
    mtls: Annotated[bool, typer.Option("--mtls", help="--tls, and every client presents a certificate of that CA "
                                       "(each plugin its own, the CLI 'admin').")] = False,
    secure: Annotated[bool, typer.Option("--secure", help="--tls, plus a NATS identity for every client (each plugin "
                                         "instance its own, with only its permissions) and signed plugin packages "
                                         "only; everything made once under the data dir.")] = False,
    cluster: Annotated[int, typer.Option("--cluster", metavar="N", help="Run N local nats-server nodes routed into "
                                         "one JetStream cluster (development; client ports --port upward, stores in "
                                         "<data-dir>/n0, n1, …).", show_default=False)] = 0,
    listen: Annotated[str, typer.Option("--listen", metavar="HOST", help="Address the embedded server listens on "
                                        "(for clients; with --join, for routes too): another machine's agents and "
                                        "plugins need one they can reach.")] = "127.0.0.1",
    join: Annotated[str | None, typer.Option("--join", metavar="ROUTE,…", show_default=False,
                                             help="Run a node that routes to these other nodes "
                                             "(nats-route://HOST:6222, comma-separated), plus the registry and "
                                             "agent: every machine of a cluster runs this, naming the others.")]
    = None,
    route_port: Annotated[int | None, typer.Option("--route-port", show_default="6222; --cluster: free ports",
                                                   help="Port the node listens on for routes.")] = None,
    server_name: Annotated[str | None, typer.Option("--server-name", show_default="<hostname>-<port>",
                                                    help="This node's name in the cluster (unique).")] = None,
    replicas: ReplicasOpt = None,
) -> None:
    """Start nats-server (embedded, JetStream), the registry and the plugins in mesh.toml. Ctrl-C stops all.

    With --nats (or MESH_NATS_URL) it uses that server instead; an explicit --port, --data-dir,
    --tls, --mtls or --secure means the embedded server, and --nats with --port (or --tls) is refused.
    --cluster 3 runs three local nodes; --join makes this machine's node part of a cluster.
    """
    from ._up import Security, Topology, run_up

    _setup_logging()
    mesh_file = file if file.exists() else None
    if mesh_file is None and file != Path("mesh.toml"):
        raise _fail(f"{file}: no such file")
    if nats_url and port is not None:
        raise _fail("--nats uses a running NATS server and --port is for the embedded one: give one or the other")

    def say(line: str) -> None:
        err.print(f"[green]mesh[/green] {escape(line)}", highlight=False)

    security = Security(tls=tls, mtls=mtls, secure=secure)
    try:
        topology = Topology(cluster=cluster, listen=listen, join=tuple(u.strip() for u in (join or "").split(",")
                                                                        if u.strip()),
                            route_port=route_port, name=server_name, replicas=replicas)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    env_url = os.environ.get("MESH_NATS_URL") or None
    embedded = (port is not None or data_dir is not None or security.uses_tls or bool(cluster or join)
                or listen != "127.0.0.1")
    if nats_url is None and env_url and not embedded:
        nats_url = env_url
    elif nats_url is None and env_url:
        say("MESH_NATS_URL is set, but --port/--data-dir/--tls start the embedded nats-server: not using it")
    try:
        code = run_up(nats_url=nats_url, port=4222 if port is None else port,
                      data_dir=(data_dir or Path(".mesh")).resolve(), mesh_file=mesh_file, say=say,
                      prefix=_prefix(prefix) if prefix else None, security=security, topology=topology)
    except KeyboardInterrupt:
        code = 130
    except NatsServerError as exc:
        hint = " (is another mesh running? choose --port, or use it with --nats)" if "in use" in str(exc) else ""
        raise _fail(f"{exc}{hint}") from None
    except PluginError as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def run(
    ref: Annotated[str, typer.Argument(help="module:Class, or an entry-point name in group groundhog.plugins.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="plugin.toml overriding the class's "
                                                "declaration.")] = None,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    heartbeat_interval: Annotated[float, typer.Option(envvar="MESH_HEARTBEAT_INTERVAL", min=0.05,
                                                      help="Seconds between heartbeats.")] = 2.0,
    instance_id: Annotated[str | None, typer.Option("--instance-id", help="Instance id to use (agents set it, "
                                                    "so an instance keeps its id across restarts).")] = None,
    reload: Annotated[bool, typer.Option("--reload", help="Restart the plugin when its source changes "
                                         "(development; state in KV is kept).")] = False,
) -> None:
    """Run one plugin instance in this process, joined to the mesh, until SIGTERM/SIGINT."""
    from ._host import run_plugin

    _setup_logging()
    if reload:
        from ._reload import run_with_reload

        # The URL (which may hold a password) goes to the child in its environment, never on its command line.
        child_args = ["--prefix", _prefix(prefix), "--heartbeat-interval", str(heartbeat_interval)]
        if config:
            child_args += ["--config", str(config)]

        def say(line: str) -> None:
            err.print(f"[green]mesh[/green] {escape(line)}", highlight=False)

        raise typer.Exit(_run(run_with_reload(ref, child_args, config_path=str(config) if config else None,
                                              say=say, instance_id=instance_id, nats_url=nats_url or default_url())))
    if instance_id is not None:
        try:
            validate_name(instance_id, what="instance id")
        except ValueError as exc:
            raise _fail(str(exc)) from None
    code = _run(run_plugin(ref, config_path=str(config) if config else None, nats_url=nats_url,
                           prefix=_prefix(prefix), heartbeat_interval=heartbeat_interval, instance_id=instance_id,
                           ready=ready_event()))
    raise typer.Exit(code)


@app.command()
def registry(
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    missed_beats: Annotated[float, typer.Option(help="Missed heartbeats before an instance is unhealthy.")] = 3,
    expire_after: Annotated[float, typer.Option(help="Seconds of silence before an instance is forgotten.")] = 60,
    replicas: ReplicasOpt = None,
) -> None:
    """Run a registry replica (any number may run; all data lives in JetStream KV)."""
    from . import __version__
    from ._registry import RegistryService
    from ._telemetry import setup_tracing

    _setup_logging()

    async def main() -> int:
        flush_traces = setup_tracing("mesh-registry", version=__version__)  # with OTEL_* set
        with stop_on_signals() as stop:
            nc = await connect(nats_url or default_url(), name="mesh registry", wait=10)
            try:
                async with RegistryService(nc, prefix=_prefix(prefix), missed_beats=missed_beats,
                                           expire_after=expire_after, replicas=replicas) as service:
                    _loop.announce()
                    if await wait_any(stop, service.failed) is service.failed:
                        return 1  # a loop of it died (logged with its traceback): a supervisor restarts it
            finally:
                await close(nc)
                if flush_traces is not None:
                    await asyncio.to_thread(flush_traces)
        return 0

    raise typer.Exit(_run(main()))


# --------------------------------------------------------------------------------------------
# Looking at things

def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@app.command("ls")
def ls(
    name: Annotated[str | None, typer.Argument(help="Only instances of this plugin.")] = None,
    version: Annotated[str | None, typer.Option("--version", help="Only versions in this range, e.g. '>=1.2,<2'.")]
    = None,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List plugin instances: name, version, instance, health, uptime, host."""
    infos = _run(_with_nc(nats_url, lambda nc: PluginRegistry(
        nc, prefix=_prefix(prefix), retry=CLI_RETRY).list_plugins(
        name, version=version)))
    if name and not infos:  # a named plugin with no instance is an error (plain `mesh ls` is not)
        raise _fail(f"no instance of {name!r} is registered" + (f" in version range {version!r}" if version else ""))
    if as_json:
        _print_json([i.model_dump(mode="json") | {"uptime": round(i.uptime, 3)} for i in infos])
        return
    if not infos:
        err.print("no plugin instances registered")
        return
    troubled = any(i.restarts or i.last_error for i in infos)
    table = Table("name", "version", "instance", "health", "uptime", "host", *(
        ("restarts", "last error") if troubled else ()))
    for i in infos:
        extra = (str(i.restarts), escape(i.last_error)) if troubled else ()
        table.add_row(i.name, i.version, i.id, styled_state(i.health.value, i.health_reason), _age(i.uptime),
                      f"{i.host}:{i.pid}", *extra)
    out.print(table)


@app.command()
def versions(
    name: Annotated[str | None, typer.Argument(help="Only this plugin.")] = None,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every version of every plugin the registry has seen."""
    records = _run(_with_nc(nats_url, lambda nc: PluginRegistry(
        nc, prefix=_prefix(prefix), retry=CLI_RETRY).list_versions(name)))
    if as_json:
        _print_json([r.model_dump(mode="json") for r in records])
        return
    table = Table("name", "version", "first seen", "last seen", "instances", "capabilities")
    for r in records:
        table.add_row(r.name, r.version, _when(r.first_seen), _when(r.last_seen), str(r.instances_seen),
                      ", ".join(r.capabilities))
    out.print(table)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------------------------
# Talking to plugins

@app.command()
def send(
    target: Annotated[str, typer.Argument(help="Plugin name (any instance) or name.instance.")],
    payload: Annotated[str | None, typer.Argument(help="JSON payload; '-' reads stdin, @file reads a file.")] = None,
    op: Annotated[str | None, typer.Option("--op", help="Operation (handler) name.")] = None,
    query_: Annotated[bool, typer.Option("--query", help="Send as a query rather than a command.")] = False,
    version: Annotated[str | None, typer.Option("--version", help="Only to an instance whose version is in this "
                                                "range, e.g. '>=1.2,<2'.")] = None,
    timeout: TimeoutOpt = 5.0,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    trace_: Annotated[bool, typer.Option("--trace", help="Send under a new trace; print its id on stderr (and "
                                         "its tree, with --jaeger).")] = False,
    jaeger: Annotated[str | None, typer.Option("--jaeger", envvar="MESH_JAEGER_URL", show_default=False,
                                               help="With --trace: Jaeger query URL to print the tree from "
                                               "(env MESH_JAEGER_URL).")] = None,
) -> None:
    """Send a message to a plugin and print its result as JSON."""
    body = _payload(payload)

    async def main(nc: Any) -> Any:
        messaging = PluginMessaging(nc, prefix=_prefix(prefix), source="cli")
        kind = MessageKind.QUERY if query_ else MessageKind.COMMAND
        return (await messaging.send_message(target, body, timeout=timeout, operation=op, kind=kind,
                                             version=version)).result

    if not trace_:
        _print_json(_run(_with_nc(nats_url, main)))
        return
    with root_span(f"mesh send {target}") as trace_id:
        _print_json(_run(_with_nc(nats_url, main)))
    show_trace(jaeger, trace_id)


@app.command()
def broadcast(
    payload: Annotated[str | None, typer.Argument(help="JSON payload.")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Only instances of this plugin.")] = None,
    op: Annotated[str | None, typer.Option("--op", help="Operation (handler) name.")] = None,
    timeout: TimeoutOpt = 2.0,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send to every live instance and print each reply, and who did not answer."""
    body = _payload(payload)

    async def main(nc: Any) -> Any:
        messaging = PluginMessaging(nc, prefix=_prefix(prefix), source="cli")
        return await messaging.broadcast_message(body, target=to, timeout=timeout, operation=op)

    result = _run(_with_nc(nats_url, main))
    replies = [{"instance": r.source, "result": r.result,
                "error": r.error.model_dump() if r.error else None} for r in result.responses]
    if as_json:
        _print_json({"replies": replies, "missing": result.missing})
        return
    for r in replies:
        _print_json(r)
    if result.missing:
        err.print(f"no reply within {timeout:g}s from: {', '.join(result.missing)}")
    if not result.expected_known:
        err.print("registry unavailable: gathered replies until the timeout")
    err.print(f"{len(replies)} replied, {len(result.missing)} missing")
    if result.missing:
        raise typer.Exit(1)


@app.command()
def events(
    pattern: Annotated[str, typer.Argument(help="Event type or pattern: orders.created, orders.*, orders.>")] = ">",
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Exit after N events.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.001,
                                                  help="Exit (code 1) if no event arrives for this long.")] = None,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Stream events as they happen, one JSON line each."""
    check_pattern(pattern)

    async def main(nc: Any) -> int:
        messaging = PluginMessaging(nc, prefix=_prefix(prefix), source="cli")
        seen = 0
        async with await messaging.subscribe_to_events(pattern) as sub:
            err.print(f"listening for {pattern!r}", highlight=False)
            while count is None or seen < count:
                try:
                    event = await sub.next(timeout=timeout)
                except TimeoutError:
                    raise UserError(f"no event matching {pattern!r} within {timeout:g}s") from None
                _print_json({"type": event.target, "id": event.id, "source": event.source,
                             "payload": event.payload, "metadata": event.metadata})
                seen += 1
        return 0

    raise typer.Exit(_run(_with_nc(nats_url, main)))


def check_pattern(pattern: str) -> None:
    try:
        check_event_type(pattern, pattern=True)
    except ValueError as exc:
        raise _fail(str(exc)) from None


@app.command()
def publish(
    event_type: Annotated[str, typer.Argument(help="Event type, e.g. orders.created.")],
    payload: Annotated[str | None, typer.Argument(help="JSON payload.")] = None,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Publish an event."""
    body = _payload(payload)

    async def main(nc: Any) -> None:
        await PluginMessaging(nc, prefix=_prefix(prefix), source="cli").publish_event(event_type, body)
        await nc.flush()

    _run(_with_nc(nats_url, main))


# --------------------------------------------------------------------------------------------
# State

async def _store(nc: Any, plugin: str, prefix: str | None, *, create: bool = False) -> StateStore:
    try:
        validate_name(plugin)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    bucket = Subjects(_prefix(prefix)).state_bucket(plugin)
    try:
        kv = await open_bucket(nc.jetstream(), bucket, create=create)
    except StateNotFound:
        raise UserError(f"plugin {plugin!r} has no state (no KV bucket {bucket})") from None
    return StateStore(kv, plugin=plugin)


@state_app.command("get")
def state_get(plugin: str, key: str, nats_url: NatsOpt = None, prefix: PrefixOpt = None,
              revision: Annotated[bool, typer.Option("--revision", help="Print {value, revision}.")] = False) -> None:
    """Print the JSON value of KEY in PLUGIN's state."""

    async def main(nc: Any) -> Any:
        entry = await (await _store(nc, plugin, prefix)).get_entry(key)
        if entry is None:
            raise UserError(f"plugin {plugin!r} has no state key {key!r}")
        return {"value": entry.value, "revision": entry.revision} if revision else entry.value

    _print_json(_run(_with_nc(nats_url, main)))


@state_app.command("put")
def state_put(plugin: str, key: str, value: str, nats_url: NatsOpt = None, prefix: PrefixOpt = None) -> None:
    """Set KEY in PLUGIN's state to a JSON VALUE; prints the new revision."""
    body = _payload(value)

    async def main(nc: Any) -> int:
        return await (await _store(nc, plugin, prefix, create=True)).put(key, body)

    _print_json({"revision": _run(_with_nc(nats_url, main))})


@state_app.command("delete")
def state_delete(plugin: str, key: str, nats_url: NatsOpt = None, prefix: PrefixOpt = None) -> None:
    """Delete KEY from PLUGIN's state."""

    async def main(nc: Any) -> None:
        await (await _store(nc, plugin, prefix)).delete(key)

    _run(_with_nc(nats_url, main))


@state_app.command("keys")
def state_keys(plugin: str, nats_url: NatsOpt = None, prefix: PrefixOpt = None) -> None:
    """List the keys of PLUGIN's state."""

    async def main(nc: Any) -> list[str]:
        return await (await _store(nc, plugin, prefix)).keys()

    _print_json(_run(_with_nc(nats_url, main)))


app.command("trace")(trace_cmd)

# The agent commands and stats/top live in their own modules; importing them registers them on ``app``.
from . import _cli_agents, _cli_keys, _cli_observe  # noqa: E402, F401


def main() -> None:
    app()


__all__ = ["app", "main"]

