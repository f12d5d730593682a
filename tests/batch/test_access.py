"""Which objects a message may have mailed (`batch/access.py`), decided before any download.

End to end (moto, the handler, nothing mailed) in `test_safe_defaults.py`; here every rule
on its own, over parsed messages.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from async_notifier.batch.access import check_location
from async_notifier.config import Settings
from async_notifier.errors import BucketNotAllowed, KeyNotAllowed
from async_notifier.messages import Notification, parse_body


def settings(buckets: str, prefix: str | None = None) -> Settings:
    env = {"SMTP_SERVER": "smtp.test", "EMAIL_FROM": "a@example.com", "ALLOWED_BUCKETS": buckets}
    if prefix is not None:
        env["ALLOWED_KEY_PREFIX"] = prefix
    return Settings.from_env(env)


def message(bucket: str = "videos", key: str = "users/u1/v1.zip", **fields: Any) -> Notification:
    body: dict[str, Any] = {"video_id": "v1", "status": "COMPLETED", "bucket": bucket, "key": key}
    body.update(fields)
    if "email" not in body and "cognito_user_id" not in body:
        body["email"] = "ana@example.com"
    return parse_body(json.dumps(body))


def test_a_listed_bucket_is_allowed_and_another_is_not() -> None:
    check_location(message("videos"), settings("videos,archive"))
    check_location(message("archive"), settings("videos,archive"))
    with pytest.raises(BucketNotAllowed, match="'private-data' is not in ALLOWED_BUCKETS") as e:
        check_location(message("private-data"), settings("videos,archive"))
    assert e.value.transient is False


def test_star_allows_any_bucket() -> None:
    check_location(message("anything-goes"), settings("*"))


def test_a_failed_notification_names_no_object_and_is_not_checked() -> None:
    failed = parse_body(
        json.dumps({"video_id": "v1", "status": "FAILED", "email": "a@example.com"})
    )
    check_location(failed, settings("videos", "users/{cognito_user_id}/"))


@pytest.mark.parametrize(
    ("key", "fields", "allowed"),
    [
        ("videos/v1/frames.zip", {}, True),
        ("videos/v1/sub/frames.zip", {}, True),
        ("videos/v2/frames.zip", {}, False),  # another video's key
        ("videos/v1x/frames.zip", {}, False),  # the prefix ends at the slash
        ("elsewhere/v1/frames.zip", {}, False),
        ("videos/v1/../v2/frames.zip", {}, False),  # dot segments walk out of the prefix
        ("videos/v1/./frames.zip", {}, False),
    ],
)
def test_keys_under_the_video_prefix(key: str, fields: dict[str, Any], allowed: bool) -> None:
    s = settings("videos", "videos/{video_id}/")
    if allowed:
        check_location(message(key=key, **fields), s)
    else:
        with pytest.raises(KeyNotAllowed) as caught:
            check_location(message(key=key, **fields), s)
        assert caught.value.transient is False


def test_a_prefix_tied_to_the_cognito_user_needs_that_user_as_the_recipient() -> None:
    s = settings("videos", "users/{cognito_user_id}/")
    check_location(message(key="users/u1/v1.zip", cognito_user_id="u1"), s)
    with pytest.raises(KeyNotAllowed, match="outside ALLOWED_KEY_PREFIX"):
        check_location(message(key="users/u2/v1.zip", cognito_user_id="u1"), s)
    with pytest.raises(KeyNotAllowed, match="names an email of its own"):
        check_location(
            message(key="users/u1/v1.zip", cognito_user_id="u1", email="x@evil.example"), s
        )
    with pytest.raises(KeyNotAllowed, match="needs cognito_user_id"):
        check_location(message(key="users/u1/v1.zip"), s)


def test_a_placeholder_value_with_a_slash_cannot_bend_the_prefix() -> None:
    s = settings("videos", "users/{cognito_user_id}/")
    with pytest.raises(KeyNotAllowed, match="must not contain '/'"):
        check_location(message(key="users/u1/x/v1.zip", cognito_user_id="u1/x"), s)
