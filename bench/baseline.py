"""The old, sequential design, kept here only to measure the project against.

One record after another: boto3 `download_file` into a temp dir, the email built with the
standard library (the ZIP read whole and attached), and a new `smtplib.SMTP` connection per
email (EHLO, STARTTLS and login when configured, send, QUIT). It reads the same environment
variables as the project and returns the same partial batch response.
"""

from __future__ import annotations

import json
import os
import smtplib
import ssl
import tempfile
import uuid
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from pathlib import Path
from typing import Any

import boto3

_TEXT = {
    "pt-BR": (
        "Seu vídeo {file} está pronto",
        "Olá {name},\n\nos quadros do vídeo {file} estão no arquivo anexo.\n",
    ),
    "en": (
        "Your video {file} is ready",
        "Hello {name},\n\nthe frames of your video {file} are in the attached file.\n",
    ),
}
_HTML = "<html><body><p>{greeting}</p></body></html>"


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, list[dict[str, str]]]:
    env = os.environ
    s3 = boto3.client(
        "s3",
        region_name=env.get("AWS_REGION", "us-east-1"),
        endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
    )
    failures: list[dict[str, str]] = []
    tmp_parent = env.get("TMP_DIR") or None
    with tempfile.TemporaryDirectory(prefix="baseline-", dir=tmp_parent) as scratch:
        for record in event.get("Records", []):
            path = Path(scratch) / f"{uuid.uuid4().hex}.zip"
            try:
                body = json.loads(record["body"])
                s3.download_file(body["bucket"], body["key"], str(path))
                send(build_message(body, path))
            except Exception as exc:
                print(f"record {record.get('messageId')} failed: {type(exc).__name__}: {exc}")
                failures.append({"itemIdentifier": record.get("messageId", "")})
            finally:
                path.unlink(missing_ok=True)
    return {"batchItemFailures": failures}


def build_message(body: dict[str, Any], attachment: Path) -> EmailMessage:
    env = os.environ
    sender_name, sender = parseaddr(env["EMAIL_FROM"])
    locale = str(body.get("locale"))
    if locale not in _TEXT:
        locale = "pt-BR"
    subject, text = _TEXT[locale]
    file_name = body.get("file_name") or "video"
    fields = {"name": body.get("name", ""), "file": file_name}
    msg = EmailMessage()
    msg["From"] = Address(display_name=sender_name, addr_spec=sender)
    msg["To"] = Address(display_name=body.get("name", ""), addr_spec=body["email"])
    msg["Subject"] = subject.format(**fields)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{body['video_id']}@{sender.rsplit('@', 1)[-1]}>"
    msg["X-Video-Id"] = body["video_id"]
    msg.set_content(text.format(**fields))
    msg.add_alternative(_HTML.format(greeting=text.format(**fields)), subtype="html")
    msg.add_attachment(
        attachment.read_bytes(),
        maintype="application",
        subtype="zip",
        filename=file_name.rsplit(".", 1)[0] + ".zip",
    )
    return msg


def send(msg: EmailMessage) -> None:
    env = os.environ
    host, port = env["SMTP_SERVER"], int(env.get("SMTP_PORT", "587"))
    mode = env.get("SMTP_TLS", "starttls")
    timeout = float(env.get("SMTP_TIMEOUT", "30"))
    context = None
    if mode != "none":
        context = ssl.create_default_context(cafile=env.get("SMTP_CA_FILE") or None)
    smtp: smtplib.SMTP
    if mode == "tls":
        smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=timeout)
    with smtp:  # QUIT on the way out
        smtp.ehlo()
        if mode == "starttls":
            smtp.starttls(context=context)
            smtp.ehlo()
        if env.get("SMTP_USER"):
            smtp.login(env["SMTP_USER"], env.get("SMTP_PASSWORD", ""))
        smtp.send_message(msg)
