"""A host that follows a swarm run: it serves the newest weights a majority of a round's signers vouch for.

`gpunite host --join ADDRESS` joins the run's DHT as a follower (no heartbeat, no training, no roster seat),
fetches the manifest and tokenizer like a joiner does, starts from round 0's weights (built from the manifest
seed, as every peer builds them: no one needs to be trusted for those), then polls. A round's weights are
accepted only when:

1. a block of that round, for this run, is signed by more than half of the round's signers: the distinct
   peers that signed any block of it, plus live peers whose heartbeat says they are in it or past it (their blocks
   may still be on the way); a peer that signed two contents counts for neither, and
2. that block links (its `prev`) to the block the host verified for the round before, so one peer that
   claims a far-off round with a block it signed alone cannot take the host over. The first link comes
   from the ledger: the host syncs its ledger with a live peer (anti-entropy, as peers do) and walks the
   canonical chain from genesis (`gpunite.ledger.chain.canonical_chain`, which ranks copies by standing),
   checking rule 1 on every round; the chain's last such round must also pass rule 1 with the live peers in
   or past it counted, so a ledger that holds (or shows) only its own peer's blocks is no anchor.

Then it fetches the global state from a peer (hash-checked by `state_from_frame`) and serves it only if its
weights hash and chain tip are the verified block's; otherwise the state is refused and logged, and the
next peer is tried. The swap goes through `Host.swap_weights`: requests in flight finish on the old weights,
none is dropped. After each swap the signed host record in the DHT names the new weights. When no peer
answers, the host keeps serving what it has and retries at the next poll. A peer that claims to be past a
round it never signed (rule 1 counts it) can delay verification, never make the host serve other weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpunite.errors import GpuniteError
from gpunite.records import GENESIS, Block
from gpunite.serve.host import HostError, ServedModel

if TYPE_CHECKING:
    from gpunite.ledger.store import Ledger
    from gpunite.manifest import Manifest
    from gpunite.records import Heartbeat
    from gpunite.serve.host import Host
    from gpunite.swarm.node import SwarmNode
    from gpunite.swarm.state_sync import GlobalState, ParamLayout

log = logging.getLogger("gpunite.serve.follow")


class FollowError(HostError):
    """Weights that are not (or not yet) verified, or a run this host cannot follow right now."""


@dataclass(frozen=True)
class VerifiedRound:
    """A round's block that a majority of the round's signers signed: the weights after that round."""

    round: int
    block_hash: str
    weights_hash: str
    signers: int  # distinct peers that signed this block's content
    total_signers: int  # distinct peers that signed any block of this round

    def describe(self) -> str:
        return f"verified by {self.signers} of {self.total_signers} signers"


def verify_round(blocks: Iterable[Block], run_id: str, round_index: int, prev_block: str | None,
                 expected_signers: Iterable[str] = ()) -> VerifiedRound:
    """The block of round_index signed by a strict majority of that round's signers (FollowError if none).

    prev_block is the verified block hash of the round before (GENESIS before round 0): the majority block
    must link to it. None skips the link check. expected_signers (peers whose heartbeat says they are in or past
    the round, so they sign it) count as signers even before their block shows up in the DHT: a decision
    is not taken on the first signer alone while the others' blocks are still on their way.
    """
    supporters: dict[str, set[str]] = {}
    by_content: dict[str, Block] = {}
    signers: set[str] = set(expected_signers)
    for block in blocks:
        if block.run_id != run_id or block.round != round_index:
            continue
        signers.add(block.peer_id)
        supporters.setdefault(block.block_hash, set()).add(block.peer_id)
        by_content.setdefault(block.block_hash, block)
    if not supporters:
        raise FollowError(f"no signed block of round {round_index} yet")
    two_faced = {pid for pid in signers if sum(pid in group for group in supporters.values()) > 1}
    best = max(supporters, key=lambda content: (len(supporters[content] - two_faced), content))
    support = len(supporters[best] - two_faced)
    if support * 2 <= len(signers):
        raise FollowError(f"no block of round {round_index} is signed by a majority: the best has {support} "
                          f"of {len(signers)} signers")
    block = by_content[best]
    if prev_block is not None and block.prev != prev_block:
        raise FollowError(f"round {round_index}'s majority block links to {block.prev[:12]}, not to the "
                          f"verified block {prev_block[:12]} of round {round_index - 1}")
    return VerifiedRound(round_index, best, block.weights_hash, support, len(signers))


def verified_from_ledger(records: Mapping[str, Any], run_id: str) -> VerifiedRound | None:
    """The last round of the run's canonical chain (from genesis) up to which every block has a majority."""
    from gpunite.ledger.chain import canonical_chain

    blocks_by_round: dict[int, list[Block]] = {}
    for record in records.values():
        if isinstance(record, Block) and record.run_id == run_id:
            blocks_by_round.setdefault(record.round, []).append(record)
    verified: VerifiedRound | None = None
    prev = GENESIS
    for link in canonical_chain(records):
        try:
            candidate = verify_round(blocks_by_round.get(link.round, []), run_id, link.round, prev)
        except FollowError:
            break
        if candidate.block_hash != link.block_hash:  # the standing-weighted choice and the majority disagree
            break
        verified, prev = candidate, candidate.block_hash
    return verified


