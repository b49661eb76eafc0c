"""Shared CLI helpers: consoles, one-line errors, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from gpunite.errors import GpuniteError

console = Console()
console_err = Console(stderr=True)

# Errors shown as one line with no traceback: ours, plus OS errors such as a full disk or a missing file.
REPORTABLE: tuple[type[BaseException], ...] = (GpuniteError, OSError)


def fail(message: str, code: int = 2) -> NoReturn:
    console_err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
