"""The model store: ``<store>/<name>/<version>/{model.json, <artifact>}``.

A store is addressed by a URI: a local path (or ``file://``) or ``s3://bucket/prefix``.
Storage backends only move bytes (read, write, list); the layout, metadata and integrity
rules live once, in :class:`ModelStore`, so both locations behave identically.

Loading always verifies the artifact's sha256 against the metadata before any framework
code sees the bytes: a corrupted or swapped artifact is refused, never deserialised.

Publishing is atomic and exclusive. Each file appears whole or not at all (a private temporary
file linked into place; an S3 object), artifact first; the metadata file is the commit point
and is created only if absent (``os.link``; S3's ``If-None-Match: *``), and so is the artifact.
So a version is never half visible, and a publish racing another for the same version fails
instead of overwriting the winner's artifact (which would leave its metadata naming other bytes).
A publish that dies leaves at most an artifact or a temporary file that no reader lists or reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Protocol

from serve_app.metadata import METADATA_FILE, ModelMetadata

# One variable names the store everywhere: the tools' default, and an override of the Serve
# config's `store` (serve_app.config), so the one Serve config stays byte-for-byte the same
# document locally and in the RayService while each place says where its models live (the
# image's baked-in store, or s3://bucket/prefix with credentials from a Secret).
STORE_ENV = "SERVE_APP_STORE"


def store_from_environment() -> str | None:
    """The store ``SERVE_APP_STORE`` names, or None when it is not set."""
    return os.environ.get(STORE_ENV, "").strip() or None


DEFAULT_STORE = store_from_environment() or "./model_store"
_VALID_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelStoreError(Exception):
    """A model cannot be found or read from the store."""


class NotInStore(ModelStoreError):
    """No such model, version or file in the store (the HTTP layer says ModelNotFoundError)."""


class IntegrityError(ModelStoreError):
    """The artifact's bytes do not match the sha256 recorded in its metadata."""


class InvalidMetadata(ModelStoreError):
    """A stored metadata file that is no metadata this server accepts (serve_app.metadata)."""


class VersionExists(ModelStoreError):
    """The version is taken: published already, or held by another (or a crashed) publish."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_sort_key(version: str) -> tuple:
    """Numeric versions sort numerically ("10" after "9"); others lexically after them."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def check_segment(kind: str, value: str) -> str:
    """Names and versions become path segments and S3 keys: keep them boring."""
    if not _VALID_SEGMENT.fullmatch(str(value)):
        raise ValueError(f"invalid model {kind} {value!r}: use letters, digits, '.', '_', '-'")
    return str(value)


