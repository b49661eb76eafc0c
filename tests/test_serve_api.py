"""The host's HTTP API against a real uvicorn server: the official openai client, signatures, quotas, bad input,
hot swap under traffic, usage records in the ledger."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch

from gpunite.identity import Identity
from gpunite.ledger.store import Ledger
from gpunite.manifest import parse_manifest
from gpunite.serve.auth import sign_request
from gpunite.serve.client import ClientError, HostClient
from gpunite.serve.engine import TextCodec
from gpunite.serve.host import Host, ServedModel, ServerThread
from gpunite.train.weights import model_hash, trainable_state, weights_hash
from test_serve_engine import make_model, make_tokenizer

GENEROUS = "[credit]\nanonymous_daily_queries = 10000\nmax_daily_queries = 10000\n"
STINGY = "[credit]\nanonymous_daily_queries = 2\n"


def start_host(tmp_path, manifest_text: str, seed: int = 1, max_tokens_cap: int = 64):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed=seed)
    served = ServedModel(model, TextCodec.from_tokenizers(tokenizer), "tiny-test", None, model_hash(model))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    host = Host(served, Identity.from_seed(b"host"), ledger=ledger, manifest=parse_manifest(manifest_text),
                max_tokens_cap=max_tokens_cap)
    server = ServerThread(host.app)
    server.start()
    return host, server, ledger


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    host, server, ledger = start_host(tmp_path_factory.mktemp("host"), GENEROUS)
    yield host, server, ledger
    server.stop()
    host.close()
    ledger.close()


@pytest.fixture(scope="module")
def client(served):
    _, server, _ = served
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_models_completions_and_chat(client, served):
    host, _, _ = served
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-test"]
    completion = client.completions.create(model="tiny-test", prompt="hello world", max_tokens=8, temperature=0)
    assert completion.usage.completion_tokens == 8 and completion.choices[0].finish_reason == "length"
    expected = host.engine.generate(host.engine.codec.encode("hello world"),
                                    __import__("gpunite.serve.engine", fromlist=["SamplingParams"])
                                    .SamplingParams(max_tokens=8, temperature=0))
    assert completion.choices[0].text == expected.text
    chat = client.chat.completions.create(model="tiny-test", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens <= 6


def test_streaming_equals_the_whole_answer(client):
    whole = client.completions.create(model="tiny-test", prompt="the quick", max_tokens=12, temperature=0.8, seed=4)
    stream = client.completions.create(model="tiny-test", prompt="the quick", max_tokens=12, temperature=0.8, seed=4,
                                       stream=True)
    pieces = list(stream)
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    chat_whole = client.chat.completions.create(model="tiny-test", max_tokens=10, temperature=0.7, seed=9,
                                                messages=[{"role": "user", "content": "tell me"}])
    chat_stream = client.chat.completions.create(model="tiny-test", max_tokens=10, temperature=0.7, seed=9,
                                                 messages=[{"role": "user", "content": "tell me"}], stream=True,
                                                 stream_options={"include_usage": True})
    chunks = list(chat_stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat_whole.usage.completion_tokens


def test_echo_logprobs_score_a_prompt(client, served):
    host, _, _ = served
    prompt = "the lazy dog jumps over the fox"
    result = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = result.choices[0]
    assert choice.text == prompt
    ids = host.engine.codec.encode(prompt)
    with torch.inference_mode():
        logits = host.engine.model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert choice.logprobs.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs[1:]), expected, atol=1e-4)
    assert len(choice.logprobs.tokens) == len(ids) and len(choice.logprobs.top_logprobs[1]) == 1


def test_several_prompts_and_choices(client):
    result = client.completions.create(model="tiny-test", prompt=["a", "hello", [5, 6, 7]], n=2, max_tokens=4,
                                       temperature=1.0, seed=1)
    assert [c.index for c in result.choices] == list(range(6))
    assert result.choices[0].text != result.choices[1].text or result.choices[2].text != result.choices[3].text


def test_concurrent_http_requests_match_sequential(client):
    prompts = ["hello", "the quick brown", "fox", "lazy dog 4", "a b c", "number 21"]
    sequential = [client.completions.create(model="tiny-test", prompt=p, max_tokens=10, temperature=0).choices[0].text
                  for p in prompts]
    concurrent = [None] * len(prompts)

    def ask(i):
        concurrent[i] = client.completions.create(model="tiny-test", prompt=prompts[i], max_tokens=10,
                                                  temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert concurrent == sequential


def test_signed_requests_replays_and_bad_signatures(served):
    host, server, ledger = served
    caller = Identity.from_seed(b"caller")
    with HostClient(server.url, caller) as signed:
        text = "".join(signed.stream_completion("hello", max_tokens=5, temperature=0))
    assert text
    usages = [r for r in ledger.records(kind="usage") if r.caller == caller.peer_id]
    assert len(usages) == 1 and usages[0].completion_tokens == 5 and usages[0].peer_id == host.identity.peer_id
    body = json.dumps({"model": "tiny-test", "prompt": "hi", "max_tokens": 2}).encode()
    headers = {**sign_request(caller, "POST", "/v1/completions", body), "content-type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/completions", content=body, headers=headers).status_code == 200
        replay = http.post("/v1/completions", content=body, headers=headers)
        assert replay.status_code == 401 and "nonce" in replay.json()["error"]["message"]
        fresh = {**sign_request(caller, "POST", "/v1/completions", body), "content-type": "application/json"}
        tampered = http.post("/v1/completions", content=body.replace(b"hi", b"ho"), headers=fresh)
        assert tampered.status_code == 401 and "does not verify" in tampered.json()["error"]["message"]
        stale = {**sign_request(caller, "POST", "/v1/completions", body, now=1000.0), "content-type": "application/json"}
        assert http.post("/v1/completions", content=body, headers=stale).status_code == 401
        partial = {"x-gpunite-signer": caller.public_key_hex, "content-type": "application/json"}
        malformed = http.post("/v1/completions", content=body, headers=partial)
        assert malformed.status_code == 401 and malformed.json()["error"]["code"] == "invalid_signature"


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"model": "other", "prompt": "hi"}', 404, "not served here"),
    (b'{"model": "tiny-test", "prompt": "hi", "max_tokens": 100000}', 400, "cap"),
    (b'{"model": "tiny-test", "prompt": "hi", "temperature": -1}', 400, "temperature"),
    (b'{"model": "tiny-test", "prompt": "hi", "top_p": 1.5}', 400, "top_p"),
    (b'{"model": "tiny-test", "prompt": "' + b"word " * 400 + b'"}', 400, "context"),
    (b'{"model": "tiny-test", "prompt": ""}', 400, "empty"),
    (b'{"model": "tiny-test", "prompt": [999999]}', 400, "token ids"),
    (b'{"model": "tiny-test", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"model": "tiny-test", "messages": []}', 400, "messages"),
    (b'{"model": "tiny-test", "prompt": ["a", "b", "c", "d", "e"], "n": 16, "max_tokens": 1}', 400, "sequences per request"),
    (b'{"model": "tiny-test", "prompt": "hi", "n": 0}', 400, "n"),
])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(served, client, body, status, needle):
    _, server, _ = served
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    response = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]
    assert client.completions.create(model="tiny-test", prompt="still", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_quota_answers_429_with_reset_time(tmp_path):
    host, server, ledger = start_host(tmp_path, STINGY)
    try:
        body = {"model": "tiny-test", "prompt": "hi", "max_tokens": 2}
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert [http.post("/v1/completions", json=body).status_code for _ in range(2)] == [200, 200]
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert error["code"] == "quota_exceeded" and error["reset_time"] % 86400 == 0
            assert int(refused.headers["retry-after"]) > 0
        caller = Identity.from_seed(b"no-credit-yet")
        with HostClient(server.url, caller) as signed:  # a signed caller has its own allowance
            abandoned = signed.stream_completion("x", max_tokens=60)
            assert next(abandoned)  # then the caller goes away mid-answer: one query used, nothing held
            abandoned.close()
            deadline = time.monotonic() + 30
            while not [r for r in ledger.records(kind="usage") if r.caller == caller.peer_id]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert "".join(signed.stream_completion("x", max_tokens=2))
            with pytest.raises(ClientError, match="429.*quota"):
                list(signed.stream_completion("x", max_tokens=2))
    finally:
        server.stop()
        host.close()
        ledger.close()


def test_hot_swap_under_traffic_drops_nothing(served, client):
    host, _, _ = served
    old_state = {k: v.clone() for k, v in trainable_state(host.engine.model).items()}
    new_state = trainable_state(make_model(make_tokenizer(), seed=2))
    prompt = "the quick brown fox"
    before = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    results, failures, stop = [], [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                stream = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=12, temperature=0,
                                                   stream=True)
                results.append("".join(c.choices[0].text for c in stream))
            except Exception as exc:  # any failure is a dropped request
                failures.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    while len(results) < 3:
        threading.Event().wait(0.05)
    host.swap_weights(new_state, weights_hash(new_state), timeout_s=60)
    count = len(results)
    while len(results) < count + 3:
        threading.Event().wait(0.05)
    stop.set()
    for t in threads:
        t.join()
    after = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert not failures
    assert after != before
    assert set(results) <= {before, after}  # every answer came wholly from one set of weights
    assert client.models.list().data[0].model_extra["weights_hash"] == weights_hash(new_state)
    host.swap_weights(old_state, weights_hash(old_state), timeout_s=60)
    with pytest.raises(Exception, match="not the announced"):
        host.swap_weights(new_state, "0" * 64)
