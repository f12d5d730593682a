"""The one way the worker makes AWS clients: the function's and the SQS runner's alike.

aioboto3 costs about 180 ms to import on a cold start, so it is imported when the first
client is wanted (`new_session`, which callers run in a thread). Clients made from one
session share its loaded data (endpoints, partitions): a second client costs a few ms
instead of tens.
"""

from __future__ import annotations

from typing import Any

from ..config import Settings
from .secrets import KeyPair

# botocore's standard retry mode: 3 attempts in all, with its own jittered back-off.
MAX_ATTEMPTS = 3


def new_session() -> Any:
    import aioboto3

    return aioboto3.Session()


def aws_client(
    service: str,
    settings: Settings,
    session: Any = None,
    *,
    max_pool_connections: int | None = None,
    read_timeout: float | None = None,
    keys: KeyPair | None = None,
    region: str | None = None,
) -> Any:
    """An aiobotocore client (an async context manager) for `service`.

    Its HTTP pool is sized for the record concurrency unless `max_pool_connections` says
    otherwise; reads time out after `S3_TIMEOUT` unless `read_timeout` says otherwise (the
    runner's long polls wait longer by design). `keys` signs with an access key pair
    instead of the process's credentials (the links of LINK_SIGNING_SECRET_ID). `region`
    replaces AWS_REGION (SES's quota is read in the region of its SMTP endpoint).
    """
    from aiobotocore.config import AioConfig

    read = settings.s3_timeout if read_timeout is None else read_timeout
    config = AioConfig(
        max_pool_connections=max_pool_connections or settings.max_concurrency,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=min(10.0, read),
        read_timeout=read,
        # Presigned links must be SigV4: S3 refuses SigV2 in newer regions and buckets.
        signature_version="s3v4" if service == "s3" else None,
        # DynamoDB validates every request itself; botocore's check before sending, of a
        # 25-item BatchWriteItem (the status writes), cost 40% of the call's CPU.
        parameter_validation=service != "dynamodb",
    )
    credentials: dict[str, str] = {}
    if keys is not None:
        credentials = {
            "aws_access_key_id": keys.access_key_id,
            "aws_secret_access_key": keys.secret_access_key,
        }
    return (session or new_session()).client(
        service,
        region_name=region or settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=config,
        **credentials,
    )
