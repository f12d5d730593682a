"""A peer on 127.0.0.1 that speaks the SES v2 API's wire format (REST, JSON), for what moto
cannot do: answer an SES error code, keep the request's tags and configuration set, hold
requests to see how many are in flight, or take a request and never answer.

It runs in the test's event loop (`async with SesApi(...) as api`) and records every request
it read (its path, headers and JSON body) before it answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from connections import Connections
from servers import LOOPBACK


@dataclass(frozen=True)
class SesAnswer:
    """What the peer answers: a status, and an SES error code when it is an error (the
    `x-amzn-ErrorType` header botocore reads); `stall` takes the request and never answers."""

    status: int = 200
    code: str | None = None
    message: str = ""
    stall: bool = False

    def body(self) -> bytes:
        if self.status == 200:
            return json.dumps({"MessageId": f"ses-{uuid.uuid4().hex}"}).encode()
        return json.dumps({"message": self.message}).encode()


@dataclass(frozen=True)
class SesRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def raw(self) -> bytes:
        """The raw message the request carried."""
        return base64.b64decode(self.body["Content"]["Raw"]["Data"])


class SesApi:
    def __init__(self, answer: SesAnswer | Callable[[SesRequest], SesAnswer] = SesAnswer()):
        self.answer = answer
        self.requests: list[SesRequest] = []
        self.gate: asyncio.Event | None = None  # when set, requests wait for it to open
        self.in_flight: list[SesRequest] = []  # read, not answered yet
        self.peak_in_flight = 0
        self._arrived = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._connections = Connections()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None
        return f"http://{LOOPBACK}:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> SesApi:
        self._server = await asyncio.start_server(
            self._connections.track(self._serve), LOOPBACK, 0, limit=1 << 20
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._connections.close()
        await self._server.wait_closed()

    async def wait_in_flight(self, count: int) -> None:
        """Until `count` requests are in flight at once (bound it with a timeout)."""
        while len(self.in_flight) < count:
            self._arrived.clear()
            await self._arrived.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines[1:] if line)
            }
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length)
            request = SesRequest(lines[0].split(" ")[1], headers, json.loads(body or b"{}"))
            self.requests.append(request)
            answer = self.answer if isinstance(self.answer, SesAnswer) else self.answer(request)
            self.in_flight.append(request)
            self.peak_in_flight = max(self.peak_in_flight, len(self.in_flight))
            self._arrived.set()
            try:
                if answer.stall:
                    while await reader.read(65536):  # until the client gives up and closes
                        pass
                    return
                if self.gate is not None:
                    await self.gate.wait()
            finally:
                self.in_flight.remove(request)
            payload = answer.body()
            extra = f"x-amzn-ErrorType: {answer.code}:\r\n" if answer.code else ""
            writer.write(
                f"HTTP/1.1 {answer.status} X\r\nContent-Type: application/json\r\n{extra}"
                f"x-amzn-RequestId: {uuid.uuid4()}\r\nContent-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stopped: end quietly (asyncio's stream callback would log a cancelled task)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def request_path_is_send_email(path: str) -> bool:
    return re.fullmatch(r"/v2/email/outbound-emails/?", path) is not None
