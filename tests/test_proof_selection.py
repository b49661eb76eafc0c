"""Audit selection is a pure function of the beacon, roughly uniform, and meets the detection target."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from gpunite.identity import Identity
from gpunite.proof.selection import (
    SelectionError,
    beacon_from_signature,
    choose_segment,
    choose_segments,
    choose_verifiers,
    is_audited,
    p_caught_within,
    p_segments_catch,
    ring_verifiers,
    segments_needed,
    sign_beacon,
)

RUN, PREV = "a" * 64, "b" * 64
IDS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
PEERS = [f"peer{i:02d}" for i in range(10)]
COORDINATOR = Identity.from_seed(b"coordinator")


def _beacon(ids=IDS, coordinator=COORDINATOR):
    signature = sign_beacon(coordinator, RUN, 7, PREV, ids)
    return beacon_from_signature(coordinator.public_key_hex, signature, RUN, 7, PREV, list(reversed(ids)))


def test_beacon_is_deterministic_and_bound_to_the_committed_set():
    assert _beacon() == _beacon()  # Ed25519: one message, one signature; the order of ids does not matter
    assert _beacon(IDS[:-1]) != _beacon()
    coordinator = Identity.from_seed(b"coordinator")
    signature = sign_beacon(coordinator, RUN, 7, PREV, IDS)
    with pytest.raises(SelectionError):
        beacon_from_signature(coordinator.public_key_hex, signature, RUN, 7, PREV, IDS[:-1])


def test_selection_is_deterministic_and_roughly_uniform():
    beacon = _beacon()
    audited = [cid for cid in IDS if is_audited(beacon, cid, 0.25)]
    assert audited == [cid for cid in IDS if is_audited(beacon, cid, 0.25)]
    assert 0.21 < len(audited) / len(IDS) < 0.29
    assert all(is_audited(beacon, cid, 0.0, signer_is_coordinator=True) for cid in IDS[:10])

    verifier_counts = Counter(v for cid in IDS for v in choose_verifiers(beacon, cid, PEERS, 2, exclude=["peer00"]))
    assert "peer00" not in verifier_counts
    assert all(300 < n < 600 for n in verifier_counts.values())  # 4000 picks over 9 peers: ~444 each
    assert choose_verifiers(beacon, IDS[0], PEERS, 3) == choose_verifiers(_beacon(), IDS[0], list(reversed(PEERS)), 3)

    segment_counts = Counter(choose_segment(beacon, cid, 10) for cid in IDS)
    assert set(segment_counts) == set(range(10)) and all(140 < n < 260 for n in segment_counts.values())
    picked = choose_segments(beacon, IDS[1], 50, 2)
    assert len(set(picked)) == 2 and all(0 <= s < 50 for s in picked)
    assert choose_segments(beacon, IDS[1], 3, 5) == [0, 1, 2]
    with pytest.raises(SelectionError):
        choose_verifiers(beacon, IDS[0], ["peer01"], 1, exclude=["peer01"])


def test_ring_verifiers_spread_a_rounds_audits_and_never_pick_the_trainer():
    beacons = [hashlib.sha256(b"beacon %d" % i).digest() for i in range(400)]
    trainers, coordinator = ["peerA", "peerB", "peerC"], "peerD"  # 4 peers: the coordinator verifies nobody
    ring_max, drawn_max, picked_for_a = Counter(), Counter(), Counter()
    for beacon in beacons:
        ring_load, drawn_load = Counter(), Counter()
        for trainer in [*trainers, coordinator]:  # the coordinator's own contribution is audited too
            cid = hashlib.sha256(beacon + trainer.encode()).hexdigest()
            chosen = ring_verifiers(beacon, cid, trainer, trainers, 1)
            assert trainer not in chosen and coordinator not in chosen and len(chosen) == 1
            ring_load.update(chosen)
            drawn_load.update(choose_verifiers(beacon, cid, [*trainers, coordinator], 1,
                                               exclude=[trainer, coordinator]))
            if trainer == "peerA":
                picked_for_a.update(chosen)
        ring_max[max(ring_load.values())] += 1
        drawn_max[max(drawn_load.values())] += 1
    assert set(ring_max) == {2}  # 4 audits over 3 verifiers: never more than 2 on one of them
    assert drawn_max[3] > 40  # independent draws put 3 of 4 on one verifier in ~1/4 of rounds
    assert set(picked_for_a) == {"peerB", "peerC"} and all(150 < n < 250 for n in picked_for_a.values())

    # n verifiers each, 10 candidates: every candidate verifies exactly n of the ring's trainers
    load = Counter(v for trainer in PEERS for v in ring_verifiers(beacons[0], trainer, trainer, PEERS, 3))
    assert load == Counter({peer: 3 for peer in PEERS})
    assert ring_verifiers(beacons[0], IDS[0], "outsider", PEERS, 2) == ring_verifiers(
        beacons[0], IDS[0], "outsider", list(reversed(PEERS)), 2)
    with pytest.raises(SelectionError):
        ring_verifiers(beacons[0], IDS[0], "peer01", ["peer01"], 1)


def test_detection_probability_and_the_default_policy():
    assert p_segments_catch(50, 25, 2) == pytest.approx(1 - (25 * 24) / (50 * 49))
    assert p_segments_catch(10, 6, 5) == 1.0
    # The manifest's original default (audit 25% of contributions, one of 10 segments) misses the target;
    # the proof policy's default (85%, two of 50 segments) meets it.
    assert p_caught_within(5, audit_fraction=0.25, n_segments=10, segments_per_audit=1, faked_fraction=0.5) < 0.5
    assert p_caught_within(5, audit_fraction=0.85, n_segments=50, segments_per_audit=2, faked_fraction=0.5) >= 0.99
    assert segments_needed(0.85, 50) == 2
    assert segments_needed(0.5, 50) is None  # below ~0.61 no number of segments is enough
