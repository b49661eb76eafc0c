"""Text generation engine: continuous batching of concurrent requests over a KV cache, per-request sampling, streaming.

One worker thread owns the model. Requests wait in an inbox; the worker admits them between decode steps
(up to `max_batch` sequences at once), prefills the newcomers as their own left-padded batch, then merges their
KV cache into the running batch (padding the shorter cache on the left, masked out). Every decode step feeds one
token per sequence, samples each sequence with its own parameters and random generator (so a seeded request
gives the same text whatever else shares its batch), and hands each sequence's new text to its callback.
Finished sequences leave the batch at once, so a short request never waits for a long one.

Weight swaps queue behind the requests already accepted: the worker stops admitting, lets every in-flight
sequence finish on the old weights, copies the new weights in, then admits the requests that came after the swap.
No request is dropped and no sequence ever mixes two sets of weights.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gpunite.errors import GpuniteError
from gpunite.train.weights import trainable_state

log = logging.getLogger(__name__)

# Temperatures below this decode greedily: the limit they approach, and dividing logits by them could overflow.
GREEDY_BELOW_TEMPERATURE = 1e-6

# Special tokens that end a text when a plain `tokenizers.Tokenizer` does not say which one is EOS.
EOS_TOKEN_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end|>")


class EngineError(GpuniteError):
    """A generation request or weight swap the engine cannot accept."""


class TextCodec:
    """Text <-> token ids for one model, over either a `tokenizers.Tokenizer` or a transformers tokenizer."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 token_text: Callable[[int], str], eos_ids: set[int]):
        self.encode = encode
        self.decode = decode
        self.token_text = token_text
        self.eos_ids = eos_ids

    @classmethod
    def from_tokenizers(cls, tokenizer: Any) -> TextCodec:
        eos_ids = {tokenizer.token_to_id(name) for name in EOS_TOKEN_NAMES} - {None}
        return cls(
            encode=lambda text: tokenizer.encode(text).ids,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            token_text=lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False),
            eos_ids=eos_ids,
        )

    @classmethod
    def from_transformers(cls, tokenizer: Any) -> TextCodec:
        eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        return cls(
            encode=lambda text: list(tokenizer.encode(text, add_special_tokens=True)),
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            token_text=lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False),
            eos_ids=eos_ids,
        )


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated; temperature 0 (or below GREEDY_BELOW_TEMPERATURE) is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob and k alternatives
    echo_logprobs: bool = False  # also the logprob of every prompt token given the ones before it


@dataclass(frozen=True)
class TokenInfo:
    """One token with its log-probability under the model and the most likely alternatives at its position."""

    token_id: int
    text: str
    logprob: float | None  # None for the first prompt token, which nothing predicts
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GenerationEvent:
    """What one sequence produced since its previous event; the last event has a finish_reason."""

    text: str
    tokens: tuple[TokenInfo, ...]  # the tokens generated since the previous event (logprobs only if asked)
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: tuple[TokenInfo, ...] | None = None  # first event only, when echo_logprobs was asked
    error: str | None = None


