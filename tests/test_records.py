import pytest

from gpunite.identity import Identity, RecordError
from gpunite.records import GENESIS, Block, Contribution, WorkUnit, parse_record, record_bytes, sign_record


def _contribution(**over):
    fields = dict(run_id="a" * 64, round=3, base_hash="b" * 64, work_units=[WorkUnit(shard="c" * 64, first=0, count=4)],
                  inner_steps=20, tokens=2560, trail_interval=10, trail=["d" * 64] * 3, delta_hash="e" * 64,
                  delta_norm=1.5, claimed_flops=1e9, time=1.0)
    fields.update(over)
    return Contribution(**fields)


def test_sign_parse_round_trip():
    ident = Identity.from_seed(b"t")
    signed = sign_record(ident, _contribution())
    again = parse_record(record_bytes(signed))
    assert again == signed and again.peer_id == ident.peer_id
    assert again.record_id == signed.record_id


def test_tampered_or_malformed_records_are_rejected():
    ident = Identity.from_seed(b"t")
    signed = sign_record(ident, _contribution()).model_dump(mode="json")
    with pytest.raises(RecordError, match="bad signature"):
        parse_record({**signed, "round": 4})
    bad = ident.sign({**_contribution().body(), "round": -1})
    with pytest.raises(RecordError, match="schema"):
        parse_record(bad)
    with pytest.raises(RecordError, match="schema"):
        parse_record(ident.sign({"kind": "nonsense"}))


def test_block_hash_ignores_signer_and_time():
    fields = dict(run_id="a" * 64, round=0, prev=GENESIS, accepted=[], weights_hash="f" * 64, tokens=0)
    one = sign_record(Identity.from_seed(b"1"), Block(time=1.0, **fields))
    two = sign_record(Identity.from_seed(b"2"), Block(time=2.0, **fields))
    assert one.block_hash == two.block_hash
    assert one.record_id != two.record_id


def test_parse_record_as_insists_on_the_kind():
    from gpunite.records import parse_record_as

    signed = sign_record(Identity.from_seed(b"t"), _contribution())
    assert parse_record_as(record_bytes(signed), Contribution) == signed
    with pytest.raises(RecordError, match="expected a Block record, got a contribution record"):
        parse_record_as(record_bytes(signed), Block)
