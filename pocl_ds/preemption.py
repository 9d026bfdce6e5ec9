"""A run's answer to being asked to stop: a cluster's SIGTERM or a user's Ctrl-C.

The first signal asks for a checkpoint after the current optimizer step, agreed by every rank
at the step's end; a second Ctrl-C exits at once. The trainer polls ``PreemptionFlag.agreed``
after each step.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from pocl_ds import distributed


class PreemptionFlag:
    """Turns SIGTERM (a cluster's preemption notice) and the first Ctrl-C (SIGINT) into a
    request to checkpoint after the current step and exit; a second Ctrl-C exits at once.

    A Ctrl-C outside the loop's steps (step-0 validation, with nothing to checkpoint yet;
    export and final evaluation, after the last checkpoint) exits at once. Under mpirun
    (mpi4py is loaded only there) no handler is installed: mpirun handles a signal itself and
    kills its ranks, so SIGINT exits 130 as Python's default does and ``--resume auto``
    continues from the last checkpoint.
    """

    # A terminal sends Ctrl-C to every process of the job and torchrun forwards it to its
    # ranks once more: SIGINTs this close together are one Ctrl-C.
    REPEAT_WINDOW_S = 1.0

    def __init__(self) -> None:
        self.signal: str | None = None  # the first signal received on this rank
        self.reason: str | None = None  # the signal the ranks agreed to stop for
        # True from the first step's end to the loop's end (run() clears it)
        self.stepping = False
        self._interrupted_at: float | None = None
        if "mpi4py.MPI" not in sys.modules:
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if not self.stepping:
                raise KeyboardInterrupt
            now = time.monotonic()
            if self._interrupted_at is None:
                self._interrupted_at = now
            elif now - self._interrupted_at > self.REPEAT_WINDOW_S:
                sys.stderr.write("second Ctrl-C: exiting without a checkpoint\n")
                sys.stderr.flush()
                os._exit(130)
        self.signal = self.signal or signal.Signals(signum).name

    @property
    def vote(self) -> float:
        """1.0 when this rank was asked to stop: summed over ranks, the ``votes`` of ``agreed``."""
        return float(self.signal is not None)

    def agreed(self, votes: float | None = None) -> bool:
        """True on every rank once any rank was asked to stop; called after every optimizer
        step, from which on a Ctrl-C means "checkpoint, then exit". ``votes``: the sum of
        ``vote`` over ranks when the caller reduced it with its own numbers (else one tiny
        all-reduce here)."""
        self.stepping = True
        if votes is None:
            votes = distributed.all_reduce_sum(self.vote)
        if votes == 0:
            return False
        self.reason = next(s for s in distributed.all_gather_objects(self.signal) if s)
        return True
