"""`make run-local` itself, as a new user runs it: exit status, the report, the outbox files."""

from __future__ import annotations

import email
import email.policy
import io
import os
import re
import subprocess
import zipfile
from email.message import EmailMessage
from pathlib import Path

from faults import S3Action, S3FaultProxy, S3Rule
from queues import client
from servers import MotoServer

from async_notifier.local.demo import Options, run_local

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def test_make_run_local(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    # The embedded moto, not whatever endpoint the caller's environment points at; and a make
    # of its own (no jobserver or flags inherited from a `make test` around this test).
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"AWS_ENDPOINT_URL", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    }
    done = subprocess.run(
        ["make", "--no-print-directory", "run-local", "MESSAGES=3", f"OUTBOX={outbox}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = done.stdout
    assert done.returncode == 0, output + done.stderr

    # The table: one row per message with what happened to it.
    rows = {
        m["label"].strip(): m
        for m in re.finditer(
            r"^\s*(?P<n>\d+)  (?P<label>.+?)  +(?P<result>sent|moved to DLQ|recorded)  +"
            r"(?P<tries>\d+)  (?P<detail>.*)$",
            output,
            re.MULTILINE,
        )
    }
    assert set(rows) == {
        "COMPLETED pt-BR",
        "FAILED en",
        "bad: not JSON",
        "SES (simulated): #1 bounced, permanent",
        "SES (simulated): #2 delivered",
        "FAILED pt-BR, to the bounced",
    }, output
    assert rows["COMPLETED pt-BR"]["result"] == "sent"
    assert rows["FAILED en"]["result"] == "sent"
    assert rows["bad: not JSON"]["result"] == "moved to DLQ"
    assert rows["bad: not JSON"]["tries"] == "1"  # the worker dead-letters it at once
    assert "bad_message: body is not valid JSON" in rows["bad: not JSON"]["detail"]
    # SES's events (simulated: no local SES publishes any) are recorded, the bounce in the
    # suppression list, and the next email to that recipient is suppressed.
    assert rows["SES (simulated): #1 bounced, permanent"]["result"] == "recorded"
    assert rows["SES (simulated): #2 delivered"]["result"] == "recorded"
    bounced = rows["FAILED pt-BR, to the bounced"]
    assert bounced["result"] == "moved to DLQ"
    assert bounced["detail"].startswith("suppressed: addr-"), output
    assert "@" not in bounced["detail"]
    assert "Every message ended where it should." in output

    # The delivery status of each, read back from the status table: SES's word on the
    # emails, the worker's on the rest, and none for a body that is no notification.
    section = output.split("Delivery status (", 1)[1].split("\n\n", 1)[0]
    assert "SES's events simulated by the demo" in section
    statuses = {
        m["n"]: (m["video"], m["status"], m["history"])
        for m in re.finditer(
            r"^\s*(?P<n>\d+)  (?P<video>demo-\d{4}|-)  +(?P<status>[a-z_]+)  +(?P<history>.*)$",
            section,
            re.MULTILINE,
        )
    }
    time = r"\d\d:\d\d:\d\d\.\d{3}"
    assert set(statuses) == {"1", "2", "3", str(bounced["n"])}, section
    assert statuses["1"][:2] == ("demo-0001", "bounced")
    assert re.fullmatch(f"accepted {time}, bounced {time} \\(bounce:Permanent:General\\)",
                        statuses["1"][2]), section  # fmt: skip
    assert statuses["2"][:2] == ("demo-0002", "delivered")
    assert re.fullmatch(f"accepted {time}, delivered {time}", statuses["2"][2]), section
    assert statuses["3"] == ("-", "none", "not a notification")
    again = statuses[str(bounced["n"])]
    assert again[1] == "suppressed"
    assert again[2].startswith("suppressed "), section

    # The files: an .eml and an .html per email, named in the table.
    emls = sorted(outbox.glob("*.eml"))
    htmls = sorted(outbox.glob("*.html"))
    assert len(emls) == len(htmls) == 2
    for path in [*emls, *htmls]:
        assert path.name in output
    for path in htmls:
        assert path.read_text(encoding="utf-8").lstrip().startswith("<!DOCTYPE html>")
    [completed] = [p for p in emls if p.name.endswith("demo-0001.eml")]
    message = email.message_from_bytes(
        completed.read_bytes(), _class=EmailMessage, policy=email.policy.default
    )
    assert message["To"].addresses[0].addr_spec == "ana.souza@example.com"
    assert message["Content-Language"] == "pt-BR"
    [attachment] = list(message.iter_attachments())
    assert attachment.get_content_type() == "application/zip"
    assert attachment.get_filename() == "férias na praia.zip"
    with zipfile.ZipFile(io.BytesIO(attachment.get_content())) as archive:
        assert archive.testzip() is None
        assert archive.namelist()[0] == "frame_0001.jpg"
    assert (outbox / "worker.log").stat().st_size > 0

    # Everything it started has stopped: moto (its pid is in the report) and the catcher.
    moto_pid = re.search(r"pid (\d+)", output)
    assert moto_pid is not None, output
    assert not _alive(int(moto_pid[1]))


async def test_an_endpoint_without_dynamodb_runs_the_rest_of_the_demo(
    s3_proxy: S3FaultProxy, moto_server: MotoServer, restore_environ: None, tmp_path: Path
) -> None:
    """LocalStack without Docker serves no DynamoDB: the demo says what it skips, shows the
    rest, and leaves nothing behind on the endpoint it was pointed at."""
    s3_proxy.set_rules(S3Rule(S3Action.INTERNAL_ERROR, target="DynamoDB_20120810.CreateTable"))
    out = io.StringIO()
    options = Options(
        messages=3, zip_size=20_000, outbox=tmp_path / "outbox", endpoint_url=s3_proxy.endpoint_url
    )
    report = await run_local(options, out=out)

    output = out.getvalue()
    assert report.ok, output
    assert [s.label for s in report.samples] == ["COMPLETED pt-BR", "FAILED en", "bad: not JSON"]
    assert [s.result for s in report.samples] == ["sent", "sent", "moved to DLQ"]
    assert "Every message ended where it should." in output
    assert (
        f"Skipped SES's events, suppression and delivery status: {s3_proxy.endpoint_url} "
        "serves no DynamoDB" in output
    )
    assert "Delivery status (" not in output
    assert "SUPPRESSION_TABLE" not in os.environ
    assert s3_proxy.counts[S3Action.INTERNAL_ERROR] >= 1
    sqs = client("sqs", moto_server.endpoint_url)
    assert not sqs.list_queues(QueueNamePrefix=report.resource_name).get("QueueUrls")
    buckets = client("s3", moto_server.endpoint_url).list_buckets()["Buckets"]
    assert report.resource_name not in {b["Name"] for b in buckets}


async def test_the_demo_through_the_ses_api(
    moto_server: MotoServer, restore_environ: None, tmp_path: Path
) -> None:
    """`make run-local TRANSPORT=ses`: the same demo through the endpoint's SES v2 API; the
    outbox is filled from the raw messages SES kept, byte for byte what the worker sent."""
    moto_server.reset()
    out = io.StringIO()
    options = Options(
        messages=4,
        zip_size=20_000,
        outbox=tmp_path / "outbox",
        endpoint_url=moto_server.endpoint_url,
        transport="ses",
    )
    report = await run_local(options, out=out)

    output = out.getvalue()
    assert report.ok, output
    assert "SES v2 API:" in output
    assert "mail catcher" not in output
    by_label = {sample.label: sample for sample in report.samples}
    [mail] = by_label["COMPLETED pt-BR"].emails
    assert mail.attachments == ("férias na praia.zip",)
    assert mail.eml.exists()
    assert [m.video_id for m in by_label["FAILED en"].emails] == [by_label["FAILED en"].video_id]
    # The statuses join SES's MessageId: the API's answer (accepted) and its events' own.
    delivered = by_label["FAILED en"].status
    assert delivered is not None
    assert delivered.status == "delivered"
    assert [e.state for e in delivered.history] == ["accepted", "delivered"]
    assert delivered.provider_id
    assert {e.provider_id for e in delivered.history} == {delivered.provider_id}
    bounced = by_label["COMPLETED pt-BR"].status
    assert bounced is not None
    assert (bounced.status, bounced.reason) == ("bounced", "bounce:Permanent:General")
    assert os.environ["TRANSPORT"] == "ses"
