"""Storage against a real S3 server on loopback (moto, real boto3) and the local filesystem, with every error case."""

from __future__ import annotations

import os
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from job import storage
from job.errors import StorageError
from tests.plugins.s3 import CREDENTIALS, free_port


@pytest.fixture(params=["s3", "path", "file-uri"])
def base(request, tmp_path) -> str:
    """A writable base URI: an S3 prefix, a plain directory path, or a file:// URI."""
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        return s3.uri("base")
    if request.param == "path":
        return str(tmp_path / "base")
    return f"file://{tmp_path}/base"


def test_bytes_and_text_round_trip(base):
    """write_bytes/read_bytes and write_text/read_text return what was written, on every backend."""
    uri = storage.join(base, "dir", "blob.bin")
    storage.write_bytes(uri, b"\x00\x01binary")
    assert storage.read_bytes(uri) == b"\x00\x01binary"
    storage.write_text(storage.join(base, "note.txt"), "héllo\n")
    assert storage.read_text(storage.join(base, "note.txt")) == "héllo\n"
    assert storage.exists(uri) and not storage.exists(storage.join(base, "dir", "other.bin"))


def test_file_round_trip(base, tmp_path):
    """upload then download gives the same bytes back."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4096))
    uri = storage.join(base, "up", "src.bin")
    storage.upload(src, uri)
    got = storage.download(uri, tmp_path / "dl" / "copy.bin")
    assert got == tmp_path / "dl" / "copy.bin"
    assert got.read_bytes() == src.read_bytes()


def test_delete_one_object(base):
    """delete removes exactly one object; deleting it again is fine."""
    keep = storage.join(base, "out", "manifest.json.bak")
    gone = storage.join(base, "out", "manifest.json")
    storage.write_bytes(keep, b"k")
    storage.write_bytes(gone, b"m")
    storage.delete(gone)
    assert not storage.exists(gone)
    assert storage.read_bytes(keep) == b"k"
    storage.delete(gone)


def test_prefix_round_trip(base, tmp_path):
    """A directory tree uploads to a prefix, lists with relative keys and sizes, downloads and deletes."""
    src = tmp_path / "model"
    (src / "sub" / "deep").mkdir(parents=True)
    files = {"config.json": b"{}", "sub/weights.bin": b"w" * 3000, "sub/deep/x.txt": b"x"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    prefix = storage.join(base, "models", "m1")
    written = storage.upload_prefix(src, prefix)
    assert written == [storage.join(prefix, k) for k in sorted(files)]
    # a sibling whose name starts with the prefix is not part of it
    storage.write_bytes(storage.join(base, "models", "m10", "other"), b"no")

    listed = storage.list_objects(prefix)
    assert [(o.key, o.size) for o in listed] == sorted((k, len(v)) for k, v in files.items())
    assert all(o.uri == storage.join(prefix, o.key) and o.etag for o in listed)
    assert storage.exists(prefix + "/")

    paths = storage.download_prefix(prefix, tmp_path / "copy")
    assert sorted(p.relative_to(tmp_path / "copy").as_posix() for p in paths) == sorted(files)
    for rel, data in files.items():
        assert (tmp_path / "copy" / rel).read_bytes() == data

    storage.delete_prefix(prefix)
    assert storage.list_objects(prefix) == []
    assert not storage.exists(prefix + "/")
    assert storage.read_bytes(storage.join(base, "models", "m10", "other")) == b"no"
    with pytest.raises(StorageError, match="nothing found under this prefix"):
        storage.download_prefix(prefix, tmp_path / "again")


def test_check_writable_leaves_nothing(base):
    """The write probe succeeds on a writable prefix and removes its marker."""
    storage.check_writable(base)
    assert storage.list_objects(base) == []


def test_multipart_upload_and_download(s3, monkeypatch, tmp_path):
    """Files above the (lowered) threshold go up in parts: the S3 ETag says how many, and bytes survive."""
    mb = 1024 * 1024
    monkeypatch.setenv("SFTOPS_S3_MULTIPART_THRESHOLD", str(5 * mb))
    monkeypatch.setenv("SFTOPS_S3_MULTIPART_CHUNKSIZE", str(5 * mb))
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * mb))
    storage.upload(src, s3.uri("big/big.bin"))
    etag = s3.client.head_object(Bucket=s3.bucket, Key="big/big.bin")["ETag"].strip('"')
    assert etag.endswith("-3")  # 5 + 5 + 1 MiB
    [info] = storage.list_objects(s3.uri("big"))
    assert (info.key, info.size, info.etag) == ("big.bin", 11 * mb, etag)
    assert storage.download(s3.uri("big/big.bin"), tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_s3_endpoint_url_alternative(s3, monkeypatch):
    """S3_ENDPOINT_URL works like AWS_ENDPOINT_URL_S3 for S3-compatible servers."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("S3_ENDPOINT_URL", s3.endpoint)
    storage.write_text(s3.uri("alt.txt"), "via S3_ENDPOINT_URL")
    assert s3.get("alt.txt") == b"via S3_ENDPOINT_URL"


