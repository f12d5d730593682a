"""`async-notifier status`: a notification's history read back from STATUS_TABLE (DynamoDB on
moto), as text and as JSON, and its exit statuses."""

from __future__ import annotations

import asyncio
import json

import aioboto3
import pytest
from servers import REGION, MotoServer
from status_events import create_status_table

from async_notifier import __main__ as cli
from async_notifier.aws.status import DynamoStatusStore
from async_notifier.delivery_status import StatusChange, iso_time

TABLE = "notifier-status"
FIRST = "1" * 40
SECOND = "2" * 40
OTHER = "3" * 40
AT = 1_796_000_000_000  # epoch ms
PROVIDER = "0100018c1c2d3e4f-abcdefab-1234-5678-9abc-def012345678-000000"


def _write(endpoint_url: str, changes: list[StatusChange]) -> None:
    async def write() -> None:
        async with aioboto3.Session().client(
            "dynamodb", endpoint_url=endpoint_url, region_name=REGION
        ) as client:
            store = DynamoStatusStore(client, TABLE)
            for change in changes:
                await store.write(change)

    asyncio.run(write())


@pytest.fixture
def table(aws: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """Two notifications of video v1 (one delivered after its acceptance, written out of
    order; one that bounced) and one of another video."""
    create_status_table(aws.endpoint_url, TABLE)
    monkeypatch.setenv("STATUS_TABLE", TABLE)
    for name in ("SMTP_SERVER", "EMAIL_FROM", "SUPPRESSION_TABLE"):
        monkeypatch.delenv(name, raising=False)
    _write(
        aws.endpoint_url,
        [
            StatusChange(FIRST, "delivered", AT + 900, "ses", "ses:d1", video_id="v1",
                         provider_id=PROVIDER),
            StatusChange(FIRST, "accepted", AT, "worker", "w:a1", video_id="v1",
                         notification_id="n-1", provider_id=PROVIDER, transport="smtp",
                         attempt=1),
            StatusChange(SECOND, "accepted", AT + 2000, "worker", "w:a2", video_id="v1",
                         transport="ses", attempt=2),
            StatusChange(SECOND, "bounced", AT + 3000, "ses", "ses:b2", video_id="v1",
                         reason="bounce:Permanent:General"),
            StatusChange(OTHER, "failed", AT + 5000, "worker", "w:f3", video_id="v2",
                         reason="bad_message: no email"),
        ],
    )  # fmt: skip
    return aws


def test_a_videos_notifications_as_text(
    table: MotoServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--video-id", "v1"]) == 0
    out = capsys.readouterr().out
    first, second = out.strip().split("\n\n")
    assert first.splitlines()[0] == f"notification {FIRST}  video v1  notification_id n-1"
    assert f"status: delivered since {iso_time(AT + 900)}" in first
    assert f"transport smtp, attempts 1, provider id {PROVIDER}" in first
    history = [line.split() for line in first.splitlines() if line.startswith("    ")]
    assert [(h[0], h[1], h[2]) for h in history] == [
        (iso_time(AT), "accepted", "worker"),
        (iso_time(AT + 900), "delivered", "ses"),
    ]
    assert "attempt 1" in first.splitlines()[-2]
    assert f"status: bounced since {iso_time(AT + 3000)} (bounce:Permanent:General)" in second
    assert OTHER not in out


def test_one_notification_as_json(table: MotoServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--notification-id", f"<{SECOND}@example.com>", "--json"]) == 0
    [record] = json.loads(capsys.readouterr().out)["notifications"]
    assert record["tracking_id"] == SECOND
    assert (record["status"], record["reason"], record["terminal"]) == (
        "bounced",
        "bounce:Permanent:General",
        True,
    )
    assert (record["transport"], record["attempts"]) == ("ses", 2)
    assert [(h["state"], h["source"], h["time"]) for h in record["history"]] == [
        ("accepted", "worker", iso_time(AT + 2000)),
        ("bounced", "ses", iso_time(AT + 3000)),
    ]


def test_the_producers_notification_id_within_a_video(
    table: MotoServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--video-id", "v1", "--notification-id", "n-1", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["notifications"]
    assert [r["tracking_id"] for r in records] == [FIRST]


def test_nothing_found_exits_1(table: MotoServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--video-id", "nobody"]) == 1
    assert "no status for video nobody in notifier-status" in capsys.readouterr().err
    assert cli.main(["status", "--notification-id", "f" * 40, "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"notifications": []}
    assert "no status for notification" in captured.err


def test_settings_and_usage_errors_exit_2(
    table: MotoServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status"]) == 2
    assert "--video-id or --notification-id" in capsys.readouterr().err
    assert cli.main(["status", "--notification-id", "n-1"]) == 2
    assert "give its --video-id too" in capsys.readouterr().err
    monkeypatch.delenv("STATUS_TABLE")
    assert cli.main(["status", "--video-id", "v1"]) == 2
    assert "STATUS_TABLE is required" in capsys.readouterr().err


def test_a_table_that_cannot_be_read_exits_3(
    table: MotoServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STATUS_TABLE", "no-such-table")
    assert cli.main(["status", "--video-id", "v1"]) == 3
    err = capsys.readouterr().err
    assert "DynamoDB Query failed" in err
    assert "ResourceNotFoundException" in err
