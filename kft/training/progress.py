"""Training progress: throughput and time left, as a live bar on a terminal and as log lines.

The periodic log line (every --log_every_steps steps) says step/total, loss, steps/s, examples/s,
tokens/s (real tokens: padding and filler rows are not counted), the time elapsed and the ETA of
the remaining steps. On a terminal (stderr is a TTY) a bar with the same figures is also redrawn in
place below the log; in CI and log files only the lines appear.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
from absl import logging


def duration(seconds: float | None) -> str:
    """0.4s, 45s, 3m12s, 1h05m: as short as a log line needs; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def per_second(count: float, seconds: float, unit: str) -> str:
    """'2.10 steps/s', '67.2 examples/s', '1,234 tokens/s' (three significant figures or more)."""
    rate = count / seconds if seconds > 0 else 0.0
    if rate >= 100:
        text = f"{rate:,.0f}"
    elif rate >= 10:
        text = f"{rate:.1f}"
    else:
        text = f"{rate:.2f}"
    return f"{text} {unit}/s"


def batch_counts(indices: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real examples and real tokens of each batch of a plan (`indices` [batches, rows], -1 = filler)."""
    valid = indices >= 0
    tokens = np.where(valid, lengths[np.maximum(indices, 0)], 0).sum(axis=1)
    return valid.sum(axis=1), tokens


class Progress:
    """Counts finished steps of one `Loop.run` and says how fast they go and how long is left.

    The ETA divides the remaining steps by the rate since this process's first step finished, so
    the first call's tracing does not inflate it (until a second step exists, the first is used).
    """

    REDRAW_SECONDS = 0.1

    def __init__(self, total_steps: int, step: int, live: bool | None = None, clock=time.monotonic):
        self.total = total_steps
        self.clock = clock
        self.live = sys.stderr.isatty() if live is None else live
        self.started = clock()
        self.start_step = step
        self.step = step
        self.first = None  # (time, step) when this process's first step had finished
        self.examples = self.tokens = 0  # since start
        self.mark = (self.started, step, 0, 0)  # time, step, examples, tokens at the last log line
        self.drawn_at = None
        self.shown = False

    # -- counting ------------------------------------------------------------------------------

    def update(self, step: int, epoch: str, loss: float, examples: int, tokens: int) -> None:
        """One finished step with its real examples and tokens; redraws the bar on a terminal."""
        now = self.clock()
        self.step = step
        self.examples += examples
        self.tokens += tokens
        if self.first is None:
            self.first = (now, step)
        if self.live and (self.drawn_at is None or now - self.drawn_at >= self.REDRAW_SECONDS
                          or step >= self.total):
            self._draw(now, epoch, loss)

    def eta_seconds(self, now: float | None = None) -> float | None:
        now = self.clock() if now is None else now
        for t0, s0 in ([self.first] if self.first else []) + [(self.started, self.start_step)]:
            if self.step > s0 and now > t0:
                return (self.total - self.step) * (now - t0) / (self.step - s0)
        return None

    def line(self, epoch: str, loss: float) -> str:
        """The periodic log line; rates are over the steps since the previous line."""
        now = self.clock()
        t, s, e, k = self.mark
        seconds = now - t
        self.mark = (now, self.step, self.examples, self.tokens)
        return (f"step {self.step}/{self.total} (epoch {epoch}): loss {loss:.4f}, "
                f"{per_second(self.step - s, seconds, 'steps')}, "
                f"{per_second(self.examples - e, seconds, 'examples')}, "
                f"{per_second(self.tokens - k, seconds, 'tokens')}, "
                f"elapsed {duration(now - self.started)}, eta {duration(self.eta_seconds(now))}")

    # -- the live bar (terminal only) ----------------------------------------------------------

    def _draw(self, now: float, epoch: str, loss: float) -> None:
        width = 24
        filled = int(width * self.step / max(self.total, 1))
        seconds = now - self.started
        text = (f"\r{self.step}/{self.total} [{'=' * filled}{'.' * (width - filled)}] epoch {epoch} "
                f"loss {loss:.4f} | {per_second(self.examples, seconds, 'ex')} "
                f"{per_second(self.tokens, seconds, 'tok')} | {duration(seconds)} elapsed, "
                f"eta {duration(self.eta_seconds(now))}\x1b[K")
        sys.stderr.write(text)
        sys.stderr.flush()
        self.drawn_at = now
        self.shown = True

    def filter(self, record) -> bool:
        """A logging filter: clears the bar before any log line is written below it."""
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            self.shown = False
            self.drawn_at = None  # redraw at the next step
        return True

    def __enter__(self):
        if self.live:
            logging.get_absl_handler().addFilter(self)
        return self

    def __exit__(self, *exc):
        if self.live:
            logging.get_absl_handler().removeFilter(self)
            if self.shown:
                sys.stderr.write("\n")
                sys.stderr.flush()
                self.shown = False
