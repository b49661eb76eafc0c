"""Inference throughput: our host (HTTP + continuous-batching engine) vs plain transformers `generate`.

Same model (the `small` preset, random init, vocabulary sized to a BPE trained here on the built-in corpus),
same prompts (real text, PROMPT_TOKENS tokens each), greedy decoding of NEW_TOKENS tokens, measured side by side
in one run:
- baseline: `model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)`, one prompt at a time;
- ours, single stream: one client sending the same prompts one at a time to a real uvicorn server
  (POST /v1/completions with token-id prompts, temperature 0, non-streaming), so HTTP, JSON, scheduling
  and detokenization are all inside our time;
- ours, 8 concurrent streams: 8 clients each sending its prompts back to back; tokens/s over the wall time.
Single-stream requests alternate prompt by prompt between baseline and ours, ROUNDS times over the prompts
(the machine may be shared, so both sides see the same load), and tokens/s is each side's total tokens over its
total time (`cpu_ratio`: the same with this process's CPU seconds, server and client included, which a
shared machine's load disturbs less). p50/p99 are request latencies in the concurrent run. `outputs_match`
says whether our greedy text equals generate's for every prompt. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import replace

import httpx
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gpunite.data.builtin import iter_builtin
from gpunite.data.readers import ReadStats
from gpunite.identity import Identity
from gpunite.model import PRESETS, build_model
from gpunite.serve.engine import TextCodec
from gpunite.serve.host import Host, ServedModel, ServerThread
from gpunite.train.weights import model_hash

PRESET = "small"
PROMPTS = 6
PROMPT_TOKENS = 32
NEW_TOKENS = 48
ROUNDS = 2
STREAMS = 8
REQUESTS_PER_STREAM = 2


def build_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(iter_builtin("builtin:python-docs", 2.0, ReadStats()), trainer)
    return tokenizer


def prompt_ids(tokenizer: Tokenizer) -> list[list[int]]:
    prompts = []
    for text in iter_builtin("builtin:python-docs", 2.0, ReadStats()):
        ids = tokenizer.encode(text).ids
        if len(ids) >= PROMPT_TOKENS * 2:
            prompts.append(ids[PROMPT_TOKENS: PROMPT_TOKENS * 2])
        if len(prompts) == PROMPTS:
            return prompts
    raise RuntimeError("the built-in corpus has too few documents for the prompts")


def baseline_generate(model, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        tensor = torch.tensor([ids])
        generated = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False)
    return generated[0, len(ids):].tolist()


def ask(http: httpx.Client, ids: list[int], model_name: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    response = http.post("/v1/completions", json={"model": model_name, "prompt": ids, "max_tokens": NEW_TOKENS,
                                                  "temperature": 0})
    latency = time.perf_counter() - start
    response.raise_for_status()
    body = response.json()
    return body["usage"]["completion_tokens"], body["choices"][0]["text"], latency


def single_stream(model, url: str, prompts: list[list[int]], model_name: str, codec: TextCodec) -> dict:
    """Both sides, one request at a time, alternating prompt by prompt."""
    time_s = {"ours": 0.0, "baseline": 0.0}
    cpu_s = {"ours": 0.0, "baseline": 0.0}  # this process's CPU time: less sensitive to other load on the machine
    tokens = {"ours": 0, "baseline": 0}
    outputs_match = True
    with httpx.Client(base_url=url, timeout=600) as http:
        for _ in range(ROUNDS):
            for ids in prompts:
                start, cpu_start = time.perf_counter(), time.process_time()
                expected = baseline_generate(model, ids)
                time_s["baseline"] += time.perf_counter() - start
                cpu_s["baseline"] += time.process_time() - cpu_start
                tokens["baseline"] += len(expected)
                cpu_start = time.process_time()
                count, text, latency = ask(http, ids, model_name)
                cpu_s["ours"] += time.process_time() - cpu_start
                time_s["ours"] += latency
                tokens["ours"] += count
                outputs_match &= text == codec.decode(expected)
    return {"ours": tokens["ours"] / time_s["ours"], "baseline": tokens["baseline"] / time_s["baseline"],
            "ours_cpu": tokens["ours"] / cpu_s["ours"], "baseline_cpu": tokens["baseline"] / cpu_s["baseline"],
            "outputs_match": outputs_match}


def concurrent_pass(url: str, prompts: list[list[int]], model_name: str) -> tuple[float, list[float]]:
    latencies: list[float] = []
    tokens = [0] * STREAMS
    failures: list[BaseException] = []

    def stream(index: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                for request in range(REQUESTS_PER_STREAM):
                    count, _, latency = ask(http, prompts[(index + request) % len(prompts)], model_name)
                    tokens[index] += count
                    latencies.append(latency)
        except BaseException as exc:  # reported below; a benchmark with failed requests is not a result
            failures.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise failures[0]
    return sum(tokens) / elapsed, latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    config = replace(PRESETS[PRESET], vocab_size=tokenizer.get_vocab_size())
    model = build_model(config, seed=0).eval()
    prompts = prompt_ids(tokenizer)
    codec = TextCodec.from_tokenizers(tokenizer)
    served = ServedModel(model, codec, PRESET, None, model_hash(model))
    host = Host(served, Identity.from_seed(b"bench-host"), quota=lambda caller, now: (True, 10**9, now + 86400),
                max_batch=STREAMS)
    with ServerThread(host.app) as server:
        single_stream(model, server.url, prompts[:1], PRESET, codec)  # warm-up both paths
        single = single_stream(model, server.url, prompts, PRESET, codec)
        concurrent_rate, latencies = concurrent_pass(server.url, prompts, PRESET)
    host.close()
    tokens_per_s, baseline_tokens_per_s = single["ours"], single["baseline"]
    result = {
        "name": "inference",
        "value": round(tokens_per_s, 2),
        "unit": "tokens/s",
        "tokens_per_s": round(tokens_per_s, 2),
        "baseline_tokens_per_s": round(baseline_tokens_per_s, 2),
        "ratio": round(tokens_per_s / baseline_tokens_per_s, 3),
        "concurrent_tokens_per_s": round(concurrent_rate, 2),
        "concurrent_streams": STREAMS,
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "cpu_ratio": round(single["ours_cpu"] / single["baseline_cpu"], 3),
        "outputs_match": single["outputs_match"],
        "ours_via": "HTTP (uvicorn, /v1/completions, non-streaming)",
        "model": f"{PRESET} preset, random init, vocab {config.vocab_size}",
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "device": str(host.engine.device),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
