import os
import stat

import pytest

from gpunite.identity import Identity, IdentityError, RecordError, decode_record, canonical_json, verify_record


def test_identity_persists_with_private_mode(tmp_path):
    a = Identity.load_or_create(tmp_path)
    b = Identity.load_or_create(tmp_path)
    assert a.peer_id == b.peer_id
    assert stat.S_IMODE(os.stat(tmp_path / "identity").st_mode) == 0o600


def test_signed_record_verifies_and_tampering_fails(tmp_path):
    ident = Identity.generate()
    record = ident.sign({"kind": "heartbeat", "round": 3})
    assert verify_record(record) is record
    assert decode_record(canonical_json(record))["round"] == 3
    with pytest.raises(RecordError, match="bad signature"):
        verify_record({**record, "round": 4})
    other = Identity.generate()
    with pytest.raises(RecordError, match="bad signature"):
        verify_record({**record, "signer": other.public_key_hex})
    for garbage in (b"\xff\xfe", b"[1,2]", b"{}", b'{"signer": "zz", "signature": "00"}'):
        with pytest.raises(RecordError):
            decode_record(garbage)


def test_corrupt_key_file_is_reported(tmp_path):
    (tmp_path / "identity").write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="move it aside"):
        Identity.load_or_create(tmp_path)
