import asyncio
import json
import logging
from dataclasses import asdict

import pytest
from _ledger_helpers import RunBuilder, peer, small_run

from gpunite.ledger.credits import credit_table
from gpunite.ledger.store import Ledger
from gpunite.ledger.sync import HANDLER_NAME, SyncError, serve_sync, sync_with
from gpunite.records import record_bytes


def _table(ledger, now):
    table = credit_table(ledger.records(), now)
    return [asdict(row) for row in table.users + table.hosts + table.teams], table.banned


async def _two_peers():
    from hivemind.p2p import P2P

    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(
        initial_peers=await server.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    return server, client


def test_two_hivemind_peers_converge_and_compute_the_same_credits(tmp_path, caplog):
    run, peers = small_run(rounds=6)
    other, _ = small_run("other", rounds=3)
    run.host(peers["hank"], user_name='Hänk 🚀 "quoted"', team="Ωmega")
    everything = run.records + other.records
    # a shares the first 60 %, plus run "other"; b shares the first 40 % plus the rest of run
    cut_a, cut_b = int(len(run.records) * 0.6), int(len(run.records) * 0.4)
    a = Ledger(tmp_path / "a.sqlite")
    b = Ledger(tmp_path / "b.sqlite")
    a.add_many(run.records[:cut_a] + other.records)
    b.add_many(run.records[:cut_b] + run.records[cut_a:])
    only_a, only_b = set(a.ids()) - set(b.ids()), set(b.ids()) - set(a.ids())
    assert only_a and only_b
    now = run.time + 3600

    async def scenario():
        server, client = await _two_peers()
        try:
            await serve_sync(server, a, leaf_ids=4)  # tiny leaves: the client must walk the prefix trie
            first = await sync_with(client, server.peer_id, b)
            second = await sync_with(client, server.peer_id, b)

            # a hostile client: a forged record, then garbage; the server keeps serving
            _, reader, writer = await client.call_binary_stream_handler(server.peer_id, HANDLER_NAME)
            forged = json.loads(record_bytes(run.records[3]))
            forged["claimed_flops"] = 1e30
            payload = json.dumps({"op": "put", "records": [json.dumps(forged)]}).encode()
            writer.write(len(payload).to_bytes(4, "big") + payload)
            await writer.drain()
            header = await reader.readexactly(4)
            reply = json.loads(await reader.readexactly(int.from_bytes(header, "big")))
            writer.write((1 << 30).to_bytes(4, "big") + b"junk")
            await writer.drain()
            assert await reader.read() == b""  # the server closed the stream
            writer.close()
            third = await sync_with(client, server.peer_id, b)
            return first, second, reply, third
        finally:
            await client.shutdown()
            await server.shutdown()

    with caplog.at_level(logging.WARNING, logger="gpunite.ledger.sync"):
        first, second, reply, third = asyncio.run(scenario())
    assert first == (len(only_a), len(only_b))
    assert second == (0, 0) and third == (0, 0)
    assert reply == {"added": 0, "refused": 1}
    assert "over the" in caplog.text
    assert a.ids() == b.ids() == sorted({r.record_id for r in everything})
    assert _table(a, now) == _table(b, now)
    assert _table(a, now)[0]  # non-empty: credits really were computed


def test_sync_with_an_unreachable_peer_is_a_one_line_error(tmp_path):
    async def scenario():
        server, client = await _two_peers()  # the server never registers the sync handler
        try:
            with pytest.raises(SyncError, match="cannot open a sync stream|sync with") as info:
                await sync_with(client, server.peer_id, Ledger(tmp_path / "l.sqlite"), timeout=5)
            assert "\n" not in str(info.value)
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())


def test_sync_refuses_records_it_did_not_ask_for(tmp_path):
    """A server that answers `get` with other records than asked gets them dropped, not stored."""
    from gpunite.ledger import sync as sync_module

    run = RunBuilder()
    honest = run.contribution(peer("h"))
    unrelated = RunBuilder("x").contribution(peer("u"))
    records, dropped = sync_module._decode_records(
        [record_bytes(unrelated).decode(), record_bytes(honest).decode()], expected={honest.record_id}
    )
    assert dropped == 1 and len(records) == 1
