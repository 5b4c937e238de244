"""What stops a training run early, and how it says so: preemption signals and non-finite updates.

    with SignalCatcher() as signals:          # SIGTERM / SIGINT are recorded, not fatal
        for step ...:
            ...
            guard.check(step, metrics)        # NonFiniteError, or a counted skip
            if signals.received:              # save a checkpoint at this step, then
                raise Preempted(...)          # the CLI exits with 128 + signal number

A second signal while the first is being handled restores the default action and re-sends itself, so a
second Ctrl-C (or kill) stops the process at once; orbax's atomic save means a checkpoint cut short that
way is never restored (docs/reliability.md).
"""
from __future__ import annotations

import math
import os
import signal
import threading
import warnings

EXIT_NONFINITE = 3


class TrainingStopped(Exception):
    """A run that stopped on purpose before train.steps; `exit_code` is what the CLI returns."""

    exit_code = 1


class Preempted(TrainingStopped):
    """SIGTERM / SIGINT arrived; a checkpoint at `step` was saved first. Exit code 128 + signal number
    (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed by that signal."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"received {signal.Signals(signum).name}: saved a checkpoint at step {step} "
                         f"({checkpoint}); run the same command again to resume")


class NonFiniteError(TrainingStopped, FloatingPointError):
    """A non-finite loss or gradient norm at `step` (train.on_nonfinite='stop', or too many skips in a row)."""

    exit_code = EXIT_NONFINITE

    def __init__(self, step: int, metric: str, value: float, last_checkpoint: str | None, detail: str = ""):
        self.step, self.metric, self.value, self.last_checkpoint = step, metric, value, last_checkpoint
        kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                else "no checkpoint had been saved yet")
        super().__init__(f"non-finite {metric}={value} in the update of step {step}{detail}; stopped, {kept} "
                         "(lower optim.learning_rate, set optim.grad_clip, or train.on_nonfinite='skip')")


class NonFiniteGuard:
    """Host-side check of each step's loss and gradient norm (the step itself never raises).

    mode "stop": the first non-finite value raises NonFiniteError. mode "skip": the step already left the
    state unchanged (see train.state.make_train_step); it is counted and reported, and `max_consecutive`
    skips in a row raise, since then the parameters themselves are at fault, not one batch.
    """

    def __init__(self, mode: str, checkpoint_dir_fn, max_consecutive: int = 10):
        if mode not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite={mode!r} is unknown; choose from ('stop', 'skip')")
        self.mode, self.max_consecutive = mode, max_consecutive
        self._last_checkpoint = checkpoint_dir_fn
        self.skipped = 0
        self._consecutive = 0

    def check(self, step: int, metrics: dict) -> None:
        """step: the 1-based number of the update that produced `metrics` (loss and grad_norm, host or device)."""
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self._consecutive = 0
            return
        metric, value = ("loss", loss) if not math.isfinite(loss) else ("grad_norm", grad_norm)
        if self.mode == "stop":
            raise NonFiniteError(step, metric, value, self._last_checkpoint())
        self.skipped += 1
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive:
            raise NonFiniteError(step, metric, value, self._last_checkpoint(),
                                 f" ({self._consecutive} updates in a row skipped)")
        warnings.warn(f"non-finite {metric}={value} in the update of step {step}: update skipped "
                      f"({self.skipped} so far)", RuntimeWarning, stacklevel=2)


class SignalCatcher:
    """Context manager that records the first SIGTERM / SIGINT in `received` (the signal number, else None)
    instead of dying. Outside the main thread (where handlers cannot be installed) it records nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:   # second signal: give up gracefully handling it, die as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False
