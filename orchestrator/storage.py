"""Where a run or a sweep keeps what another process must read, on every node of a cluster.

Ray Train's run state and checkpoints, Ray Tune's sweep state, the MLflow run id that a re-run of
the command continues and the last report of a sweep's trial all live in the ``storage`` of the
experiment: a local path (the default, under ``output_dir``: right on one node), a path that every
node mounts (NFS, EFS: say so with ``storage.shared: true``), or a URI (``s3://bucket/prefix``,
``gs://...``) read and written through a pyarrow filesystem. Every read and write of that state
goes through :class:`Storage`, never through a local glob or path arithmetic.

S3 credentials come from the standard AWS environment variables (``AWS_ACCESS_KEY_ID``, ...) or the
nodes' instance roles, never from the experiment file, so no secret reaches MLflow or a log; the
endpoint and region may be given in the file or as ``AWS_ENDPOINT_URL`` / ``AWS_REGION``.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detectors.errors import UserInputError

def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@dataclass(frozen=True)
class Storage:
    """A root folder on a pyarrow filesystem; paths below it are ``/``-joined strings."""
    filesystem: Any  # pyarrow.fs.FileSystem
    root: str        # the root inside ``filesystem``: ``bucket/prefix`` or an absolute local path
    uri: str         # as the user wrote it, for messages
    shared: bool     # reachable from every node of the cluster
    field: str = "storage"

    @property
    def remote(self) -> bool:
        return is_uri(self.uri)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def child(self, *parts: str) -> "Storage":
        sub = "/".join(parts)
        return Storage(self.filesystem, self.path(*parts), f"{self.uri.rstrip('/')}/{sub}", self.shared, self.field)

    def ray_kwargs(self) -> dict[str, Any]:
        """``RunConfig(**storage.ray_kwargs())``: Ray Train and Tune keep their state here."""
        if self.remote:
            return {"storage_path": self.root, "storage_filesystem": self.filesystem}
        return {"storage_path": self.root}

    def read_text(self, path: str) -> str | None:
        """The file's text, or None when it does not exist (or cannot be read as text)."""
        import pyarrow as pa
        try:
            with self.filesystem.open_input_stream(path) as stream:
                return stream.read().decode()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        except (OSError, pa.ArrowException) as exc:
            if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
                return None
            raise

    def read_json(self, path: str) -> Any | None:
        text = self.read_text(path)
        try:
            return None if text is None else json.loads(text)
        except ValueError:
            return None

    def write_text(self, path: str, text: str) -> None:
        """Whole or not at all: an object store's put is atomic, a local file is renamed into place."""
        self.filesystem.create_dir(posixpath.dirname(path), recursive=True)
        staging = path if self.remote else f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self.filesystem.open_output_stream(staging) as stream:
            stream.write(text.encode())
        if staging != path:
            os.replace(staging, path)

    def files(self, path: str) -> dict[str, int]:
        """Every file below ``path`` (recursively) and its size in bytes; {} when there is none."""
        from pyarrow.fs import FileSelector, FileType
        selector = FileSelector(path, recursive=True, allow_not_found=True)
        return {info.path: info.size for info in self.filesystem.get_file_info(selector)
                if info.type == FileType.File}

    def check(self) -> None:
        """One line, before anything starts, when the storage cannot hold the run's state: a server that
        does not answer, a bucket that does not exist, missing credentials, a path that is a file.
        Nothing is left behind: a local folder is not created, a probe object is deleted."""
        where = f"{self.field}: {self.uri}"
        if not self.remote:
            existing = Path(self.root)
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir():
                raise UserInputError(f"{where}: {existing} is a file; give a folder")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise UserInputError(f"{where}: {existing} is not writable")
            return
        from pyarrow.fs import FileType
        try:
            bucket = self.root.split("/", 1)[0]
            if self.filesystem.get_file_info(bucket).type == FileType.NotFound:
                raise UserInputError(f"{where}: the bucket {bucket!r} does not exist")
            if self.filesystem.get_file_info(self.root).type == FileType.File:
                raise UserInputError(f"{where} is a file; give a bucket prefix")
            probe = self.path(f".write-probe-{uuid.uuid4().hex[:8]}")
            with self.filesystem.open_output_stream(probe) as stream:
                stream.write(b"ok")
            self.filesystem.delete_file(probe)
        except UserInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError and its own errors
            reason = " ".join(str(exc).split())[:240] or type(exc).__name__
            raise UserInputError(f"{where} cannot be used: {reason}") from None


def s3_filesystem(endpoint_url: str | None, region: str | None, *, probe: bool = False):
    """pyarrow's S3 filesystem for AWS or any S3-compatible server (MinIO, moto, Ceph)."""
    from pyarrow import fs
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {"region": region or os.environ.get("AWS_REGION")
                               or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options.update(endpoint_override=host or endpoint, scheme=scheme or "https")
    if probe:  # the preflight must answer in seconds, not after the SDK's minutes of retries
        options.update(connect_timeout=2, request_timeout=2,
                       retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1))
    return fs.S3FileSystem(**options)


def open_storage(uri: str, *, shared: bool = False, endpoint_url: str | None = None, region: str | None = None,
                 field: str = "storage", probe: bool = False) -> Storage:
    """The :class:`Storage` at ``uri`` (a local path, ``file://`` path, or a filesystem URI)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        root = uri.removeprefix("s3://").strip("/")
        if not root:
            raise UserInputError(f"{field}: {uri} names no bucket")
        return Storage(s3_filesystem(endpoint_url, region, probe=probe), root, uri, True, field)
    if is_uri(uri):
        from pyarrow import fs
        try:
            filesystem, root = fs.FileSystem.from_uri(uri)
        except Exception as exc:  # noqa: BLE001
            raise UserInputError(f"{field}: {uri} is not a storage URI pyarrow can open "
                                 f"({' '.join(str(exc).split())[:200]})") from None
        return Storage(filesystem, root.rstrip("/"), uri, True, field)
    from pyarrow.fs import LocalFileSystem
    local = Path(uri.removeprefix("file://")).expanduser().resolve()
    return Storage(LocalFileSystem(), str(local), str(local), shared, field)


__all__ = ["Storage", "open_storage", "s3_filesystem", "is_uri"]
