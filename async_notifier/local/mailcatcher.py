"""A real SMTP server on 127.0.0.1 that files every message under an outbox directory.

`make run-local` sends through it so a developer can open what the worker really sent: the
raw message as `NNNN-<video>.eml` (any mail client opens it) and its HTML part as
`NNNN-<video>.html` (any browser). aiosmtpd serves from its own thread and event loop, so
the worker talks to it over a genuine TCP connection, exactly as it would to a relay.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import socket
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from .service import Service

LOOPBACK = "127.0.0.1"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
OUTBOX_FILE = re.compile(r"^\d{4}-.*\.(eml|html)$")


@dataclass(frozen=True)
class CaughtMail:
    """One accepted message and the files it was written to."""

    index: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    subject: str
    video_id: str | None
    message_id: str | None
    eml: Path
    html: Path | None
    attachments: tuple[str, ...]


def free_port() -> int:
    """A loopback port that was free a moment ago (aiosmtpd needs a fixed one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def clear_outbox(outbox: Path) -> int:
    """Remove the files an earlier run wrote (and only those); return how many."""
    removed = 0
    if outbox.is_dir():
        for path in outbox.iterdir():
            if path.is_file() and OUTBOX_FILE.match(path.name):
                path.unlink()
                removed += 1
    return removed


class _Handler:
    def __init__(self, catcher: MailCatcher) -> None:
        self.catcher = catcher

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = envelope.original_content
        if not isinstance(data, bytes):
            return "554 5.6.0 no message data"
        try:
            self.catcher.file(envelope.mail_from or "", tuple(envelope.rcpt_tos), data)
        except OSError as exc:
            return f"451 4.3.0 cannot store the message: {exc}"
        return "250 OK"


class MailCatcher(Service):
    """Accepts any message from anyone on 127.0.0.1 and writes it to `outbox`."""

    def __init__(self, outbox: Path, *, host: str = LOOPBACK) -> None:
        self.outbox = outbox
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._messages: list[CaughtMail] = []
        self._controller: Controller | None = None

    @property
    def messages(self) -> list[CaughtMail]:
        with self._lock:
            return list(self._messages)

    def start(self, attempts: int = 3) -> None:
        """Listen on a free loopback port (another one if it was taken meanwhile)."""
        if self._controller is not None:
            raise RuntimeError("mail catcher already running")
        self.outbox.mkdir(parents=True, exist_ok=True)
        error: Exception | None = None
        for _ in range(attempts):
            port = free_port()
            controller = Controller(
                _Handler(self),
                hostname=self.host,
                port=port,
                # A fixed name: the default, getfqdn(), can take seconds to resolve.
                server_hostname="mailcatcher.local",
                data_size_limit=64 * 1024 * 1024,
                ready_timeout=10.0,
            )
            try:
                controller.start()
            except (OSError, RuntimeError, TimeoutError) as exc:
                error = exc
                continue
            self._controller = controller
            self.port = port
            return
        raise RuntimeError(f"mail catcher could not start: {error}")

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def file(self, mail_from: str, rcpt_tos: tuple[str, ...], data: bytes) -> None:
        """File one message (the server thread's, or what an SES endpoint kept): parse once,
        write the .eml and .html atomically."""
        message = email.message_from_bytes(data, _class=EmailMessage, policy=email.policy.default)
        video_id = message.get("X-Video-Id")
        with self._lock:
            index = len(self._messages) + 1
            stem = f"{index:04d}-{_slug(video_id or (rcpt_tos[0] if rcpt_tos else 'message'))}"
            eml = self.outbox / f"{stem}.eml"
            _write(eml, data)
            html_path: Path | None = None
            body = message.get_body(preferencelist=("html",))
            if isinstance(body, EmailMessage):
                html_path = self.outbox / f"{stem}.html"
                _write(html_path, str(body.get_content()).encode("utf-8"))
            attachments = tuple(
                part.get_filename() or "unnamed" for part in message.iter_attachments()
            )
            self._messages.append(
                CaughtMail(
                    index=index,
                    mail_from=mail_from,
                    rcpt_tos=rcpt_tos,
                    subject=str(message.get("Subject", "")),
                    video_id=str(video_id) if video_id else None,
                    message_id=str(message.get("Message-ID", "")) or None,
                    eml=eml,
                    html=html_path,
                    attachments=attachments,
                )
            )


def _slug(text: str) -> str:
    return _UNSAFE.sub("_", str(text)).strip("._")[:60] or "message"


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
