"""Parsing one SQS record body into a `Notification`: every alias, every way to be bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from servers import sqs_record

from async_notifier.errors import BadMessage
from async_notifier.messages import Notification, SqsRecord, parse_body

CANONICAL: dict[str, Any] = {
    "video_id": "298ce197-3627-4845-83d7-cd6c98a9df8c",
    "status": "COMPLETED",
    "bucket": "videos-zip",
    "key": "298ce197/298ce197.zip",
    "email": "maria@example.com",
    "name": "Maria",
    "file_name": "ferias.mp4",
    "message": "",
    "locale": "pt-BR",
    "timestamp": "2025-06-19T19:46:37+00:00",
}


def body(**changes: Any) -> str:
    """The canonical body with fields changed; a value of None removes the field."""
    data = {**CANONICAL, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not None})


def bad(text: str) -> str:
    """Parse `text`, expecting BadMessage; return its reason."""
    with pytest.raises(BadMessage) as caught:
        parse_body(text)
    reason = caught.value.reason
    assert reason == str(caught.value)
    assert caught.value.transient is False  # bad input never gets better by retrying
    return reason


# --------------------------------------------------------------------------- good input


def test_canonical_body() -> None:
    n = parse_body(json.dumps(CANONICAL))
    assert n == Notification(
        video_id="298ce197-3627-4845-83d7-cd6c98a9df8c",
        status="COMPLETED",
        email="maria@example.com",
        name="Maria",
        file_name="ferias.mp4",
        message="",
        locale="pt-BR",
        timestamp=datetime(2025, 6, 19, 19, 46, 37, tzinfo=UTC),
        bucket="videos-zip",
        key="298ce197/298ce197.zip",
    )
    assert n.display_name == "ferias.mp4"


def test_zip_object_alias() -> None:
    n = parse_body(body(bucket=None, key=None, zip={"bucket": "other-zips", "key": "a/b.zip"}))
    assert (n.bucket, n.key) == ("other-zips", "a/b.zip")


def test_s3_bucket_and_s3_key_aliases() -> None:
    n = parse_body(body(bucket=None, key=None, s3_bucket="legacy-zips", s3_key="c/d.zip"))
    assert (n.bucket, n.key) == ("legacy-zips", "c/d.zip")


def test_recipient_email_and_recipient_name_aliases() -> None:
    n = parse_body(
        body(email=None, name=None, recipient_email="joao@example.com", recipient_name="João")
    )
    assert n.email == "joao@example.com"
    assert n.name == "João"


def test_minimal_body_defaults() -> None:
    n = parse_body(
        json.dumps({"video_id": "v-1", "email": "a@example.com", "bucket": "bkt", "key": "k"})
    )
    assert n.status == "COMPLETED"
    assert n.name is None
    assert n.file_name is None
    assert n.message == ""
    assert n.locale is None  # the renderer's default (pt-BR) applies
    assert n.timestamp is None
    assert n.display_name == "v-1"  # no file name: the video id names the video


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("completed", "COMPLETED"),
        ("Completed", "COMPLETED"),
        ("failed", "FAILED"),
        (" FaIlEd ", "FAILED"),
    ],
)
def test_status_is_case_insensitive(raw: str, expected: str) -> None:
    assert parse_body(body(status=raw)).status == expected


def test_status_defaults_to_completed() -> None:
    assert parse_body(body(status=None)).status == "COMPLETED"
    assert parse_body(body(status="")).status == "COMPLETED"


def test_failed_needs_no_bucket_or_key() -> None:
    n = parse_body(body(status="FAILED", bucket=None, key=None, message="codec h265 unsupported"))
    assert n.status == "FAILED"
    assert (n.bucket, n.key) == (None, None)
    assert n.message == "codec h265 unsupported"


def test_sns_envelope_is_unwrapped() -> None:
    envelope = {
        "Type": "Notification",
        "MessageId": "0f1e2d3c-0000-4000-8000-000000000000",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:video-events",
        "Message": body(email="sns@example.com"),
        "Timestamp": "2025-06-19T19:46:38.000Z",
    }
    n = parse_body(json.dumps(envelope))
    assert n.email == "sns@example.com"
    assert n.key == CANONICAL["key"]


def test_sns_envelope_with_bad_inner_message_is_bad_input() -> None:
    reason = bad(json.dumps({"Type": "Notification", "Message": "{not json"}))
    assert "JSON" in reason
    reason = bad(json.dumps({"Type": "Notification", "Message": {"video_id": "v"}}))
    assert "Message" in reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("pt-BR", "pt-BR"),
        ("pt_br", "pt-BR"),
        ("PT-br", "pt-BR"),
        ("pt", "pt-BR"),
        ("en", "en"),
        ("en-US", "en"),
        ("en_GB", "en"),
        ("fr-FR", None),
        ("klingon", None),
        ("", None),
    ],
)
def test_locale_normalisation(raw: str, expected: str | None) -> None:
    assert parse_body(body(locale=raw)).locale == expected


def test_email_is_trimmed_and_idn_domain_made_ascii() -> None:
    assert parse_body(body(email="  maria@example.com ")).email == "maria@example.com"
    assert parse_body(body(email="maria@exámple.com")).email == "maria@xn--exmple-qta.com"


def test_timestamp_with_z_suffix() -> None:
    n = parse_body(body(timestamp="2025-06-19T19:46:37Z"))
    assert n.timestamp == datetime(2025, 6, 19, 19, 46, 37, tzinfo=UTC)


def test_hostile_but_printable_values_are_kept_verbatim() -> None:
    """Markup and address-like text in a name is not a header break; escaping is later's job."""
    n = parse_body(
        body(
            name='Eve "x" <eve@evil.example>, bob@x.com', file_name="<script>alert(1)</script>.mp4"
        )
    )
    assert n.name == 'Eve "x" <eve@evil.example>, bob@x.com'
    assert n.file_name == "<script>alert(1)</script>.mp4"


