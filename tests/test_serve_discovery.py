"""Finding a host through the swarm: a real host announces its signed record in a real DHT, a caller that only
knows a peer's address finds it (skipping an announced host that does not answer) and gets an answer."""

from __future__ import annotations

import time

import pytest

from gpunite.identity import Identity
from gpunite.records import HostRecord, sign_record
from gpunite.serve.client import ClientError, HostClient, resolve_host_url
from gpunite.serve.host import announce_host
from gpunite.swarm.node import SwarmNode
from gpunite.train.hardware import probe
from gpunite.util import free_port
from test_serve_api import GENEROUS, start_host

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def swarm_peer():
    node = SwarmNode().start()
    yield node
    node.close()


def test_ask_finds_the_announced_host_that_answers(tmp_path, swarm_peer):
    host, server, ledger = start_host(tmp_path, GENEROUS)
    host_node = SwarmNode(initial_peers=[swarm_peer.maddrs[0]]).start()
    try:
        announce_host(host_node, host.host_record(probe("cpu", budget_s=0.05), api_url=server.url))
        # a newer record whose host is gone: the caller must skip it
        gone = sign_record(Identity.from_seed(b"gone"), HostRecord(
            host_name="gone", device="cpu", memory_gb=1.0, tflops=1.0,
            api_url=f"http://127.0.0.1:{free_port()}", time=time.time() + 60))
        announce_host(host_node, gone)
        url = resolve_host_url(None, join=swarm_peer.maddrs[0])
        assert url == server.url
        with HostClient(url, Identity.from_seed(b"caller")) as client:
            assert "".join(client.stream_completion("def ", max_tokens=4, temperature=0))
    finally:
        host_node.close()
        server.stop()
        host.close()
        ledger.close()


def test_ask_says_when_no_host_is_announced(swarm_peer):
    with pytest.raises(ClientError, match="no host is announced"):
        resolve_host_url(None, join=swarm_peer.maddrs[0])
    assert resolve_host_url("http://example.org:9/", join=swarm_peer.maddrs[0]) == "http://example.org:9"
