"""`gpunite data ...`: prepare a run's corpus into content-addressed shards, and show what was prepared."""

from __future__ import annotations

from pathlib import Path

import typer

from gpunite.cli._common import console, console_err, print_json

data_app = typer.Typer(help="Prepare and inspect a run's training data.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("prepare")
def prepare(
    manifest_path: Path = typer.Argument(..., help="A run manifest (TOML)."),
    skip_bad_lines: bool = typer.Option(
        False,
        "--skip-bad-lines",
        help="Count and skip bad lines (bad JSON, missing field, bad UTF-8, truncated "
        ".zst) instead of stopping at the first one.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (no progress bar)."),
) -> None:
    """Train or load the tokenizer, tokenize every source into shards, record the hashes in the manifest."""
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    if as_json:
        result = prepare_dataset(manifest, skip_bad_lines=skip_bad_lines)
        print_json(result.to_json())
        return

    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[read_mb]:.1f}/{task.fields[total_mb]:.1f} MB read"),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TextColumn("{task.fields[documents]:,} docs"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console_err, transient=True) as bar:
        task = bar.add_task(
            "training tokenizer", total=None, read_mb=0.0, total_mb=0.0, tokens=0, documents=0
        )

        def show(state) -> None:
            bar.update(
                task,
                description="training tokenizer" if state.phase == "tokenizer" else "tokenizing",
                total=state.total_input_bytes if state.phase == "shards" else None,
                completed=state.stats.input_bytes,
                read_mb=state.stats.input_bytes / 1e6,
                total_mb=state.total_input_bytes / 1e6,
                tokens=state.tokens,
                documents=state.stats.documents,
            )

        result = prepare_dataset(manifest, skip_bad_lines=skip_bad_lines, progress=show)

    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("prepared", result.prepared_dir)
    table.add_row("documents", f"{result.documents:,}")
    table.add_row("tokens", f"{result.tokens:,} ({result.dtype})")
    table.add_row("shards", f"{result.shards:,}")
    table.add_row(
        "text",
        f"{result.text_bytes / 1e6:.2f} MB at {result.text_mb_per_s:.2f} MB/s "
        f"(tokenizer {result.tokenizer_seconds:.1f} s)",
    )
    if result.skipped_lines or result.truncated_files:
        table.add_row(
            "skipped",
            f"{result.skipped_lines:,} bad lines, {result.truncated_files} truncated files "
            f"(first: {result.first_skip})",
        )
    if result.filtered_documents:
        table.add_row("filtered", f"{result.filtered_documents:,} documents outside data.pile_subsets")
    table.add_row("tokenizer hash", result.tokenizer_hash)
    table.add_row("dataset hash", result.dataset_hash)
    console.print(table)
    if result.previous_dataset_hash and result.previous_dataset_hash != result.dataset_hash:
        console.print(
            f"[yellow]the dataset hash changed (was {result.previous_dataset_hash[:16]}...): "
            "the manifest now describes a new run id[/]"
        )
    console.print(f"hashes written to [bold]{manifest_path}[/]; next: [bold]gpunite train {manifest_path}[/]")


@data_app.command("info")
def info(
    manifest_path: Path = typer.Argument(..., help="A run manifest (TOML)."),
    verify: bool = typer.Option(False, "--verify", help="Also check every shard file against its hash."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Show the prepared dataset of a run: its index, hashes and sequence counts."""
    from gpunite.data.batches import heldout_units, training_units
    from gpunite.data.shards import ShardIndex, verify_shards
    from gpunite.manifest import load_manifest

    manifest = load_manifest(manifest_path, check_data=False)
    index = ShardIndex.load(manifest.prepared_path)
    if verify:
        verify_shards(manifest.prepared_path, index)
    seq_len = manifest.data.seq_len
    summary = {
        "prepared_dir": str(manifest.prepared_path),
        "dataset_hash": index.dataset_hash,
        "tokenizer_hash": index.tokenizer_hash,
        "manifest_matches": manifest.data.dataset_hash == index.dataset_hash,
        "vocab_size": index.vocab_size,
        "eos_id": index.eos_id,
        "dtype": index.dtype,
        "documents": index.documents,
        "total_tokens": index.total_tokens,
        "shard_tokens": index.shard_tokens,
        "seq_len": seq_len,
        "trainable_sequences": sum(unit.count for unit in training_units(index, seq_len)),
        "heldout_sequences": sum(unit.count for unit in heldout_units(index, seq_len)),
        "shards": [entry.model_dump() for entry in index.shards],
        "shards_verified": verify,
    }
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    for key, value in summary.items():
        if key == "shards":
            value = f"{len(index.shards)} (first {index.shards[0].sha256[:16]}...)" if index.shards else "0"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)
    if not summary["manifest_matches"]:
        console.print(
            f"[yellow]the manifest's data.dataset_hash differs from this index; "
            f"run `gpunite data prepare {manifest_path}`[/]"
        )
