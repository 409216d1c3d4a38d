"""A real S3-compatible server (moto) on loopback, spoken to by real boto3."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

import boto3
import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    """A running S3 server and a fresh bucket for one test."""

    endpoint: str
    bucket: str
    client: object

    def uri(self, key: str = "") -> str:
        """s3:// URI of a key in this test's bucket."""
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, body: bytes | str) -> str:
        """Upload bytes to this test's bucket and return the object's URI."""
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body.encode() if isinstance(body, str) else body)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        """Download an object's bytes from this test's bucket."""
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        """All keys under a prefix, sorted."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the whole session, on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> str:
    """Point the standard AWS environment at the loopback server; returns its endpoint."""
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def s3(s3_env) -> S3:
    """A fresh bucket on the loopback S3 server."""
    client = boto3.client("s3", endpoint_url=s3_env, **{
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    })
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3(endpoint=s3_env, bucket=bucket, client=client)
