"""The built-in offline corpus: documentation and standard-library sources that every Python install carries.

``builtin:python-docs`` yields, in this fixed order:
1. every help topic of ``pydoc_data.topics`` (the language reference text behind ``help()``), sorted by name;
2. every standard-library ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (site-packages, dist-packages
   and hidden or cache folders excluded), sorted by relative path; files that are not UTF-8 are left out.
Reading stops before the first document that would take the total past ``max_builtin_mb`` MB (10**6 bytes of
UTF-8 text). The corpus depends on the Python version, so two peers share a dataset by its hash, not by
re-preparing it on different Pythons.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

from gpunite.data.errors import DataError
from gpunite.data.readers import ReadStats

BUILTIN_CORPORA = ("builtin:python-docs",)
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def iter_builtin(name: str, max_builtin_mb: float, stats: ReadStats) -> Iterator[str]:
    """Documents of a built-in corpus, capped at max_builtin_mb MB of text."""
    if name not in BUILTIN_CORPORA:
        raise DataError(
            f"unknown built-in corpus {name!r}; the built-in corpora are: {', '.join(BUILTIN_CORPORA)}"
        )
    budget_bytes = int(max_builtin_mb * 1_000_000)
    stats.files += 1
    for text in _python_docs():
        n_bytes = len(text.encode("utf-8"))
        if n_bytes > budget_bytes:
            return
        budget_bytes -= n_bytes
        stats.documents += 1
        stats.text_bytes += n_bytes
        stats.input_bytes += n_bytes
        yield text


def _python_docs() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for name in sorted(topics):
        if topics[name].strip():
            yield topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_sources(stdlib):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield text


def stdlib_sources(stdlib: Path) -> list[Path]:
    """The standard library's .py files, sorted by relative path (deterministic on a given install)."""
    found = []
    for path in stdlib.rglob("*.py"):
        relative = path.relative_to(stdlib).parts
        if any(part in _EXCLUDED_DIRS or part.startswith(".") for part in relative[:-1]):
            continue
        found.append(path)
    return sorted(found, key=lambda path: path.relative_to(stdlib).as_posix())
