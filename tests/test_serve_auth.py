"""Request signatures: what verifies, and every way a signature is refused (malformed, wrong, stale, replayed)."""

from __future__ import annotations

import pytest

from gpunite.identity import Identity
from gpunite.serve.auth import ANONYMOUS, AuthError, RequestVerifier, sign_request

NOW = 1_800_000_000.0
BODY = b'{"model":"m","prompt":"hi"}'


@pytest.fixture
def caller() -> Identity:
    return Identity.from_seed(b"auth-test")


def test_unsigned_requests_are_anonymous_with_unique_ids():
    verifier = RequestVerifier()
    first, second = (verifier.verify("POST", "/v1/completions", BODY, {}, now=NOW) for _ in range(2))
    assert first.peer_id == second.peer_id == ANONYMOUS and first.request_id != second.request_id


def test_a_signed_request_verifies_once(caller):
    verifier = RequestVerifier(window_s=300)
    headers = sign_request(caller, "POST", "/v1/completions", BODY, now=NOW, nonce="nonce-0001")
    identified = verifier.verify("POST", "/v1/completions", BODY, headers, now=NOW + 5)
    assert identified.peer_id == caller.peer_id and identified.request_id == "nonce-0001"
    with pytest.raises(AuthError, match="already used"):
        verifier.verify("POST", "/v1/completions", BODY, headers, now=NOW + 6)


@pytest.mark.parametrize("change, needle", [
    (lambda h: {**h, "x-gpunite-signature": "ab" * 64}, "does not verify"),
    (lambda h: {**h, "x-gpunite-signature": "xyz"}, "128 hex"),
    (lambda h: {**h, "x-gpunite-signer": "00" * 31}, "64-hex"),
    (lambda h: {**h, "x-gpunite-nonce": "short"}, "Nonce"),
    (lambda h: {**h, "x-gpunite-timestamp": "yesterday"}, "Unix time"),
    (lambda h: {k: v for k, v in h.items() if k != "x-gpunite-nonce"}, "missing header"),
    (lambda h: {**h, "x-gpunite-signer": Identity.from_seed(b"other").public_key_hex}, "does not verify"),
])
def test_malformed_or_wrong_signatures_are_refused(caller, change, needle):
    headers = sign_request(caller, "POST", "/v1/completions", BODY, now=NOW)
    with pytest.raises(AuthError, match=needle):
        RequestVerifier().verify("POST", "/v1/completions", BODY, change(headers), now=NOW)


def test_signature_covers_method_path_and_body(caller):
    headers = sign_request(caller, "POST", "/v1/completions", BODY, now=NOW)
    for method, path, body in (("GET", "/v1/completions", BODY), ("POST", "/v1/chat/completions", BODY),
                               ("POST", "/v1/completions", BODY + b" ")):
        with pytest.raises(AuthError, match="does not verify"):
            RequestVerifier().verify(method, path, body, headers, now=NOW)


def test_stale_and_future_timestamps_are_refused_and_old_nonces_forgotten(caller):
    verifier = RequestVerifier(window_s=60)
    old = sign_request(caller, "POST", "/p", BODY, now=NOW - 61)
    with pytest.raises(AuthError, match="behind"):
        verifier.verify("POST", "/p", BODY, old, now=NOW)
    ahead = sign_request(caller, "POST", "/p", BODY, now=NOW + 61)
    with pytest.raises(AuthError, match="ahead"):
        verifier.verify("POST", "/p", BODY, ahead, now=NOW)
    for i in range(5):
        verifier.verify("POST", "/p", BODY, sign_request(caller, "POST", "/p", BODY, now=NOW, nonce=f"n-{i:06d}"),
                        now=NOW)
    assert len(verifier._seen) == 5
    verifier.verify("POST", "/p", BODY, sign_request(caller, "POST", "/p", BODY, now=NOW + 120), now=NOW + 120)
    assert len(verifier._seen) == 1  # the first five can no longer be replayed (too old), so they are dropped
