"""The scripted relay itself, spoken to with raw bytes: the conformance tests trust it.

Pipelined commands are answered in order and only once read; a rule matches the occurrence
it names (server-wide, per connection, on a reused connection, by the command's text); an
early reply comes after the given body bytes and the hang-up after it reaches the client;
commands written inside a body are recorded.
"""

from __future__ import annotations

import asyncio
import math

from scripted_relay import Rule, ScriptedRelay

ENVELOPE = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
BODY = b"Subject: t\r\nMessage-ID: <t1@example.com>\r\n\r\nhello\r\n.\r\n"


class Client:
    """A bare SMTP client: writes bytes, reads whole replies (bounded waits)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, relay: ScriptedRelay) -> Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(relay.host, relay.port), 5)
        return cls(reader, writer)

    async def reply(self) -> str:
        """One reply, its lines joined by "|"; "" at end of stream."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            if not line:
                return "|".join(lines)
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "|".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), 5)

    async def close(self) -> None:
        self.writer.close()
        await asyncio.wait_for(self.writer.wait_closed(), 5)


async def greeted(relay: ScriptedRelay) -> Client:
    client = await Client.connect(relay)
    assert (await client.reply()).startswith("220 ")
    await client.send(b"EHLO test\r\n")
    assert (await client.reply()).startswith("250-relay.test")
    return client


async def test_pipelined_commands_are_answered_in_order_each_after_it_was_read() -> None:
    # MAIL answers late: the replies behind it must still come after it, in order.
    with ScriptedRelay([Rule("MAIL", delay=0.3)], size=1000) as relay:
        client = await greeted(relay)
        await client.send(ENVELOPE + BODY + ENVELOPE)
        replies = [(await client.reply())[:3] for _ in range(7)]
        await client.close()
    assert replies == ["250", "250", "354", "250", "250", "250", "354"]
    assert relay.accepted == ["<t1@example.com>"]
    assert relay.data_transactions == 2


async def test_rules_match_the_occurrence_they_name() -> None:
    rules = [
        Rule("MAIL", "451 4.3.0 reused", reused=True),
        Rule("RCPT", "550 5.1.1 that one", contains="<c@"),
        Rule("NOOP", "500 second on its connection", nth=2, per_connection=True),
    ]
    with ScriptedRelay(rules, pipelining=False) as relay:
        client = await greeted(relay)
        replies = []
        for command in (b"NOOP", b"NOOP", b"MAIL FROM:<a@example.com>", b"RCPT TO:<c@example.com>"):
            await client.send(command + b"\r\n")
            replies.append((await client.reply())[:3])
        await client.send(b"RCPT TO:<b@example.com>\r\nDATA\r\n" + BODY)
        replies += [(await client.reply())[:3] for _ in range(3)]
        await client.send(b"MAIL FROM:<a@example.com>\r\nNOOP\r\n")  # now reused
        replies += [(await client.reply())[:3] for _ in range(2)]
        await client.close()
    assert replies == ["250", "500", "250", "550", "250", "354", "250", "451", "250"]


async def test_an_early_reply_reaches_the_client_before_the_hang_up() -> None:
    too_big = "552 5.3.4 Message size exceeds fixed limit"
    with ScriptedRelay([Rule("BODY", too_big, after_bytes=64 * 1024, hang_up=True)]) as relay:
        client = await greeted(relay)
        await client.send(ENVELOPE)
        assert [(await client.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
        client.writer.write(b"x" * 1000 + b"\r\n" + b"y" * 200 * 1024)  # no end of data
        assert await client.reply() == too_big
        assert await client.reply() == ""  # then the relay hangs up
        await client.close()
    (upload,) = relay.uploads
    assert upload.size >= 64 * 1024
    assert relay.accepted == []


async def test_commands_inside_a_body_are_recorded() -> None:
    with ScriptedRelay() as relay:
        client = await greeted(relay)
        await client.send(ENVELOPE + b"Subject: t\r\n\r\nRSET\r\nMAIL FROM:<x@y>\r\n.\r\n")
        assert [(await client.reply())[:3] for _ in range(4)] == ["250", "250", "354", "250"]
        await client.close()
    assert relay.commands_in_body == ["RSET", "MAIL FROM:<x@y>"]


async def test_the_greeting_can_be_refused_withheld_or_skipped() -> None:
    with ScriptedRelay([Rule("GREETING", "554 5.3.2 not now", nth=1)]) as relay:
        client = await Client.connect(relay)
        assert await client.reply() == "554 5.3.2 not now"
        await client.close()
    with ScriptedRelay([Rule("GREETING", close_instead=True)]) as relay:
        client = await Client.connect(relay)
        assert await client.reply() == ""
        await client.close()
    with ScriptedRelay([Rule("GREETING", delay=math.inf)]) as relay:
        client = await Client.connect(relay)
        try:
            await asyncio.wait_for(client.reader.readline(), 0.3)
            raise AssertionError("the relay greeted")
        except TimeoutError:
            pass
        await client.close()
    assert relay.connections_opened == 1
