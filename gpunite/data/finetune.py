"""Fine-tuning data: prompt/completion and chat records as training documents, and the base model's tokenizer.

A finetune run's .jsonl (or .jsonl.zst) lines are one of
- ``{"prompt": "...", "completion": "..."}``: the document is prompt + completion, joined as written (put any
  separator, such as a trailing space or newline, in the prompt);
- ``{"messages": [{"role": "user", "content": "..."}, ...]}``: every message becomes
  ``<|role|>\\n{content}\\n``, the chat template the host's /v1/chat/completions uses
  (gpunite.serve.api.chat_prompt), so a model tuned on chats answers in the form the host prompts it with;
- a record with the run's text field: a plain document, as in pretraining.
Each document ends with the end-of-document token (data prepare adds it), which is where generation stops.
The loss covers every token of the document (prompts included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpunite.data.errors import DataError

CHAT_ROLES = ("system", "developer", "user", "assistant")
CHECKPOINT_TOKENIZER_KEY = "tokenizer_json"  # where a gpunite checkpoint keeps its tokenizer (metadata)


class FinetuneRecordError(ValueError):
    """What is wrong with one fine-tuning record (the reader adds the file and line)."""


def chat_text(messages: Any) -> str:
    """The chat template applied to a list of {role, content} messages ("developer" counts as system)."""
    if not isinstance(messages, list) or not messages:
        raise FinetuneRecordError('"messages" must be a non-empty list of {"role", "content"} objects')
    parts = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise FinetuneRecordError(f"messages[{index}] must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise FinetuneRecordError(f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, "
                                      f"got {role!r}")
        if not isinstance(content, str):
            raise FinetuneRecordError(
                f"messages[{index}].content must be a string, got {type(content).__name__}")
        parts.append(f"<|{'system' if role == 'developer' else role}|>\n{content}\n")
    return "".join(parts)


def finetune_text(record: dict, text_field: str = "text") -> str:
    """The training document of one fine-tuning record (see the module docstring for the shapes)."""
    if "messages" in record:
        return chat_text(record["messages"])
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                got = "missing" if value is None and key not in record else f"a {type(value).__name__}"
                raise FinetuneRecordError(f'"{key}" must be a string, got {got}')
        if not completion:
            raise FinetuneRecordError('"completion" is empty: nothing to learn')
        return prompt + completion
    if text_field in record:
        text = record[text_field]
        if not isinstance(text, str):
            raise FinetuneRecordError(f"field {text_field!r} must be a string, got {type(text).__name__}")
        return text
    raise FinetuneRecordError(
        f'expected {{"prompt", "completion"}}, {{"messages": [...]}} or a {text_field!r} field')


def base_path(base: str, manifest_dir: Path) -> Path:
    path = Path(base).expanduser()
    return (path if path.is_absolute() else manifest_dir / path).resolve()


def base_tokenizer_bytes(base: Path) -> bytes:
    """tokenizer.json of a fine-tuning base: a gpunite checkpoint's own, or the Hugging Face folder's file."""
    if base.is_dir():
        tokenizer_file = base / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise DataError(f"fine-tuning base {base} has no tokenizer.json; gpunite reads fast-tokenizer "
                            "files (save the base's tokenizer with transformers to make one)")
        return tokenizer_file.read_bytes()
    if not base.is_file():
        raise DataError(f"fine-tuning base {base} does not exist; fix model.base in the manifest")
    from safetensors import safe_open

    try:
        with safe_open(str(base), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for files that are not safetensors
        raise DataError(f"fine-tuning base {base} is not a gpunite checkpoint ({' '.join(str(exc).split())})"
                        ) from None
    tokenizer_json = metadata.get(CHECKPOINT_TOKENIZER_KEY)
    if not tokenizer_json:
        raise DataError(f"fine-tuning base {base} carries no tokenizer; use a checkpoint written by "
                        "`gpunite train` or a swarm peer")
    return tokenizer_json.encode("utf-8")
