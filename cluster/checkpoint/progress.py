"""The loading progress line: one tqdm bar per process over the tensors it loads."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class _LogLines:
    """A file for tqdm when stderr is not a terminal (Ray's log files): each redraw becomes one whole line,
    instead of carriage returns that pile up into one unreadable line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, label: str, enabled: bool) -> tqdm:
    """A tqdm bar over the tensors this process loads, with the bytes so far: one line per process, redrawn in place
    on a terminal, a line every 10 s (and the last one) in a log file such as Ray's."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=f"[mixserve] loading {label}",
        bar_format="{desc}: {n_fmt}/{total_fmt} tensors{postfix} |{bar:20}| {elapsed}",
        postfix="0.0 MiB",
        file=sys.stderr if tty else _LogLines(sys.stderr),
        mininterval=0.5 if tty else 10.0,
        leave=True,
        disable=not enabled,
    )
