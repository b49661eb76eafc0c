"""The `gpunite` command: a thin typer app; each verb lives in a module of this package and calls library code."""

from __future__ import annotations

import sys

import typer

from gpunite.cli import _common

app = typer.Typer(
    name="gpunite",
    help="Train, fine-tune and serve open language models together, peer to peer.\n\n"
    "Start with `gpunite demo` to watch a real local swarm train a model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _register() -> None:
    # Each module adds its verbs to `app`; they import heavy libraries only inside the commands.
    from gpunite.cli import runs

    for name in ("data", "train", "swarm", "ledger", "serve", "sim"):
        try:
            module = __import__(f"gpunite.cli.{name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"gpunite.cli.{name}":
                raise
            continue
        module.register(app)
    runs.register(app)


_register()


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        from gpunite import __version__

        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    try:
        app()
    except _common.REPORTABLE as exc:
        _common.fail(str(exc))
    except KeyboardInterrupt:
        _common.console_err.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
