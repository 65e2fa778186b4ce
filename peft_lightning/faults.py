"""Nothing is lost: atomic checkpoint writes and a checkpoint on SIGTERM / Ctrl-C."""
from __future__ import annotations

import logging
import os
import signal as _signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

INTERRUPTS = (KeyboardInterrupt, SIGTERMException)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<name>.tmp`, fsync, then rename: a kill mid-write leaves the previous file intact
    and never a half-written checkpoint under the final name that a resume would pick up."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


class InterruptCheckpoint(OnExceptionCheckpoint):
    """On SIGTERM or SIGINT, save `<dirpath>/interrupted.ckpt` (resumable mid-epoch).

    A first Ctrl-C is handled like SIGTERM: training stops at the next batch boundary, so the
    checkpoint describes a finished step (a KeyboardInterrupt raised mid-step would not); a second
    Ctrl-C interrupts at once. Other exceptions (a NaN loss, a bug) save nothing here: the last
    good checkpoints stay as they are.
    """

    received: str | None = None  # name of the signal that stopped training, for the exit code

    def __init__(self, dirpath: str, filename: str = "interrupted"):
        super().__init__(dirpath=dirpath, filename=filename)
        self._previous_sigint = None

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def graceful(signum, frame):
            if trainer.received_sigterm:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            log.warning("Ctrl-C: stopping after this batch and saving a checkpoint (again to stop at once)")
            InterruptCheckpoint.received = "SIGINT"
            trainer._signal_connector.received_sigterm = True

        self._previous_sigint = _signal.signal(_signal.SIGINT, graceful)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            _signal.signal(_signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, INTERRUPTS):
            InterruptCheckpoint.received = InterruptCheckpoint.received or (
                "SIGINT" if isinstance(exception, KeyboardInterrupt) else "SIGTERM")
            super().on_exception(trainer, pl_module, exception)
            log.warning("interrupted: checkpoint saved to %s; resume with `python train.py ... ckpt_path=%s`",
                        self.ckpt_path, self.ckpt_path)


class FaultInjection(Callback):
    """Deliberate faults for testing recovery (`+callbacks.fault=...` from the command line):
    send `signal` to this process after `signal_at_step` optimizer steps, or poison a trainable
    tensor with NaN before step `nan_at_step`."""

    def __init__(self, signal_at_step: int | None = None, signal: str = "SIGTERM", nan_at_step: int | None = None):
        self.signal_at_step, self.signal, self.nan_at_step = signal_at_step, signal, nan_at_step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.signal_at_step:
            self.signal_at_step = None
            os.kill(os.getpid(), getattr(_signal, self.signal))

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.nan_at_step:
            param = next(p for p in pl_module.parameters() if p.requires_grad)
            with torch.no_grad():
                param.fill_(float("nan"))


def check_checkpoint(path) -> None:
    """Fail early and clearly on a missing, truncated or corrupt resume checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (ckpt_path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for damaged zip archives
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err}); "
                         "resume from another one, e.g. checkpoints/last.ckpt") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
