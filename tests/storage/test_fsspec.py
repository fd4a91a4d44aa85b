"""What the fsspec backend adds to the protocol: URL selection, typed errors from the backend, exclusive creates
that stay exclusive when the store's own check is slow, and uploads that leave nothing behind when aborted."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from safepoint._errors import ConfigError, StorageError
from safepoint._storage import FsspecStorage, LocalStorage, open_storage

from .conftest import Backend, S3Server
from .test_conformance import put, race_to_publish


def test_urls_select_the_backend(tmp_path: Any) -> None:
    assert isinstance(open_storage(tmp_path / "x"), LocalStorage)
    local = open_storage(f"file://{tmp_path}/y")
    assert isinstance(local, LocalStorage)
    assert local.root == f"{tmp_path}/y"
    assert isinstance(open_storage("memory://somewhere"), FsspecStorage)


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("nosuchproto://bucket/x", None, "unknown storage protocol 'nosuchproto'"),
        ("gs://bucket/x", None, "gcsfs"),  # gcsfs is not installed: the error says what to install
        ("memory://x", "key=value", "must be a mapping"),
    ],
)
def test_a_url_that_cannot_be_opened_is_a_config_error_naming_it(url: str, options: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        open_storage(url, options)
    assert url in str(caught.value)


def test_storage_options_on_a_local_path_are_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="object-store URLs"):
        open_storage(tmp_path, {"anon": True})


@pytest.mark.parametrize("grace", [-1, "soon", float("nan"), True])
def test_a_bad_grace_period_is_a_config_error(grace: Any) -> None:
    with pytest.raises(ConfigError, match="grace_period"):
        open_storage("memory://x", grace_period=grace)


def test_exclusive_create_holds_when_the_existence_check_is_slow(
    object_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check-then-write with a wide gap between the two: every writer sees "absent" unless the backend makes the
    pair atomic (a process-wide lock for memory://, If-None-Match for S3)."""
    storage = object_backend.open()
    assert isinstance(storage, FsspecStorage)
    original = type(storage.fs).exists

    def slow_exists(self: Any, path: str, **kwargs: Any) -> bool:
        found: bool = original(self, path, **kwargs)
        time.sleep(0.05)
        return found

    monkeypatch.setattr(type(storage.fs), "exists", slow_exists)
    race_to_publish(storage, "ckpt", writers=4)


def test_publishing_the_same_bytes_again_counts_as_done(object_backend: Backend) -> None:
    """A conditional PUT whose reply was lost is retried and refused by its own first write: that is success."""
    storage = object_backend.open()
    put(storage, "a/manifest.json", b"same")
    storage.publish("a/manifest.json", "manifest.json")
    storage.publish("a/manifest.json", "manifest.json")
    put(storage, "b/manifest.json", b"other")
    with pytest.raises(FileExistsError):
        storage.publish("b/manifest.json", "manifest.json")
    assert storage.read_bytes("manifest.json", 100) == b"same"


def test_an_aborted_s3_upload_leaves_no_object_and_no_multipart_upload(s3_server: S3Server, s3_url: Any) -> None:
    storage = open_storage(s3_url(), s3_server.options)
    sink = storage.create("big.bin")
    sink.write(memoryview(b"\x01" * (6 << 20)))  # over s3fs's part size: a multipart upload is under way
    sink.write(memoryview(b"\x02" * (6 << 20)))
    sink.abort()
    assert not storage.exists("big.bin")
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket)
    assert [u["Key"] for u in uploads.get("Uploads", []) if "big.bin" in u["Key"]] == []


def test_a_missing_bucket_is_a_storage_error_naming_it(s3_server: S3Server) -> None:
    storage = open_storage("s3://no-such-bucket/run", s3_server.options)
    with pytest.raises(StorageError, match="no-such-bucket") as caught:
        storage.ensure_dir("")
    assert caught.value.errno == 2
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.lock_attempt("x.lock")


def test_an_unreachable_endpoint_is_a_storage_error_naming_the_url_with_the_cause_kept() -> None:
    with _closed_port() as port:
        options = {
            "key": "k",
            "secret": "s",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        }
        storage = open_storage("s3://bucket/run", options)
        started = time.monotonic()
        with pytest.raises(StorageError, match="s3://bucket") as caught:
            put(storage, "file", b"x")
    assert caught.value.__cause__ is not None
    assert time.monotonic() - started < 30


@contextlib.contextmanager
def _closed_port() -> Iterator[int]:
    """A loopback port bound but never listening: connections to it are refused at once."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port: int = bound.getsockname()[1]
        yield port
