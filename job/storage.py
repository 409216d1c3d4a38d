"""Read and write artifacts at `s3://bucket/key`, `file:///abs/path` or a plain path, alike.

S3 goes through boto3 with the standard AWS environment (credentials, region, profile). The endpoint comes
from `AWS_ENDPOINT_URL_S3`, `S3_ENDPOINT_URL` or `AWS_ENDPOINT_URL` (MinIO, Ceph, ...), else AWS. Every failure becomes a
one-line StorageError that names the URI; boto3 is imported only when an s3:// URI is used.

Knobs (environment): AWS_MAX_ATTEMPTS (default 5, adaptive retry mode), SFTOPS_S3_MULTIPART_THRESHOLD and
SFTOPS_S3_MULTIPART_CHUNKSIZE (bytes; default 64 MiB), SFTOPS_S3_ADDRESSING_STYLE (default "path" with a
custom endpoint, where virtual-host bucket names rarely resolve).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.errors import InputError, StorageError

MB = 1024 * 1024
# Connection problems are retried quickly by botocore (non-throttling backoff is 50 ms * 2^n), so a dead
# endpoint fails within seconds; throttling is paced by the adaptive token bucket.
DEFAULT_MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 60
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
# Codes S3 (and MinIO/Ceph) use when the caller's identity is not allowed, or not accepted.
DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
BAD_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a prefix: its full URI, its key relative to the prefix, size and ETag."""

    uri: str
    key: str
    size: int
    etag: str


# ---------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    """True for s3:// URIs."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); raises InputError for a URI without a bucket."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"{uri}: an S3 URI must look like s3://bucket/key")
    return bucket, key


def local_path(uri: str | Path) -> Path:
    """The filesystem path of a `file://` URI or a plain path."""
    text = str(uri)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI or path with exactly one '/' between them."""
    out = str(uri)
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def _as_prefix(key: str) -> str:
    """A key prefix that only matches whole path components ('a/b' -> 'a/b/')."""
    return key if not key or key.endswith("/") else key + "/"


# ---------------------------------------------------------------- S3 client


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment, or None for AWS itself."""
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def transfer_config(threshold: int | None = None, chunksize: int | None = None):
    """boto3 TransferConfig: multipart above `threshold` bytes (env SFTOPS_S3_MULTIPART_THRESHOLD, default 64 MiB)."""
    from boto3.s3.transfer import TransferConfig

    threshold = threshold or int(os.environ.get("SFTOPS_S3_MULTIPART_THRESHOLD", 64 * MB))
    chunksize = chunksize or int(os.environ.get("SFTOPS_S3_MULTIPART_CHUNKSIZE", max(threshold, 8 * MB)))
    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunksize, max_concurrency=8)