class StorageBackend(Protocol):
    """Moves bytes. A written key appears with all its bytes or not at all."""

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist (atomically); False when it did."""
        ...
    def list_children(self, prefix: str) -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int | None:
        """The bytes of ``key`` without reading them; None when it does not exist."""
        ...


class LocalBackend:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def read_bytes(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError as exc:
            raise NotInStore(f"{self.root / key} does not exist") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.root / key
        self._private_copy(path, data).replace(path)  # readers never see a half-written file

    def create_bytes(self, key: str, data: bytes) -> bool:
        path = self.root / key
        tmp = self._private_copy(path, data)
        try:
            os.link(tmp, path)  # fails if the name exists: exclusive, and complete when it appears
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    @staticmethod
    def _private_copy(path: Path, data: bytes) -> Path:
        """``data`` in a new file beside ``path`` under a name no other writer uses (a dot file,
        never a version or a metadata file to readers), flushed to disk."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def size(self, key: str) -> int | None:
        try:
            return (self.root / key).stat().st_size
        except FileNotFoundError:
            return None

    def list_children(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def __str__(self) -> str:
        return str(self.root)


class S3Backend:
    """S3 or any S3-compatible service; ``AWS_ENDPOINT_URL`` (honoured by boto3) points it
    at MinIO or a test server, credentials come from the usual AWS environment/profile."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        import boto3  # here: a second to import, and only S3 stores need it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey as exc:
            raise NotInStore(f"s3://{self.bucket}/{self._key(key)} does not exist") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def create_bytes(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError  # here: boto3 is imported only for S3 stores

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            # 412: the key exists; 409: a concurrent conditional write of the key won
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError  # here: boto3 is imported only for S3 stores

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, key: str) -> bool:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(key), MaxKeys=1)
        return any(obj["Key"] == self._key(key) for obj in listed.get("Contents", []))

    def list_children(self, prefix: str) -> list[str]:
        full = self._key(prefix).strip("/")
        full = f"{full}/" if full else ""
        children: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                children.add(common["Prefix"][len(full) :].strip("/"))
        return sorted(children)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def backend_for(uri: str) -> StorageBackend:
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        return S3Backend(bucket, prefix)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return LocalBackend(uri)


class ModelStore:
    def __init__(self, uri: str = DEFAULT_STORE, backend: StorageBackend | None = None):
        self.uri = uri
        self.backend = backend or backend_for(uri)

    # -- reading -------------------------------------------------------------------------
    def list_models(self) -> dict[str, list[str]]:
        """Every model name with its versions, oldest first."""
        return {name: self.versions(name) for name in self.backend.list_children("")}

    def versions(self, name: str) -> list[str]:
        """Complete versions only: a version whose metadata is not written yet is invisible."""
        name = check_segment("name", name)
        complete = [v for v in self.backend.list_children(name)
                    if self.backend.exists(f"{name}/{v}/{METADATA_FILE}")]
        return sorted(complete, key=version_sort_key)

    def latest_version(self, name: str) -> str:
        versions = self.versions(name)
        if not versions:
            raise NotInStore(f"model {name!r} has no versions in store {self.backend}")
        return versions[-1]

    def resolve_version(self, name: str, version: str | None) -> str:
        return self.latest_version(name) if version in (None, "", "latest") else str(version)

    def read_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        version = self.resolve_version(name, version)
        key = f"{check_segment('name', name)}/{check_segment('version', version)}/{METADATA_FILE}"
        data = self.backend.read_bytes(key)
        try:
            return ModelMetadata.from_dict(json.loads(data))
        except ValueError as exc:  # not JSON, or not metadata this server accepts (MetadataError)
            raise InvalidMetadata(f"{name}/{version}/{METADATA_FILE}: {exc}") from None

    def artifact_size(self, metadata: ModelMetadata) -> int | None:
        """The artifact's bytes as stored (a stat, an S3 HEAD), before anyone reads it."""
        return self.backend.size(f"{metadata.name}/{metadata.version}/{metadata.artifact}")

    def read_artifact(self, metadata: ModelMetadata) -> bytes:
        """The artifact's bytes, refused unless they hash to the recorded sha256."""
        data = self.backend.read_bytes(f"{metadata.name}/{metadata.version}/{metadata.artifact}")
        actual = sha256_hex(data)
        if actual != metadata.sha256:
            raise IntegrityError(
                f"artifact {metadata.name}/{metadata.version}/{metadata.artifact} has sha256 "
                f"{actual}, but its metadata records {metadata.sha256}: refusing to load it"
            )
        return data

    # -- writing -------------------------------------------------------------------------
    def save(self, metadata: ModelMetadata, artifact: bytes, *, replace: bool = False) -> ModelMetadata:
        """Write artifact first, metadata last: a version is visible only once complete.

        Both are created only if absent (an artifact already holding these very bytes is
        kept): VersionExists when the version is taken, by a finished publish, one in
        progress, or one that crashed after writing its artifact. ``replace`` overwrites
        instead, for rebuilding a store no server reads (a reader between the two writes
        would find the new artifact under the old metadata and refuse it)."""
        check_segment("name", metadata.name)
        check_segment("version", metadata.version)
        metadata.sha256 = sha256_hex(artifact)
        prefix = f"{metadata.name}/{metadata.version}"
        artifact_key, metadata_key = f"{prefix}/{metadata.artifact}", f"{prefix}/{METADATA_FILE}"
        document = json.dumps(metadata.to_dict(), indent=2).encode()
        if replace:
            self.backend.write_bytes(artifact_key, artifact)
            self.backend.write_bytes(metadata_key, document)
            return metadata
        if (not self.backend.create_bytes(artifact_key, artifact)
                and sha256_hex(self.backend.read_bytes(artifact_key)) != metadata.sha256):
            raise VersionExists(f"{prefix} in {self.backend} is taken: another publish of it wrote other bytes "
                                "(in progress, or crashed before its metadata)")
        if not self.backend.create_bytes(metadata_key, document):
            raise VersionExists(f"{metadata.name} version {metadata.version} exists in {self.backend}")
        return metadata

    def next_version(self, name: str) -> str:
        """One above every numbered version of ``name``, complete or not: a number a crashed
        or concurrent publish holds is not tried again."""
        numbers = [int(v) for v in self.backend.list_children(check_segment("name", name)) if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    def add_version(self, metadata: ModelMetadata, artifact: bytes, attempts: int = 20) -> ModelMetadata:
        """Save as the next numbered version; a number taken meanwhile by a concurrent
        publish moves this one to the next."""
        for _ in range(attempts):
            metadata.version = self.next_version(metadata.name)
            try:
                return self.save(metadata, artifact)
            except VersionExists:
                continue
        raise VersionExists(f"no free version of {metadata.name} in {self.backend} after {attempts} attempts")
