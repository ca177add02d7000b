"""In-process stand-ins for a killed job: the kill comes from the test, never from a config key."""

from __future__ import annotations

import contextlib

import pytest


class Killed(BaseException):
    """The test's stand-in for SIGKILL (a BaseException: nothing in the trainer or the pipeline catches it)."""


@contextlib.contextmanager
def killed_after(step: int):
    """The training run in the block dies right after step ``step`` (its checkpoint and validation done)."""
    from firered_core.training.trainer import Trainer

    real = Trainer.train_step

    def step_or_die(self):
        if self.step >= step:
            raise Killed(f"killed after step {self.step}")
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", step_or_die)
        with pytest.raises(Killed):
            yield


@contextlib.contextmanager
def killed_after_calls(module, name: str, calls: int):
    """The work in the block dies right after the ``calls``-th call of ``module.name`` (a file writer, say) returned:
    a job killed between two files."""
    real, done = getattr(module, name), []

    def call_then_die(*args, **kwargs):
        out = real(*args, **kwargs)
        done.append(args)
        if len(done) == calls:
            raise Killed(f"killed after {calls} calls of {name}")
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, name, call_then_die)
        with pytest.raises(Killed):
            yield
