"""The host role: check the machine against the run's [host] minimum, load weights, serve them, swap in new ones.

`Host` ties the pieces together: an `Engine` over the loaded model, the FastAPI app from `gpunite.serve.api`,
quotas from the ledger (`gpunite.ledger.quota.QuotaCheck`) and signed Usage records written to that ledger.
`gpunite.serve.follow` calls `Host.swap_weights(state_dict, weights_hash)` when a new round's weights are
verified: requests already accepted finish on the old weights, later ones run on the new (see engine.py), none
fail. `Host.host_record(report)` is the signed HostRecord announced in the DHT; `announce_host` keeps it there
under HOSTS_KEY (and `.update()` replaces it after a swap) so `gpunite ask --join` finds the host's api_url.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpunite.errors import GpuniteError
from gpunite.identity import Identity
from gpunite.manifest import HostSection, Manifest, parse_manifest
from gpunite.records import HostRecord, record_bytes, sign_record

if TYPE_CHECKING:
    import torch
    import uvicorn

    from gpunite.ledger.store import Ledger
    from gpunite.serve.api import QuotaFunction
    from gpunite.serve.engine import Engine, TextCodec
    from gpunite.train.hardware import HardwareReport

log = logging.getLogger(__name__)


class HostError(GpuniteError):
    """This machine or these weights cannot be served."""


def check_host_hardware(minimum: HostSection, report: HardwareReport, source: str = "the run manifest") -> None:
    """Refuse (HostError) when the probed machine is below the run's [host] minimum memory or TFLOPS."""
    if report.memory_gb < minimum.min_memory_gb:
        raise HostError(
            f"this machine is below the run's host minimum: {report.device} has {report.memory_gb:.2f} GB memory, "
            f"[host] min_memory_gb is {minimum.min_memory_gb:g} ({source}); host on a larger device"
        )
    if report.tflops < minimum.min_tflops:
        raise HostError(
            f"this machine is below the run's host minimum: {report.device} measured {report.tflops:.4f} TFLOPS, "
            f"[host] min_tflops is {minimum.min_tflops:g} ({source}); host on a faster device"
        )


@dataclass
class ServedModel:
    """Weights ready to serve: the model on its device, its tokenizer, a name, and the run it belongs to."""

    model: Any
    codec: TextCodec
    name: str
    manifest: Manifest | None
    weights_hash: str


def load_served_model(path: str | Path, device: str = "auto") -> ServedModel:
    """A gpunite checkpoint file (with its tokenizer) or a Hugging Face folder (local files only)."""
    from gpunite.serve.engine import TextCodec
    from gpunite.train.trainer import pick_device
    from gpunite.train.weights import model_hash

    path = Path(path)
    torch_device = pick_device(device)
    if path.is_file():
        from tokenizers import Tokenizer

        from gpunite.train.checkpoint import load_checkpoint, model_from_checkpoint

        checkpoint = load_checkpoint(path)
        if not checkpoint.tokenizer_json:
            raise HostError(f"checkpoint {path} carries no tokenizer; save it with one (gpunite train does)")
        manifest = parse_manifest(checkpoint.manifest_toml, str(path)) if checkpoint.manifest_toml else None
        model = model_from_checkpoint(checkpoint, device=torch_device)
        codec = TextCodec.from_tokenizers(Tokenizer.from_str(checkpoint.tokenizer_json))
        name = manifest.run.name if manifest else path.stem
    elif path.is_dir():
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(torch_device)
        except (OSError, ValueError) as exc:
            raise HostError(f"{path} is not a Hugging Face model folder ({exc}); pass a checkpoint or an export") from None
        codec = _folder_codec(path)
        manifest = None
        name = path.name
    else:
        raise HostError(f"no checkpoint file or model folder at {path}; check the path")
    return ServedModel(model.eval(), codec, name, manifest, model_hash(model))


def _folder_codec(path: Path) -> TextCodec:
    from gpunite.serve.engine import TextCodec

    try:
        from transformers import AutoTokenizer

        return TextCodec.from_transformers(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError, TypeError):
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return TextCodec.from_tokenizers(Tokenizer.from_file(str(path / "tokenizer.json")))
        raise HostError(f"{path} has no tokenizer (tokenizer.json or tokenizer files); add one to serve it") from None


