"""Peer identity: an Ed25519 key pair on disk, the peer id derived from it, and signed JSON records.

Every layer signs or checks records, so this module sits at the bottom, beside the manifest.
A signed record is a plain JSON object with three extra fields: `signer` (hex public key),
`signature` (hex Ed25519 signature over the canonical JSON of every other field) and nothing else
hidden: what is signed is exactly what is stored and sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gpunite.errors import GpuniteError

SIGNATURE_FIELDS = ("signer", "signature")
MAX_RECORD_BYTES = 1 << 20


class IdentityError(GpuniteError):
    """A key file that cannot be used."""


class RecordError(GpuniteError):
    """A record that is malformed or whose signature does not verify."""


def default_home() -> Path:
    return Path(os.environ.get("GPUNITE_HOME", Path.home() / ".gpunite"))


def canonical_json(data: Any) -> bytes:
    """The byte string that is signed and hashed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def peer_id_of(public_key_hex: str) -> str:
    """A short, stable peer id: the first 20 bytes of sha256 of the public key, hex."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:40]


@dataclass
class Identity:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity (tests and simulations only)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @classmethod
    def load_or_create(cls, home: str | Path | None = None) -> Identity:
        """The identity in HOME/identity, created with mode 0600 on first use."""
        home = Path(home) if home else default_home()
        path = home / "identity"
        if path.exists():
            try:
                raw = path.read_bytes()
                key = serialization.load_pem_private_key(raw, password=None)
            except (OSError, ValueError, TypeError) as exc:
                raise IdentityError(
                    f"cannot read identity key {path}: {exc}; move it aside to create a new identity"
                ) from None
            if not isinstance(key, Ed25519PrivateKey):
                raise IdentityError(f"{path} is not an Ed25519 key; move it aside to create a new identity")
            return cls(key)
        identity = cls.generate()
        home.mkdir(parents=True, exist_ok=True)
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return identity

    @property
    def public_key_hex(self) -> str:
        raw = self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return raw.hex()

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key_hex)

    def sign_bytes(self, data: bytes) -> str:
        return self.private_key.sign(data).hex()

    def sign(self, record: dict[str, Any]) -> dict[str, Any]:
        """A copy of record with signer and signature added."""
        body = {k: v for k, v in record.items() if k not in SIGNATURE_FIELDS}
        body["signer"] = self.public_key_hex
        signature = self.sign_bytes(canonical_json(body))
        return {**body, "signature": signature}


def verify_bytes(public_key_hex: str, data: bytes, signature_hex: str) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), data)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def verify_record(record: Any) -> dict[str, Any]:
    """The record itself if it is a JSON object with a valid signature; RecordError otherwise."""
    if not isinstance(record, dict):
        raise RecordError(f"record is a {type(record).__name__}, not an object")
    signer, signature = record.get("signer"), record.get("signature")
    if not isinstance(signer, str) or not isinstance(signature, str):
        raise RecordError("record has no signer/signature")
    body = {k: v for k, v in record.items() if k != "signature"}
    try:
        data = canonical_json(body)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"record is not canonical JSON: {exc}") from None
    if not verify_bytes(signer, data, signature):
        raise RecordError(f"bad signature on record from {peer_id_of(signer) if _is_hex(signer) else signer!r}")
    return record


def record_signer_id(record: dict[str, Any]) -> str:
    return peer_id_of(record["signer"])


def record_hash(record: dict[str, Any]) -> str:
    """Content hash of a signed record (its id in the ledger)."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def decode_record(data: bytes) -> dict[str, Any]:
    """Parse and verify a signed record received from the network or a file."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record is {len(data)} bytes, more than {MAX_RECORD_BYTES}")
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"record is not JSON: {exc}") from None
    return verify_record(record)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
        return True
    except ValueError:
        return False
