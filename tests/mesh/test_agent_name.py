"""An agent's default name: MESH_AGENT_NAME (a Kubernetes node name works), else the hostname."""

from __future__ import annotations

import socket

import pytest

from mesh._agent import default_agent_name


def test_mesh_agent_name_is_made_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_AGENT_NAME", "ip-10-0-1-7.EC2.internal")
    assert default_agent_name() == "ip-10-0-1-7-ec2-internal"
    monkeypatch.delenv("MESH_AGENT_NAME")
    assert default_agent_name().startswith(socket.gethostname().lower().split(".")[0][:10])
