"""When `make localstack` and the LocalStack tests call LocalStack ready (no LocalStack needed)."""

from __future__ import annotations

import pytest

from async_notifier.local.localstack import ready


@pytest.mark.parametrize(
    ("services", "expected"),
    [
        ({"s3": "running", "sqs": "available"}, True),
        # Host mode here: DynamoDB Local cannot be installed, and a failed call marks it.
        ({"s3": "running", "sqs": "running", "dynamodb": "error"}, True),
        ({"s3": "running", "sqs": "error"}, False),
        ({"s3": "initializing", "sqs": "running"}, False),
        ({"sqs": "running"}, False),
    ],
)
def test_ready_needs_s3_and_sqs(services: dict[str, str], expected: bool) -> None:
    assert ready({"services": services}) is expected


def test_no_health_document_is_not_ready() -> None:
    assert not ready(None)
    assert not ready({"edition": "community"})