def client():
    """A boto3 S3 client for the current environment, cached per endpoint, credentials and region."""
    endpoint = endpoint_url()
    env_key = (
        endpoint,
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
        os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        os.environ.get("AWS_MAX_ATTEMPTS"),
    )
    with _clients_lock:
        cached = _clients.get(env_key)
        if cached is not None:
            return cached
        import boto3
        from botocore.config import Config

        # Under the job's INFO logging botocore announces where it found credentials on every client; noise.
        logging.getLogger("botocore.credentials").setLevel(logging.WARNING)

        config = Config(
            retries={"mode": "adaptive", "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS))},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            # S3-compatible servers are usually addressed by host:port, where virtual-host buckets do not resolve.
            s3={"addressing_style": os.environ.get("SFTOPS_S3_ADDRESSING_STYLE", "path" if endpoint else "auto")},
            max_pool_connections=16,
        )
        session = boto3.session.Session()
        made = session.client("s3", endpoint_url=endpoint, config=config)
        _clients.clear()  # the environment changed (tests, credential rotation): drop stale clients
        _clients[env_key] = made
        return made


def _storage_error(uri: str, err: BaseException, bucket: str | None = None) -> StorageError:
    """Map a boto3/botocore exception to a one-line StorageError naming the URI (never the credentials)."""
    from botocore import exceptions as bx

    if isinstance(err, bx.ClientError):
        info = err.response.get("Error", {})
        code = str(info.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: bucket {bucket!r} does not exist (check the bucket name and the endpoint)")
        if code in MISSING_KEY_CODES or status == 404:
            return StorageError(f"{uri}: no such object")
        if code in BAD_CREDENTIAL_CODES:
            return StorageError(
                f"{uri}: the S3 server rejected the credentials ({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        if code in DENIED_CODES or status == 403:
            return StorageError(
                f"{uri}: access denied; the credentials in use may not read/write this bucket (check its policy)"
            )
        message = str(info.get("Message") or "").splitlines()[0] if info.get("Message") else ""
        return StorageError(f"{uri}: S3 error {code or status}{': ' + message if message else ''}")
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return StorageError(f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(err, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ConnectionClosedError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint_url() or 'AWS'} (is it running and reachable?)")
    if isinstance(err, bx.ReadTimeoutError):
        return StorageError(f"{uri}: the S3 endpoint {endpoint_url() or 'AWS'} timed out")
    if isinstance(err, bx.ParamValidationError):
        return StorageError(f"{uri}: invalid S3 request: {str(err).splitlines()[0]}")
    return StorageError(f"{uri}: S3 request failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _s3_call(uri: str, bucket: str, fn, *args, **kwargs):
    """Run one boto3 call, turning its errors into StorageError."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError) as e:
        raise _storage_error(uri, e, bucket) from None
    except S3UploadFailedError as e:
        # upload_file wraps the ClientError it got; map that one.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ClientError | BotoCoreError):
            raise _storage_error(uri, cause, bucket) from None
        raise StorageError(f"{uri}: upload failed: {str(e).splitlines()[0]}") from None


def _bucket_problem(uri: str, bucket: str) -> StorageError | None:
    """Why the bucket of a URI is unusable (missing, denied, unreachable), or None if it answers HEAD."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client().head_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            # HEAD answers carry no error code, so a 404 here can only mean the bucket.
            return StorageError(f"{uri}: bucket {bucket!r} does not exist (check the bucket name and the endpoint)")
        return _storage_error(uri, e, bucket)
    except BotoCoreError as e:
        return _storage_error(uri, e, bucket)
    return None


def _missing(uri: str, bucket: str) -> StorageError:
    """The error for a 404 on an object: a missing bucket if that is the cause, else a missing key."""
    return _bucket_problem(uri, bucket) or StorageError(f"{uri}: no such object")


# ---------------------------------------------------------------- local helpers


def _local_error(uri: str, err: OSError) -> StorageError:
    """Map a filesystem error to a one-line StorageError naming the URI."""
    if isinstance(err, FileNotFoundError):
        return StorageError(f"{uri}: no such file or directory")
    if isinstance(err, PermissionError):
        return StorageError(f"{uri}: permission denied")
    if isinstance(err, IsADirectoryError):
        return StorageError(f"{uri}: is a directory, expected a file")
    if isinstance(err, NotADirectoryError | FileExistsError):  # mkdir(exist_ok=True) only fails so on a file
        return StorageError(f"{uri}: a parent of this path is a file, not a directory")
    return StorageError(f"{uri}: {err.strerror or err}")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write bytes next to the target and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_copy(src: Path, dest: Path) -> None:
    """Copy a file via a temporary name and rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- public API


def read_bytes(uri: str) -> bytes:
    """The whole object or file; raises StorageError."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        body = _s3_call(uri, bucket, client().get_object, Bucket=bucket, Key=key)["Body"]
        return _s3_call(uri, bucket, body.read)
    try:
        return local_path(uri).read_bytes()
    except OSError as e:
        raise _local_error(uri, e) from None


def read_text(uri: str) -> str:
    """The object or file decoded as UTF-8 (a BOM is dropped); raises StorageError or InputError."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{uri}: not UTF-8 text (byte {e.start})") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write bytes to an object or file (files atomically, parents created); raises StorageError."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, bucket, client().put_object, Bucket=bucket, Key=key, Body=data)
        return
    try:
        _atomic_write(local_path(uri), data)
    except OSError as e:
        raise _local_error(uri, e) from None


def write_text(uri: str, text: str) -> None:
    """Write UTF-8 text to an object or file; raises StorageError."""
    write_bytes(uri, text.encode("utf-8"))


def download(uri: str, dest: Path) -> Path:
    """Copy one object or file to `dest` (multipart for large objects) and return `dest`; raises StorageError."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            client().download_file(bucket, key, str(dest), Config=transfer_config())
        except ClientError as e:
            # download_file starts with a HEAD, whose 404 says nothing about bucket versus key.
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise _missing(uri, bucket) from None
            raise _storage_error(uri, e, bucket) from None
        except BotoCoreError as e:
            raise _storage_error(uri, e, bucket) from None
        return dest
    src = local_path(uri)
    try:
        if src.resolve() != dest.resolve():
            _atomic_copy(src, dest)
        elif not src.is_file():
            raise FileNotFoundError(src)
    except OSError as e:
        raise _local_error(uri, e) from None
    return dest


def upload(src: Path, uri: str) -> None:
    """Copy a local file to an object or path (multipart for large files); raises StorageError."""
    src = Path(src)
    if not src.is_file():
        raise StorageError(f"{src}: no such file to upload to {uri}")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, bucket, client().upload_file, str(src), bucket, key, Config=transfer_config())
        return
    dest = local_path(uri)
    try:
        if src.resolve() != dest.resolve():
            _atomic_copy(src, dest)
    except OSError as e:
        raise _local_error(uri, e) from None


def list_objects(uri_prefix: str) -> list[ObjectInfo]:
    """Every object (file) under a prefix (directory), sorted by key; a missing prefix lists nothing."""
    if is_s3(uri_prefix):
        bucket, key = split_s3(uri_prefix)
        prefix = _as_prefix(key)
        paginator = client().get_paginator("list_objects_v2")
        out = []
        pages = _s3_call(uri_prefix, bucket, lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue  # "directory" marker objects some tools create
                out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", rel, int(obj["Size"]), obj["ETag"].strip('"')))
        return sorted(out, key=lambda o: o.key)
    root = local_path(uri_prefix)
    if root.is_file():
        raise StorageError(f"{uri_prefix}: is a file, expected a directory")
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        rel = path.relative_to(root).as_posix()
        # A change token, not a content hash: hashing whole model files on every listing would be slow.
        out.append(ObjectInfo(join(str(uri_prefix), rel), rel, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}"))
    return out


def exists(uri: str) -> bool:
    """True if the object/file exists, or for a URI ending in '/', if anything is under it; raises StorageError."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            return bool(_s3_call(uri, bucket, client().list_objects_v2, Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount"))
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise _storage_error(uri, e, bucket) from None
        except BotoCoreError as e:
            raise _storage_error(uri, e, bucket) from None
        problem = _bucket_problem(uri, bucket)
        if problem is not None:
            raise problem
        return False
    path = local_path(uri)
    if str(uri).endswith("/"):
        return path.is_dir() and any(path.iterdir())
    return path.exists()


def download_prefix(uri: str, dest_dir: Path) -> list[Path]:
    """Copy every object under a prefix into `dest_dir`, keeping relative paths; raises StorageError if empty."""
    dest_dir = Path(dest_dir)
    objects = list_objects(uri)
    if not objects:
        raise StorageError(f"{uri}: nothing found under this prefix")
    root = dest_dir.resolve()
    paths = []
    for obj in objects:
        target = (dest_dir / obj.key).resolve()
        if root not in target.parents:
            raise StorageError(f"{obj.uri}: key escapes the download directory; refusing to write it")
        paths.append(download(obj.uri, target))
    return paths


def upload_prefix(src_dir: Path, uri: str) -> list[str]:
    """Copy every file under `src_dir` to the prefix, keeping relative paths; returns the URIs written."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise StorageError(f"{src_dir}: no such directory to upload to {uri}")
    written = []
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        target = join(uri, path.relative_to(src_dir).as_posix())
        upload(path, target)
        written.append(target)
    return written


def delete_prefix(uri: str) -> None:
    """Delete every object under a prefix (or the directory tree); a missing prefix is fine; raises StorageError."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        keys = [o.uri[len(f"s3://{bucket}/") :] for o in list_objects(uri)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            answer = _s3_call(uri, bucket, client().delete_objects, Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageError(f"s3://{bucket}/{first.get('Key')}: cannot delete: {first.get('Code')}")
        return
    path = local_path(uri)
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        raise _local_error(uri, e) from None


def delete(uri: str) -> None:
    """Delete one object or file; a missing one is fine; raises StorageError."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, bucket, client().delete_object, Bucket=bucket, Key=key)
        return
    try:
        local_path(uri).unlink(missing_ok=True)
    except OSError as e:
        raise _local_error(uri, e) from None


def check_writable(uri_prefix: str) -> None:
    """Cheap probe: write and delete a marker under the prefix; raises StorageError if that fails."""
    marker = join(uri_prefix, f".sftops-write-check-{uuid.uuid4().hex[:12]}")
    write_bytes(marker, b"ok")
    delete(marker)
