"""`gpunite train`, `doctor`, `export`, `generate`: local training, hardware probe, HF export, sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gpunite.cli._common import console, console_err, print_json


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("doctor")(doctor)
    app.command("export")(export)
    app.command("generate")(generate)


def train(
    manifest_path: Path = typer.Argument(..., help="A run manifest (TOML) whose data is prepared."),
    steps: Optional[int] = typer.Option(
        None,
        "--steps",
        help="Stop at this step (default train.total_steps; the lr schedule keeps its length).",
    ),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Checkpoint folder (default <manifest dir>/checkpoints/<run name>)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps or xpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (no progress bar)."),
) -> None:
    """Train the run's model locally on its prepared data, with checkpoints and resume."""
    from gpunite.manifest import load_manifest
    from gpunite.train.local import train_local

    manifest = load_manifest(manifest_path, check_data=False)
    if as_json:
        print_json(train_local(manifest, steps=steps, resume=resume, out_dir=out, device=device).to_json())
        return

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[tokens_per_s]:,.0f} tok/s"),
        TextColumn("MFU {task.fields[mfu]:.1%}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console_err, transient=True) as bar:
        task = bar.add_task("train", total=None, loss=float("nan"), lr=0.0, tokens_per_s=0.0, mfu=0.0)

        def show(state) -> None:
            bar.update(
                task,
                total=state.target_step,
                completed=state.step,
                loss=state.loss,
                lr=state.lr,
                tokens_per_s=state.tokens_per_s,
                mfu=state.mfu,
            )

        result = train_local(manifest, steps=steps, resume=resume, out_dir=out, device=device, progress=show)

    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("device", f"{result.device} ({result.peak_tflops:.3f} TFLOPS measured peak)")
    table.add_row("model", f"{result.params / 1e6:.2f}M parameters")
    resumed = f" (resumed at step {result.start_step})" if result.resumed else ""
    table.add_row("steps", f"{result.steps_run} run, now at step {result.final_step}{resumed}")
    if result.final_loss is not None:
        table.add_row("train loss", f"{result.final_loss:.4f}")
    table.add_row("held-out loss", f"{result.heldout_loss:.4f}")
    table.add_row("speed", f"{result.tokens_per_s:,.0f} tokens/s, MFU {result.mfu:.1%}")
    table.add_row("checkpoint", result.checkpoint)
    console.print(table)
    console.print(f'next: [bold]gpunite generate {result.checkpoint} "Once upon a time"[/]')


def doctor(
    device: str = typer.Option("auto", "--device", help="The device to measure: auto, cpu, cuda, mps, xpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Probe this machine: devices, memory, measured matmul TFLOPS, free disk, torch version."""
    from gpunite.train.hardware import probe

    report = probe(device)
    if as_json:
        print_json(report.to_dict())
        return
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("device", f"{report.device} ({report.device_name})")
    available = (
        f", {report.memory_available_gb:.1f} GB free" if report.memory_available_gb is not None else ""
    )
    table.add_row("memory", f"{report.memory_gb:.1f} GB{available}")
    rates = ", ".join(f"{name} {rate:.3f}" for name, rate in report.tflops_by_dtype.items())
    table.add_row("matmul TFLOPS", f"{rates} (training uses {report.train_dtype})")
    ram_free = f", {report.ram_available_gb:.1f} GB free" if report.ram_available_gb is not None else ""
    table.add_row("RAM", f"{report.ram_gb:.1f} GB{ram_free}")
    table.add_row("disk", f"{report.disk_free_gb:.1f} GB free at {report.disk_path}")
    table.add_row("CPU threads", str(report.cpu_threads))
    table.add_row("torch", report.torch_version)
    table.add_row("platform", report.platform)
    if len(report.devices) > 1:
        table.add_row("all devices", ", ".join(f"{d.device} ({d.name})" for d in report.devices))
    console.print(table)


def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `gpunite train` or a swarm peer."),
    hf: Path = typer.Option(..., "--hf", help="Output folder in Hugging Face format."),
    merge: bool = typer.Option(
        False, "--merge", help="LoRA fine-tunes: write the full model with the adapters merged in "
        "(default: the adapter alone, in peft's format)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a checkpoint as a Hugging Face folder (config, safetensors weights, tokenizer) or adapter."""
    from gpunite.export import export_hf

    folder = export_hf(checkpoint, hf, merge=merge)
    adapter = (folder / "adapter_config.json").is_file()
    if as_json:
        print_json({"path": str(folder), "kind": "adapter" if adapter else "model",
                    "files": sorted(p.name for p in folder.iterdir())})
        return
    if adapter:
        console.print(f"wrote the LoRA adapter to [bold]{folder}[/]: load it onto its base with "
                      "peft.PeftModel.from_pretrained, or export with --merge for a full model")
    else:
        console.print(f"wrote [bold]{folder}[/]: load it with transformers' "
                      f"AutoModelForCausalLM.from_pretrained or serve it with `gpunite host {folder}`")


def generate(
    source: Path = typer.Argument(..., help="A checkpoint file or an exported Hugging Face folder."),
    prompt: str = typer.Argument("", help="Text to continue (empty: start a new document)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most tokens to add."),
    temperature: float = typer.Option(0.8, "--temperature", help="0 is greedy; higher is more random."),
    top_p: float = typer.Option(
        0.95, "--top-p", help="Sample from the smallest set of tokens with this mass."
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed: the same seed gives the same text."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps or xpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Sample a continuation of a prompt."""
    from gpunite.export import generate_text, load_for_generation
    from gpunite.train.trainer import pick_device

    loaded = load_for_generation(source, device=pick_device(device))
    text = generate_text(
        loaded, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    if as_json:
        print_json({"prompt": prompt, "completion": text})
        return
    from rich.markup import escape

    console_err.print(f"[dim]{escape(prompt)}[/]", end="")
    console.print(text, markup=False, highlight=False)