class Host:
    """A model served over HTTP, with quotas and usage records, that can take new weights while serving."""

    def __init__(self, served: ServedModel, identity: Identity, *, ledger: Ledger | None = None,
                 manifest: Manifest | None = None, quota: QuotaFunction | None = None,
                 max_batch: int | None = None, max_tokens_cap: int = 1024):
        from gpunite.model import forward_flops_per_token
        from gpunite.serve.api import ServeSettings, create_app
        from gpunite.serve.engine import Engine
        from gpunite.train.checkpoint import model_config_of

        self.identity = identity
        self.manifest = manifest or served.manifest or parse_manifest("", "<defaults>")
        self.run_id = self.manifest.run_id
        self.ledger = ledger
        if quota is None:
            if ledger is None:
                raise HostError("a host needs a ledger (for quotas and usage records) or an explicit quota function")
            from gpunite.ledger.quota import QuotaCheck

            quota = QuotaCheck(ledger, self.run_id, self.manifest.credit, host=identity.peer_id).check
        config = model_config_of(served.model)
        self.engine: Engine = Engine(served.model, served.codec, max_batch=max_batch or self.manifest.host.max_batch,
                                     weights_label=served.weights_hash)
        self.settings = ServeSettings(
            engine=self.engine, model_name=served.name, host_identity=identity, quota=quota, run_id=self.run_id,
            weights_hash=lambda: self.engine.weights_label, on_usage=ledger.add if ledger is not None else None,
            forward_flops_per_token=float(forward_flops_per_token(config, config.max_seq_len)),
            max_tokens_cap=max_tokens_cap,
        )
        self.provenance: dict[str, Any] = {}  # where the served weights come from (shown by /health)
        self.settings.health_extra = lambda: dict(self.provenance)
        self.app = create_app(self.settings)

    @property
    def weights_hash(self) -> str:
        """The hash of the weights answering requests now."""
        return self.engine.weights_label

    def swap_weights(self, state_dict: Mapping[str, torch.Tensor], weights_hash: str,
                     timeout_s: float | None = None, provenance: Mapping[str, Any] | None = None) -> None:
        """Serve new verified weights: checks their hash, then swaps once in-flight requests finish (none
        dropped). provenance (say, the verified round and its signers) is shown by /health afterwards."""
        from gpunite.train.weights import weights_hash as hash_of

        actual = hash_of(state_dict)
        if actual != weights_hash:
            raise HostError(f"new weights hash to {actual[:16]}, not the announced {weights_hash[:16]}; not serving them")
        self.engine.swap_weights(state_dict, weights_hash, timeout_s=timeout_s)
        self.provenance = dict(provenance or {})
        log.info("now serving weights %s", weights_hash[:16])

    def host_record(self, report: HardwareReport, user_name: str = "", team: str = "",
                    api_url: str | None = None) -> HostRecord:
        """This host's signed record for the DHT: hardware measured by the probe, its capacity (sequences
        decoded together), the weights it serves and where its API answers (api_url, when it announces)."""
        record = HostRecord(
            host_name=socket.gethostname()[:128], user_name=user_name, team=team,
            device=f"{report.device} ({report.device_name})"[:256], memory_gb=report.memory_gb,
            tflops=report.tflops, serves_model=self.weights_hash, api_url=api_url,
            max_batch=self.engine.max_batch, time=time.time(),
        )
        return sign_record(self.identity, record)  # type: ignore[return-value]

    def close(self) -> None:
        self.engine.close()


HOSTS_KEY = "gpunite:hosts"  # DHT key: every announced host's signed HostRecord, under the host's peer id
HOST_TTL_S = 300.0


class HostAnnouncement:
    """A signed host record kept in the DHT under HOSTS_KEY: republished every ttl/4 until the node closes,
    replaced at once by `update` (after a weight swap)."""

    def __init__(self, node: Any, record: HostRecord, ttl_s: float = HOST_TTL_S):
        self.node = node
        self.ttl_s = ttl_s
        self.record = record
        self.task = node.submit(self._republish())

    def update(self, record: HostRecord) -> None:
        self.record = record
        self.node.submit(self._store())

    async def _store(self) -> None:
        from hivemind.utils import get_dht_time

        record = self.record
        try:
            await self.node._dht.store(HOSTS_KEY, record_bytes(record), get_dht_time() + self.ttl_s,
                                       subkey=record.peer_id)
        except Exception as exc:  # retried at the next tick; serving goes on meanwhile
            log.warning("host record not announced: %s", exc)

    async def _republish(self) -> None:
        while True:
            await self._store()
            await asyncio.sleep(self.ttl_s / 4)


def announce_host(node: Any, record: HostRecord, ttl_s: float = HOST_TTL_S) -> HostAnnouncement:
    """Keep a signed host record in the DHT under HOSTS_KEY ; `.update()` replaces it."""
    return HostAnnouncement(node, record, ttl_s)


class ServerThread:
    """A real uvicorn server on host:port in a background thread (tests, benchmarks, embedding in a peer)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        from gpunite.util import free_port

        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, host=host, port=self.port, log_level=log_level, access_log=False,
                                lifespan="off")
        self.server: uvicorn.Server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="gpunite-http", daemon=True)

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise HostError(f"the HTTP server did not start on {self.url}; is the port free?")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
