import json

import numpy as np
import pytest

from gpunite.data.batches import heldout_units, load_sequences
from gpunite.data.shards import ShardIndex, ShardWriter
from gpunite.records import WorkUnit
from gpunite.swarm.assignment import AssignmentError, WorkPlan, apportion, epoch_order, split_units

SHARD_A, SHARD_B = "a" * 64, "b" * 64
RANGES = [WorkUnit(shard=SHARD_B, first=0, count=37), WorkUnit(shard=SHARD_A, first=5, count=60)]
PEERS = [("p1", 1.0), ("p2", 1.0), ("p3", 1.0)]


def sequences(units):
    return [(u.shard, s) for u in units for s in range(u.first, u.first + u.count)]


def test_split_units_keeps_every_sequence_once_in_canonical_order():
    units = split_units(RANGES, 8)
    assert units[0] == WorkUnit(shard=SHARD_A, first=5, count=8)
    assert sorted(sequences(units)) == sorted(sequences(RANGES))
    assert len(sequences(units)) == 97 and max(u.count for u in units) == 8
    with pytest.raises(AssignmentError, match="overlap"):
        split_units(RANGES + [WorkUnit(shard=SHARD_A, first=64, count=2)], 8)


def test_epoch_order_is_a_seeded_permutation():
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0)
    assert sorted(epoch_order(50, 1, 0)) == list(range(50))
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1) != epoch_order(50, 2, 0)


def test_apportion_follows_speed_and_caps_absurd_claims():
    assert apportion(30, [("fast", 2.0), ("slow", 1.0)]) == {"fast": 20, "slow": 10}
    assert apportion(7, [("b", 1.0), ("a", 1.0)]) == {"a": 4, "b": 3}  # ties go by peer id
    capped = apportion(60, [("liar", 1e12), ("h1", 1.0), ("h2", 1.0)])
    assert capped["liar"] <= 4 * capped["h1"] and sum(capped.values()) == 60
    assert apportion(3, [("x", float("nan")), ("y", 1.0), ("z", 1e-9)]) == {"x": 1, "y": 1, "z": 1}
    with pytest.raises(AssignmentError, match="more than once"):
        apportion(3, [("x", 1.0), ("x", 2.0)])


def run_plan(plan, rosters, accepted_by_round, units_per_peer=2):
    history = []
    for round_, roster in enumerate(rosters):
        assigned = plan.assign(round_, roster, units_per_peer)
        history.append(assigned)
        plan.settle(round_, accepted_by_round(round_, assigned))
    return history


def test_every_sequence_exactly_once_per_epoch_without_churn():
    plan = WorkPlan(RANGES, seed=7, sequences_per_unit=8)  # 13 units
    trained = []
    round_ = 0
    while plan.coverage() < 1.0:
        assigned = plan.assign(round_, PEERS, 1)
        plan.settle(round_, [p for p, _ in PEERS])
        trained += [u for units in assigned.values() for u in units]
        round_ += 1
    assert sorted(sequences(trained)) == sorted(sequences(RANGES))
    assert plan.epoch == 0 and round_ == 5  # 13 units, 3 per round
    plan.assign(round_, PEERS, 1)
    assert plan.epoch == 1 and plan.coverage() == 0.0


def test_the_same_history_gives_the_same_plan_everywhere():
    def accept_all_but_p2_in_round_1(round_, assigned):
        return [p for p in assigned if not (round_ == 1 and p == "p2")]

    rosters = [PEERS] * 4
    first = run_plan(WorkPlan(RANGES, 3, 8), rosters, accept_all_but_p2_in_round_1)
    # Peers list the roster in whatever order they learned it; the plan sorts it.
    second = run_plan(WorkPlan(RANGES, 3, 8), [list(reversed(PEERS))] * 4, accept_all_but_p2_in_round_1)
    assert first == second
    assert run_plan(WorkPlan(RANGES, 4, 8), rosters, accept_all_but_p2_in_round_1) != first
    assert WorkPlan(RANGES, 3, 8).assign(0, PEERS, 2) == WorkPlan(RANGES, 3, 8).assign(0, PEERS, 2)