def test_identity_is_stable_and_distinguishes_records() -> None:
    a = parse_body(body())
    assert a.identity == parse_body(body(name="Other", file_name="x.mp4")).identity
    assert a.identity != parse_body(body(video_id="another-video")).identity
    assert a.identity != parse_body(body(status="FAILED")).identity
    assert a.identity != parse_body(body(email="other@example.com")).identity


def test_long_error_message_is_truncated_not_rejected() -> None:
    n = parse_body(body(status="FAILED", message="x" * 50_000))
    assert n.message.startswith("x" * 10_000)
    assert len(n.message) <= 10_001


# --------------------------------------------------------------------------- bad input


def test_invalid_json() -> None:
    assert "not valid JSON" in bad("{'video_id': 'single quotes'}")
    assert "not valid JSON" in bad("")


@pytest.mark.parametrize("text", ["[]", '"a string"', "42", "null", "true"])
def test_body_that_is_not_an_object(text: str) -> None:
    assert "not a JSON object" in bad(text)


def test_missing_email() -> None:
    assert "'email' is required" in bad(body(email=None))


def test_missing_video_id() -> None:
    assert "'video_id' is required" in bad(body(video_id=None))
    assert "'video_id' is required" in bad(body(video_id="   "))


@pytest.mark.parametrize("missing", ["bucket", "key"])
def test_completed_without_bucket_or_key(missing: str) -> None:
    reason = bad(body(**{missing: None}))
    assert "COMPLETED" in reason
    assert "bucket" in reason
    assert "key" in reason


def test_unknown_status() -> None:
    reason = bad(body(status="DONE"))
    assert "unknown status" in reason
    assert "DONE" in reason


@pytest.mark.parametrize(
    "address",
    ["a@x.com, b@x.com", "a@x.com;b@x.com", "a@x.com b@x.com"],
)
def test_two_addresses(address: str) -> None:
    assert "not a valid single address" in bad(body(email=address))


def test_display_name_form_of_address() -> None:
    assert "not a valid single address" in bad(body(email="Eve <e@x.com>"))


@pytest.mark.parametrize("address", ["maria", "maria@", "@example.com", "maria@@example.com"])
def test_malformed_address(address: str) -> None:
    assert "'email'" in bad(body(email=address))


@pytest.mark.parametrize("field", ["name", "file_name", "email", "video_id"])
@pytest.mark.parametrize("breaker", ["\r\n", "\n", "\r"])
def test_line_breaks_in_header_bound_values(field: str, breaker: str) -> None:
    original = CANONICAL[field]
    reason = bad(body(**{field: f"{original}{breaker}Bcc: attacker@evil.example"}))
    assert f"'{field}'" in reason
    assert "line breaks" in reason


def test_line_break_through_alias_fields() -> None:
    assert "'email'" in bad(body(email=None, recipient_email="a@x.com\r\nBcc: b@x.com"))
    assert "'name'" in bad(body(name=None, recipient_name="Eve\nBcc: b@x.com"))


@pytest.mark.parametrize("value", ["a\u2028b", "a\tb", "a\x00b", "a\x1bb", "a\x85b"])
def test_other_control_or_separator_characters_in_name(value: str) -> None:
    assert "'name'" in bad(body(name=value))


def test_control_characters_in_key() -> None:
    assert "'key'" in bad(body(key="a\r\nb.zip"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("video_id", 12345),
        ("email", ["maria@example.com"]),
        ("email", 7),
        ("name", {"first": "Maria"}),
        ("file_name", 3.5),
        ("status", 1),
        ("message", ["boom"]),
        ("locale", 5),
        ("timestamp", 1718826397),
        ("key", 99),
        ("bucket", 123),
        ("zip", "videos-zip/key.zip"),
    ],
)
def test_non_string_types(field: str, value: Any) -> None:
    assert repr(field) in bad(body(**{field: value}))


@pytest.mark.parametrize("value", ["yesterday", "2025-13-01T00:00:00", "19/06/2025"])
def test_bad_timestamp(value: str) -> None:
    assert "'timestamp' is not ISO 8601" in bad(body(timestamp=value))


@pytest.mark.parametrize(
    "value", ["../etc", "a", "-videos", "videos zip", "videos/zip", "vídeos", "x" * 300]
)
def test_bad_bucket_name(value: str) -> None:
    assert "'bucket' is not a valid bucket name" in bad(body(bucket=value))


def test_bad_bucket_name_in_aliases() -> None:
    assert "bucket" in bad(body(bucket=None, s3_bucket="../x"))
    assert "bucket" in bad(body(bucket=None, zip={"bucket": "a b", "key": "k"}))


def test_too_long_values() -> None:
    assert "'name'" in bad(body(name="n" * 1001))
    assert "'key'" in bad(body(key="k" * 1025))


# --------------------------------------------------------------------------- SQS record


def test_sqs_record_from_event() -> None:
    raw = sqs_record(json.loads(body()), "m-1", receive_count=3)
    record = SqsRecord.from_event(raw)
    assert record.message_id == "m-1"
    assert record.body == raw["body"]
    assert record.receive_count == 3


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not a record", "not an object"),
        ({"body": "{}"}, "messageId"),
        ({"messageId": "", "body": "{}"}, "messageId"),
        ({"messageId": "m-1"}, "body"),
        ({"messageId": "m-1", "body": {"video_id": "v"}}, "body"),
    ],
)
def test_malformed_sqs_record(raw: Any, reason: str) -> None:
    with pytest.raises(BadMessage, match=reason):
        SqsRecord.from_event(raw)