def check_state(state: GlobalState, verified: VerifiedRound) -> None:
    """Refuse (FollowError) a global state that is not the one the verified block describes."""
    if state.round != verified.round + 1:
        raise FollowError(f"the peer sent the state of round {state.round}, not round {verified.round + 1}'s")
    if state.weights_hash != verified.weights_hash:
        raise FollowError(f"its weights {state.weights_hash[:12]} are not in a verified block (round "
                          f"{verified.round}'s majority signed {verified.weights_hash[:12]})")
    if state.tip is None or state.tip.block_hash != verified.block_hash:
        raise FollowError(f"its chain tip is not round {verified.round}'s verified block "
                          f"{verified.block_hash[:12]}")


class RunSource:
    """The run as a follower sees it: live peers, blocks in the DHT, the ledger to sync, global states."""

    def __init__(self, node: SwarmNode, run_id: str, layout: ParamLayout, ledger: Ledger | None = None,
                 self_id: str = "", fresh_s: float = 30.0, state_timeout_s: float = 120.0) -> None:
        self.node, self.run_id, self.layout, self.ledger = node, run_id, layout, ledger
        self.self_id = self_id
        self.fresh_s = fresh_s
        self.state_timeout_s = state_timeout_s
        self._seen: dict[str, Heartbeat] = {}  # each peer's newest heartbeat read so far

    def live_peers(self) -> list[Heartbeat]:
        """Peers whose newest heartbeat seen is fresh, newest round first.

        Heartbeats seen in earlier polls count until fresh_s passes: a peer whose DHT entry lapsed for a
        moment (a busy peer stores its heartbeat late) is still a signer of the round it is in.
        """
        from gpunite.swarm.membership import parse_heartbeat
        from gpunite.swarm.protocol import run_key

        now = time.time()
        for pid, beat in self.node.get_records(run_key(self.run_id, "heartbeat"), parse_heartbeat).items():
            if pid != self.self_id and beat.run_id == self.run_id and beat.p2p_id:
                known = self._seen.get(pid)
                if known is None or beat.time > known.time:
                    self._seen[pid] = beat
        self._seen = {pid: beat for pid, beat in self._seen.items() if now - beat.time < self.fresh_s}
        return sorted(self._seen.values(), key=lambda beat: (-beat.round, beat.peer_id))

    def blocks(self, round_index: int) -> list[Block]:
        from gpunite.swarm.peer import parse_block
        from gpunite.swarm.protocol import run_key

        return list(self.node.get_records(run_key(self.run_id, "block", round_index), parse_block).values())

    def ledger_records(self, beats: list[Heartbeat]) -> Mapping[str, Any]:
        """The run's records after one anti-entropy exchange with the first live peer that answers."""
        from hivemind.p2p import PeerID

        from gpunite.ledger.sync import sync_with

        if self.ledger is None:
            return {}
        for beat in beats:
            try:
                self._connect(beat)
                peer = PeerID.from_base58(beat.p2p_id)
                self.node.run(sync_with(self.node._p2p, peer, self.ledger, timeout=30), timeout=120)
                break
            except (GpuniteError, ValueError) as exc:
                log.info("ledger sync with %s failed: %s", beat.peer_id[:12], exc)
        return self.ledger.records_by_id(run_id=self.run_id)

    def fetch_state(self, beat: Heartbeat) -> GlobalState:
        from gpunite.swarm.protocol import HANDLE_STATE
        from gpunite.swarm.state_sync import max_state_bytes, state_from_frame

        # Weights only: the host serves them and never trains, so the optimizer states would be a waste (a peer
        # that sends them anyway is still within the joiner's bound, and the host does not use them).
        header, body = self.node.request(beat.p2p_id, HANDLE_STATE, {"run": self.run_id, "weights_only": True},
                                         max_reply_bytes=max_state_bytes(self.layout.numel),
                                         maddrs=list(beat.maddrs), timeout=self.state_timeout_s)
        return state_from_frame(header, body, self.layout, self.run_id)

    def _connect(self, beat: Heartbeat) -> None:
        """Dial the peer's announced addresses so the daemon can reach it (as node.request does)."""
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        addresses = [Multiaddr(m.split("/p2p/")[0]) for m in beat.maddrs]
        if addresses:
            try:
                self.node.run(self.node._p2p._client.connect(PeerID.from_base58(beat.p2p_id), addresses),
                              timeout=30)
            except Exception as exc:  # the daemon may know a route already; the sync says if it does not
                log.debug("dialing %s: %s", beat.peer_id[:12], exc)


