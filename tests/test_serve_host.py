"""The host role: hardware minimum, loading checkpoints and HF folders, the signed host record, the CLI verbs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gpunite.cli import app
from gpunite.identity import Identity
from gpunite.ledger.store import Ledger
from gpunite.manifest import parse_manifest
from gpunite.records import HostRecord, parse_record
from gpunite.serve.engine import SamplingParams
from gpunite.serve.host import Host, HostError, ServerThread, check_host_hardware, load_served_model
from gpunite.train.hardware import probe
from gpunite.train.weights import model_hash
from test_serve_engine import make_model, make_tokenizer


@pytest.fixture(scope="module")
def report():
    return probe("cpu", budget_s=0.05)


def test_host_refuses_a_machine_below_the_minimum(report, tmp_path):
    check_host_hardware(parse_manifest("[host]\nmin_memory_gb = 0.01\nmin_tflops = 1e-6\n").host, report)
    with pytest.raises(HostError, match="min_memory_gb is 100000"):
        check_host_hardware(parse_manifest("[host]\nmin_memory_gb = 100000\n").host, report)
    with pytest.raises(HostError, match="min_tflops is 1e\\+06"):
        check_host_hardware(parse_manifest("[host]\nmin_tflops = 1e6\n").host, report)
    manifest = tmp_path / "run.toml"
    manifest.write_text("[host]\nmin_tflops = 1e6\n")
    result = CliRunner().invoke(app, ["host", str(tmp_path / "any.safetensors"), "--manifest", str(manifest),
                                      "--home", str(tmp_path / "home"), "--device", "cpu"])
    assert isinstance(result.exception, HostError) and "below the run's host minimum" in str(result.exception)


def test_host_says_what_to_serve(tmp_path):
    runner = CliRunner()
    nothing = runner.invoke(app, ["host", "--home", str(tmp_path / "home")])
    assert isinstance(nothing.exception, HostError) and "pass WEIGHTS" in str(nothing.exception)
    both = runner.invoke(app, ["host", str(tmp_path / "ckpt.safetensors"), "--run", "abc",
                               "--home", str(tmp_path / "home")])
    assert isinstance(both.exception, HostError) and "--run picks the swarm run" in str(both.exception)


def test_loads_a_checkpoint_and_an_hf_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from gpunite.train.checkpoint import save_checkpoint

    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed=3)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model, None, data_position=0,
                           manifest=parse_manifest('[run]\nname = "ckpt-run"\n'), tokenizer_json=tokenizer.to_str())
    from_checkpoint = load_served_model(path, device="cpu")
    assert from_checkpoint.name == "ckpt-run" and from_checkpoint.weights_hash == model_hash(model)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)
    from_folder = load_served_model(folder, device="cpu")
    assert from_folder.name == "hf" and from_folder.weights_hash == model_hash(model)
    prompt = "hello world"
    for served in (from_checkpoint, from_folder):
        from gpunite.serve.engine import Engine

        engine = Engine(served.model, served.codec)
        try:
            texts = engine.generate(engine.codec.encode(prompt), SamplingParams(max_tokens=6, temperature=0)).text
        finally:
            engine.close()
        assert texts
    with pytest.raises(HostError, match="no checkpoint file or model folder"):
        load_served_model(tmp_path / "missing", device="cpu")


def test_host_record_is_signed_and_names_the_weights(report, tmp_path):
    from gpunite.serve.engine import TextCodec
    from gpunite.serve.host import ServedModel

    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    served = ServedModel(model, TextCodec.from_tokenizers(tokenizer), "t", None, model_hash(model))
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        host = Host(served, Identity.from_seed(b"h"), ledger=ledger)
        try:
            record = parse_record(host.host_record(report).model_dump(mode="json"))
            assert isinstance(record, HostRecord) and record.serves_model == model_hash(model)
            assert record.peer_id == Identity.from_seed(b"h").peer_id and record.tflops == report.tflops
            with ServerThread(host.app) as server:
                runner = CliRunner()
                asked = runner.invoke(app, ["ask", "hello", "--url", server.url, "--max-tokens", "5",
                                            "--temperature", "0", "--home", str(tmp_path / "caller")])
                assert asked.exit_code == 0, asked.output
                assert asked.output.strip()
                chatted = runner.invoke(app, ["chat", "--url", server.url, "--max-tokens", "4",
                                              "--home", str(tmp_path / "caller")], input="hi there\n\n")
                assert chatted.exit_code == 0, chatted.output
            caller = Identity.load_or_create(tmp_path / "caller").peer_id
            assert len([r for r in ledger.records(kind="usage") if r.caller == caller]) == 2
        finally:
            host.close()
