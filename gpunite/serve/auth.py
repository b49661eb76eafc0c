"""Signed HTTP requests: the headers a caller adds, their check on the host (time window, replayed nonces).

A caller signs, with its Ed25519 identity, the canonical JSON of
`{"method", "path", "body_sha256", "timestamp", "nonce"}` and sends four headers:

    X-Gpunite-Signer     the caller's public key, 64 hex characters
    X-Gpunite-Timestamp  Unix time in seconds, as sent (the exact string is what is signed)
    X-Gpunite-Nonce      8 to 128 characters of [A-Za-z0-9_-], never reused by this caller
    X-Gpunite-Signature  128 hex characters

The host accepts a signature only within `window_s` of its own clock and only once per (signer, nonce): a
replayed request is refused even inside the window. A request with none of the headers is anonymous; one with
some but not all of them is malformed.
"""

from __future__ import annotations

import hashlib
import heapq
import re
import threading
import time
import uuid
from dataclasses import dataclass

from gpunite.errors import GpuniteError
from gpunite.identity import Identity, canonical_json, peer_id_of, verify_bytes

SIGNER_HEADER = "x-gpunite-signer"
TIMESTAMP_HEADER = "x-gpunite-timestamp"
NONCE_HEADER = "x-gpunite-nonce"
SIGNATURE_HEADER = "x-gpunite-signature"
SIGNATURE_HEADERS = (SIGNER_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)
ANONYMOUS = "anonymous"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_NONCE = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_TIMESTAMP = re.compile(r"^\d{1,12}(\.\d{1,9})?$")


class AuthError(GpuniteError):
    """A request signature that is malformed, wrong, stale or replayed (HTTP 401)."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a peer id (signed) or "anonymous", and the request's id for its usage record."""

    peer_id: str
    request_id: str

    @property
    def anonymous(self) -> bool:
        return self.peer_id == ANONYMOUS


def signed_message(method: str, path: str, body: bytes, timestamp: str, nonce: str) -> bytes:
    """The exact bytes a caller signs for one request."""
    return canonical_json({
        "method": method.upper(),
        "path": path,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "timestamp": timestamp,
        "nonce": nonce,
    })


def sign_request(identity: Identity, method: str, path: str, body: bytes,
                 now: float | None = None, nonce: str | None = None) -> dict[str, str]:
    """The four headers that sign one request as identity."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = nonce or uuid.uuid4().hex
    signature = identity.sign_bytes(signed_message(method, path, body, timestamp, nonce))
    return {
        SIGNER_HEADER: identity.public_key_hex,
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: signature,
    }


class RequestVerifier:
    """Checks request signatures and remembers nonces for as long as their timestamps stay acceptable."""

    def __init__(self, window_s: float = 300.0, max_remembered: int = 1_000_000):
        self.window_s = window_s
        self.max_remembered = max_remembered
        self._seen: set[tuple[str, str]] = set()
        self._expiry: list[tuple[float, tuple[str, str]]] = []
        self._lock = threading.Lock()

    def verify(self, method: str, path: str, body: bytes, headers: dict[str, str],
               now: float | None = None) -> Caller:
        """The caller of a request; AuthError if its signature headers are malformed, wrong, stale or replayed."""
        now = time.time() if now is None else now
        present = [name for name in SIGNATURE_HEADERS if name in headers]
        if not present:
            return Caller(ANONYMOUS, f"anon-{uuid.uuid4().hex}")
        if len(present) != len(SIGNATURE_HEADERS):
            missing = ", ".join(name for name in SIGNATURE_HEADERS if name not in headers)
            raise AuthError(f"signed request is missing header(s) {missing}; send all four X-Gpunite-* headers or none")
        signer, timestamp = headers[SIGNER_HEADER].lower(), headers[TIMESTAMP_HEADER]
        nonce, signature = headers[NONCE_HEADER], headers[SIGNATURE_HEADER].lower()
        if not _HEX64.match(signer):
            raise AuthError("X-Gpunite-Signer must be a 64-hex-character Ed25519 public key")
        if not _HEX128.match(signature):
            raise AuthError("X-Gpunite-Signature must be 128 hex characters")
        if not _NONCE.match(nonce):
            raise AuthError("X-Gpunite-Nonce must be 8 to 128 characters of letters, digits, '_' or '-'")
        if not _TIMESTAMP.match(timestamp):
            raise AuthError("X-Gpunite-Timestamp must be Unix time in seconds, like 1767225600.123")
        skew = float(timestamp) - now
        if abs(skew) > self.window_s:
            raise AuthError(
                f"request timestamp is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the host's clock "
                f"(limit {self.window_s:.0f} s); check your clock and sign a fresh request"
            )
        if not verify_bytes(signer, signed_message(method, path, body, timestamp, nonce), signature):
            raise AuthError("request signature does not verify; sign method, path, body hash, timestamp and nonce")
        key = (signer, nonce)
        with self._lock:
            self._forget_expired(now)
            if key in self._seen:
                raise AuthError("this nonce was already used (replayed request); sign each request with a new nonce")
            if len(self._seen) >= self.max_remembered:
                raise AuthError("the host is tracking too many recent requests; retry in a minute")
            self._seen.add(key)
            heapq.heappush(self._expiry, (float(timestamp) + self.window_s, key))
        return Caller(peer_id_of(signer), nonce)

    def _forget_expired(self, now: float) -> None:
        # A nonce can be forgotten once its timestamp is outside the window: a replay would be refused as stale.
        while self._expiry and self._expiry[0][0] < now - 1.0:
            _, key = heapq.heappop(self._expiry)
            self._seen.discard(key)
