"""An S3 server on loopback for the object-storage tests: moto's threaded HTTP server and a fresh bucket per test.

Import the fixtures into a test module (no ``pytest_plugins``)::

    from s3server import moto_server_fixture, s3_bucket_fixture  # noqa: F401  (registers moto_server, s3_bucket)

``s3_bucket`` creates a bucket and points Streaming's own S3 clients at the server through the environment
(``S3_ENDPOINT_URL``, dummy ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``), so subprocesses started by the test
(the CLI, loader workers) reach it too. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "AKIATESTLITWEBSSL0001"
SECRET_KEY = "lit-webssl-test-secret-8f3d2a91c7e54b06"  # tests check that this value never reaches a log or config
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the loopback server.

    Attributes:
        name: Bucket name.
        endpoint: ``http://127.0.0.1:<port>`` (the value of ``S3_ENDPOINT_URL``).
        secret: The secret access key set in the environment.
    """

    name: str
    endpoint: str
    secret: str = SECRET_KEY

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts joined by />``."""
        return "/".join([f"s3://{self.name}", *(p.strip("/") for p in parts if p)])

    def client(self):
        """A boto3 S3 client on the server (credentials from the environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION)

    def keys(self, prefix: str = "") -> list[str]:
        """Sorted object keys under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def upload_dir(self, local: Path, prefix: str) -> str:
        """Upload every file under ``local`` to ``prefix`` (same relative layout); returns ``s3://bucket/prefix``."""
        client = self.client()
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            client.upload_file(str(path), self.name, f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}")
        return self.url(prefix)

    def get(self, key: str) -> bytes:
        """The bytes of object ``key``."""
        return self.client().get_object(Bucket=self.name, Key=key)["Body"].read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", name="moto_server")
def moto_server_fixture() -> Iterator[str]:
    """moto's S3 server on ``127.0.0.1`` (a free port) for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(name="s3_bucket")
def s3_bucket_fixture(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Bucket:
    """A fresh bucket on the loopback server, with the environment set for Streaming's and boto3's clients."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "MOSAICML_STREAMING_AWS_REQUESTER_PAYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("S3_ENDPOINT_URL", moto_server)
    no_proxy = ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get("NO_PROXY")]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)
    bucket = S3Bucket(name=f"lit-webssl-{uuid.uuid4().hex[:12]}", endpoint=moto_server)
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket
