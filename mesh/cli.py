"""The ``mesh`` command line. Thin: parse, call the library, print.

User errors print one line on stderr (``error: <what>``) and exit 1; no traceback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
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
from rich.table import Table

from plugin_sdk import (
    Health,
    MessageKind,
    PluginError,
    PluginMessaging,
    PluginNotFound,
    PluginRegistry,
    StateStore,
)
from plugin_sdk._config import validate_name
from plugin_sdk._natsd import NatsServerError
from plugin_sdk._state import open_bucket
from plugin_sdk._wire import Subjects, check_event_type

from ._connect import DEFAULT_URL, close, connect, default_prefix, default_url

T = TypeVar("T")

app = typer.Typer(name="mesh", help="groundhog: a distributed plugin mesh over NATS.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
state_app = typer.Typer(help="Read and write a plugin's persisted state (JetStream KV).", no_args_is_help=True)
app.add_typer(state_app, name="state")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

NatsOpt = Annotated[str | None, typer.Option("--nats", help=f"NATS URL (env MESH_NATS_URL; default {DEFAULT_URL}).",
                                             show_default=False)]
PrefixOpt = Annotated[str | None, typer.Option("--prefix", help="Subject prefix of the mesh (env MESH_PREFIX; "
                                               "default mesh).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds to wait for replies.")]


class UserError(Exception):
    """A mistake in what the user typed; printed as one line."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    return typer.Exit(code)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning every expected failure into one clear line."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except PluginError as exc:
        where = f" (plugin {exc.plugin})" if exc.plugin and exc.plugin not in str(exc) else ""
        raise _fail(f"{type(exc).__name__}: {exc}{where}") from None
    except (UserError, NatsServerError, ValueError) as exc:
        raise _fail(str(exc)) from None
    except nats.errors.Error as exc:
        raise _fail(f"NATS: {type(exc).__name__}: {exc}") from None


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


