import pytest
import torch

from gpunite.manifest import parse_manifest
from gpunite.model import PRESETS, ModelError, build_model, config_from_manifest, flops_per_token, hf_config, param_count


@pytest.mark.parametrize("preset", list(PRESETS))
def test_param_count_is_exact(preset):
    from transformers import LlamaForCausalLM

    config = PRESETS[preset]
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config(config))
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_preset_sizes_match_their_names():
    millions = {name: param_count(cfg) / 1e6 for name, cfg in PRESETS.items()}
    assert 3 < millions["tiny"] < 6
    assert 20 < millions["small"] < 40
    assert 100 < millions["125m"] < 150
    assert 300 < millions["350m"] < 400
    assert 900 < millions["1b"] < 1300
    assert 6000 < millions["7b"] < 7500


def test_flops_per_token_counts_weights_and_attention():
    config = PRESETS["tiny"]
    # With a zero-length context only the 6N term is left; attention adds 12 L d per context token.
    assert flops_per_token(config, 0) == 6 * param_count(config)
    assert flops_per_token(config, 128) - flops_per_token(config, 0) == 12 * config.n_layers * config.hidden_size * 128


def test_build_is_deterministic_and_uses_manifest_vocab():
    manifest = parse_manifest("[data]\nvocab_size = 1000\n")
    config = config_from_manifest(manifest)
    a, b = build_model(config, seed=7), build_model(config, seed=7)
    c = build_model(config, seed=8)
    assert a.config.vocab_size == 1000
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
    assert not all(torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_bad_model_config_is_reported():
    with pytest.raises(ModelError, match="unknown model preset"):
        config_from_manifest(parse_manifest("[model]\npreset = 'huge'\n"))
    with pytest.raises(ModelError, match="not divisible"):
        config_from_manifest(parse_manifest("[model]\nhidden_size = 250\n"))
