"""`async-notifier preview`, run as a template editor would: a subprocess, no settings at all."""

from __future__ import annotations

import email
import email.policy
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from async_notifier.config import DEFAULT_TEMPLATES_DIR

SUBJECTS = {
    ("COMPLETED", "pt-BR"): "Seus frames de férias.mp4 estão prontos",
    ("COMPLETED", "en"): "Your frames from férias.mp4 are ready",
    ("FAILED", "pt-BR"): "Não foi possível processar férias.mp4",
    ("FAILED", "en"): "We could not process férias.mp4",
}
LINK = "https://videos-zip.s3.amazonaws.com/k/v.zip?X-Amz-Expires=604800&X-Amz-Signature=ab"


def preview(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with no AWS, SMTP or worker setting in its environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "SMTP_", "EMAIL_", "TEMPLATES_", "DEFAULT_LOCALE"))
    }
    return subprocess.run(
        [sys.executable, "-m", "async_notifier", "preview", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def read_eml(path: Path) -> EmailMessage:
    message = email.message_from_bytes(
        path.read_bytes(), _class=EmailMessage, policy=email.policy.default
    )
    assert isinstance(message, EmailMessage)
    return message


def html_part(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


@pytest.mark.parametrize("locale", ["pt-BR", "en"])
@pytest.mark.parametrize("status", ["COMPLETED", "FAILED"])
def test_preview_writes_html_text_and_eml(tmp_path: Path, status: str, locale: str) -> None:
    result = preview(tmp_path, "--status", status, "--locale", locale, "--out", "preview")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"Subject: {SUBJECTS[(status, locale)]}"
    stem = tmp_path / "preview" / f"{status.lower()}-{locale}"
    html = stem.with_suffix(".html").read_text(encoding="utf-8")
    text = stem.with_suffix(".txt").read_text(encoding="utf-8")
    for path in (".html", ".txt", ".eml"):
        assert str(Path("preview") / f"{stem.name}{path}") in result.stdout
    assert f'<html lang="{locale}">' in html
    assert "<style" not in html
    assert 'style="' in html
    assert "<" not in text

    message = read_eml(stem.with_suffix(".eml"))
    assert message["Subject"] == SUBJECTS[(status, locale)]
    assert str(message["From"]) == "Async Notifier <no-reply@example.com>"
    assert message["Content-Language"] == locale
    assert html_part(message).replace("\r\n", "\n") == html
    attachments = list(message.iter_attachments())
    if status == "COMPLETED":
        [attachment] = attachments
        assert attachment.get_content_type() == "application/zip"
        assert attachment.get_filename() == "férias.zip"
        with zipfile.ZipFile(io.BytesIO(attachment.get_content())) as archive:
            assert archive.testzip() is None
            assert archive.namelist()
    else:
        assert attachments == []
        assert "ffmpeg" in text


def test_data_file_and_overrides(tmp_path: Path) -> None:
    """--status and --locale win over the file; a FAILED body needs no S3 location."""
    data = {
        "video_id": "abc-123",
        "status": "FAILED",
        "email": "joao@example.com",
        "name": "João",
        "file_name": "Apresentação.mov",
        "locale": "en",
        "timestamp": "2025-06-19T19:46:37+00:00",
    }
    (tmp_path / "sample.json").write_text(json.dumps(data), encoding="utf-8")
    result = preview(
        tmp_path, "--data", "sample.json", "--status", "completed", "--locale", "pt_BR"
    )
    assert result.returncode == 0, result.stderr
    assert "Subject: Seus frames de Apresentação.mov estão prontos" in result.stdout
    message = read_eml(tmp_path / "preview" / "completed-pt-BR.eml")
    [to] = message["To"].addresses
    assert (to.display_name, to.addr_spec) == ("João", "joao@example.com")
    assert message["X-Video-Id"] == "abc-123"
    [attachment] = message.iter_attachments()
    assert attachment.get_filename() == "Apresentação.zip"

    # Without overrides, the file's own status and locale.
    result = preview(tmp_path, "--data", "sample.json")
    assert result.returncode == 0, result.stderr
    assert "Subject: We could not process Apresentação.mov" in result.stdout
    assert (tmp_path / "preview" / "failed-en.eml").is_file()


def test_link_variant_has_no_attachment(tmp_path: Path) -> None:
    result = preview(tmp_path, "--locale", "en", "--link", LINK, "--out", "out")
    assert result.returncode == 0, result.stderr
    stem = tmp_path / "out" / "completed-en-link"
    message = read_eml(stem.with_suffix(".eml"))
    assert list(message.iter_attachments()) == []
    assert LINK.replace("&", "&amp;") in html_part(message)
    assert LINK in stem.with_suffix(".txt").read_text(encoding="utf-8")
    assert "valid until" in stem.with_suffix(".txt").read_text(encoding="utf-8")


def test_from_and_templates_options(tmp_path: Path) -> None:
    templates = tmp_path / "edited"
    shutil.copytree(DEFAULT_TEMPLATES_DIR, templates)
    (templates / "en" / "failed.subject.txt").write_text("Problem with {{ display_name }}")
    result = preview(
        tmp_path,
        "--status",
        "FAILED",
        "--locale",
        "en",
        "--templates",
        str(templates),
        "--from",
        "Frames <frames@videos.example.org>",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Subject: Problem with férias.mp4"
    message = read_eml(tmp_path / "preview" / "failed-en.eml")
    assert str(message["From"]) == "Frames <frames@videos.example.org>"
    assert message["Message-ID"].endswith("@videos.example.org>")


@pytest.mark.parametrize(
    ("data", "args", "error"),
    [
        ('{"video_id": "v", "status": "FAILED"}', [], "field 'email' is required"),
        ("{not json", [], "body is not valid JSON"),
        ("[1, 2]", [], "body is not a JSON object"),
        ('{"video_id": "v", "email": "a@b.example", "status": "DONE"}', [], "unknown status"),
        ('{"video_id": "v", "email": "x@@y"}', [], "field 'email' is not a valid"),
        ('{"video_id": "v\\nBcc: x", "email": "a@b.example"}', [], "line breaks"),
        (None, ["--locale", "fr"], "locale 'fr' is not supported"),
        (None, ["--status", "FAILED", "--link", LINK], "--link only applies to COMPLETED"),
        (None, ["--link", "javascript:alert(1)"], "--link must be an http(s) URL"),
        (None, ["--from", "a@b.example, c@d.example"], "invalid --from"),
        (None, ["--data", "missing.json"], "cannot read missing.json"),
    ],
)
def test_bad_input_exits_2_with_the_reason(
    tmp_path: Path, data: str | None, args: list[str], error: str
) -> None:
    if data is not None:
        (tmp_path / "bad.json").write_text(data, encoding="utf-8")
        args = ["--data", "bad.json", *args]
    result = preview(tmp_path, *args)
    assert result.returncode == 2
    assert error in result.stderr
    assert result.stderr.startswith("async-notifier preview: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "preview").exists()


def test_template_error_names_the_template(tmp_path: Path) -> None:
    templates = tmp_path / "edited"
    shutil.copytree(DEFAULT_TEMPLATES_DIR, templates)
    page = templates / "en" / "completed.html"
    page.write_text(
        page.read_text().replace("{% endblock %}", "{{ support_url }}{% endblock %}", 1)
    )
    result = preview(tmp_path, "--locale", "en", "--templates", str(templates))
    assert result.returncode == 2
    assert "'support_url' is undefined" in result.stderr
    assert "en/completed.html" in result.stderr

    (templates / "en" / "completed.html").unlink()
    result = preview(tmp_path, "--locale", "en", "--templates", str(templates))
    assert result.returncode == 2
    assert "en/completed.html" in result.stderr


def test_preview_imports_nothing_of_the_runner(tmp_path: Path) -> None:
    """Each subcommand imports its own modules: preview never loads the AWS SDK or the runner."""
    code = (
        "import sys; from async_notifier.__main__ import main; "
        f"code = main(['preview', '--out', {str(tmp_path)!r}]); "
        "loaded = [m for m in ('aioboto3', 'botocore', 'aiosmtplib', 'async_notifier.runner') "
        "if m in sys.modules]; "
        "print(code, loaded)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.splitlines()[-1] == "0 []", result.stderr


def test_cli_wait_time_limit_matches_the_runner() -> None:
    from async_notifier import __main__ as cli
    from async_notifier import runner

    assert cli.MAX_WAIT_TIME == runner.MAX_WAIT_TIME


def test_unwritable_out_exits_2(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a directory")
    result = preview(tmp_path, "--out", "taken")
    assert result.returncode == 2
    assert "cannot write to taken" in result.stderr
