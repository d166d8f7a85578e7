"""``mesh stats`` and ``mesh top``: every instance's metrics, once or live."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ._cli_common import (
    JsonOpt,
    NatsOpt,
    PrefixOpt,
    _fail,
    _prefix,
    _print_json,
    _run,
    _with_nc,
    app,
    err,
    out,
    styled_state,
)
from ._observe import InstanceMetrics, Rates, collect


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _mb(value: Any) -> str:
    return f"{value / 2**20:.0f}M" if isinstance(value, int | float) and value >= 0 else "-"


def _health(row: InstanceMetrics) -> str:
    health = str(row.figure("health", default=row.info.health.value))
    reason = row.figure("health_reason", default=row.info.health_reason) or ""
    return styled_state(health, str(reason))


def _pct(value: Any) -> str:
    return f"{value:.0f}%" if isinstance(value, int | float) else "-"


def stats_table(rows: list[InstanceMetrics]) -> Table:
    table = Table("instance", "version", "health", "msgs", "errors", "err %", "p50 ms", "p95 ms", "p99 ms",
                  "inflight", "cpu", "rss", "fds", "restarts", "load s")
    for r in rows:
        if r.metrics is None:
            table.add_row(r.info.id, r.info.version, _health(r), *["-"] * 11, style="dim")
            continue
        m = r.metrics
        res = m.get("resources", {})
        load = m.get("load_time_s")
        table.add_row(r.info.id, r.info.version, _health(r), str(m.get("messages", 0)), str(m.get("errors", 0)),
                      f"{100 * m.get('error_rate', 0):.1f}", _ms(r.latency_ms("p50")), _ms(r.latency_ms("p95")),
                      _ms(r.latency_ms("p99")), str(m.get("inflight", 0)), _pct(res.get("cpu_percent")),
                      _mb(res.get("rss_bytes")), str(res.get("open_fds", "-")), str(m.get("restarts", 0)),
                      f"{load:.2f}" if isinstance(load, int | float) else "-")
    return table


def kinds_table(row: InstanceMetrics) -> Table:
    table = Table("kind", "count", "errors", "mean ms", "p50 ms", "p95 ms", "p99 ms", "max ms",
                  title=f"{row.info.id} by message kind", title_justify="left")
    for kind, k in sorted((row.figure("kinds", default={}) or {}).items()):
        lat = k["latency_ms"]
        table.add_row(kind, str(k["count"]), str(k["errors"]), *(_ms(lat[q]) for q in ("mean", "p50", "p95",
                                                                                      "p99", "max")))
    return table


@app.command()
def stats(
    name: Annotated[str | None, typer.Argument(help="Only instances of this plugin (then also per message kind).")]
    = None,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each instance.")] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Metrics of every instance: messages, errors, latency p50/p95/p99, in-flight, CPU, memory, fds,
    restarts, load time (``<prefix>.control.<instance>.metrics``)."""
    rows = _run(_with_nc(nats_url, lambda nc: collect(nc, prefix=_prefix(prefix), name=name, timeout=timeout)))
    if name and not rows:  # said once, as `mesh ls NAME` says it
        raise _fail(f"no instance of {name!r} is registered")
    if as_json:
        _print_json([r.as_json() for r in rows])
    elif not rows:
        err.print("no plugin instances registered")
    else:
        out.print(stats_table(rows))
        if name:
            for r in rows:
                if r.metrics is not None:
                    out.print(kinds_table(r))
        for r in rows:
            if r.error:
                err.print(f"[yellow]{r.info.id}[/yellow]: no metrics ({escape(r.error)})")


def top_view(rows: list[InstanceMetrics], interval: float) -> Group:
    table = Table("instance", "version", "health", "msgs/s", "errors/s", "p50 ms", "p99 ms", "inflight", "cpu",
                  "rss", "restarts", expand=False)
    total = 0.0
    for r in rows:
        if r.metrics is None:
            table.add_row(r.info.id, r.info.version, _health(r), *["-"] * 8, style="dim")
            continue
        rate, errs = r.rates.get("messages"), r.rates.get("errors")
        total += rate or 0.0
        res = r.metrics.get("resources", {})
        table.add_row(r.info.id, r.info.version, _health(r), "-" if rate is None else f"{rate:.1f}",
                      "-" if errs is None else f"{errs:.1f}", _ms(r.latency_ms("p50", recent=True)),
                      _ms(r.latency_ms("p99", recent=True)), str(r.metrics.get("inflight", 0)),
                      _pct(res.get("cpu_percent")), _mb(res.get("rss_bytes")), str(r.metrics.get("restarts", 0)))
    head = Text(f"mesh top  {time.strftime('%H:%M:%S')}  {len(rows)} instance(s)  {total:.1f} msgs/s  "
                f"(latency over the last 10-20 s; every {interval:g}s; Ctrl-C to quit)", style="bold")
    return Group(head, table)


@app.command()
def top(
    name: Annotated[str | None, typer.Argument(help="Only instances of this plugin.")] = None,
    nats_url: NatsOpt = None,
    prefix: PrefixOpt = None,
    interval: Annotated[float, typer.Option("--interval", "-n", min=0.1, help="Seconds between refreshes.")] = 1.0,
    iterations: Annotated[int, typer.Option("--iterations", min=0, help="Stop after this many refreshes "
                                            "(0: until Ctrl-C).")] = 0,
) -> None:
    """A live view of every instance: health, msgs/s, p50/p99, errors, CPU, memory; refreshed each second."""

    async def main(nc: Any) -> None:
        rates = Rates()
        with Live(console=out, auto_refresh=False, transient=False) as live:
            done = 0
            while True:
                started = time.monotonic()
                rows = await collect(nc, prefix=_prefix(prefix), name=name, timeout=min(interval, 2.0))
                rates.update(rows, time.monotonic())
                live.update(top_view(rows, interval), refresh=True)
                done += 1
                if iterations and done >= iterations:
                    return
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    _run(_with_nc(nats_url, main))
