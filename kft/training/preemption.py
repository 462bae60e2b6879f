"""Preemption: a SIGTERM (or Ctrl-C) stops training after the current step, with a checkpoint.

While training, the signal only sets a flag; the loop asks `StopRequests` between steps, and every
worker stops at the same step once any of them was signalled. After training, `StopOnSigterm`
stops the final evaluation or export at once: a rerun redoes them from the saved checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable

from absl import logging

from kft.exit_codes import EXIT_PREEMPTED  # noqa: F401  (callers name it through `loop`)
from kft.training import checkpoints


class Preempted(Exception):
    """SIGTERM (or a Ctrl-C) arrived; a checkpoint of the current step was written (on the chief)."""

    def __init__(self, step: int, path: str | None, by: str = "SIGTERM"):
        super().__init__(f"stopped by {by} at step {step}; checkpoint {path or '(written by chief)'}; "
                         "rerun the same command to continue")
        self.step, self.path = step, path


class PreemptedAfterTraining(Preempted):
    """SIGTERM arrived after training had finished and was saved: during evaluation or export."""

    def __init__(self, step: int, saved: str, phase: str):
        Exception.__init__(self, f"stopped by SIGTERM during {phase}, after training had finished at step "
                           f"{step} ({saved}); no export was left half-written. Rerun the same command to "
                           "evaluate and export without training again")
        self.step, self.path, self.phase = step, saved, phase


class SigtermFlag:
    """Set by SIGTERM or a first Ctrl-C (SIGINT) while installed; the loop polls it between steps.

    A second Ctrl-C raises KeyboardInterrupt at once (kft.train reports it in one line)."""

    def __init__(self):
        self.raised = False
        self.by = "SIGTERM"
        self._previous = self._previous_int = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if ignored
                self._previous_int = signal.signal(signal.SIGINT, self._handle_int)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after the current step")
        self.raised = True

    def _handle_int(self, signum, frame):
        print("\nCtrl-C: saving a checkpoint after the current step, then stopping (Ctrl-C again to stop "
              "at once, without saving)", file=sys.stderr, flush=True)
        self.raised, self.by = True, "Ctrl-C"
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)


class StopRequests:
    """The one stop check of the training loop: did any worker get a SIGTERM or Ctrl-C?

    `agree` sums a 0/1 flag over the workers (None with a single worker): every worker must stop
    at the same step, or the others would wait forever in the next collective step.
    """

    def __init__(self, flag: SigtermFlag, agree: Callable[[int], int] | None = None):
        self.flag, self.agree = flag, agree

    def requested(self) -> bool:
        if self.agree is None:
            return self.flag.raised
        return self.agree(int(self.flag.raised)) > 0

    def stop_if_requested(self, step: int, save: Callable[[], str | None]) -> None:
        """Raises Preempted at `step`, with the checkpoint `save()` writes (or names), if asked to stop."""
        if self.requested():
            raise Preempted(step, save(), self.flag.by)


class StopOnSigterm:
    """After training: a SIGTERM stops the run at once, as PreemptedAfterTraining.

    Installed once the loop has saved the finished training, so what a preemption cuts short is
    the final evaluation or export, which a rerun redoes from the checkpoint without training;
    the export is renamed into place only when complete (kft/models/savedmodel.py). Set `phase` to name what
    is running. Use it inside `sigterm_scope`, which turns the interruption into the exception and
    puts the previous handler back.
    """

    def __init__(self, ckpt_dir: str, step: int):
        self.step, self.phase = step, "the final evaluation"
        self.saved = (f"saved in {checkpoints.path_for(ckpt_dir, step)}"
                      if step in checkpoints.list_steps(ckpt_dir) else "no training to save")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        raise _Interrupted(PreemptedAfterTraining(self.step, self.saved, self.phase))


class _Interrupted(BaseException):
    """Raised by StopOnSigterm's handler wherever Python happens to be. A BaseException, like
    KeyboardInterrupt: Keras and TensorFlow catch `Exception` inside layers and traced functions
    and raise it again wrapped in a RuntimeError, which would hide the preemption."""


@contextlib.contextmanager
def sigterm_scope():
    """Puts back, when the block ends, the SIGTERM handler that was installed when it began, and
    raises a StopOnSigterm interruption as its PreemptedAfterTraining."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    except _Interrupted as interrupted:
        raise interrupted.args[0] from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