def missing_bucket_calls(tmp_path):
    """Every operation on a bucket that does not exist."""
    src = tmp_path / "f"
    src.write_bytes(b"x")
    uri = "s3://no-such-bucket-sftops/k"
    return uri, [
        lambda: storage.read_bytes(uri),
        lambda: storage.write_bytes(uri, b"x"),
        lambda: storage.download(uri, tmp_path / "d"),
        lambda: storage.upload(src, uri),
        lambda: storage.exists(uri),
        lambda: storage.check_writable("s3://no-such-bucket-sftops/k"),
    ]


def test_missing_bucket(s3, tmp_path):
    """Each operation on a missing bucket fails with one line naming the URI and the bucket."""
    uri, calls = missing_bucket_calls(tmp_path)
    for call in calls:
        with pytest.raises(StorageError) as err:
            call()
        message = str(err.value)
        assert message.startswith("s3://no-such-bucket-sftops/")
        assert message.endswith(": bucket 'no-such-bucket-sftops' does not exist (check the bucket name and the endpoint)")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-sftops/p: bucket 'no-such-bucket-sftops' does not"):
        storage.list_objects("s3://no-such-bucket-sftops/p")


def test_missing_key(s3, tmp_path):
    """Reading or downloading a key that does not exist names the URI; exists() says False."""
    uri = s3.uri("nope/data.jsonl")
    for call in (lambda: storage.read_bytes(uri), lambda: storage.download(uri, tmp_path / "x")):
        with pytest.raises(StorageError) as err:
            call()
        assert str(err.value) == f"{uri}: no such object"
    assert storage.exists(uri) is False
    assert not (tmp_path / "x").exists()


@pytest.fixture
def foreign_bucket(s3, monkeypatch) -> str:
    """A bucket owned by another AWS account (via a real STS AssumeRole on the server), cross-account access off."""
    sts = boto3.client("sts", endpoint_url=s3.endpoint, region_name="us-east-1",
                       aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                       aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    creds = sts.assume_role(RoleArn="arn:aws:iam::111111111111:role/owner", RoleSessionName="sftops-tests")
    creds = creds["Credentials"]
    other = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                         aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                         aws_session_token=creds["SessionToken"])
    bucket = f"{s3.bucket}-foreign"
    other.create_bucket(Bucket=bucket)
    other.put_object(Bucket=bucket, Key="data.jsonl", Body=b"{}")
    # moto reads this per request: buckets of other accounts now answer AccessDenied, as on AWS without a policy.
    monkeypatch.setenv("MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS", "false")
    return bucket


def test_access_denied(foreign_bucket, tmp_path):
    """A bucket the credentials may not use gives an access-denied line naming the URI, for reads and writes."""
    uri = f"s3://{foreign_bucket}/data.jsonl"
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = [
        lambda: storage.read_bytes(uri),
        lambda: storage.download(uri, tmp_path / "d"),
        lambda: storage.write_bytes(uri, b"x"),
        lambda: storage.upload(src, uri),
        lambda: storage.list_objects(uri),
        lambda: storage.exists(uri),
    ]
    for call in calls:
        with pytest.raises(StorageError) as err:
            call()
        assert str(err.value) == f"{uri}: access denied; the credentials in use may not read/write this bucket (check its policy)"


def test_unreachable_endpoint_fails_fast(s3_env, monkeypatch):
    """A closed port on 127.0.0.1 fails within seconds, naming the URI and the endpoint."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://bucket/key.jsonl")
    assert time.monotonic() - start < 10
    assert str(err.value) == f"s3://bucket/key.jsonl: cannot reach the S3 endpoint {endpoint} (is it running and reachable?)"


def test_no_credentials(s3_env, monkeypatch, tmp_path):
    """Without any AWS credentials the error says which variables to set."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://bucket/key")
    assert str(err.value) == "s3://bucket/key: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


