"""The model store: ``<store>/<name>/<version>/{model.json, <artifact>}``.

A store is addressed by a URI: a local path (or ``file://``) or ``s3://bucket/prefix``.
Storage backends only move bytes (read, write, list); the layout, metadata and integrity
rules live once, in :class:`ModelStore`, so both locations behave identically.

Loading always verifies the artifact's sha256 against the metadata before any framework
code sees the bytes: a corrupted or swapped artifact is refused, never deserialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def list_children(self, prefix: str) -> list[str]: ...
    def exists(self, key: str) -> bool: ...


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see a half-written file

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

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
        return ModelMetadata.from_dict(json.loads(self.backend.read_bytes(key)))

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
    def save(self, metadata: ModelMetadata, artifact: bytes) -> ModelMetadata:
        """Write artifact first, metadata last: a version is visible only once complete."""
        check_segment("name", metadata.name)
        check_segment("version", metadata.version)
        metadata.sha256 = sha256_hex(artifact)
        prefix = f"{metadata.name}/{metadata.version}"
        self.backend.write_bytes(f"{prefix}/{metadata.artifact}", artifact)
        self.backend.write_bytes(
            f"{prefix}/{METADATA_FILE}", json.dumps(metadata.to_dict(), indent=2).encode()
        )
        return metadata
