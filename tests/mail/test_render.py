"""Rendering the localised email and building the MIME message, read back like a mail client."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from servers import make_zip

from async_notifier.config import DEFAULT_TEMPLATES_DIR, ConfigError
from async_notifier.errors import BadMessage
from async_notifier.mail.mime import attachment_filename, build_streamed_email, message_id
from async_notifier.mail.render import Renderer
from async_notifier.messages import Notification, parse_body

SENDER = Address(display_name="Async Notifier", username="no-reply", domain="example.com")
EXPECTED_HEADERS = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "x-video-id",
    "auto-submitted",
    "x-ses-message-tags",  # the SES message tags (video, status, tracking id): tag-safe
    "mime-version",
    "content-type",
    "content-language",
}
SUBJECTS = {
    ("pt-BR", "COMPLETED"): "Seus frames de férias.mp4 estão prontos",
    ("en", "COMPLETED"): "Your frames from férias.mp4 are ready",
    ("pt-BR", "FAILED"): "Não foi possível processar férias.mp4",
    ("en", "FAILED"): "We could not process férias.mp4",
}
GREETINGS = {"pt-BR": "Olá, Maria", "en": "Hello Maria"}


@pytest.fixture
def zip_file(tmp_path: Path) -> Path:
    path = tmp_path / "download.zip"
    path.write_bytes(make_zip(50_000, seed=3))
    return path


def notification(**fields: Any) -> Notification:
    data: dict[str, Any] = {
        "video_id": "298ce197-3627-4845-83d7-cd6c98a9df8c",
        "status": "COMPLETED",
        "bucket": "videos-zip",
        "key": "298ce197/298ce197.zip",
        "email": "maria@example.com",
        "name": "Maria",
        "file_name": "férias.mp4",
        "locale": "pt-BR",
        "timestamp": "2025-06-19T19:46:37+00:00",
    }
    data.update(fields)
    return parse_body(json.dumps({k: v for k, v in data.items() if v is not None}))


@dataclass(frozen=True)
class Built:
    """The envelope and the whole message, as the SMTP server will receive them."""

    sender: str
    recipient: str
    message_id: str
    data: bytes


def build(
    renderer: Renderer, n: Notification, attachment: Path | None = None
) -> tuple[Built, EmailMessage]:
    name = attachment_filename(n) if attachment is not None else None
    rendered = renderer.render(n, attachment_name=name)
    streamed = build_streamed_email(
        n, rendered, sender=SENDER, attachment=attachment, attachment_name=name
    )
    out = Built(streamed.sender, streamed.recipient, streamed.message_id, streamed.as_bytes())
    parsed = email.message_from_bytes(out.data, _class=EmailMessage, policy=email.policy.default)
    return out, parsed


def alternatives(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None
    assert html is not None
    return text.get_content(), html.get_content()


def raw_header_lines(data: bytes) -> list[bytes]:
    head, _, _ = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")


# --------------------------------------------------------------------------- render


@pytest.mark.parametrize("locale", ["pt-BR", "en"])
@pytest.mark.parametrize("status", ["COMPLETED", "FAILED"])
def test_each_locale_and_status_renders(renderer: Renderer, locale: str, status: str) -> None:
    n = notification(locale=locale, status=status, message="Codec não suportado: h265")
    rendered = renderer.render(n, attachment_name="férias.zip" if status == "COMPLETED" else None)
    assert rendered.locale == locale
    assert rendered.subject == SUBJECTS[(locale, status)]
    assert GREETINGS[locale] in rendered.text
    assert GREETINGS[locale] in rendered.html
    assert f'<html lang="{locale}">' in rendered.html
    assert n.video_id in rendered.text
    assert n.video_id in rendered.html
    if status == "COMPLETED":
        assert "férias.zip" in rendered.text
        assert "Codec não suportado" not in rendered.text + rendered.html
    else:
        assert "Codec não suportado: h265" in rendered.text
        assert "Codec não suportado: h265" in rendered.html


def test_unknown_or_missing_locale_uses_default(renderer: Renderer) -> None:
    assert renderer.render(notification(locale=None)).locale == "pt-BR"
    assert renderer.render(notification(locale="fr")).locale == "pt-BR"
    english_default = Renderer(DEFAULT_TEMPLATES_DIR, default_locale="en")
    rendered = english_default.render(notification(locale=None))
    assert rendered.subject == SUBJECTS[("en", "COMPLETED")]


def test_subject_names_the_video_id_without_a_file_name(renderer: Renderer) -> None:
    rendered = renderer.render(notification(file_name=None, locale="en"))
    assert rendered.subject == "Your frames from 298ce197-3627-4845-83d7-cd6c98a9df8c are ready"


def test_subject_is_one_line_whatever_the_template_does(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES_DIR, templates)
    (templates / "en" / "completed.subject.txt").write_text(
        "  Your frames\nfrom {{ display_name }}\r\n are ready  \n\n"
    )
    rendered = Renderer(templates).render(notification(locale="en"))
    assert rendered.subject == "Your frames from férias.mp4 are ready"


def test_missing_template_is_a_config_error_at_load_time(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES_DIR, templates)
    (templates / "en" / "failed.html").unlink()
    with pytest.raises(ConfigError, match=r"en/failed\.html"):
        Renderer(templates)


def test_html_autoescapes_user_data_and_text_stays_plain(renderer: Renderer) -> None:
    n = notification(
        status="FAILED",
        locale="en",
        name='<script>alert("name")</script>',
        file_name="<b>bold</b> & <i>co</i>.mp4",
        message="<img src=x onerror=alert(1)> & more",
    )
    rendered = renderer.render(n)
    html = rendered.html
    assert "<script>" not in html
    assert "<img" not in html
    assert "<b>bold" not in html
    # Inlining re-serialises the HTML: in text, a quote needs no entity (Jinja's &#34;
    # comes out as "), while < > & stay escaped.
    assert '&lt;script&gt;alert("name")&lt;/script&gt;' in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;i&gt;co&lt;/i&gt;.mp4" in html
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; more" in html
    # The text part is not HTML: the same values appear as the user wrote them.
    assert '<script>alert("name")</script>' in rendered.text
    assert "<img src=x onerror=alert(1)> & more" in rendered.text
    assert "&lt;" not in rendered.text
    assert "&amp;" not in rendered.text
    # Neither is the subject.
    assert rendered.subject == "We could not process <b>bold</b> & <i>co</i>.mp4"


# --------------------------------------------------------------------------- MIME structure


def test_completed_email_structure(renderer: Renderer, zip_file: Path) -> None:
    n = notification()
    out, message = build(renderer, n, zip_file)
    assert message.get_content_type() == "multipart/mixed"
    alternative, attachment = message.get_payload()
    assert alternative.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in alternative.get_payload()] == ["text/plain", "text/html"]
    assert attachment.get_content_type() == "application/zip"
    assert attachment.get_content_disposition() == "attachment"
    assert attachment.get_content() == zip_file.read_bytes()
    text, html = alternatives(message)
    assert "Olá, Maria" in text
    assert "<html" not in text
    assert '<html lang="pt-BR">' in html
    assert out.sender == "no-reply@example.com"
    assert out.recipient == "maria@example.com"
    assert out.message_id == message["Message-ID"]


def test_failed_email_has_no_attachment_and_shows_the_error(renderer: Renderer) -> None:
    n = notification(status="FAILED", bucket=None, key=None, message="ffmpeg exited with 183")
    _, message = build(renderer, n)
    assert list(message.iter_attachments()) == []
    assert all(part.get_content_type() != "application/zip" for part in message.walk())
    text, html = alternatives(message)
    assert "ffmpeg exited with 183" in text
    assert "ffmpeg exited with 183" in html


def test_headers(renderer: Renderer, zip_file: Path) -> None:
    n = notification(locale="en")
    _, message = build(renderer, n, zip_file)
    assert str(message["From"]) == "Async Notifier <no-reply@example.com>"
    [to] = message["To"].addresses
    assert to.display_name == "Maria"
    assert to.addr_spec == "maria@example.com"
    assert message["Subject"] == "Your frames from férias.mp4 are ready"
    assert parsedate_to_datetime(message["Date"]).tzinfo is not None
    assert message["Message-ID"].endswith("@example.com>")
    assert message["X-Video-Id"] == n.video_id
    assert message["Content-Language"] == "en"


def test_to_without_a_name_is_the_bare_address(renderer: Renderer) -> None:
    _, message = build(renderer, notification(name=None))
    [to] = message["To"].addresses
    assert to.display_name == ""
    assert to.addr_spec == "maria@example.com"


def test_attachment_filename_rfc2231_for_non_ascii(renderer: Renderer, zip_file: Path) -> None:
    out, message = build(renderer, notification(file_name="férias.mp4"), zip_file)
    [attachment] = message.iter_attachments()
    assert attachment.get_filename() == "férias.zip"
    assert b"filename*=utf-8''f%C3%A9rias.zip" in out.data


def test_attachment_filename_plain_ascii(renderer: Renderer, zip_file: Path) -> None:
    out, message = build(renderer, notification(file_name="holiday.video.mp4"), zip_file)
    [attachment] = message.iter_attachments()
    assert attachment.get_filename() == "holiday.video.zip"
    assert b'filename="holiday.video.zip"' in out.data


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"file_name": "férias.mp4"}, "férias.zip"),
        ({"file_name": "ferias"}, "ferias.zip"),
        ({"file_name": None, "key": "298ce197/298ce197.zip"}, "298ce197.zip"),
        ({"file_name": None, "key": "../../etc/passwd"}, "passwd.zip"),
        ({"file_name": "../../etc/passwd"}, None),
        ({"file_name": "C:\\Users\\eve\\evil.exe"}, None),
        ({"file_name": 'x"; filename="evil.exe'}, None),
        ({"file_name": "...", "key": "k"}, "frames.zip"),
    ],
)
def test_attachment_filename_is_safe(fields: dict[str, Any], expected: str | None) -> None:
    name = attachment_filename(notification(**fields))
    if expected is not None:
        assert name == expected
    assert name.endswith(".zip")
    assert "/" not in name
    assert "\\" not in name
    assert ".." not in name
    assert '"' not in name
    assert not name.startswith(".")


def test_traversal_key_never_becomes_a_filename(renderer: Renderer, zip_file: Path) -> None:
    n = notification(file_name=None, key="../../etc/passwd")
    out, message = build(renderer, n, zip_file)
    [attachment] = message.iter_attachments()
    assert attachment.get_filename() == "passwd.zip"
    assert b"../" not in out.data
    assert b"etc/passwd" not in out.data


def test_message_id_is_stable_per_record_identity(renderer: Renderer) -> None:
    first, _ = build(renderer, notification())
    again, _ = build(renderer, notification(name="Someone else", locale="en"))
    assert first.message_id == again.message_id  # a redelivered record repeats it
    others = {
        build(renderer, notification(video_id="another-video"))[0].message_id,
        build(renderer, notification(status="FAILED"))[0].message_id,
        build(renderer, notification(email="other@example.com"))[0].message_id,
    }
    assert first.message_id not in others
    assert len(others) == 3
    assert message_id(notification(), "example.com") == first.message_id


HOSTILE = [
    {"name": 'Eve "x" <eve@evil.example>, bob@example.net; Bcc: z@evil.example'},
    {"name": "José da Silva <script>" + " ção" * 40},
    {"name": "=?utf-8?q?Bcc=3A_z=40evil.example?="},
    {"file_name": "Bcc: z@evil.example, bob@example.net.mp4"},
    {"file_name": "vídeo " * 40 + ".mp4"},
    {"video_id": "id: Bcc=z@evil.example " + "x" * 200},
]


@pytest.mark.parametrize("fields", HOSTILE)
def test_no_header_injection_with_hostile_but_valid_input(
    renderer: Renderer, zip_file: Path, fields: dict[str, Any]
) -> None:
    n = notification(locale="en", **fields)
    out, message = build(renderer, n, zip_file)
    lines = raw_header_lines(out.data)
    names = set()
    for line in lines:
        assert b"\r" not in line
        assert b"\n" not in line
        if line[:1] in (b" ", b"\t"):
            continue  # a folded continuation of the previous header
        names.add(line.split(b":", 1)[0].decode().lower())
    assert names == EXPECTED_HEADERS
    assert message.get_all("Bcc") is None
    assert message.get_all("Cc") is None
    [to] = message["To"].addresses  # exactly one recipient, and it is the record's
    assert to.addr_spec == "maria@example.com"
    assert out.recipient == "maria@example.com"
    for header in ("To", "Subject", "From", "X-Video-Id", "Message-ID", "X-SES-MESSAGE-TAGS"):
        value = str(message[header])
        assert "\r" not in value
        assert "\n" not in value


@pytest.mark.parametrize(
    "name",
    [
        "Maria",
        "João da Silva",
        'Eve "x" <eve@evil.example>, bob@example.net; Bcc: z@evil.example',
        "Zoë (admin) [root]",
    ],
)
def test_to_display_name_round_trips(renderer: Renderer, name: str) -> None:
    _, message = build(renderer, notification(name=name))
    [to] = message["To"].addresses
    assert to.display_name == name
    assert to.addr_spec == "maria@example.com"


@pytest.mark.parametrize(
    ("locale", "file_name"),
    [
        ("pt-BR", "férias.mp4"),
        ("pt-BR", "Apresentação final.mp4"),
        ("pt-BR", "Casamento da Júlia e do André.mp4"),
        ("en", "Entrevista com o diretor de operações.mp4"),
        # Folded into two encoded words, the space before "estão" used to vanish.
        ("pt-BR", "Vídeo da apresentação.mp4"),
    ],
)
def test_subject_round_trips_to_the_rendered_text(
    renderer: Renderer, locale: str, file_name: str
) -> None:
    n = notification(locale=locale, file_name=file_name)
    out, message = build(renderer, n)
    expected = renderer.render(n).subject
    assert file_name in expected
    assert message["Subject"] == expected
    assert max(len(line) for line in raw_header_lines(out.data)) <= 78


@pytest.mark.parametrize("length", [100, 500, 900, 1000])
def test_every_accepted_name_builds_lines_within_rfc5322_limit(
    renderer: Renderer, length: int
) -> None:
    """RFC 5322 caps a line at 998 octets and servers (aiosmtpd among them) refuse longer ones,
    so a name the parser accepts must build a sendable message; rejecting it up front as
    BadMessage is the other acceptable outcome, failing at the SMTP server is not.
    """
    try:
        n = notification(status="FAILED", bucket=None, key=None, name="M" * length)
    except BadMessage:
        return
    out, message = build(renderer, n)
    longest = max(len(line) for line in out.data.split(b"\r\n"))
    assert longest <= 998
    [to] = message["To"].addresses
    assert to.addr_spec == "maria@example.com"