class Follower:
    """Keeps a Host on the run's newest verified weights: poll, verify, fetch, check, hot-swap, announce."""

    def __init__(self, host: Host, source: RunSource, poll_s: float = 2.0, ledger_every_s: float = 30.0,
                 on_swap: Callable[[VerifiedRound], None] | None = None) -> None:
        self.host = host
        self.source = source
        self.poll_s = poll_s
        self.ledger_every_s = ledger_every_s
        self.on_swap = on_swap
        self.verified: VerifiedRound | None = None  # served now; None: round 0's weights (from the seed)
        self._ledger_read_at = float("-inf")
        self._problems_logged: set[str] = set()  # failures already logged since the last good poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpunite-follow", daemon=True)

    @property
    def served_round(self) -> int:
        """The round whose block the served weights come from (-1: round 0's initial weights)."""
        return self.verified.round if self.verified else -1

    def start(self) -> Follower:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling; a fetch under way is abandoned (a daemon thread; the node closes next)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll_logged()
            self._stop.wait(self.poll_s)

    def poll_logged(self) -> bool:
        """One poll; a failure is logged (once until it changes) and the current weights stay served."""
        try:
            swapped = self.poll()
        except GpuniteError as exc:
            message = str(exc)
            if message not in self._problems_logged:  # polls repeat the same failure: say it once
                self._problems_logged.add(message)
                log.warning("%s; still serving %s, retrying every %g s", message, self._serving_text(),
                            self.poll_s)
            return False
        except Exception:  # a bug in one poll must not stop the host from serving
            log.exception("following the run failed; still serving %s", self._serving_text())
            return False
        self._problems_logged.clear()
        return swapped

    def poll(self) -> bool:
        """Swap in newer verified weights if a live peer has them; True when the served weights changed."""
        beats = self.source.live_peers()
        if not beats:
            raise FollowError(f"no live peer of run {self.source.run_id[:12]} is in the DHT")
        newest = beats[0].round - 1  # the newest block a live peer says it has signed
        if newest <= self.served_round:
            return False
        target = self.verify_up_to(newest, beats)
        if target is None or target.round <= self.served_round:
            return False
        problems = []
        for beat in beats:
            if beat.round - 1 < target.round:
                break
            try:
                state = self.source.fetch_state(beat)
                if state.round - 1 > target.round:  # it moved on since its heartbeat: verify its round too
                    target = self.verify_up_to(state.round - 1, beats) or target
                    if state.round - 1 > target.round:  # its newest block is not verified yet: not a lie
                        log.debug("peer %s is past the verified round %d", beat.peer_id[:12], target.round)
                        continue
                check_state(state, target)
            except GpuniteError as exc:
                log.warning("refused the global state of peer %s: %s", beat.peer_id[:12], exc)
                problems.append(f"{beat.peer_id[:12]}: {exc}")
                continue
            self.swap(state, target)
            return True
        if not problems:
            return False  # the peers that hold round target.round moved on; the next poll verifies theirs
        raise FollowError(f"no peer served the verified weights of round {target.round} "
                          f"({'; '.join(problems)[:300]})")

    def verify_up_to(self, newest: int, beats: list[Heartbeat]) -> VerifiedRound | None:
        """The newest verified round up to `newest`, walking block by block from the served one."""
        verified = self.verified
        next_round = self.served_round + 1
        if verified is None or not self._extends(verified):
            anchor = self._anchor(beats)
            if anchor is not None and anchor.round > self.served_round:
                verified, next_round = anchor, anchor.round + 1
        prev = verified.block_hash if verified else GENESIS
        while next_round <= newest:
            try:
                past = {beat.peer_id for beat in beats if beat.round >= next_round}  # in it or past it: they sign it
                blocks = self.source.blocks(next_round)
                verified = verify_round(blocks, self.source.run_id, next_round, prev, past)
            except FollowError as exc:
                log.debug("round %d not verified (yet): %s", next_round, exc)
                break
            prev, next_round = verified.block_hash, next_round + 1
        return verified

    def _extends(self, verified: VerifiedRound) -> bool:
        """Whether the DHT still holds blocks of the round after the served one (blocks expire)."""
        return bool(self.source.blocks(verified.round + 1))

    def _anchor(self, beats: list[Heartbeat]) -> VerifiedRound | None:
        """The ledger's verified chain tip (synced from a peer), at most once per ledger_every_s."""
        if time.monotonic() - self._ledger_read_at < self.ledger_every_s:
            return None
        self._ledger_read_at = time.monotonic()
        records = self.source.ledger_records(beats)
        anchor = verified_from_ledger(records, self.source.run_id)
        if anchor is None:
            return None
        # Every round up to the anchor links to it by hash, but the anchor's own majority was counted among
        # the blocks one peer's ledger held (its peers' blocks may not have reached it, or it may hide them):
        # the live peers in or past that round are its signers too, as on the DHT path.
        blocks = [record for record in records.values() if isinstance(record, Block)
                  and record.run_id == self.source.run_id and record.round == anchor.round]
        expected = {beat.peer_id for beat in beats if beat.round >= anchor.round}
        try:
            checked = verify_round(blocks + self.source.blocks(anchor.round), self.source.run_id, anchor.round,
                                   None, expected)
        except FollowError as exc:
            log.debug("the ledger's round %d is not verified among the live peers (yet): %s", anchor.round, exc)
            return None
        return checked if checked.block_hash == anchor.block_hash else None

    def swap(self, state: GlobalState, verified: VerifiedRound) -> None:
        provenance = {"round": verified.round, "block_hash": verified.block_hash, "signers": verified.signers,
                      "total_signers": verified.total_signers}
        if state.weights_hash == self.host.weights_hash:  # a round that merged nothing: no pause to swap
            self.host.provenance = provenance
        else:
            self.host.swap_weights(self.source.layout.named(state.weights), state.weights_hash,
                                   provenance=provenance)
        self.verified = verified
        log.info("serving round %d weights %s (%s)", verified.round, verified.weights_hash[:12],
                 verified.describe())
        if self.on_swap is not None:
            self.on_swap(verified)

    def _serving_text(self) -> str:
        if self.verified is None:
            return f"round 0's initial weights {self.host.weights_hash[:12]}"
        return f"round {self.verified.round} weights {self.verified.weights_hash[:12]}"


