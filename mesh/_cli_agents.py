"""``mesh agent`` and the commands that talk to agents: load, unload, reload, agents, plugins, new."""


from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import nats.errors
import typer
from rich.markup import escape
from rich.table import Table

from plugin_sdk import (
    ConnectionFailed,
    Health,
    PayloadTooLarge,
    PluginError,
    PluginInfo,
    PluginNotFound,
    PluginRegistry,
)
from plugin_sdk.host import Subjects, redact

from . import _loop
from ._cli_common import (
    CLI_RETRY,
    AgentTimeout,
    JsonOpt,
    NatsOpt,
    OnOpt,
    PrefixOpt,
    ReplicasOpt,
    UserError,
    _fail,
    _prefix,
    _print_json,
    _run,
    _setup_logging,
    _with_nc,
    app,
    err,
    out,
    styled_state,
)
from ._cli_keys import TrustDirOpt
from ._connect import close, connect, default_url
from ._service import stop_on_signals


@app.command()
def agent(
    name: Annotated[str | None, typer.Option("--name", help="Agent name (default: the hostname).")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Plugins to run at start (mesh.toml).")] = None,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    data_dir: Annotated[Path, typer.Option(help="Where the agent keeps configs sent to it.")] = Path(".mesh/agent"),
    restart_limit: Annotated[int, typer.Option(min=0, help="Restarts allowed within --restart-window.")] = 5,
    restart_window: Annotated[float, typer.Option(min=0.1, help="Seconds over which restarts count.")] = 60.0,
    heartbeat_interval: Annotated[float | None, typer.Option(envvar="MESH_HEARTBEAT_INTERVAL", min=0.05,
                                                             help="Heartbeat interval of the plugins it runs "
                                                             "(default: the file's, else 2).")] = None,
    unresponsive_after: Annotated[float | None, typer.Option(
        min=0.1, show_default=False, help="Kill and restart a running plugin host whose heartbeats stopped this "
        "many seconds ago (default: 5 heartbeat intervals, at least 10).")] = None,
    require_signatures: Annotated[bool, typer.Option(
        "--require-signatures", help="Refuse plugin packages not signed by a key of --trust-dir (a signed one "
        "is always verified; without this an unsigned one is loaded with a warning).")] = False,
    trust_dir: TrustDirOpt = None,
    auth_dir: Annotated[Path | None, typer.Option(
        "--auth-dir", envvar="MESH_AUTH_DIR", show_default=False,
        help="The auth store of a --secure mesh (<data dir>/auth of its mesh up): give each plugin instance its "
        "own NATS identity, minted with the account signing key kept there.")] = None,
    replicas: ReplicasOpt = None,
) -> None:
    """Run this machine's agent: supervises plugin hosts, takes load/unload/reload over NATS."""
    from . import __version__
    from ._agent import Agent
    from ._auth import AuthStore
    from ._telemetry import setup_tracing
    from ._up import MeshFile, load_mesh_file, plan, start_in_order, stop_in_reverse

    _setup_logging()

    def say(line: str) -> None:
        err.print(f"[green]agent[/green] {line}", highlight=False)

    async def main() -> int:
        with stop_on_signals() as stop:
            return await serve(stop)

    async def serve(stop: asyncio.Event) -> int:
        mesh = load_mesh_file(file) if file else MeshFile()
        base = (file.parent if file else Path.cwd()).resolve()
        levels = plan(mesh, base_dir=base, source=str(file), trust_dir=trust_dir,  # cycles refused before starting
                      require_signatures=require_signatures) if file else []
        url = nats_url or default_url()
        auth = AuthStore(auth_dir, create=False) if auth_dir else None
        flush_traces = setup_tracing("mesh-agent", version=__version__, instance_id=name or "")  # with OTEL_* set
        try:
            nc = await connect(url, name="mesh agent", wait=10)
        except ConnectionFailed as exc:  # its message names the URL: not the password in it
            raise ConnectionFailed(redact(str(exc)), plugin=exc.plugin) from None
        try:
            # Precedence, as in `mesh up`: option, then environment, then the file, then the default.
            chosen_prefix = prefix or os.environ.get("MESH_PREFIX") or mesh.mesh.prefix
            async with Agent(nc, nats_url=url, name=name, prefix=_prefix(chosen_prefix),
                             data_dir=data_dir.resolve(), restart_limit=restart_limit, restart_window=restart_window,
                             heartbeat_interval=heartbeat_interval or mesh.mesh.heartbeat_interval or 2.0,
                             cwd=base, unresponsive_after=unresponsive_after, trust_dir=trust_dir,
                             require_signatures=require_signatures or auth is not None, auth=auth,
                             replicas=replicas) as ag:
                _loop.announce()
                started = await start_in_order(ag, levels, base_dir=base, say=say)
                say(f"{ag.name} ready")
                await stop.wait()
                await stop_in_reverse(ag, started)
        finally:
            await close(nc)
            if flush_traces is not None:
                await asyncio.to_thread(flush_traces)
        return 0

    raise typer.Exit(_run(main()))


async def _agents(nc: Any, prefix: str, *, timeout: float = 0.5) -> list[dict[str, Any]]:
    """Every agent's answer to <prefix>.agents.list within ``timeout``."""
    from plugin_sdk.host import is_no_responders, response_from_msg

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: list[dict[str, Any]] = []
    try:
        await nc.publish(Subjects(prefix).agents_list, b"", reply=inbox)
        deadline = asyncio.get_running_loop().time() + timeout
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                break
            if is_no_responders(msg):
                break  # no agent is running
            found.append(response_from_msg(msg).raise_for_error().result)
    finally:
        await sub.unsubscribe()
    return sorted(found, key=lambda a: str(a.get("agent")))


async def _agent_call(nc: Any, prefix: str, agent_name: str, verb: str, body: Any, timeout: float) -> Any:
    from plugin_sdk.host import dumps, request, response_from_msg

    subject = Subjects(prefix).agent(agent_name, verb)
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


async def _on_agents_running(nc: Any, prefix: str, on: str | None, match: Callable[[dict[str, Any]], bool],
                             verb: str, body: Any, timeout: float, *, what: str) -> list[Any]:
    """Send ``verb`` to agent ``on``, or to every agent running an instance that ``match``es."""
    names = [on] if on else [str(a["agent"]) for a in await _agents(nc, prefix) if any(map(match, a["plugins"]))]
    if not names:
        raise UserError(f"no agent runs {what}")
    return [await _agent_call(nc, prefix, n, verb, body, timeout) for n in names]




def _package_request(arg: str) -> tuple[dict[str, Any], int]:
    """The load request's package fields for the directory or wheel ``arg``, and the zip's size."""
    from ._signing import pack, read_package

    try:
        pkg = read_package(Path(arg))
    except PluginError as exc:
        raise _fail(escape(f"{type(exc).__name__}: {exc}")) from None
    except ValueError as exc:
        raise _fail(escape(str(exc))) from None
    data = pack(pkg)
    return {"package": base64.b64encode(data).decode(), "package_kind": pkg.kind, "package_name": arg,
            "signature": pkg.signature}, len(data)


@app.command()
def load(
    ref: Annotated[str, typer.Argument(help="module:Class or an entry-point name, importable on the agent; or a "
                                       "plugin package (a directory holding plugin.toml, or a .whl), sent to the "
                                       "agent, which verifies it and runs its own copy.")],
    on: OnOpt = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="plugin.toml (sent to the agent).")] = None,
    instances: Annotated[int, typer.Option(min=1, max=100, help="How many instances.")] = 1,
    wait: Annotated[bool, typer.Option(help="Wait until every new instance is healthy.")] = True,
    timeout: AgentTimeout = 30.0,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Start a plugin on an agent (any machine), supervised."""
    from ._signing import looks_like_package

    package: dict[str, Any] | None = None
    zipped = 0
    if looks_like_package(ref):
        if config is not None:
            raise _fail("--config goes with a REF: a package brings its own plugin.toml")
        package, zipped = _package_request(ref)
    try:
        config_toml = config.read_text(encoding="utf-8") if config else None
    except OSError as exc:
        raise _fail(f"cannot read {config}: {exc.strerror}") from None

    async def main(nc: Any) -> Any:
        p = _prefix(prefix)
        agent_name = await _choose_agent(nc, p, on)
        body = ({"ref": ref, "config_toml": config_toml, "config_name": str(config or "")} if package is None
                else package) | {"instances": instances}
        try:
            result = await _agent_call(nc, p, agent_name, "load", body, timeout)
        except PayloadTooLarge:
            if package is None:
                raise
            raise UserError(f"package {ref} is too large to send: {zipped} bytes zipped, "
                            f"{len(package['package'])} as base64 in the request, over the NATS server's "
                            f"max_payload of {nc.max_payload} bytes (headers included); leave out what the plugin "
                            "does not need to run (tests, data), or raise max_payload") from None
        if package is not None and not (result.get("package") or {}).get("signed_by"):
            err.print(f"warning: {escape(ref)} is not signed; agent {escape(agent_name)} loaded it because it does "
                      "not require signatures (mesh sign it)", highlight=False)
        if wait:
            await _wait_healthy(PluginRegistry(nc, prefix=p, retry=CLI_RETRY), result["instances"], timeout,
                                what=f"{ref} on {agent_name}")
        return result

    _print_json(_run(_with_nc(nats_url, main)))


async def _wait_healthy(registry: PluginRegistry, instances: list[str], timeout: float, *, what: str) -> None:
    """Until every instance serves; the status line, and the error at the timeout, say where each one is."""
    from ._agent import describe_health

    deadline = asyncio.get_running_loop().time() + timeout
    last: dict[str, PluginInfo | None] = dict.fromkeys(instances)

    def where() -> str:
        return ", ".join(f"{ident} ({describe_health(last[ident])})" for ident in sorted(last))

    with err.status(f"waiting for {len(last)} instance(s) of {what}") as status:
        while last:
            for ident in list(last):
                info = last[ident] = await registry.get_plugin(ident)
                if info is not None and info.health.serving:
                    del last[ident]
                elif info is not None and info.health == Health.FAILED:
                    raise UserError(f"{ident} failed: {info.last_error}")
            if last and asyncio.get_running_loop().time() > deadline:
                raise UserError(f"not healthy within {timeout:g}s: {where()} (see the agent's log)")
            if last:
                status.update(f"waiting for {len(last)} instance(s) of {what}: {where()}")
                await asyncio.sleep(0.1)


@app.command()
def unload(
    target: Annotated[str, typer.Argument(help="Plugin name (all its instances) or one instance id.")],
    on: OnOpt = None,
    timeout: AgentTimeout = 30.0,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Stop a plugin's instances (drain, stop, cleanup, unregister) wherever agents run them."""

    _print_json(_run(_with_nc(nats_url, lambda nc: _on_agents_running(
        nc, _prefix(prefix), on, lambda x: target in (x["id"], x["name"]), "unload", {"target": target}, timeout,
        what=f"a plugin or instance {target!r}"))))


@app.command()
def reload(
    name: Annotated[str, typer.Argument(help="Plugin name: each instance is replaced by one running new code.")],
    on: OnOpt = None,
    timeout: AgentTimeout = 600.0,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Rolling reload: start a new instance, wait until healthy, then drain and stop the old one."""

    _print_json(_run(_with_nc(nats_url, lambda nc: _on_agents_running(
        nc, _prefix(prefix), on, lambda x: x["name"] == name, "reload", {"name": name}, timeout,
        what=f"a plugin {name!r}"))))


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
            table.add_row(a["agent"], a["host"], x["id"], x["ref"], styled_state(x["state"]), str(x["restarts"]),
                          escape(x["last_error"]))
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


