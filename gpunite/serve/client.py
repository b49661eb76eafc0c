"""The caller's side: find a host, sign requests with the caller's identity, stream completions and chats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from gpunite.errors import GpuniteError
from gpunite.identity import Identity
from gpunite.serve.auth import sign_request

DEFAULT_HOST_URL = "http://127.0.0.1:8000"


class ClientError(GpuniteError):
    """A host that cannot be reached or that refused a request."""


def resolve_host_url(url: str | None, join: str | None = None) -> str:
    """The base URL of the host to ask: the one given, else the first reachable host announced in the swarm
    that `join` (any peer's multiaddr) reaches, else the local default."""
    if url:
        return url.rstrip("/")
    if join is None:
        return DEFAULT_HOST_URL
    urls = find_host_urls(join)
    for candidate in urls:
        if _answers(candidate):
            return candidate
    if not urls:
        raise ClientError(f"no host is announced in the swarm at {join}; start one with `gpunite host WEIGHTS "
                          "--join ADDRESS`, or pass --url")
    raise ClientError(f"none of the {len(urls)} hosts announced in the swarm answers ({', '.join(urls[:3])}); "
                      "try again later, or pass --url")


def find_host_urls(join: str, attempts: int = 10) -> list[str]:
    """API URLs of the hosts announced in the swarm (signed host records in the DHT), newest first."""
    import time

    from gpunite.serve.host import HOSTS_KEY
    from gpunite.swarm.membership import parse_host
    from gpunite.swarm.node import SwarmNode

    node = SwarmNode(initial_peers=[join]).start()
    try:
        for attempt in range(attempts):
            records = node.get_records(HOSTS_KEY, parse_host)
            if records or attempt == attempts - 1:
                break
            time.sleep(0.5)  # a fresh node may not have found the peers holding the key yet
    finally:
        node.close()
    newest = sorted(records.values(), key=lambda record: (-record.time, record.peer_id))
    urls = [record.api_url.rstrip("/") for record in newest
            if record.api_url and record.api_url.startswith(("http://", "https://"))]
    return list(dict.fromkeys(urls))


def _answers(url: str, timeout_s: float = 5.0) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


class HostClient:
    """Signed requests to one host's OpenAI-compatible API."""

    def __init__(self, url: str, identity: Identity | None, timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.identity = identity
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def model_name(self) -> str:
        data = self._json(self._send("GET", "/v1/models", None))
        try:
            return data["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise ClientError(f"{self.url}/v1/models lists no model; is this a gpunite host?") from None

    def stream_completion(self, prompt: str, max_tokens: int = 128, **options: Any) -> Iterator[str]:
        """The completion of prompt, piece by piece as the host generates it."""
        body = {"model": self.model_name(), "prompt": prompt, "max_tokens": max_tokens, "stream": True, **options}
        for chunk in self._stream("/v1/completions", body):
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    yield choice["text"]

    def stream_chat(self, messages: list[dict[str, str]], max_tokens: int = 256, **options: Any) -> Iterator[str]:
        """The assistant's next message, piece by piece."""
        body = {"model": self.model_name(), "messages": messages, "max_tokens": max_tokens, "stream": True,
                **options}
        for chunk in self._stream("/v1/chat/completions", body):
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    yield content

    def _signed_headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        headers = {"content-type": "application/json"} if body else {}
        if self.identity is not None:
            headers.update(sign_request(self.identity, method, path, body))
        return headers

    def _send(self, method: str, path: str, body: dict | None) -> httpx.Response:
        data = json.dumps(body).encode() if body is not None else b""
        try:
            return self._http.request(method, path, content=data, headers=self._signed_headers(method, path, data))
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach host {self.url}: {exc}; is `gpunite host` running there?") from None

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise ClientError(_error_message(response.status_code, response.content))
        return response.json()

    def _stream(self, path: str, body: dict) -> Iterator[dict]:
        data = json.dumps(body).encode()
        try:
            with self._http.stream("POST", path, content=data, headers=self._signed_headers("POST", path, data)) as r:
                if r.status_code >= 400:
                    raise ClientError(_error_message(r.status_code, r.read()))
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: "):]
                    if payload == "[DONE]":
                        return
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise ClientError(f"host {self.url} failed mid-answer: {chunk['error'].get('message')}")
                    yield chunk
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach host {self.url}: {exc}; is `gpunite host` running there?") from None


def _error_message(status: int, content: bytes) -> str:
    try:
        error = json.loads(content)["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        message = content[:200].decode(errors="replace")
    return f"host answered {status}: {message}"
