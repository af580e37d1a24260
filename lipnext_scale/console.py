"""The console: a copy of it in the run directory, and memory figures that stay readable when small."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO


def memory_text(gib: float) -> str:
    """'1.3G' from 1 GiB up, '51M' below: the quickstart's 0.05 GiB plan would otherwise read '0.0G'."""
    return f"{gib:.1f}G" if gib >= 1 else f"{gib * 1024:.0f}M"


class ConsoleLog:
    """Tees this process's stdout into ``path`` (mode "a" for a resumed run, which continues its log).

    stdout carries everything the trainer prints (the memory plan, the epoch lines, the final table,
    warnings written with print); the progress bar redraws itself on stderr and stays out of the file,
    whose per-step figures are in metrics.jsonl. Only rank 0 keeps one: the ranks print the same things.
    """

    def __init__(self, path: str | Path, mode: str = "w"):
        self.path = Path(path)
        self._file = open(self.path, mode, buffering=1, encoding="utf-8")
        self._stdout: TextIO = sys.stdout
        sys.stdout = self

    def write(self, text: str) -> int:
        self._file.write(text)
        return self._stdout.write(text)

    def flush(self) -> None:
        self._file.flush()
        self._stdout.flush()

    def isatty(self) -> bool:
        return self._stdout.isatty()

    def fileno(self) -> int:
        return self._stdout.fileno()

    @property
    def encoding(self) -> str:
        return self._stdout.encoding

    def close(self) -> None:
        """Restore stdout (if it is still this log) and close the file; safe to call twice."""
        if sys.stdout is self:
            sys.stdout = self._stdout
        if not self._file.closed:
            self._file.close()
