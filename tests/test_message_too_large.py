"""A server that refuses a message for its size, though it advertised no limit: the ZIP goes
as a download link instead, and the process remembers the server's limit.

End to end through `handler.lambda_handler`, moto S3 and a scripted relay that answers
`552 5.3.4` in the middle of any body over 100 KB and hangs up, as some servers do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scripted_relay import Rule, ScriptedRelay
from servers import (
    FakeLambdaContext,
    MotoServer,
    failed_ids,
    log_lines,
    make_zip,
    s3_client,
    seed_objects,
    sqs_event,
    sqs_record,
)

import handler

TOO_LARGE = "552 5.3.4 Message size exceeds fixed limit"


def completed(video_id: str, key: str, recipient: str) -> dict[str, str]:
    return {
        "video_id": video_id,
        "status": "COMPLETED",
        "bucket": "videos-zip",
        "key": key,
        "email": recipient,
    }


def test_a_zip_too_large_for_the_server_goes_as_a_link(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_objects(
        s3_client(aws.endpoint_url),
        bucket,
        {"big-1.zip": make_zip(300_000, seed=1), "big-2.zip": make_zip(300_000, seed=2)},
    )
    script = [Rule("BODY", reply=TOO_LARGE, after_bytes=100_000, hang_up=True)]
    with ScriptedRelay(script, size=None) as relay:  # no SIZE: the server says nothing first
        monkeypatch.setenv("SMTP_PORT", str(relay.port))
        monkeypatch.setenv("MAX_CONCURRENCY", "1")  # the first record teaches the second
        records = [
            sqs_record(completed("v1", "big-1.zip", "ana@example.com"), "m-1"),
            sqs_record(completed("v2", "big-2.zip", "bo@example.com"), "m-2"),
        ]
        result = handler.lambda_handler(sqs_event(records), FakeLambdaContext())
        handler.reset()

        assert failed_ids(result) == []  # both delivered, as links
        assert len(relay.accepted) == 2
        first, second = relay.accepted
        # The first went up once with its ZIP (refused in the body), then once as a link...
        attempts = relay.uploads_of(first)
        assert [(u.verdict or "")[:3] for u in attempts] == ["552", "250"]
        assert attempts[0].size >= 100_000
        assert attempts[1].size < 100_000
        # ...and the second, the limit now known to the process, only as a link.
        [only] = relay.uploads_of(second)
        assert (only.verdict or "").startswith("250")
        assert only.size < 100_000
    lines = log_lines(capsys.readouterr().out)
    done = {line["messageId"]: line for line in lines if line.get("message") == "record done"}
    assert done["m-1"]["outcome"] == "sent_link"
    assert done["m-2"]["outcome"] == "sent_link"
    assert not any(line.get("message") == "record failed" for line in lines)
    assert list(Path(lambda_env["TMP_DIR"]).rglob("*")) == []  # every download removed
