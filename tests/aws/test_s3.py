"""Streaming S3 objects (moto server) into the private scratch directory."""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from faults import S3Action, S3FaultProxy, S3Rule
from servers import LOOPBACK, MotoServer, make_zip, s3_client, seed_objects

from async_notifier.aws.clients import aws_client
from async_notifier.aws.s3 import ObjectStore
from async_notifier.batch.scratch import ScratchDir
from async_notifier.config import Settings
from async_notifier.errors import (
    DownloadFailed,
    ObjectUnavailable,
    TooLarge,
)

CHUNK = 4096


def settings(endpoint_url: str, **extra: str) -> Settings:
    return Settings.from_env(
        {
            "SMTP_SERVER": "smtp.invalid",
            "EMAIL_FROM": "no-reply@example.com",
            "ALLOWED_BUCKETS": "*",
            "AWS_ENDPOINT_URL": endpoint_url,
            "AWS_REGION": "us-east-1",
            **extra,
        }
    )


@contextlib.asynccontextmanager
async def object_store(endpoint_url: str) -> AsyncIterator[ObjectStore]:
    async with aws_client("s3", settings(endpoint_url)) as client:
        yield ObjectStore(client, chunk_size=CHUNK)


@pytest.fixture
def scratch(tmp_path: Path) -> Any:
    parent = tmp_path / "tmp"
    parent.mkdir()
    with ScratchDir(parent) as directory:
        yield directory


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


async def test_download_is_byte_identical_over_many_chunks(
    aws: MotoServer, bucket: str, scratch: ScratchDir
) -> None:
    data = make_zip(300_000, seed=11)  # ~73 chunks of 4 KiB
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v1/v1.zip": data})
    dest = scratch.new_file()
    async with object_store(aws.endpoint_url) as store:
        size = await store.download(bucket, "v1/v1.zip", dest)
    assert size == len(data)
    assert dest.read_bytes() == data
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


async def test_many_concurrent_downloads_through_one_client(
    aws: MotoServer, bucket: str, scratch: ScratchDir
) -> None:
    objects = {f"v{i}/frames.zip": make_zip(20_000 + i * 1000, seed=i) for i in range(12)}
    seed_objects(s3_client(aws.endpoint_url), bucket, objects)
    async with object_store(aws.endpoint_url) as store:
        dests = {key: scratch.new_file() for key in objects}
        sizes = await asyncio.gather(
            *(store.download(bucket, key, dest) for key, dest in dests.items())
        )
    assert sizes == [len(body) for body in objects.values()]
    for key, dest in dests.items():
        assert dest.read_bytes() == objects[key]


async def test_traversal_key_stays_inside_scratch_dir(
    aws: MotoServer, bucket: str, tmp_path: Path
) -> None:
    data = make_zip(10_000, seed=5)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"../../x.zip": data})
    parent = tmp_path / "a" / "b"
    parent.mkdir(parents=True)
    with ScratchDir(parent) as scratch:
        dest = scratch.new_file()
        async with object_store(aws.endpoint_url) as store:
            await store.download(bucket, "../../x.zip", dest)
        assert dest.read_bytes() == data
        assert dest.parent == scratch.path
        assert dest.name != "x.zip"
        assert files_under(tmp_path) == [dest]
    assert files_under(tmp_path) == []


async def test_missing_key_is_permanent_object_unavailable(
    aws: MotoServer, bucket: str, scratch: ScratchDir
) -> None:
    dest = scratch.new_file()
    async with object_store(aws.endpoint_url) as store:
        with pytest.raises(ObjectUnavailable) as caught:
            await store.download(bucket, "does/not/exist.zip", dest)
    assert caught.value.transient is False
    assert "NoSuchKey" in caught.value.reason
    assert "does/not/exist.zip" in caught.value.reason
    assert not dest.exists()
    assert files_under(scratch.path) == []


async def test_missing_bucket_is_permanent_object_unavailable(
    aws: MotoServer, scratch: ScratchDir
) -> None:
    dest = scratch.new_file()
    async with object_store(aws.endpoint_url) as store:
        with pytest.raises(ObjectUnavailable, match="NoSuchBucket"):
            await store.download("no-such-bucket", "k.zip", dest)
    assert not dest.exists()


# --------------------------------------------------------------------------- a broken stream

# moto always serves whole objects, so a broken download needs a peer that breaks it: this one
# speaks just enough HTTP to answer GetObject with a Content-Length it never delivers.
DECLARED = 200_000
DELIVERED = 60_000


@contextlib.asynccontextmanager
async def truncating_s3() -> AsyncIterator[str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\n"
                b"Content-Type: application/zip\r\n"
                + f"Content-Length: {DECLARED}\r\n".encode()
                + b'ETag: "0123456789abcdef0123456789abcdef"\r\n'
                b"x-amz-request-id: TRUNCATED\r\n\r\n" + b"P" * DELIVERED
            )
            await writer.drain()
        finally:
            writer.close()  # mid-body: the client sees the connection end early

    server = await asyncio.start_server(serve, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_broken_stream_is_transient_and_leaves_no_file(
    scratch: ScratchDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    async with truncating_s3() as endpoint, object_store(endpoint) as store:
        dest = scratch.new_file()
        with pytest.raises(DownloadFailed) as caught:
            await store.download("videos-zip", "v/v.zip", dest)
    assert caught.value.transient is True
    assert "s3://videos-zip/v/v.zip" in caught.value.reason
    assert not dest.exists()
    assert files_under(scratch.path) == []


# --------------------------------------------------------------------------- unknown sizes


@pytest.fixture
def chunked_objects(aws: MotoServer, bucket: str, s3_proxy: S3FaultProxy) -> dict[str, bytes]:
    """Objects served through the proxy without a Content-Length (Transfer-Encoding: chunked)."""
    objects = {"small.zip": make_zip(30_000, seed=31), "big.zip": make_zip(400_000, seed=32)}
    seed_objects(s3_client(aws.endpoint_url), bucket, objects)
    s3_proxy.set_rules(S3Rule(S3Action.CHUNKED, methods={"GET"}, slow_chunk=3000))
    return objects


async def test_an_unannounced_size_is_counted_and_stopped_past_the_limit(
    s3_proxy: S3FaultProxy, bucket: str, chunked_objects: dict[str, bytes], scratch: ScratchDir
) -> None:
    limit = 100_000
    async with object_store(s3_proxy.endpoint_url) as store:
        small = await store.open(bucket, "small.zip")
        assert small.size == -1
        dest = scratch.new_file()
        assert await store.save(small, dest, limit) == len(chunked_objects["small.zip"])
        assert dest.read_bytes() == chunked_objects["small.zip"]

        big = await store.open(bucket, "big.zip")
        assert big.size == -1
        too_big = scratch.new_file()
        with pytest.raises(TooLarge) as caught:
            await store.save(big, too_big, limit)
    # Stopped at the first chunk past the limit, not at the end of the object.
    assert limit < caught.value.written <= limit + CHUNK
    assert not too_big.exists()
    assert files_under(scratch.path) == [dest]
    assert s3_proxy.counts == {S3Action.CHUNKED: 2}
