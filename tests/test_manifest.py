import pytest

from gpunite.manifest import ManifestError, load_manifest, parse_manifest


def test_defaults_round_trip_and_stable_run_id(tmp_path):
    manifest = parse_manifest("")
    path = tmp_path / "run.toml"
    manifest.save(path)
    again = load_manifest(path)
    assert again.canonical() == manifest.canonical()
    assert again.run_id == manifest.run_id
    assert len(manifest.run_id) == 64


def test_run_id_changes_with_content():
    a = parse_manifest("[train]\nlr = 0.001\n")
    b = parse_manifest("[train]\nlr = 0.002\n")
    assert a.run_id != b.run_id


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[train]\nlr = -1\n", "[train.lr] Input should be greater than 0, got -1 (m.toml line 2)"),
        ("[train]\nbogus = 1\n", "[train.bogus] unknown key (m.toml line 2)"),
        ("[run]\nname = 'x'\n\n[model]\nn_layers = 'four'\n", "[model.n_layers]"),
        ("[run]\nkind = 'mine'\n", "[run.kind]"),
        ("[nosuch]\nx = 1\n", "[nosuch] unknown key (m.toml line 1)"),
        ("[model\n", "not valid TOML"),
        ("[proof]\nverifiers_per_audit = 1\naccepts_required = 2\n", "accepts_required (2) must be <="),
        ("[train]\ncompression = 'int4'\ncompression_chunk = 4097\n",
         "[train.compression_chunk] int4 packs two values per byte, so compression_chunk must be even, "
         "got 4097"),
        ("[train]\ncompression = 'int2'\n", "[train.compression]"),
        ("[train]\noverlap_lr_scale = 1.5\n", "[train.overlap_lr_scale] Input should be less than or equal to 1"),
    ],
)
def test_bad_manifests_give_one_line_errors(text, expected):
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "m.toml")
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_every_compression_method_is_a_manifest_choice():
    from gpunite.train.compression import COMPRESSIONS, payload_method

    for name in COMPRESSIONS:
        assert payload_method(parse_manifest(f"[train]\ncompression = '{name}'\n").train.compression) == name
    assert parse_manifest("[train]\ncompression_chunk = 4097\n").train.compression_chunk == 4097  # int8: any


def test_overlap_scales_the_outer_lr_and_synchronous_rounds_keep_it():
    sync = parse_manifest("[train]\nouter_lr = 1.2\noverlap = false\noverlap_lr_scale = 0.5\n").train
    assert sync.effective_outer_lr == 1.2
    overlapped = parse_manifest("[train]\nouter_lr = 1.2\n").train  # overlap is the default
    assert overlapped.overlap and overlapped.overlap_lr_scale == 1.0 and overlapped.effective_outer_lr == 1.2
    assert parse_manifest("[train]\noverlap_lr_scale = 0.5\n").train.effective_outer_lr == pytest.approx(0.7)


def test_missing_data_file_is_named(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\nsources = ["nowhere.jsonl"]\n')
    with pytest.raises(ManifestError, match=r"\[data.sources\] no such file or folder: nowhere.jsonl .*line 2"):
        load_manifest(path)


def test_missing_manifest_says_what_to_do(tmp_path):
    with pytest.raises(ManifestError, match="gpunite run init"):
        load_manifest(tmp_path / "absent.toml")


def test_examples_hold_one_valid_manifest_per_preset():
    from pathlib import Path

    from gpunite.model import PRESETS

    examples = Path(__file__).resolve().parent.parent / "examples"
    presets = {load_manifest(path).model.preset: path for path in sorted(examples.glob("*.toml"))}
    assert set(presets) == set(PRESETS)
