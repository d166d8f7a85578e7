"""Keeping credentials out of what the mesh logs and prints."""

from __future__ import annotations

import re

__all__ = ["redact_url"]

# scheme://userinfo@ : userinfo is "user:password" or a bare token (nats://TOKEN@host).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^@/\s,]+)@")


def _hide(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:***@" if colon else f"{match['scheme']}***@"


def redact_url(text: str) -> str:
    """Every URL in ``text`` with its credentials hidden: ``nats://u:pw@h`` → ``nats://u:***@h``.

    A URL holding a bare token (``nats://s3cret@h``) becomes ``nats://***@h``. Text without
    credentials, including several comma-separated URLs or a whole log line, is kept as it is.
    """
    if "@" not in text:  # the common case, and a cheap one: relayed log lines pass through here
        return text
    return _USERINFO.sub(_hide, text)