def test_a_faster_peer_gets_about_twice_the_units():
    plan = WorkPlan([WorkUnit(shard=SHARD_A, first=0, count=10_000)], seed=1, sequences_per_unit=4)
    assigned = plan.assign(0, [("fast", 2.0), ("slow", 1.0)], 10)
    assert len(assigned["fast"]) == 13 and len(assigned["slow"]) == 7


def test_vanished_peers_units_are_reassigned_first_and_coverage_completes():
    plan = WorkPlan(RANGES, seed=11, sequences_per_unit=8)
    round0 = plan.assign(0, PEERS, 1)
    returned = plan.settle(0, ["p1", "p3"])  # p2 vanished
    assert returned == round0["p2"]
    assert plan.coverage() == pytest.approx(sum(u.count for p in ("p1", "p3") for u in round0[p]) / 97)
    survivors = [("p1", 1.0), ("p3", 1.0)]
    round1 = plan.assign(1, survivors, 1)
    assert round1["p1"] == round0["p2"]  # handed out again, first
    plan.settle(1, ["p1", "p3"])
    trained = [u for p in ("p1", "p3") for u in round0[p]] + [u for units in round1.values() for u in units]
    round_ = 2
    while plan.coverage() < 1.0:
        assigned = plan.assign(round_, survivors, 1)
        plan.settle(round_, ["p1", "p3"])
        trained += [u for units in assigned.values() for u in units]
        round_ += 1
    assert sorted(sequences(trained)) == sorted(sequences(RANGES))


def test_late_joiner_continues_from_json_state_with_rounds_in_flight():
    plan = WorkPlan(RANGES, seed=5, sequences_per_unit=8)
    plan.assign(0, PEERS, 1)
    plan.settle(0, ["p1"])
    plan.assign(1, PEERS, 1)  # still open when the joiner arrives (overlapped rounds)
    joiner = WorkPlan.from_state_dict(RANGES, json.loads(json.dumps(plan.state_dict())))
    assert joiner.state_dict() == plan.state_dict()
    for p in (plan, joiner):
        p.settle(1, ["p1", "p2"])
    roster = PEERS + [("p4", 1.0)]
    assert joiner.assign(2, roster, 2) == plan.assign(2, roster, 2)
    assert joiner.coverage() == plan.coverage()


def test_bad_state_is_rejected_with_one_line_errors():
    state = WorkPlan(RANGES, seed=5, sequences_per_unit=8).state_dict()
    with pytest.raises(AssignmentError, match="different dataset"):
        WorkPlan.from_state_dict(RANGES[:1], state)
    with pytest.raises(AssignmentError, match="do not exist"):
        WorkPlan.from_state_dict(RANGES, {**state, "trained": [999]})
    with pytest.raises(AssignmentError, match="schema"):
        WorkPlan.from_state_dict(RANGES, {**state, "cursor": "x"})
    with pytest.raises(AssignmentError, match="no open assignment"):
        WorkPlan(RANGES, 1, 8).settle(3, [])
    with pytest.raises(AssignmentError, match="no trainable"):
        WorkPlan([], 1, 8)


def test_plan_over_a_prepared_dataset_trains_every_trainable_sequence_and_no_heldout_one(tmp_path):
    writer = ShardWriter(tmp_path, 1024, "uint16")
    writer.add(np.arange(2500, dtype=np.int64))  # token i is i: a sequence is named by its first token
    shards = writer.finish()
    ShardIndex(tokenizer_hash="0" * 64, vocab_size=65536, eos_id=0, dtype="uint16", seq_len=16,
               shard_tokens=1024, documents=1, total_tokens=2500, shards=shards).save(tmp_path)
    index = ShardIndex.load(tmp_path)
    plan = WorkPlan.from_index(index, seq_len=16, seed=9, sequences_per_unit=5)
    firsts = []
    round_ = 0
    while plan.coverage() < 1.0:
        for units in plan.assign(round_, PEERS, 2).values():
            for u in units:
                firsts += load_sequences(tmp_path, index, u.shard, u.first, u.count, 16)[:, 0].tolist()
        plan.settle(round_, [p for p, _ in PEERS])
        round_ += 1
    heldout = [load_sequences(tmp_path, index, h.shard_sha256, h.first, h.count, 16)[:, 0].tolist()
               for h in heldout_units(index, 16)]
    assert len(firsts) == len(set(firsts)) == plan.total_sequences
    assert not set(firsts) & {t for rows in heldout for t in rows}
