"""The reader's protocol parser: nats-py's, with messages (``MSG``/``HMSG``) parsed in one pass.

nats-py's :class:`~nats.protocol.parser.Parser` matches a regular expression per control line
(two for an ``HMSG``: ``MSG`` is tried first), keeps each message's arguments in a dict, deletes
every parsed message from the front of its buffer, and awaits ``_process_msg`` as a coroutine per
message. Here a chunk read from the socket is walked with an offset: a message's control line is
split once, its body sliced once, and a message for a subscription on the direct path goes to
``MeshClient.deliver_direct`` without a coroutine. Everything that is not a message (``PING``,
``PONG``, ``INFO``, ``+OK``, ``-ERR``, and any line this parser does not read as one) is handed,
with the rest of the chunk, to nats-py's own parser, whose state (``state``, ``needed``,
``header_needed``, ``msg_arg``, ``buf``) this one shares: either can stop where the other goes on.

It hands over what nats-py's parser does (property-tested in ``tests/sdk/test_fast_paths.py``, for
any stream of messages, control lines and odd lines, cut anywhere): the same messages with the
same subject, reply, sizes, body and header bytes, the same ``ProtocolError``, the same wait for
more bytes. With one exception, on purpose: nats-py's ``HMSG`` expression lets the separator before
the last size run past the line's end, so a header block that starts with digits and CRLF (which
nats-server forwards as any client wrote it) made it read the wrong reply and sizes, then the
stream after it as garbage: a ``ProtocolError``, a reconnect, and the messages that came with it
lost. This parser reads the line up to its CRLF, as the protocol defines it
(``tests/sdk/test_bad_input.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

if TYPE_CHECKING:
    from ._connection import MeshClient

_CRLF = b"\r\n"
_M, _H = ord("M"), ord("H")


class MeshParser(Parser):
    """nats-py's parser with a one-pass path for ``MSG`` and ``HMSG`` (see the module's docstring)."""

    nc: MeshClient

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        if buf:  # the tail of the previous read: one buffer of both (one copy per read, not per message)
            buf.extend(data)
            chunk = bytes(buf)
            buf.clear()
        else:
            chunk = data
        end = len(chunk)
        pos = 0
        nc = self.nc
        deliver = nc.deliver_direct
        while pos < end:
            if self.state == AWAITING_CONTROL_LINE:
                eol = chunk.find(_CRLF, pos)
                if eol < 0:
                    break  # (split line: nats-py's parser keeps it, or refuses one too long)
                first = chunk[pos]
                if first != _M and first != _H:  # PING, PONG, INFO, +OK, -ERR: nats-py's, for this line alone
                    buf.extend(chunk[pos:eol + 2])
                    pos = eol + 2
                    await Parser.parse(self)
                    if self.buf is not buf:  # (reset while it ran: a reconnect; the rest of this read is void)
                        return
                    if buf:  # (a line it keeps for more bytes: what follows waits behind it, as in its buffer)
                        buf.extend(chunk[pos:])
                        return
                    continue
                args = _message_args(chunk, pos, eol)
                if args is None:
                    break  # (not a message line we read: nats-py's expressions decide)
                subject, sid, reply, header_size, size = args
                pos = eol + 2
                if end - pos < size + 2:  # the body is not all here yet: nats-py's state, as its parser leaves it
                    self.msg_arg["subject"], self.msg_arg["sid"], self.msg_arg["reply"] = subject, sid, reply
                    self.needed, self.header_needed = size, header_size
                    self.state = AWAITING_MSG_PAYLOAD
                    continue
            else:  # AWAITING_MSG_PAYLOAD, left by either parser
                size = self.needed
                if end - pos < size + 2:
                    break
                arg = self.msg_arg
                subject, sid, reply, header_size = arg["subject"], arg["sid"], arg["reply"], self.header_needed
                self.header_needed = 0
                self.state = AWAITING_CONTROL_LINE
            body_end = pos + size
            if header_size > 0:
                headers: bytes | None = chunk[pos:pos + header_size]
                payload = chunk[pos + header_size:body_end]
            else:
                headers = None
                payload = chunk[pos:body_end]
            pos = body_end + 2
            if not deliver(sid, subject, reply, payload, headers):
                await nc._process_msg(sid, subject, reply, payload, headers)  # type: ignore[arg-type]  # (None: as nats-py's)
                if self.buf is not buf:  # (reset while it ran: a reconnect; the rest of this read is void)
                    return
        if pos < end:  # a line that is not a message, or one split across reads: nats-py's parser goes on
            buf.extend(chunk[pos:] if pos else chunk)
            await Parser.parse(self)


def _message_args(chunk: bytes, start: int, eol: int) -> tuple[bytes, int, bytes, int, int] | None:
    """(subject, sid, reply, header size, total size) of the ``MSG``/``HMSG`` line ``chunk[start:eol]``,
    or None where nats-py's ``MSG_RE``/``HMSG_RE`` are left to decide: anything but a line as
    nats-server writes one (fields one space apart, sizes in digits, a header no bigger than the
    message, a sid that is a number)."""
    line = chunk[start:eol]
    parts = line.split(b" ")
    n = len(parts)
    op = parts[0]
    if op == b"HMSG":
        if n == 5:
            reply = b""
        elif n == 6:
            reply = parts[3]
        else:
            return None
        header_size, size = parts[-2], parts[-1]
        if not (header_size.isdigit() and size.isdigit()):
            return None
        header, total = int(header_size), int(size)
        if header > total:
            return None
    elif op == b"MSG":
        if n == 4:
            reply = b""
        elif n == 5:
            reply = parts[3]
        else:
            return None
        size = parts[-1]
        if not size.isdigit():
            return None
        header, total = 0, int(size)
    else:
        return None
    if len(line.split()) != n:  # (other whitespace, or spaces doubled: as the expressions read it)
        return None
    try:
        sid = int(parts[2])
    except ValueError:
        return None  # (nats-py's parser raises its ProtocolError for it)
    return parts[1], sid, reply, header, total
