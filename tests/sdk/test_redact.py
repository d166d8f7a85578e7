"""redact: credentials in URLs never reach a log line."""

from __future__ import annotations

import pytest

from plugin_sdk.host import redact


@pytest.mark.parametrize(("text", "shown"), [
    ("nats://u:s3cret@127.0.0.1:4222", "nats://u:***@127.0.0.1:4222"),
    ("nats://t0ken@nats.example:4222", "nats://***@nats.example:4222"),
    ("tls://u:p%40ss@a:1,tls://v:w@b:2", "tls://u:***@a:1,tls://v:***@b:2"),
    ("cannot reach NATS at nats://admin:hunter2@box-2:4222 (NoServersError)",
     "cannot reach NATS at nats://admin:***@box-2:4222 (NoServersError)"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("mail ada@example.com about nats://h:1/x@y", "mail ada@example.com about nats://h:1/x@y"),
    ("", ""),
])
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown
