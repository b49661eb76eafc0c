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
    base: Optional[str] = typer.Option(None, help="finetune: base checkpoint or Hugging Face folder."),
    seed: int = typer.Option(1234, help="Seed for weights, data order and work units."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing manifest."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write a complete run manifest with documented defaults."""
    from gpunite.manifest import ManifestError, load_manifest, parse_manifest

    if output.exists() and not force:
        raise ManifestError(f"{output} already exists; pass --force to overwrite it or choose another -o")
    manifest = parse_manifest("", "<defaults>")
    manifest.run.name = name or output.stem
    manifest.run.kind = kind  # validated on assignment
    manifest.run.seed = seed
    manifest.model.preset = preset
    manifest.model.base = base
    if data:
        out_dir = output.resolve().parent
        manifest.data.sources = [_relative_to(Path(d).resolve(), out_dir) for d in data]
    text_check = parse_manifest(manifest.to_toml(), str(output))  # the written text must read back the same
    if text_check.canonical() != manifest.canonical():
        raise ManifestError("internal: rendered manifest does not read back identically")
    manifest.save(output)
    manifest = load_manifest(output)
    from gpunite.model import config_from_manifest, param_count

    params = param_count(config_from_manifest(manifest))
    if as_json:
        print_json({"path": str(output), "run_id": manifest.run_id, "params": params})
    else:
        console.print(f"wrote [bold]{output}[/] (run id {manifest.run_id[:16]}, {params / 1e6:.1f}M parameters)")
        console.print(f"next: [bold]gpunite data prepare {output}[/]")


@run_app.command("show")
def show(
    manifest_path: Path = typer.Argument(..., help="A run manifest (TOML)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Validate a manifest and print its run id and model size."""
    from gpunite.manifest import load_manifest
    from gpunite.model import config_from_manifest, flops_per_token, param_count

    manifest = load_manifest(manifest_path)
    config = config_from_manifest(manifest)
    info = {
        "run_id": manifest.run_id,
        "name": manifest.run.name,
        "kind": manifest.run.kind,
        "params": param_count(config),
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