def _setup_logging() -> None:
    level = os.environ.get("MESH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _prefix(p: str | None) -> str:
    prefix = p or default_prefix()
    Subjects(prefix)  # validates
    return prefix


# --------------------------------------------------------------------------------------------
# Running things

@app.command()
def up(
    nats_url: Annotated[str | None, typer.Option("--nats", envvar="MESH_NATS_URL",
                                                 help="Use this NATS server instead of starting one.")] = None,
    port: Annotated[int, typer.Option(help="Port of the embedded nats-server.")] = 4222,
    data_dir: Annotated[Path, typer.Option(help="JetStream storage of the embedded server.")] = Path(".mesh"),
    file: Annotated[Path, typer.Option("--file", "-f", help="Plugins to run.")] = Path("mesh.toml"),
    prefix: Annotated[str | None, typer.Option("--prefix", envvar="MESH_PREFIX", show_default=False,
                                               help="Subject prefix (default: mesh.toml's, else mesh).")] = None,
) -> None:
    """Start nats-server (embedded, JetStream), the registry and the plugins in mesh.toml. Ctrl-C stops all."""
    from ._up import run_up

    _setup_logging()
    mesh_file = file if file.exists() else None
    if mesh_file is None and file != Path("mesh.toml"):
        raise _fail(f"{file}: no such file")

    def say(line: str) -> None:
        err.print(f"[green]mesh[/green] {line}", highlight=False)

    try:
        code = run_up(nats_url=nats_url, port=port, data_dir=data_dir.resolve(), mesh_file=mesh_file, say=say,
                      prefix=_prefix(prefix) if prefix else None)
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

        child_args = ["--nats", nats_url or default_url(), "--prefix", _prefix(prefix),
                      "--heartbeat-interval", str(heartbeat_interval)]
        if config:
            child_args += ["--config", str(config)]

        def say(line: str) -> None:
            err.print(f"[green]mesh[/green] {line}", highlight=False)

        raise typer.Exit(_run(run_with_reload(ref, child_args, config_path=str(config) if config else None,
                                              say=say)))
    if instance_id is not None:
        try:
            validate_name(instance_id, what="instance id")
        except ValueError as exc:
            raise _fail(str(exc)) from None
    code = _run(run_plugin(ref, config_path=str(config) if config else None, nats_url=nats_url,
                           prefix=_prefix(prefix), heartbeat_interval=heartbeat_interval, instance_id=instance_id))
    raise typer.Exit(code)


@app.command()
def registry(
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    missed_beats: Annotated[float, typer.Option(help="Missed heartbeats before an instance is unhealthy.")] = 3,
    expire_after: Annotated[float, typer.Option(help="Seconds of silence before an instance is forgotten.")] = 60,
) -> None:
    """Run a registry replica (any number may run; all data lives in JetStream KV)."""
    from ._registry import RegistryService

    _setup_logging()

    async def main() -> int:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        nc = await connect(nats_url or default_url(), name="mesh registry", wait=10)
        try:
            async with RegistryService(nc, prefix=_prefix(prefix), missed_beats=missed_beats,
                                       expire_after=expire_after):
                await stop.wait()
        finally:
            await close(nc)
        return 0

    raise typer.Exit(_run(main()))


@app.command()
def agent(
    name: Annotated[str | None, typer.Option("--name", help="Agent name (default: the hostname).")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Plugins to run at start (mesh.toml).")] = None,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    data_dir: Annotated[Path, typer.Option(help="Where the agent keeps configs sent to it.")] = Path(".mesh/agent"),
    restart_limit: Annotated[int, typer.Option(min=0, help="Restarts allowed within --restart-window.")] = 5,
    restart_window: Annotated[float, typer.Option(min=0.1, help="Seconds over which restarts count.")] = 60.0,
    heartbeat_interval: Annotated[float, typer.Option(envvar="MESH_HEARTBEAT_INTERVAL", min=0.05,
                                                      help="Heartbeat interval of the plugins it runs.")] = 2.0,
) -> None:
    """Run this machine's agent: supervises plugin hosts, takes load/unload/reload over NATS."""
    from ._agent import Agent
    from ._up import MeshFile, load_mesh_file, plan, start_in_order, stop_in_reverse

    _setup_logging()

    def say(line: str) -> None:
        err.print(f"[green]agent[/green] {line}", highlight=False)

    async def main() -> int:
        import signal

        mesh = load_mesh_file(file) if file else MeshFile()
        base = (file.parent if file else Path.cwd()).resolve()
        levels = plan(mesh, base_dir=base, source=str(file)) if file else []  # cycles refused before starting
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        url = nats_url or default_url()
        nc = await connect(url, name="mesh agent", wait=10)
        try:
            async with Agent(nc, nats_url=url, name=name, prefix=_prefix(prefix or mesh.mesh.prefix),
                             data_dir=data_dir.resolve(), restart_limit=restart_limit, restart_window=restart_window,
                             heartbeat_interval=mesh.mesh.heartbeat_interval or heartbeat_interval, cwd=base) as ag:
                started = await start_in_order(ag, levels, base_dir=base, say=say)
                say(f"{ag.name} ready")
                await stop.wait()
                await stop_in_reverse(ag, started)
        finally:
            await close(nc)
        return 0

    raise typer.Exit(_run(main()))


async def _agents(nc: Any, prefix: str, *, timeout: float = 0.5) -> list[dict[str, Any]]:
    """Every agent's answer to <prefix>.agents.list within ``timeout``."""
    from plugin_sdk._wire import response_from_msg

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: list[dict[str, Any]] = []
    try:
        await nc.publish(f"{prefix}.agents.list", b"", reply=inbox)
        deadline = asyncio.get_running_loop().time() + timeout
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                break
            if not msg.data and msg.headers and msg.headers.get("Status") == "503":
                break  # the server's "no responders": no agent is running
            found.append(response_from_msg(msg).raise_for_error().result)
    finally:
        await sub.unsubscribe()
    return sorted(found, key=lambda a: str(a.get("agent")))


async def _agent_call(nc: Any, prefix: str, agent_name: str, verb: str, body: Any, timeout: float) -> Any:
    from plugin_sdk._wire import dumps, request, response_from_msg

    subject = f"{prefix}.agent.{agent_name}.{verb}"
    try:
        msg = await request(nc, subject, dumps(body), headers=None, timeout=timeout, plugin=f"agent {agent_name}")
    except PluginNotFound:
        raise UserError(f"no agent named {agent_name!r} is running (mesh agents lists them)") from None
    return response_from_msg(msg).raise_for_error().result


async def _choose_agent(nc: Any, prefix: str, on: str | None) -> str:
    if on:
        return on
    names = [str(a["agent"]) for a in await _agents(nc, prefix)]
    if len(names) == 1:
        return names[0]
    if not names:
        raise UserError("no agent is running (start `mesh up` or `mesh agent`)")
    raise UserError(f"several agents are running ({', '.join(names)}): choose one with --on")


OnOpt = Annotated[str | None, typer.Option("--on", help="Agent to act on (default: the only one running).")]
AgentTimeout = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the agent.")]


@app.command()
def load(
    ref: Annotated[str, typer.Argument(help="module:Class or an entry-point name, importable on the agent.")],
    on: OnOpt = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="plugin.toml (sent to the agent).")] = None,
    instances: Annotated[int, typer.Option(min=1, max=100, help="How many instances.")] = 1,
    wait: Annotated[bool, typer.Option(help="Wait until every new instance is healthy.")] = True,
    timeout: AgentTimeout = 30.0,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Start a plugin on an agent (any machine), supervised."""
    try:
        config_toml = config.read_text(encoding="utf-8") if config else None
    except OSError as exc:
        raise _fail(f"cannot read {config}: {exc.strerror}") from None

    async def main(nc: Any) -> Any:
        p = _prefix(prefix)
        agent_name = await _choose_agent(nc, p, on)
        result = await _agent_call(nc, p, agent_name, "load",
                                   {"ref": ref, "config_toml": config_toml, "config_name": str(config or ""),
                                    "instances": instances}, timeout)
        if wait:
            registry = PluginRegistry(nc, prefix=p)
            deadline = asyncio.get_running_loop().time() + timeout
            pending = set(result["instances"])
            with err.status(f"waiting for {len(pending)} instance(s) of {ref} on {agent_name}"):
                while pending:
                    for ident in list(pending):
                        info = await registry.get_plugin(ident)
                        if info is not None and info.health == Health.HEALTHY:
                            pending.discard(ident)
                        elif info is not None and info.health == Health.FAILED:
                            raise UserError(f"{ident} failed: {info.last_error}")
                    if pending and asyncio.get_running_loop().time() > deadline:
                        raise UserError(f"not healthy within {timeout:g}s: {', '.join(sorted(pending))} "
                                        f"(see the agent's log)")
                    if pending:
                        await asyncio.sleep(0.1)
        return result

    _print_json(_run(_with_nc(nats_url, main)))


@app.command()
def unload(
    target: Annotated[str, typer.Argument(help="Plugin name (all its instances) or one instance id.")],
    on: OnOpt = None,
    timeout: AgentTimeout = 30.0,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Stop a plugin's instances (drain, stop, cleanup, unregister) wherever agents run them."""

    async def main(nc: Any) -> Any:
        p = _prefix(prefix)
        names = [on] if on else [str(a["agent"]) for a in await _agents(nc, p)
                                 if any(target in (x["id"], x["name"]) for x in a["plugins"])]
        if not names:
            raise UserError(f"no agent runs a plugin or instance {target!r}")
        return [await _agent_call(nc, p, n, "unload", {"target": target}, timeout) for n in names]

    _print_json(_run(_with_nc(nats_url, main)))


@app.command()
def reload(
    name: Annotated[str, typer.Argument(help="Plugin name: each instance is replaced by one running new code.")],
    on: OnOpt = None,
    timeout: AgentTimeout = 600.0,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Rolling reload: start a new instance, wait until healthy, then drain and stop the old one."""

    async def main(nc: Any) -> Any:
        p = _prefix(prefix)
        names = [on] if on else [str(a["agent"]) for a in await _agents(nc, p)
                                 if any(x["name"] == name for x in a["plugins"])]
        if not names:
            raise UserError(f"no agent runs a plugin {name!r}")
        return [await _agent_call(nc, p, n, "reload", {"name": name}, timeout) for n in names]

    _print_json(_run(_with_nc(nats_url, main)))


@app.command()
def agents(
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.05, help="Seconds to gather answers.")] = 0.5,
) -> None:
    """List the running agents and the plugin instances each supervises."""
    found = _run(_with_nc(nats_url, lambda nc: _agents(nc, _prefix(prefix), timeout=timeout)))
    if as_json:
        _print_json(found)
        return
    if not found:
        err.print("no agent answered")
        return
    table = Table("agent", "host", "instance", "plugin", "state", "restarts", "last error")
    for a in found:
        if not a["plugins"]:
            table.add_row(a["agent"], a["host"], "-", "-", "-", "-", "")
        for x in a["plugins"]:
            table.add_row(a["agent"], a["host"], x["id"], x["ref"], x["state"], str(x["restarts"]), x["last_error"])
    out.print(table)


@app.command()
def plugins(as_json: JsonOpt = False) -> None:
    """The plugins this machine can load: entry points in group groundhog.plugins, with versions."""
    from ._host import installed_plugins

    rows = installed_plugins()
    if as_json:
        _print_json(rows)
        return
    if not rows:
        err.print("no plugins installed (entry-point group groundhog.plugins)")
        return
    table = Table("name", "ref", "distribution", "version")
    for r in rows:
        table.add_row(r["name"], r["ref"], r["distribution"], r["version"])
    out.print(table)


new_app = typer.Typer(help="Create things from templates.", no_args_is_help=True)
app.add_typer(new_app, name="new")


@new_app.command("plugin")
def new_plugin(
    name: Annotated[str, typer.Argument(help="Plugin name: lowercase letters, digits, '-' and '_'.")],
    directory: Annotated[Path | None, typer.Option("--dir", help="Where to write it (default: ./NAME).")] = None,
) -> None:
    """Scaffold a plugin package: pyproject with the entry point, the class, plugin.toml and a test."""
    from ._scaffold import scaffold_plugin

    target = directory or Path(name)
    try:
        written = scaffold_plugin(name, target)
    except (ValueError, FileExistsError) as exc:
        raise _fail(str(exc)) from None
    for path in written:
        err.print(f"  wrote {path}", highlight=False)
    err.print(f"next: cd {target} && pip install -e '.[test]' && python -m pytest", markup=False, highlight=False)


# --------------------------------------------------------------------------------------------
# Looking at things

def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


_HEALTH_STYLE = {Health.HEALTHY: "green", Health.UNHEALTHY: "red", Health.STARTING: "yellow",
                 Health.STOPPING: "yellow", Health.FAILED: "red"}


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
    infos = _run(_with_nc(nats_url, lambda nc: PluginRegistry(nc, prefix=_prefix(prefix)).list_plugins(
        name, version=version)))
    if as_json:
        _print_json([i.model_dump(mode="json") | {"uptime": round(i.uptime, 3)} for i in infos])
        return
    if not infos:
        err.print("no plugin instances registered" + (f" named {name!r}" if name else ""))
        return
    troubled = any(i.restarts or i.last_error for i in infos)
    table = Table("name", "version", "instance", "health", "uptime", "host", *(
        ("restarts", "last error") if troubled else ()))
    for i in infos:
        style = _HEALTH_STYLE.get(i.health, "")
        extra = (str(i.restarts), i.last_error) if troubled else ()
        table.add_row(i.name, i.version, i.id, f"[{style}]{i.health.value}[/{style}]", _age(i.uptime),
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
    records = _run(_with_nc(nats_url, lambda nc: PluginRegistry(nc, prefix=_prefix(prefix)).list_versions(name)))
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
) -> None:
    """Send a message to a plugin and print its result as JSON."""
    body = _payload(payload)

    async def main(nc: Any) -> Any:
        messaging = PluginMessaging(nc, prefix=_prefix(prefix), source="cli")
        kind = MessageKind.QUERY if query_ else MessageKind.COMMAND
        return (await messaging.send_message(target, body, timeout=timeout, operation=op, kind=kind,
                                             version=version)).result

    _print_json(_run(_with_nc(nats_url, main)))


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
    import nats.js.errors

    try:
        validate_name(plugin)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    bucket = Subjects(_prefix(prefix)).state_bucket(plugin)
    try:
        kv = await open_bucket(nc.jetstream(), bucket, create=create)
    except nats.js.errors.BucketNotFoundError:
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


def main() -> None:
    app()


__all__ = ["app", "main"]
