"""The bans a joiner takes with its global state: carried in the state frame, checked against the live peers'
heartbeats (each carries the digest of the bans its round is judged by), refused when malformed."""

from __future__ import annotations

import time

import pytest
import torch

from gpunite.identity import Identity
from gpunite.proof.policy import Ban, BanList
from gpunite.records import Heartbeat, sign_record
from gpunite.swarm.state_sync import (
    GlobalState,
    ParamLayout,
    StateSyncError,
    check_bans,
    state_from_frame,
    state_to_frame,
)

RUN_ID = "cd" * 32
CHEATERS = ["a" * 40, "b" * 40]
BANS = (Ban(CHEATERS[0], 1, "proven: replay lands far", ("e" * 64,)),
        Ban(CHEATERS[1], 3, "proven: delta mismatch", ("f" * 64, "9" * 64)))


def _state(round_index: int = 5, bans=BANS) -> tuple[GlobalState, ParamLayout]:
    model = torch.nn.Linear(4, 2)
    layout = ParamLayout.of(model)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return GlobalState(round_index, weights, None, {}, None, None, layout.hash(weights), bans=bans), layout


def _beat(seed: bytes, round_index: int, bans: str) -> Heartbeat:
    return sign_record(Identity.from_seed(seed), Heartbeat(
        run_id=RUN_ID, round=round_index, weights_hash="0" * 64, roles=["trainer"], maddrs=[], p2p_id="x",
        time=time.time(), bans=bans))


def test_the_digest_names_who_was_banned_and_when_in_any_order():
    forward = BanList({b.peer_id: b for b in BANS})
    backward = BanList({b.peer_id: b for b in reversed(BANS)})
    assert BanList().digest() == "" and forward.digest() == backward.digest() != ""
    assert forward.as_of(2).digest() != forward.digest()  # round 2 is judged by the first ban only
    assert forward.as_of(2).digest() == BanList({CHEATERS[0]: BANS[0]}).digest()
    moved = BanList({CHEATERS[0]: BANS[0], CHEATERS[1]: Ban(CHEATERS[1], 4, "", ())})
    assert moved.digest() != forward.digest()  # another round is another ban history


def test_bans_travel_in_the_state_frame_and_malformed_ones_are_refused():
    state, layout = _state()
    header, body = state_to_frame(state)
    assert state_from_frame(header, body, layout, RUN_ID).bans == BANS
    assert state_from_frame({**header, "bans": None}, body, layout, RUN_ID).bans == ()
    for bad in ("x", [["a" * 40, -1, "", []]], [["a" * 40, 1, "", ["e" * 65]]], [["a" * 40, 1, ""]],
                [["a" * 40, 1, "", []], ["a" * 40, 2, "", []]], [["a" * 100, 1, "", []]]):
        with pytest.raises(StateSyncError, match="ban"):
            state_from_frame({**header, "bans": bad}, body, layout, RUN_ID)


def test_bans_most_live_peers_contradict_are_refused():
    state, _ = _state(round_index=5)
    held = BanList({b.peer_id: b for b in BANS})
    honest = [_beat(b"p1", 5, held.digest()), _beat(b"p2", 4, held.as_of(4).digest()),
              _beat(b"p3", 2, held.as_of(2).digest())]  # behind: it votes on the bans as of its own round
    check_bans(state, honest)
    omitted, _ = _state(round_index=5, bans=BANS[:1])  # a peer that hides a ban from the joiner
    with pytest.raises(StateSyncError, match="disagree"):
        check_bans(omitted, honest)
    # peers further on may know newer bans: they do not vote; one liar among honest voters changes nothing
    check_bans(state, [*honest, _beat(b"p4", 9, "0" * 64), _beat(b"liar", 5, "1" * 64)])
    check_bans(state, [])  # nobody to ask: taken as sent


def test_a_weights_only_frame_carries_the_weights_and_bans_but_no_optimizer_state():
    """What a host following the run asks for: a fifth of a joiner's frame, and still hash-checked."""
    model = torch.nn.Linear(256, 64)
    layout = ParamLayout.of(model)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    full = GlobalState(5, weights, torch.randn_like(weights), {}, None, None, layout.hash(weights),
                       inner_optimizer={"0.exp_avg": torch.randn(64, 256), "0.exp_avg_sq": torch.rand(64, 256)},
                       previous_weights=torch.randn_like(weights), bans=BANS)
    _, joiner_body = state_to_frame(full)
    header, body = state_to_frame(full, weights_only=True)
    slim = state_from_frame(header, body, layout, RUN_ID)
    assert torch.equal(slim.weights, weights) and slim.bans == BANS and slim.weights_hash == full.weights_hash
    assert slim.momentum is None and slim.inner_optimizer is None and slim.previous_weights is None
    assert len(body) < 0.3 * len(joiner_body) and 4 * layout.numel <= len(body) < 4 * layout.numel + 4096
    with pytest.raises(StateSyncError, match="hash"):  # still checked against the hash the peer sent
        state_from_frame({**header, "weights_hash": "0" * 64}, body, layout, RUN_ID)
