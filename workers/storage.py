"""Artifact storage: local paths and object stores alike, through ``pyarrow.fs``.

Every write is atomic: local and HDFS files are written beside their target and renamed into
place; object stores make a single PUT visible only when complete. A folder is published
(``publish_dir``) into a location of its own, with a manifest (files, sizes, digests) written
last: a folder without one is a half-published attempt, never a result (``published``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs

_SCHEMES = ("file://", "s3://", "gs://", "gcs://", "hdfs://", "viewfs://")
MANIFEST = "_MANIFEST.json"


def is_local(uri: str) -> bool:
    return not uri.startswith(_SCHEMES) or uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or storage URI."""
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        # pyarrow's S3 client does not read AWS_ENDPOINT_URL itself (MinIO, moto, Ceph...).
        endpoint = os.environ["AWS_ENDPOINT_URL"]
        scheme, _, host = endpoint.partition("://")
        # allow_delayed_open: a small object is one PUT (not a multipart upload), which every
        # S3-compatible server supports.
        fs = pafs.S3FileSystem(endpoint_override=host or endpoint, scheme=scheme if host else "https",
                               region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), allow_delayed_open=True)
        return fs, uri[len("s3://"):].rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def client_env(forward_secrets: bool = False) -> dict[str, str]:
    """The environment object-store clients read, to hand to stage processes so they reach the
    same store as the driver: the variables of ``CLIENT_ENV`` that are set, nothing else (a
    task's environment is visible in Ray's state API and dashboard). The keys of ``SECRET_ENV``
    only with ``forward_secrets``; without it nodes use their instance profile or credential files."""
    names = CLIENT_ENV | (SECRET_ENV if forward_secrets else frozenset())
    return {k: v for k, v in os.environ.items() if k in names}


CLIENT_ENV = frozenset({
    # S3 (pyarrow, boto): where the store is and how to find credentials, never the credentials
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_STS_REGIONAL_ENDPOINTS", "AWS_EC2_METADATA_DISABLED",
    # GCS: the service-account key file's path, the project, an emulator
    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "STORAGE_EMULATOR_HOST",
    # HDFS (pyarrow's libhdfs): the Hadoop install, its configuration, the user, the Kerberos ticket cache's path
    "HADOOP_HOME", "HADOOP_CONF_DIR", "HADOOP_USER_NAME", "ARROW_LIBHDFS_DIR", "CLASSPATH", "JAVA_HOME",
    "KRB5CCNAME", "LIBHDFS_OPTS",
})
"""What a store's client needs to reach the driver's store (an allowlist: a variable not named
here is never forwarded)."""
SECRET_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"})
"""Static credentials, forwarded only on request (``ORCHESTRATOR_FORWARD_SECRETS=1``)."""


def join(uri: str, *parts: str) -> str:
    if is_local(uri) and not uri.startswith("file://"):
        return str(Path(uri).joinpath(*parts))
    return posixpath.join(uri.rstrip("/"), *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        with fs.open_input_stream(path) as f:
            return f.read()
    # One ranged GET of the whole object: a stream reads in chunks, and chunks of an object
    # overwritten meanwhile would mix two versions.
    with fs.open_input_file(path) as f:
        return f.read()


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt JSON file {uri}: {e}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never a torn one."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic; no fsync: survives a killed process, which is what resume needs
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.HadoopFileSystem):  # HDFS shows a file while it is written: rename into place
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex[:8]}-{posixpath.basename(path)}")
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_file(path)
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_json(uri: str, obj: Any, indent: int | None = 2, sort_keys: bool = True) -> None:
    write_bytes(uri, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str).encode())


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def publish_dir(local_dir: Path, uri: str) -> None:
    """Publish a finished local folder at ``uri``, a location of this attempt's own: the files,
    then a manifest of them (sizes, sha256) written last, so ``published`` tells a complete
    folder from one whose copy was cut short."""
    local_dir = Path(local_dir)
    files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
    manifest = {"files": {rel: {"size": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in files.items()}}
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        staging = f"{path}.incoming-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, staging)
        if os.path.exists(path):  # an earlier try of this very attempt: replace it whole
            old = f"{path}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, path)
    else:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)  # never mix with keys a cut-short copy left
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    write_json(join(uri, MANIFEST), manifest)


def published(uri: str) -> str | None:
    """None when ``uri`` holds a complete publication (its manifest, and every file it lists with
    the listed size); else why not."""
    fs, path = resolve(uri)
    try:
        manifest = read_json(join(uri, MANIFEST))
    except FileNotFoundError:
        return f"{uri} has no {MANIFEST} (a publication cut short)"
    except (OSError, ValueError) as e:
        return f"{uri}: unreadable {MANIFEST}: {e}"
    listed = manifest.get("files", {})
    infos = fs.get_file_info([posixpath.join(path, rel) if not isinstance(fs, pafs.LocalFileSystem)
                              else os.path.join(path, rel) for rel in listed])
    for (rel, meta), info in zip(listed.items(), infos):
        if info.type != pafs.FileType.File or info.size != meta["size"]:
            return f"{uri}/{rel} is missing or has another size than its manifest says"
    return None


def list_names(uri: str) -> list[str]:
    """The names of the entries directly inside the folder ``uri`` (none when it is missing)."""
    fs, path = resolve(uri)
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def remove_unpublished(parent_uri: str, keep: str | None = None,
                       spare: Callable[[str], bool] | None = None) -> list[str]:
    """Delete the folders under ``parent_uri`` without a manifest (attempts cut short, their
    staging copies), except ``keep`` and those whose name ``spare`` says another writer may still
    be filling; returns what was removed."""
    fs, path = resolve(parent_uri)
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        name = posixpath.basename(info.path)
        child = join(parent_uri, name)
        if info.type != pafs.FileType.Directory or child == keep or exists(join(child, MANIFEST)):
            continue
        if spare is not None and spare(name):
            continue
        fs.delete_dir(info.path)
        removed.append(child)
    return removed


def download_dir(uri: str, local_dir: Path) -> Path:
    """Copy a stored folder to a local one (returns the local path; no copy when already local)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    local_dir.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
