"""Progress of long operator commands (`keys reencrypt`, `queue purge|retry|hold|release`,
`retention run`) on the terminal.

Why this shape: an engineer re-encrypting a 2 TB spool over SSH needs to see that it moves and when it
will end, but scripts and tests parse these commands' stdout, and a log collector reading stderr must
not fill up with carriage-return redraws. So the live line goes to stderr only when stderr is a
terminal, is redrawn at most a few times a second, and stdout is never touched. One summary line
(count, time, rate) goes to stderr at the end whether or not it is a terminal.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """`with Progress("re-encrypting", total, "files") as p: ... p.advance()`.

    `total` may be None (unknown) or grow via `p.total = n`; the live line then shows no ETA.
    """

    def __init__(self, label: str, total: int | None, unit: str = "items", stream: TextIO | None = None,
                 interactive: bool | None = None, min_interval: float = 0.2):
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.min_interval = min_interval
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._finished = False

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish("interrupted" if exc_type is not None else None)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def update(self, done: int) -> None:
        self.done = done
        self._draw()

    def line(self) -> str:
        """The live line: `label: done/total unit (pct) rate/s ETA mm:ss`."""
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            pct = 100.0 * self.done / self.total
            text = f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%) {rate:.1f}/s"
            if rate > 0 and self.done < self.total:
                text += f" ETA {_clock((self.total - self.done) / rate)}"
        else:
            text = f"{self.label}: {self.done} {self.unit} {rate:.1f}/s"
        return text

    def _draw(self, force: bool = False) -> None:
        if not self.interactive or self._finished:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        # \r and clear-to-end-of-line: the line shrinks cleanly when the ETA gets shorter.
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def finish(self, outcome: str | None = None) -> None:
        """Replace the live line with one summary line (always written, terminal or not)."""
        if self._finished:
            return
        self._finished = True
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        text = (f"{self.label}: {self.done}{of} {self.unit} in {_clock(elapsed)} ({rate:.1f}/s)"
                + (f" {outcome}" if outcome else ""))
        if self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()
