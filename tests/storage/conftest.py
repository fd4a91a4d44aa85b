"""Storage backends for the tests: a local directory, memory://, and S3 served by moto on 127.0.0.1.

The S3 server is a real HTTP server (moto's ThreadedMotoServer) on a free loopback port, started once for the
session and stopped at its end. Credentials are dummies and every client is pointed at the loopback endpoint, so
nothing can reach a real AWS account.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from safepoint._storage import Storage, open_storage

BUCKET = "safepoint-tests"
_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    options: dict[str, Any] = field(default_factory=dict)  # storage_options for safepoint / s3fs

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # AWS_ENDPOINT_URL: any client a test forgets to point at the server still goes to it, never to AWS
    with _environment({**_DUMMY_ENV, "AWS_ENDPOINT_URL": endpoint}):
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            options = {
                "key": "testing",
                "secret": "testing",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
            s3 = S3Server(endpoint, BUCKET, options)
            s3.client().create_bucket(Bucket=BUCKET)
            yield s3
        finally:
            server.stop()


@dataclass(frozen=True)
class Backend:
    """One storage location for a test, opened as often as the test likes (e.g. with another grace period)."""

    kind: str  # "local", "memory" or "s3"
    location: str
    options: dict[str, Any] | None

    def open(self, grace_period: float | None = None) -> Storage:
        return open_storage(self.location, self.options, grace_period=grace_period)

    @property
    def flat(self) -> bool:
        return self.kind != "local"


def _memory_location() -> Iterator[str]:
    from fsspec.implementations.memory import MemoryFileSystem

    root = f"/safepoint-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    with contextlib.suppress(FileNotFoundError):
        MemoryFileSystem().rm(root, recursive=True)


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request.param, request, tmp_path)


@pytest.fixture(params=["memory", "s3"])
def object_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request.param, request, tmp_path)


def _backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if kind == "local":
        yield Backend("local", str(tmp_path / "store"), None)
    elif kind == "memory":
        for location in _memory_location():
            yield Backend("memory", location, None)
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        yield Backend("s3", s3.url(uuid.uuid4().hex), s3.options)


@pytest.fixture
def s3_url(s3_server: S3Server) -> Callable[[], str]:
    return lambda: s3_server.url(uuid.uuid4().hex)
