"""Which clients watch their requests for permission violations (it costs a task per request)."""

from __future__ import annotations

from pathlib import Path

from mesh._auth import AuthStore
from mesh._auth import Permissions as AuthPermissions
from plugin_sdk.host import MeshClient


def client_with(creds: Path) -> MeshClient:
    nc = MeshClient()
    nc._user_credentials = str(creds)  # (what nats-py's connect(user_credentials=…) sets)
    return nc


def test_only_restricted_identities_watch_for_violations(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth")
    assert not MeshClient().enforced  # anonymous: no permissions to break
    assert not client_with(store.admin.creds).enforced  # may publish everything: nothing to watch
    plugin = store.mint("p-1", AuthPermissions(pub_allow=("m.plugin.x",), sub_allow=("_INBOX_p-1.>",)))
    assert client_with(plugin.creds).enforced
    (tmp_path / "odd.creds").write_text("not a creds file")
    assert client_with(tmp_path / "odd.creds").enforced  # unreadable: watch, to be safe
