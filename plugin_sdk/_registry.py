"""``PluginRegistry``: the client of the registry service (``mesh registry``)."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from pydantic import BaseModel, Field, TypeAdapter

from . import _tracing
from ._durable import Retry, transient
from ._errors import InvalidMessage, PluginNotFound, RequestTimeout, StateTimeout, StateUnavailable
from ._message import PluginInfo
from ._wire import Subjects, dumps, publish, request, response_from_msg

__all__ = ["PluginRegistry", "VersionRecord"]


class VersionRecord(BaseModel):
    """One version of a plugin the registry has seen, and when."""

    name: str
    version: str
    first_seen: float
    last_seen: float
    capabilities: list[str] = Field(default_factory=list)
    instances_seen: int = 0


_INFOS = TypeAdapter(list[PluginInfo])
_VERSIONS = TypeAdapter(list[VersionRecord])


class PluginRegistry:
    """Register, unregister, look up and list plugin instances through the registry service.

    Every call is a NATS request to ``<prefix>.registry.<verb>``, answered by any registry
    replica; failures raise typed errors (``PluginNotFound`` when no registry runs,
    ``RequestTimeout``). What may pass by itself (no registry answering while one fails over, a
    timeout, the registry's bucket electing a leader) is retried for ``retry.within`` seconds
    (default 20, env ``MESH_RETRY_FOR``); every call is idempotent, so a retry is safe.
    With tracing on, each call but the heartbeat is a PRODUCER span
    (``send <prefix>.registry.<verb>``) whose ``traceparent`` the registry continues.
    """

    def __init__(self, nc: NATS, *, prefix: str = "mesh", timeout: float = 2.0, retry: Retry | None = None) -> None:
        self._nc = nc
        self._subjects = Subjects(prefix)
        self._timeout = timeout
        self._retry = retry or Retry.from_env()

    def with_retry(self, retry: Retry) -> PluginRegistry:
        """This client, retrying per ``retry`` instead."""
        return PluginRegistry(self._nc, prefix=self._subjects.prefix, timeout=self._timeout, retry=retry)

    def without_retries(self) -> PluginRegistry:
        """This client, answering at once instead of retrying (for look-ups that are only a hint)."""
        return self.with_retry(Retry(within=0))

    async def _call(self, verb: str, body: Any, *, timeout: float | None = None, instance: str | None = None) -> Any:
        return await self._retry.run(lambda n: self._call_once(verb, body, timeout=timeout, instance=instance),
                                     what=f"registry {verb}", retry_on=_passing)

    async def _call_once(self, verb: str, body: Any, *, timeout: float | None, instance: str | None) -> Any:
        subject = self._subjects.registry_own(verb, instance) if instance else self._subjects.registry(verb)
        if not _tracing.enabled():  # the fast path: no span, no context to carry
            return await self._request(subject, body, timeout, None)
        # The span is named after the verb's subject, not the instance's (span names stay few).
        with _tracing.produce(self._subjects.registry(verb), attributes={"mesh.registry.verb": verb}) as carrier:
            return await self._request(subject, body, timeout, carrier)

    async def _request(self, subject: str, body: Any, timeout: float | None, headers: dict[str, str] | None) -> Any:
        try:
            msg = await request(self._nc, subject, dumps(body), headers=headers, timeout=timeout or self._timeout,
                                plugin="registry")
        except PluginNotFound:
            raise PluginNotFound(f"no registry is running for mesh {self._subjects.prefix!r} (nothing serves "
                                 f"{subject}); start `mesh up` or `mesh registry`", plugin="registry",
                                 subject=subject) from None
        return response_from_msg(msg).raise_for_error().result

    async def register_plugin(self, info: PluginInfo) -> None:
        """Add or refresh an instance (idempotent)."""
        await self._call("register", info.model_dump(mode="json"), instance=info.id)

    async def unregister_plugin(self, instance_id: str) -> bool:
        """Forget an instance; ``False`` if the registry did not know it."""
        return bool(await self._call("unregister", {"id": instance_id}, instance=instance_id))

    async def get_plugin(self, name_or_id: str, *, version: str | None = None) -> PluginInfo | None:
        """The instance with this id, or the healthiest newest instance of this name (whose version
        is in the range ``version``, e.g. ``">=1.2,<2"``), or ``None``."""
        body: dict[str, Any] = {"key": name_or_id}
        if version:
            body["version"] = version
        found = await self._call("get", body)
        return None if found is None else PluginInfo.model_validate(found)

    async def list_plugins(self, name: str | None = None, *, version: str | None = None,
                           healthy_only: bool = False, timeout: float | None = None) -> list[PluginInfo]:
        """Every known instance (of ``name``, in the range ``version``), with its health as of now."""
        body: dict[str, Any] = {"name": name, "healthy_only": healthy_only}
        if version:
            body["version"] = version
        return _INFOS.validate_python(await self._call("list", body, timeout=timeout))

    async def list_ids(self, name: str | None = None, *, healthy_only: bool = False,
                       timeout: float | None = None) -> list[str]:
        """The ids of :meth:`list_plugins`'s instances, without their records (what a broadcast needs:
        a tenth of the bytes, and no model to build per instance). A registry that predates ``ids``
        answers with the records; their ids are taken."""
        result = await self._call("list", {"name": name, "healthy_only": healthy_only, "ids": True}, timeout=timeout)
        if not isinstance(result, list):
            raise InvalidMessage(f"the registry answered list with {type(result).__name__}, not a list")
        return [str(item.get("id")) if isinstance(item, dict) else str(item) for item in result]

    async def list_versions(self, name: str | None = None) -> list[VersionRecord]:
        """Every version ever registered (of ``name``), oldest first."""
        return _VERSIONS.validate_python(await self._call("versions", {"name": name}))

    async def heartbeat(self, info: PluginInfo) -> None:
        """Tell the registry this instance is alive (fire-and-forget publish).

        Not traced, on purpose: every instance beats every 2 s, so one span per beat would bury
        the traces that matter in Jaeger under thousands of one-span traces an hour.
        """
        await publish(self._nc, self._subjects.registry_own("heartbeat", info.id), dumps(info.model_dump(mode="json")),
                      plugin=info.name, what="heartbeat")


def _passing(exc: BaseException) -> bool:
    """What may pass by itself within seconds: no registry answering (one failing over), no answer in
    time, the registry's bucket unavailable (a leader election), or the connection reconnecting."""
    return isinstance(exc, PluginNotFound | RequestTimeout | StateUnavailable | StateTimeout) or transient(exc)
