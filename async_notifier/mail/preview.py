"""`async-notifier preview`: render one email to files, without sending it.

For the people who edit templates: it renders a message body exactly as the worker
would (same parser, same renderer with CSS inlining, same MIME builder), so what
the preview shows is what a user receives. It needs no AWS or SMTP settings and
touches no network: the ZIP is a small dummy made on the fly, the link is whatever
`--link` says.
"""

from __future__ import annotations

import json
import tempfile
import traceback
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from ..config import DEFAULT_TEMPLATES_DIR, SUPPORTED_LOCALES, ConfigError, Settings, _Env
from ..errors import BadMessage
from ..messages import Notification, parse_body
from .mime import attachment_filename, build_streamed_email
from .render import Renderer

DEFAULT_SENDER = "Async Notifier <no-reply@example.com>"
# A message body as the upstream service publishes it (README, "The message").
SAMPLE: dict[str, Any] = {
    "video_id": "298ce197-3627-4845-83d7-cd6c98a9df8c",
    "status": "COMPLETED",
    "bucket": "videos-zip",
    "key": "298ce197/298ce197.zip",
    "email": "maria@example.com",
    "name": "Maria",
    "file_name": "férias.mp4",
    "message": "Invalid data found when processing input (ffmpeg exited with code 183)",
    "locale": "pt-BR",
    "timestamp": "2025-06-19T19:46:37+00:00",
}
# parse_body wants an S3 location for COMPLETED; a preview fetches nothing, so data
# written for FAILED (or without one) can still be previewed as COMPLETED.
_LOCATION_FIELDS = ("bucket", "key", "zip", "s3_bucket", "s3_key")
_PLACEHOLDER_LOCATION = {"bucket": "preview-bucket", "key": "preview/frames.zip"}


class PreviewError(Exception):
    """Bad input (data, options or templates): reported in one line, exit status 2."""


@dataclass(frozen=True)
class Preview:
    subject: str
    html: Path
    text: Path
    eml: Path
    attachment: str | None


def read_data(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PreviewError(f"cannot read {path}: {exc}") from None


def load_notification(
    data: str | None,
    *,
    status: str | None = None,
    locale: str | None = None,
    source: str = "data",
) -> Notification:
    """Parse `data` (a message body, JSON) with the worker's parser, after the overrides.

    `None` means the built-in sample. The worker's validation applies unchanged, so
    data the worker would reject is rejected here, with the same reason.
    """
    fields = dict(SAMPLE) if data is None else _json_object(data, source)
    if status is not None:
        fields["status"] = status
    if locale is not None:
        fields["locale"] = locale
    if not any(fields.get(name) not in (None, "") for name in _LOCATION_FIELDS):
        fields.update(_PLACEHOLDER_LOCATION)
    try:
        notification = parse_body(json.dumps(fields))
    except BadMessage as exc:
        raise PreviewError(f"invalid {source}: {exc}") from None
    if locale is not None and notification.locale is None:
        # The worker would quietly fall back to DEFAULT_LOCALE; asked for by name, say so.
        raise PreviewError(
            f"locale {locale!r} is not supported (supported: {', '.join(SUPPORTED_LOCALES)})"
        )
    return notification


def _json_object(data: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, RecursionError):
        value = None
    if isinstance(value, dict) and value.get("Type") == "Notification" and "Message" in value:
        # An SNS envelope, as parse_body accepts it: overrides apply to the message inside.
        inner = value.get("Message")
        try:
            value = json.loads(inner) if isinstance(inner, str) else None
        except (json.JSONDecodeError, RecursionError):
            value = None
    if not isinstance(value, dict):
        try:
            parse_body(data)  # for the worker's own words on what is wrong
        except BadMessage as exc:
            raise PreviewError(f"invalid {source}: {exc}") from None
        raise PreviewError(f"invalid {source}: not a JSON object")
    return value


def parse_sender(value: str) -> Address:
    """`--from`, checked as EMAIL_FROM is (one address, optional display name)."""
    env = _Env({"EMAIL_FROM": value})
    address = env.address("EMAIL_FROM")
    if env.problems:
        raise PreviewError(f"invalid --from: {'; '.join(env.problems)}")
    return address


def render_preview(
    notification: Notification,
    *,
    out_dir: Path,
    sender: Address,
    templates_dir: Path = DEFAULT_TEMPLATES_DIR,
    link: str | None = None,
) -> Preview:
    """Write `<out>/<status>-<locale>[-link].{html,txt,eml}` and return what was written."""
    if link is not None:
        if notification.status != "COMPLETED":
            raise PreviewError("--link only applies to COMPLETED emails")
        if not link.startswith(("https://", "http://")) or any(c.isspace() for c in link):
            raise PreviewError(f"--link must be an http(s) URL without spaces: {link!r}")
    try:
        renderer = Renderer(templates_dir)
    except ConfigError as exc:
        raise PreviewError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="async-notifier-preview-") as scratch:
        zip_path: Path | None = None
        name: str | None = None
        expires: datetime | None = None
        if notification.status == "COMPLETED" and link is None:
            name = attachment_filename(notification)
            zip_path = _dummy_zip(Path(scratch) / name)
        elif link is not None:
            expires = datetime.now(UTC) + timedelta(seconds=Settings.link_expiry_seconds)
        try:
            rendered = renderer.render(
                notification, attachment_name=name, download_url=link, link_expires_at=expires
            )
        except TemplateError as exc:
            raise PreviewError(f"template error{_where(exc)}: {exc}") from None
        message = build_streamed_email(
            notification, rendered, sender=sender, attachment=zip_path, attachment_name=name
        ).as_bytes()
    stem = f"{notification.status.lower()}-{rendered.locale}" + ("-link" if link else "")
    preview = Preview(
        subject=rendered.subject,
        html=out_dir / f"{stem}.html",
        text=out_dir / f"{stem}.txt",
        eml=out_dir / f"{stem}.eml",
        attachment=name,
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        preview.html.write_text(rendered.html, encoding="utf-8")
        preview.text.write_text(rendered.text, encoding="utf-8")
        preview.eml.write_bytes(message)
    except OSError as exc:
        raise PreviewError(f"cannot write to {out_dir}: {exc}") from None
    return preview


def _dummy_zip(path: Path) -> Path:
    """A few bytes standing in for the frames, so the .eml has a real ZIP attached."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README.txt", "Preview attachment: the real email carries the frames.\n")
        for index in range(1, 4):
            archive.writestr(f"frame_{index:04d}.txt", f"frame {index}\n")
    return path


def _where(exc: BaseException) -> str:
    """` in en/completed.html line 5`: Jinja puts template lines in the traceback."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.endswith((".html", ".txt")):
            return f" in {frame.filename} line {frame.lineno}"
    return ""
