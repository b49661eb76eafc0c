"""A run's tokenizer: train a deterministic byte-level BPE on a bounded corpus sample, or load tokenizer.json.

A trained tokenizer has ``<|endoftext|>`` as id 0, used to separate documents in the token stream, and the 256
byte symbols in its alphabet, so any text encodes without unknown tokens. Training is deterministic: the same
sample gives the same tokenizer.json bytes, hence the same ``data.tokenizer_hash``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpunite.data.errors import DataError
from gpunite.data.readers import ReadStats, iter_documents
from gpunite.util import sha256_bytes

EOS_TOKEN = "<|endoftext|>"
# Names of the end-of-document token in common existing tokenizers, tried in this order.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
# The BPE learns its merges from at most this much text (UTF-8 bytes), shared evenly between the sources.
TOKENIZER_SAMPLE_BYTES = 16_000_000


@dataclass(frozen=True)
class RunTokenizer:
    """A tokenizer ready to encode, with the exact tokenizer.json bytes its hash is taken over."""

    tokenizer: object  # tokenizers.Tokenizer (imported lazily: the library is heavy)
    json_bytes: bytes
    eos_id: int

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.json_bytes)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def train_bpe(documents: Iterable[str], vocab_size: int) -> RunTokenizer:
    """Train a byte-level BPE with `<|endoftext|>` = id 0 on the given documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return _run_tokenizer(tokenizer, tokenizer.to_str().encode("utf-8"), "the trained tokenizer")


def load_tokenizer_file(path: str | Path) -> RunTokenizer:
    """An existing tokenizer.json, kept byte for byte (its hash is the hash of the file)."""
    from tokenizers import Tokenizer

    path = Path(path)
    try:
        json_bytes = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the tokenizer ({exc.strerror}); fix data.tokenizer") from None
    try:
        tokenizer = Tokenizer.from_str(json_bytes.decode("utf-8"))
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a valid tokenizer.json ({first_line}); fix data.tokenizer") from None
    return _run_tokenizer(tokenizer, json_bytes, str(path))


def tokenizer_from_bytes(json_bytes: bytes, name: str) -> RunTokenizer:
    """A tokenizer from tokenizer.json bytes (a fine-tuning base's), kept byte for byte."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(json_bytes.decode("utf-8"))
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name} is not a valid tokenizer.json ({first_line})") from None
    return _run_tokenizer(tokenizer, json_bytes, name)


def _run_tokenizer(tokenizer, json_bytes: bytes, name: str) -> RunTokenizer:
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return RunTokenizer(tokenizer, json_bytes, token_id)
    raise DataError(
        f"{name}: has no end-of-document token (one of {', '.join(EOS_CANDIDATES)}); "
        "add one or leave data.tokenizer empty so gpunite trains a tokenizer"
    )


def sample_documents(
    sources: Sequence[str],
    sample_bytes: int,
    text_field: str = "text",
    pile_subsets: Iterable[str] = (),
    skip_bad_lines: bool = False,
    max_builtin_mb: float = 8.0,
) -> Iterator[str]:
    """The first documents of each source, up to sample_bytes / len(sources) bytes each.

    A bounded, deterministic sample that reads only the start of each source (an early bad line fails fast).
    """
    per_source_bytes = max(1, sample_bytes // max(1, len(sources)))
    for source in sources:
        stats = ReadStats()
        documents = iter_documents(source, text_field, pile_subsets, skip_bad_lines, stats, max_builtin_mb)
        try:
            for text in documents:
                yield text
                if stats.text_bytes >= per_source_bytes:
                    break
        finally:
            documents.close()  # closes the file now, not when the generator is collected