@pytest.mark.parametrize(
    "code, status, message",
    [
        ("InvalidAccessKeyId", 403,
         "the S3 server rejected the credentials (InvalidAccessKeyId); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
        ("SignatureDoesNotMatch", 403,
         "the S3 server rejected the credentials (SignatureDoesNotMatch); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
        ("SlowDown", 503, "S3 error SlowDown: Please reduce your request rate."),
    ],
)
def test_other_server_errors_are_mapped(s3_env, code, status, message):
    """Errors moto does not produce (it does not check signatures) are mapped from botocore's real Stubber."""
    client = storage.client()
    with Stubber(client) as stub:
        stub.add_client_error("get_object", service_error_code=code, service_message="Please reduce your request rate.",
                              http_status_code=status)
        with pytest.raises(StorageError) as err:
            storage.read_bytes("s3://bucket/key")
    assert str(err.value) == f"s3://bucket/key: {message}"
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in str(err.value)


def test_local_errors(tmp_path):
    """Local paths fail like S3 ones: one line naming the path."""
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(StorageError, match=r"missing\.txt: no such file or directory$"):
        storage.read_bytes(missing)
    with pytest.raises(StorageError, match=r"missing\.txt: no such file or directory$"):
        storage.download(f"file://{missing}", tmp_path / "x")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match=r"a parent of this path is a file"):
        storage.write_text(str(tmp_path / "afile" / "child.txt"), "y")
    with pytest.raises(StorageError, match="is a file, expected a directory"):
        storage.list_objects(str(tmp_path / "afile"))
    assert storage.list_objects(str(tmp_path / "nothing-here")) == []
    storage.delete_prefix(str(tmp_path / "nothing-here"))  # deleting nothing is fine


def test_download_refuses_keys_escaping_the_directory(s3, tmp_path):
    """An object key with '..' cannot write outside the destination directory."""
    s3.put("p/../../escape.txt", b"x")
    s3.put("p/ok.txt", b"y")
    listed = [o.key for o in storage.list_objects(s3.uri("p"))]
    if not any(".." in k for k in listed):
        pytest.skip("the server normalized the key")
    with pytest.raises(StorageError, match="escapes the download directory"):
        storage.download_prefix(s3.uri("p"), tmp_path / "d")
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize(
    "uri, parts, expected",
    [
        ("s3://b/prefix", ("a", "b.txt"), "s3://b/prefix/a/b.txt"),
        ("s3://b/prefix/", ("/a/",), "s3://b/prefix/a"),
        ("s3://b", ("k",), "s3://b/k"),
        ("/data/out", ("train.jsonl",), "/data/out/train.jsonl"),
        ("file:///data/out/", ("x", ""), "file:///data/out/x"),
    ],
)
def test_join(uri, parts, expected):
    """join puts exactly one '/' between parts."""
    assert storage.join(uri, *parts) == expected


def test_split_s3_needs_a_bucket():
    """An s3:// URI without a bucket is rejected."""
    from job.errors import InputError

    assert storage.split_s3("s3://b/a/b") == ("b", "a/b")
    with pytest.raises(InputError, match="must look like s3://bucket/key"):
        storage.split_s3("s3:///key")


def test_client_config(s3_env):
    """The client uses adaptive retries, a short connect timeout and path-style addressing for custom endpoints."""
    config = storage.client().meta.config
    assert config.retries["mode"] == "adaptive"
    assert config.connect_timeout == storage.CONNECT_TIMEOUT_S
    assert config.s3["addressing_style"] == "path"
    assert storage.client().meta.endpoint_url == s3_env


def test_client_error_without_code(s3_env):
    """A bare ClientError still yields one line."""
    err = ClientError({"Error": {}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetObject")
    assert str(storage._storage_error("s3://b/k", err, "b")) == "s3://b/k: S3 error 500"


def test_local_write_is_atomic(tmp_path):
    """A local write leaves no temporary files behind and replaces the old content whole."""
    target = tmp_path / "out" / "f.txt"
    storage.write_text(str(target), "one")
    storage.write_text(str(target), "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in Path(target.parent).iterdir()) == ["f.txt"]