# ----- setting a following host up -----

def open_run(node: SwarmNode, run_id: str | None = None) -> Manifest:
    """The run's manifest from the DHT, checked against its run id (as a joiner checks it)."""
    from gpunite.swarm.bootstrap import find_run, manifest_from_announcement

    return manifest_from_announcement(find_run(node, run_id))


def load_run_model(node: SwarmNode, manifest: Manifest, home: Path, device: str = "auto",
                   self_id: str = "") -> ServedModel:
    """Round 0's model of the run (built from the manifest seed, as every peer builds it) and its tokenizer
    (fetched from a peer by hash, like a joiner)."""
    from tokenizers import Tokenizer

    from gpunite.model import build_model, config_from_manifest
    from gpunite.serve.engine import TextCodec
    from gpunite.swarm.bootstrap import StateSources
    from gpunite.train.trainer import pick_device
    from gpunite.train.weights import model_hash

    run_dir = home / "runs" / manifest.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest.save(run_dir / "run.toml")
    tokenizer_path = StateSources(node, manifest.run_id, self_id).fetch_file(
        run_dir / "prepared", "tokenizer", manifest.data.tokenizer_hash or "")
    codec = TextCodec.from_tokenizers(Tokenizer.from_file(str(tokenizer_path)))
    # built on the CPU, as the peers build it: the same seed gives the same bits there, not on every GPU
    model = build_model(config_from_manifest(manifest), seed=manifest.run.seed)
    initial_hash = model_hash(model)
    model = model.to(pick_device(device))
    return ServedModel(model.eval(), codec, manifest.run.name, manifest, initial_hash)