@dataclass
class Completion:
    """The whole result of one sequence, gathered from its events."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: tuple[TokenInfo, ...] | None = None
    error: str | None = None

    def add(self, event: GenerationEvent) -> None:
        self.text += event.text
        self.tokens.extend(event.tokens)
        self.prompt_tokens = event.prompt_tokens
        self.completion_tokens = event.completion_tokens
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    largest_batch: int = 0
    swaps: int = 0


class GenerationHandle:
    """A submitted request; `cancel()` drops it at the next step (a client that went away)."""

    def __init__(self, request: _Request):
        self._request = request

    def cancel(self) -> None:
        self._request.cancelled = True


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[GenerationEvent], None]
    cancelled: bool = False


@dataclass
class _Swap:
    state: dict[str, torch.Tensor]
    label: str
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class _Sequence:
    """One request being generated: its tokens so far, its text, and how much text it has handed out."""

    def __init__(self, request: _Request, generator: torch.Generator | None):
        self.request = request
        self.params = request.params
        self.generator = generator
        self.generated: list[int] = []
        self.emitted_chars = 0
        self.prompt_logprobs: tuple[TokenInfo, ...] | None = None
        self.longest_stop = max((len(s) for s in self.params.stop), default=0)

    def emit(self, text: str, tokens: tuple[TokenInfo, ...], finish_reason: str | None = None,
             error: str | None = None) -> None:
        event = GenerationEvent(
            text=text, tokens=tokens, finish_reason=finish_reason,
            prompt_tokens=len(self.request.prompt_ids), completion_tokens=len(self.generated),
            prompt_logprobs=self.prompt_logprobs, error=error,
        )
        self.prompt_logprobs = None  # sent once
        try:
            self.request.on_event(event)
        except Exception:  # a broken consumer must not stop the other sequences
            log.exception("generation callback failed; dropping its request")
            self.request.cancelled = True


@dataclass
class _Batch:
    """The sequences decoding together, their shared KV cache, attention mask and next position ids."""

    cache: Any
    mask: torch.Tensor  # [batch, cache length], 0 over left padding
    positions: torch.Tensor  # [batch], position id of the next token fed per sequence
    sequences: list[_Sequence]


class Engine:
    """Generates text for many concurrent requests with one model on one device."""

    def __init__(self, model: torch.nn.Module, codec: TextCodec, *, max_batch: int = 8,
                 batch_window_s: float = 0.002, weights_label: str = ""):
        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.codec = codec
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.device = next(model.parameters()).device
        self.context_length = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.stats = EngineStats()
        self.weights_label = weights_label  # names the weights being served (the host uses their hash)
        # transformers 5 calls the KV cache argument `cache`, 4.x `past_key_values`.
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._inbox: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gpunite-engine", daemon=True)
        self._thread.start()

    # ---- public API (any thread) ----

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[GenerationEvent], None]) -> GenerationHandle:
        """Queue a request; on_event is called from the engine thread, and must return quickly."""
        self.check_request(prompt_ids, params)
        if self._closed:
            raise EngineError("the engine is shut down; start the host again")
        request = _Request(list(prompt_ids), params, on_event)
        self._inbox.put(request)
        return GenerationHandle(request)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise EngineError("the prompt is empty; send at least one token of text")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise EngineError(f"token ids must be in [0, {self.vocab_size}); the prompt has one outside")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise EngineError(
                f"the model's context is {self.context_length} tokens, but the prompt has {len(prompt_ids)} "
                f"and max_tokens is {params.max_tokens}; shorten the prompt or lower max_tokens"
            )
        if params.max_tokens < 0:
            raise EngineError(f"max_tokens must be >= 0, got {params.max_tokens}")
        if params.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {params.temperature}")
        if not 0 <= params.top_p <= 1:
            raise EngineError(f"top_p must be in [0, 1], got {params.top_p}")
        if params.logprobs is not None and params.logprobs < 0:
            raise EngineError(f"logprobs must be >= 0, got {params.logprobs}")

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """Blocking: the whole completion of one prompt."""
        completion = Completion()
        finished = threading.Event()

        def on_event(event: GenerationEvent) -> None:
            completion.add(event)
            if event.finish_reason is not None:
                finished.set()

        self.submit(prompt_ids, params, on_event)
        finished.wait()
        return completion

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """The whole completion, gathered on the engine thread: the event loop wakes once, not once per token."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        completion = Completion()

        def on_event(event: GenerationEvent) -> None:
            completion.add(event)
            if event.finish_reason is not None:
                loop.call_soon_threadsafe(_resolve, done, completion)

        handle = self.submit(prompt_ids, params, on_event)
        try:
            return await done
        finally:
            handle.cancel()  # a no-op once finished; drops the request if the caller went away

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationEvent]:
        """The request's events as they come; leaving the loop early cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handle = self.submit(prompt_ids, params, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while True:
                event = await events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            handle.cancel()

    def check_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise EngineError unless state has exactly this model's trainable tensors, with the same shapes."""
        current = trainable_state(self.model)
        if set(current) != set(state):
            missing, extra = sorted(set(current) - set(state)), sorted(set(state) - set(current))
            raise EngineError(f"new weights do not fit the served model: missing {missing[:2]}, extra {extra[:2]}")
        for name, tensor in current.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise EngineError(
                    f"new weight {name} is {tuple(state[name].shape)}, the served model has {tuple(tensor.shape)}"
                )
            if not torch.isfinite(state[name]).all():
                raise EngineError(f"new weight {name} has NaN or infinite values; refusing to serve it")

    def swap_weights(self, state: Mapping[str, torch.Tensor], label: str, timeout_s: float | None = None) -> None:
        """Replace the weights once every request accepted before this call has finished; blocks until done.

        `weights_label` becomes label when the new weights are in; after a timeout the swap still happens later.
        """
        self.check_weights(state)
        reference = trainable_state(self.model)
        prepared = {name: t.detach().to(device=self.device, dtype=reference[name].dtype) for name, t in state.items()}
        swap = _Swap(prepared, label)
        self._inbox.put(swap)
        if not swap.done.wait(timeout_s):
            raise EngineError(f"weight swap did not complete within {timeout_s} s; in-flight requests are still running")

    def close(self) -> None:
        """Stop the worker; requests still queued or running end with an error event."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_STOP)
        self._thread.join()

    # ---- worker thread ----

    def _run(self) -> None:
        batch: _Batch | None = None
        waiting_swap: _Swap | None = None
        with torch.inference_mode():
            while True:
                newcomers: list[_Request] = []
                if waiting_swap is None:
                    room = self.max_batch - (len(batch.sequences) if batch else 0)
                    newcomers, waiting_swap, stopping = self._collect(block=batch is None, room=room)
                    if stopping:
                        break
                if waiting_swap is not None and batch is None:
                    self._apply_swap(waiting_swap)
                    waiting_swap = None
                    continue
                newcomers = [request for request in newcomers if not request.cancelled]
                try:
                    if newcomers:
                        joined = self._prefill(newcomers)
                        batch = joined if batch is None else self._merge(batch, joined) if joined else batch
                    if batch is not None:
                        batch = self._decode_step(batch)
                except Exception as exc:  # a failed forward fails its requests, never the server
                    log.exception("generation step failed")
                    failed = (batch.sequences if batch else []) + [
                        _Sequence(r, None) for r in newcomers if batch is None or
                        all(s.request is not r for s in batch.sequences)]
                    for sequence in failed:
                        sequence.emit("", (), finish_reason="error", error=f"generation failed: {exc}")
                    batch = None
        leftovers = batch.sequences if batch else []
        for sequence in leftovers:
            sequence.emit("", (), finish_reason="error", error="the host is shutting down")
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request):
                _Sequence(item, None).emit("", (), finish_reason="error", error="the host is shutting down")
            elif isinstance(item, _Swap):
                item.done.set()
        if waiting_swap is not None:
            waiting_swap.done.set()

    def _collect(self, block: bool, room: int) -> tuple[list[_Request], _Swap | None, bool]:
        """Requests to admit now (waiting a few ms for company when idle), a swap that stops admission, or stop."""
        requests: list[_Request] = []
        if room <= 0:
            return requests, None, False
        deadline = None
        while len(requests) < room:
            try:
                if block and not requests:
                    item = self._inbox.get()
                    deadline = time.monotonic() + self.batch_window_s
                elif deadline is not None and (left := deadline - time.monotonic()) > 0:
                    item = self._inbox.get(timeout=left)
                else:
                    item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return requests, None, True
            if isinstance(item, _Swap):
                return requests, item, False
            requests.append(item)
        return requests, None, False

    def _apply_swap(self, swap: _Swap) -> None:
        current = trainable_state(self.model)
        for name, tensor in swap.state.items():
            current[name].copy_(tensor)
        self.weights_label = swap.label
        self.stats.swaps += 1
        swap.done.set()

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 all_logits: bool) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
            logits_to_keep=0 if all_logits else 1, **{self._cache_argument: cache},
        )
        return output.logits

    def _prefill(self, requests: list[_Request]) -> _Batch | None:
        from transformers import DynamicCache

        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        input_ids = torch.zeros((len(requests), width), dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, width - lengths[row]:] = torch.tensor(request.prompt_ids)
            mask[row, width - lengths[row]:] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        echo = any(r.params.echo_logprobs for r in requests)
        logits = self._forward(input_ids, mask, positions, cache, all_logits=echo)
        sequences = []
        for row, request in enumerate(requests):
            params = request.params
            generator = None
            if params.temperature >= GREEDY_BELOW_TEMPERATURE:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "big"))
            sequence = _Sequence(request, generator)
            if params.echo_logprobs:
                sequence.prompt_logprobs = self._prompt_logprobs(
                    logits[row, width - lengths[row]:], request.prompt_ids, params.logprobs or 0)
            sequences.append(sequence)
        self.stats.requests += len(requests)
        self.stats.prompt_tokens += sum(lengths)
        batch = _Batch(cache, mask, torch.tensor(lengths, device=self.device), sequences)
        return self._advance(batch, logits[:, -1, :])

    def _prompt_logprobs(self, logits: torch.Tensor, prompt_ids: list[int], top_k: int) -> tuple[TokenInfo, ...]:
        """log p(token_i | tokens before i) for every prompt token; the first has none."""
        infos = [TokenInfo(prompt_ids[0], self.codec.token_text(prompt_ids[0]), None)]
        if len(prompt_ids) > 1:
            logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
            targets = torch.tensor(prompt_ids[1:], device=logprobs.device)
            chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
            tops = self._top(logprobs, top_k)
            for token_id, logprob, top in zip(prompt_ids[1:], chosen, tops):
                infos.append(TokenInfo(token_id, self.codec.token_text(token_id), logprob, top))
        return tuple(infos)

    def _top(self, logprobs: torch.Tensor, k: int) -> list[tuple[tuple[str, float], ...]]:
        if k <= 0:
            return [()] * logprobs.shape[0]
        values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        return [tuple((self.codec.token_text(i), v) for i, v in zip(row_ids, row_values))
                for row_ids, row_values in zip(indices.tolist(), values.tolist())]

    def _decode_step(self, batch: _Batch) -> _Batch | None:
        input_ids = torch.tensor([[s.generated[-1]] for s in batch.sequences], device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        logits = self._forward(input_ids, batch.mask, batch.positions[:, None], batch.cache, all_logits=False)
        batch.positions = batch.positions + 1
        self.stats.decode_steps += 1
        return self._advance(batch, logits[:, -1, :])

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Pick each sequence's next token, hand out its text, and drop the sequences that are done."""
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch.sequences))
        logits = logits.float()
        wants_logprobs = any(s.params.logprobs is not None for s in batch.sequences)
        logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        chosen = logits.argmax(dim=-1).tolist()
        tokens_in_context = (batch.positions + 1).tolist()
        for row, sequence in enumerate(batch.sequences):
            if sequence.generator is not None and sequence.params.max_tokens > 0:
                chosen[row] = _sample(logits[row], sequence.params.temperature, sequence.params.top_p,
                                      sequence.generator)
        keep = []
        for row, sequence in enumerate(batch.sequences):
            if sequence.request.cancelled:
                continue
            if sequence.params.max_tokens == 0:
                sequence.emit("", (), finish_reason="length")
                continue
            token_id = chosen[row]
            sequence.generated.append(token_id)
            self.stats.completion_tokens += 1
            info = self._token_info(token_id, logprobs[row] if logprobs is not None else None, sequence.params)
            if self._finish_or_stream(sequence, token_id, info, tokens_in_context[row]):
                keep.append(row)
        if len(keep) == len(batch.sequences):
            return batch
        if not keep:
            return None
        return self._select(batch, keep)

    def _token_info(self, token_id: int, logprobs: torch.Tensor | None, params: SamplingParams) -> TokenInfo:
        if logprobs is None or params.logprobs is None:
            return TokenInfo(token_id, "", None)
        top = self._top(logprobs[None, :], params.logprobs)[0]
        return TokenInfo(token_id, self.codec.token_text(token_id), float(logprobs[token_id]), top)

    def _finish_or_stream(self, sequence: _Sequence, token_id: int, info: TokenInfo, tokens_in_context: int) -> bool:
        """Send the sequence's new text; False when the sequence has finished (its last event sent)."""
        params = sequence.params
        infos = (info,)
        if token_id in self.codec.eos_ids:
            text = self.codec.decode(sequence.generated)
            sequence.emit(text[sequence.emitted_chars:], infos, finish_reason="stop")
            return False
        text = self.codec.decode(sequence.generated)
        if params.stop:
            search_from = max(0, sequence.emitted_chars - sequence.longest_stop)
            hits = [i for i in (text.find(s, search_from) for s in params.stop) if i >= 0]
            if hits:
                end = max(min(hits), sequence.emitted_chars)
                sequence.emit(text[sequence.emitted_chars:end], infos, finish_reason="stop")
                return False
        if len(sequence.generated) >= params.max_tokens or tokens_in_context >= self.context_length:
            sequence.emit(text[sequence.emitted_chars:], infos, finish_reason="length")
            return False
        safe_end = _safe_text_end(text, params.stop)
        delta = text[sequence.emitted_chars:safe_end] if safe_end > sequence.emitted_chars else ""
        sequence.emitted_chars += len(delta)
        sequence.emit(delta, infos)
        return True

    def _select(self, batch: _Batch, keep: list[int]) -> _Batch:
        index = torch.tensor(keep, device=self.device)
        batch.cache.batch_select_indices(index)
        batch = _Batch(batch.cache, batch.mask[index], batch.positions[index], [batch.sequences[i] for i in keep])
        return self._trim_left_padding(batch)

    def _merge(self, running: _Batch, joined: _Batch | None) -> _Batch:
        """One batch from two: the shorter cache padded on the left (masked out) to the longer one's length."""
        if joined is None:
            return running
        width = max(running.mask.shape[1], joined.mask.shape[1])
        layers = []
        for (k1, v1), (k2, v2) in zip(_cache_tensors(running.cache), _cache_tensors(joined.cache)):
            layers.append((torch.cat([_pad_left(k1, width, 2), _pad_left(k2, width, 2)]),
                           torch.cat([_pad_left(v1, width, 2), _pad_left(v2, width, 2)])))
        return _Batch(
            cache=self._cache_from(layers),
            mask=torch.cat([_pad_left(running.mask, width, 1), _pad_left(joined.mask, width, 1)]),
            positions=torch.cat([running.positions, joined.positions]),
            sequences=running.sequences + joined.sequences,
        )

    def _trim_left_padding(self, batch: _Batch) -> _Batch:
        """Drop cache columns that are padding for every sequence left (they only cost attention time)."""
        used = batch.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first == 0:
            return batch
        layers = [(k[:, :, first:], v[:, :, first:]) for k, v in _cache_tensors(batch.cache)]
        return _Batch(self._cache_from(layers), batch.mask[:, first:], batch.positions, batch.sequences)

    def _cache_from(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers, config=self.model.config)


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from softmax(logits / temperature), restricted to the smallest set with mass >= top_p."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
        sorted_probs[0] = sorted_probs[0].clamp(min=1e-30)  # top_p = 0 keeps the single best token
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _safe_text_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of text can be sent: not a trailing partial character, nor a tail that may start a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:size]):
                end -= size
                break
    return end
