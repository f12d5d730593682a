"""Streaming S3 objects (moto server) into the private scratch directory, and sweeping the
scratch directories that killed invocations left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faults import S3Action, S3FaultProxy, S3Rule
from servers import LOOPBACK, CapturedLogs, MotoServer, make_zip, s3_client, seed_objects

from async_notifier.aws.clients import aws_client
from async_notifier.aws.s3 import ObjectStore
from async_notifier.batch.scratch import STALE_AFTER, ScratchDir, stale_at
from async_notifier.config import Settings
from async_notifier.deadline import Deadline
from async_notifier.errors import (
    BucketNotAllowed,
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
            "AWS_ENDPOINT_URL": endpoint_url,
            "AWS_REGION": "us-east-1",
            **extra,
        }
    )


@contextlib.asynccontextmanager
async def object_store(
    endpoint_url: str, allowed: frozenset[str] = frozenset()
) -> AsyncIterator[ObjectStore]:
    async with aws_client("s3", settings(endpoint_url)) as client:
        yield ObjectStore(client, chunk_size=CHUNK, allowed_buckets=allowed)


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


async def test_scratch_dir_is_private_and_names_are_ours(tmp_path: Path) -> None:
    with ScratchDir(tmp_path) as scratch:
        assert scratch.path.parent == tmp_path
        assert stat.S_IMODE(scratch.path.stat().st_mode) == 0o700
        names = {scratch.new_file().name for _ in range(50)}
        assert len(names) == 50
        assert all(name.endswith(".zip") and "/" not in name for name in names)


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


async def test_bucket_outside_allowed_buckets_is_refused(
    aws: MotoServer, bucket: str, scratch: ScratchDir
) -> None:
    client = s3_client(aws.endpoint_url)
    seed_objects(client, "private-data", {"secrets.zip": b"PK secret"})
    seed_objects(client, bucket, {"ok.zip": b"PK ok"})
    allowed = frozenset({bucket})
    async with object_store(aws.endpoint_url, allowed) as store:
        dest = scratch.new_file()
        with pytest.raises(BucketNotAllowed) as caught:
            await store.download("private-data", "secrets.zip", dest)
        assert caught.value.transient is False
        assert "private-data" in caught.value.reason
        assert not dest.exists()
        with pytest.raises(BucketNotAllowed):
            store.check_allowed("private-data")
        # The allowed bucket still works through the same store.
        ok = scratch.new_file()
        assert await store.download(bucket, "ok.zip", ok) == len(b"PK ok")
    assert files_under(scratch.path) == [ok]


async def test_no_allowed_buckets_means_any_bucket(aws: MotoServer, scratch: ScratchDir) -> None:
    seed_objects(s3_client(aws.endpoint_url), "anything-goes", {"a.zip": b"PK a"})
    async with object_store(aws.endpoint_url) as store:
        dest = scratch.new_file()
        assert await store.download("anything-goes", "a.zip", dest) == 4


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


def test_scratch_dir_close_removes_everything(tmp_path: Path) -> None:
    scratch = ScratchDir(tmp_path)
    for index in range(3):
        scratch.new_file().write_bytes(b"x" * index)
    nested = scratch.path / "left" / "behind"
    nested.mkdir(parents=True)
    (nested / "file").write_bytes(b"y")
    scratch.close()
    assert not scratch.path.exists()
    assert os.listdir(tmp_path) == []
    scratch.close()  # idempotent


# --------------------------------------------------------------------------- stale scratch dirs


def _dir(parent: Path, name: str, *, age: float = 0.0) -> Path:
    path = parent / name
    path.mkdir()
    (path / "left.zip").write_bytes(b"x" * 100)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def test_scratch_dir_name_records_when_it_becomes_stale(tmp_path: Path) -> None:
    before = time.time()
    with ScratchDir(tmp_path) as plain:
        until = stale_at(plain.path.name)
        assert until is not None
        assert before + STALE_AFTER <= until <= time.time() + STALE_AFTER + 1
    with ScratchDir(tmp_path, Deadline.after(5.0, grace=20.0)) as timed:
        until = stale_at(timed.path.name)
        assert until is not None
        assert before + 25 <= until <= time.time() + 25 + 1  # the deadline's end
    assert stale_at("async-notifier-abcd1234") is None
    assert stale_at("async-notifier-until-12x-abcd1234") is None


def test_sweep_removes_only_stale_scratch_dirs(tmp_path: Path, captured: CapturedLogs) -> None:
    now = time.time()
    gone = [
        _dir(tmp_path, f"async-notifier-until-{int(now) - 5}-abcd1234"),
        _dir(tmp_path, "async-notifier-k3j_9x0a", age=STALE_AFTER + 60),  # the old format
    ]
    kept = [
        _dir(tmp_path, f"async-notifier-until-{int(now) + 60}-abcd1234"),  # live
        _dir(tmp_path, "async-notifier-zz99yy88", age=STALE_AFTER - 60),  # old format, recent
        _dir(tmp_path, "async-notifier-backup", age=10 * STALE_AFTER),  # not our name
        _dir(tmp_path, "other-app-until-1-abcd1234", age=10 * STALE_AFTER),
    ]
    note = tmp_path / "async-notifier-until-1-abcd1234.txt"  # a file, not a directory
    note.write_text("keep")
    # A stale name on a symbolic link: removing it must not follow it anywhere.
    target = _dir(tmp_path, "elsewhere")
    (tmp_path / "async-notifier-until-1-linkdirx").symlink_to(target)

    with ScratchDir(tmp_path) as scratch:
        kept.append(scratch.path)
        for path in gone:
            assert not path.exists(), path
        for path in kept:
            assert path.is_dir(), path
    assert note.read_text() == "keep"
    assert (target / "left.zip").exists()
    removed = sorted(r.dir for r in captured.named("stale scratch dir removed"))
    assert removed == sorted(p.name for p in gone)


@pytest.fixture
def undeletable(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Make a file impossible to delete, for real: a read-only parent for a normal user, the
    immutable attribute for root (who ignores permissions)."""
    made: list[Path] = []

    def make(path: Path) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(path)], check=True)
        else:
            path.parent.chmod(0o500)
        made.append(path)

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.parent.chmod(0o700)


def test_a_stale_dir_that_cannot_be_removed_is_logged_and_skipped(
    tmp_path: Path, undeletable: Callable[[Path], None], captured: CapturedLogs
) -> None:
    stuck = _dir(tmp_path, "async-notifier-until-1-stuck000")
    undeletable(stuck / "left.zip")
    stale = _dir(tmp_path, "async-notifier-until-2-stale000")

    with ScratchDir(tmp_path) as scratch:
        assert scratch.path.is_dir()
        assert not stale.exists()
        assert (stuck / "left.zip").exists()
    [warning] = captured.named("stale scratch dir not removed")
    assert warning.dir == stuck.name


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
