"""The generation engine: KV-cached decoding equals transformers' generate, batching changes no output, stops, echo."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

from gpunite.model import PRESETS, build_model
from gpunite.serve.engine import Engine, EngineError, SamplingParams, TextCodec

CORPUS = [f"the quick brown fox {i} jumps over the lazy dog; hello world number {i * 7}." for i in range(300)]
PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "lazy dog number 12 and the", "fox 3"]


def make_tokenizer():
    """A small byte-level BPE trained here, with an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def make_model(tokenizer, seed: int = 1):
    """The tiny preset, sized to the tokenizer, with a short context so limits are easy to reach."""
    config = replace(PRESETS["tiny"], vocab_size=tokenizer.get_vocab_size(), max_seq_len=128, n_layers=2)
    return build_model(config, seed=seed).eval()


@pytest.fixture(scope="module")
def engine():
    tokenizer = make_tokenizer()
    engine = Engine(make_model(tokenizer), TextCodec.from_tokenizers(tokenizer), max_batch=8)
    yield engine
    engine.close()


def token_ids(completion) -> list[int]:
    return [info.token_id for info in completion.tokens]


def test_greedy_matches_transformers_generate(engine):
    for prompt in PROMPTS[:3]:
        ids = engine.codec.encode(prompt)
        ours = engine.generate(ids, SamplingParams(max_tokens=12, temperature=0))
        with torch.inference_mode():
            tensor = torch.tensor([ids])
            theirs = engine.model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=12,
                                           do_sample=False)[0, len(ids):].tolist()
        assert token_ids(ours) == theirs
        assert ours.finish_reason == "length" and ours.completion_tokens == 12


def test_concurrent_requests_give_the_same_outputs_as_sequential(engine):
    cases = []
    for i, prompt in enumerate(PROMPTS):
        cases.append((prompt, SamplingParams(max_tokens=6 + 3 * i, temperature=0)))
        cases.append((prompt, SamplingParams(max_tokens=20 - 2 * i, temperature=0.9, top_p=0.9, seed=100 + i)))
    sequential = [token_ids(engine.generate(engine.codec.encode(p), params)) for p, params in cases]
    concurrent: list[list[int] | None] = [None] * len(cases)

    def run(index: int) -> None:
        time.sleep(0.003 * index)  # staggered: later requests join a batch that is already decoding
        prompt, params = cases[index]
        concurrent[index] = token_ids(engine.generate(engine.codec.encode(prompt), params))

    largest_before = engine.stats.largest_batch
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert concurrent == sequential
    assert engine.stats.largest_batch > max(1, largest_before)
    assert len({tuple(ids) for ids in sequential}) > 5  # the cases really differ


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    ids = engine.codec.encode(PROMPTS[1])
    first = engine.generate(ids, SamplingParams(max_tokens=16, temperature=1.0, seed=5))
    again = engine.generate(ids, SamplingParams(max_tokens=16, temperature=1.0, seed=5))
    other = engine.generate(ids, SamplingParams(max_tokens=16, temperature=1.0, seed=6))
    assert token_ids(first) == token_ids(again)
    assert token_ids(first) != token_ids(other)


def test_stop_string_ends_text_before_it(engine):
    ids = engine.codec.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=11)
    full = engine.generate(ids, params).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and stop.strip("\ufffd")
    stopped = engine.generate(ids, replace(params, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def test_streamed_pieces_add_up_to_the_text(engine):
    pieces = []
    done = threading.Event()

    def on_event(event):
        pieces.append(event)
        if event.finish_reason:
            done.set()

    engine.submit(engine.codec.encode(PROMPTS[2]), SamplingParams(max_tokens=15, temperature=1.0, seed=3), on_event)
    assert done.wait(30)
    whole = engine.generate(engine.codec.encode(PROMPTS[2]), SamplingParams(max_tokens=15, temperature=1.0, seed=3))
    assert len(pieces) == 15
    assert "".join(p.text for p in pieces) == whole.text
    assert [p.finish_reason for p in pieces[:-1]] == [None] * 14 and pieces[-1].finish_reason == "length"


def test_echo_gives_prompt_logprobs_of_the_model(engine):
    ids = engine.codec.encode(PROMPTS[3])
    result = engine.generate(ids, SamplingParams(max_tokens=0, logprobs=2, echo_logprobs=True))
    assert result.finish_reason == "length" and result.completion_tokens == 0 and result.text == ""
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    infos = result.prompt_logprobs
    assert [i.token_id for i in infos] == ids and infos[0].logprob is None
    assert torch.allclose(torch.tensor([i.logprob for i in infos[1:]]), expected, atol=1e-4)
    assert all(len(i.top) == 2 and i.top[0][1] >= i.top[1][1] for i in infos[1:])


def test_generated_logprobs_are_of_the_chosen_tokens(engine):
    ids = engine.codec.encode(PROMPTS[4])
    result = engine.generate(ids, SamplingParams(max_tokens=5, temperature=0, logprobs=3))
    for info in result.tokens:
        assert info.logprob == pytest.approx(info.top[0][1])  # greedy: the chosen token is the top one


def test_bad_requests_are_refused(engine):
    with pytest.raises(EngineError, match="empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(EngineError, match="context"):
        engine.generate([1] * 120, SamplingParams(max_tokens=20))
    with pytest.raises(EngineError, match="token ids"):
        engine.generate([10**6], SamplingParams())


def test_context_limit_ends_generation(engine):
    result = engine.generate([5] * 120, SamplingParams(max_tokens=8, temperature=0))
    assert result.completion_tokens == 8 and result.finish_reason == "length"


def test_cancelled_request_stops_generating(engine):
    events = []
    finished, submitted = threading.Event(), threading.Event()
    handles = []

    def on_event(event):
        events.append(event)
        if len(events) == 2:
            submitted.wait()
            handles[0].cancel()
        if event.finish_reason:
            finished.set()

    before = engine.stats.completion_tokens
    handles.append(engine.submit(engine.codec.encode(PROMPTS[0]), SamplingParams(max_tokens=100, temperature=0),
                                 on_event))
    submitted.set()
    deadline = time.monotonic() + 10
    while engine.stats.completion_tokens - before < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.generate(engine.codec.encode("a"), SamplingParams(max_tokens=2, temperature=0))  # the worker moved on
    assert not finished.is_set() and len(events) == 2  # cancelled in its second callback: no third token
    assert engine.stats.completion_tokens - before == 2 + 2


def test_vanishing_temperature_decodes_greedily(engine):
    ids = engine.codec.encode(PROMPTS[1])
    greedy = engine.generate(ids, SamplingParams(max_tokens=8, temperature=0))
    tiny = engine.generate(ids, SamplingParams(max_tokens=8, temperature=1e-45, seed=1))
    assert token_ids(tiny) == token_ids(greedy) and tiny.finish_reason == "length"
