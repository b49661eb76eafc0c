"""`gpunite run ...`: create and inspect run manifests (the swarm module adds `run start`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gpunite.cli._common import console, print_json

run_app = typer.Typer(help="Create, inspect and start runs.", no_args_is_help=True)


@run_app.command("init")
def init(
    preset: str = typer.Option("tiny", help="Model preset: tiny, small, 125m, 350m, 1b, 7b."),
    data: Optional[list[str]] = typer.Option(
        None, "--data", help="Data files or folders (.jsonl.zst Pile, .jsonl, .txt); repeatable. "
        "Default: the built-in offline corpus."),
    output: Path = typer.Option(Path("run.toml"), "-o", "--output", help="Where to write the manifest."),
    name: Optional[str] = typer.Option(None, help="Run name (default: from the output file name)."),
    kind: str = typer.Option("pretrain", help="pretrain, finetune or serve."),
    base: Optional[Path] = typer.Option(
        None, help="finetune: the base model, a gpunite checkpoint file or a Hugging Face (Llama) folder; "
        "its architecture, tokenizer and weights hash go into the manifest."),
    lora_rank: Optional[int] = typer.Option(
        None, "--lora-rank", help="finetune: LoRA rank (default 8); 0 fine-tunes every weight."),
    seed: int = typer.Option(1234, help="Seed for weights, data order and work units."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing manifest."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write a complete run manifest with documented defaults (--kind finetune: its [lora] section too)."""
    from gpunite.manifest import ManifestError, load_manifest, parse_manifest

    if output.exists() and not force:
        raise ManifestError(f"{output} already exists; pass --force to overwrite it or choose another -o")
    manifest = parse_manifest("", "<defaults>")
    manifest.run.name = name or output.stem
    manifest.run.kind = kind  # validated on assignment
    manifest.run.seed = seed
    manifest.model.preset = preset
    if kind == "finetune":
        _set_finetune_base(manifest, base, lora_rank)
    elif base is not None or lora_rank is not None:
        raise ManifestError("--base and --lora-rank are for --kind finetune")
    if data:
        out_dir = output.resolve().parent
        manifest.data.sources = [_relative_to(Path(d).resolve(), out_dir) for d in data]
    text_check = parse_manifest(manifest.to_toml(), str(output))  # the written text must read back the same
    if text_check.canonical() != manifest.canonical():
        raise ManifestError("internal: rendered manifest does not read back identically")
    manifest.save(output)
    manifest = load_manifest(output)
    from gpunite.model import config_from_manifest, param_count, trainable_param_count

    config = config_from_manifest(manifest)
    params, trainable = param_count(config), trainable_param_count(config)
    if as_json:
        print_json({"path": str(output), "run_id": manifest.run_id, "params": params,
                    "trainable_params": trainable})
    else:
        trains = f", {trainable / 1e6:.2f}M of them train" if trainable != params else ""
        console.print(f"wrote [bold]{output}[/] (run id {manifest.run_id[:16]}, "
                      f"{params / 1e6:.1f}M parameters{trains})")
        console.print(f"next: [bold]gpunite data prepare {output}[/]")


def _set_finetune_base(manifest, base: Path | None, lora_rank: int | None) -> None:
    """Point a finetune manifest at its base: absolute path, weights hash, the base's vocabulary size."""
    from gpunite.manifest import ManifestError
    from gpunite.train.lora import base_model_config, base_weights_hash

    if base is None:
        raise ManifestError("--kind finetune needs --base PATH (a gpunite checkpoint or Hugging Face folder)")
    base = base.expanduser().resolve()
    if not base.exists():
        raise ManifestError(f"--base {base}: no such file or folder")
    config = base_model_config(base)
    manifest.model.preset = None
    manifest.model.base = str(base)  # absolute: a joiner reads the manifest from its own run folder
    manifest.model.base_hash = base_weights_hash(base)
    manifest.data.vocab_size = config.vocab_size
    manifest.data.seq_len = min(manifest.data.seq_len, config.max_seq_len)
    if lora_rank is not None:
        manifest.lora.rank = lora_rank


@run_app.command("show")
def show(
    manifest_path: Path = typer.Argument(..., help="A run manifest (TOML)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Validate a manifest and print its run id and model size."""
    from gpunite.manifest import load_manifest
    from gpunite.model import config_from_manifest, flops_per_token, param_count, trainable_param_count

    manifest = load_manifest(manifest_path)
    config = config_from_manifest(manifest)
    info = {
        "run_id": manifest.run_id,
        "name": manifest.run.name,
        "kind": manifest.run.kind,
        "params": param_count(config),
        "trainable_params": trainable_param_count(config),
        "flops_per_token": flops_per_token(config, manifest.data.seq_len),
        "sources": manifest.data.sources,
    }
    if as_json:
        print_json(info)
        return
    from rich.table import Table

    table = Table(show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)


def _relative_to(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def register(app: typer.Typer) -> None:
    app.add_typer(run_app, name="run")
