"""Nothing is lost, resumes are exact, checkpoints are loaded safely.

- `AtomicCheckpointIO`: checkpoints are written to a temporary name, fsynced, then renamed.
- `InterruptCheckpoint`: SIGTERM / Ctrl-C during training stops at a batch boundary and writes
  `checkpoints/interrupted.ckpt`; stopped inside a validation, the checkpoint re-runs that validation.
- `ExactResume`: what a resume needs besides Lightning's own state to finish exactly like an
  uninterrupted run (per-batch dropout seeds, the logged metrics, the best-model record).
- `interrupt_on_sigterm`: outside the trainer's own handler (setup, between fit and test), a SIGTERM
  raises at once, so the run still ends with results.json.
- `hold_run_folder`: one process at a time runs in a run folder (a sweep relaunched while the first launch
  still runs, the same resume started twice): the second stops before it writes anything.
- `check_checkpoint`: a resume checkpoint is loaded with `weights_only=True` (a pickle cannot run code).
- `FaultInjection`: signals and NaNs on purpose, for the tests.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import re
import signal as _signal
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from peft_lightning.errors import CheckpointError, OutputError

log = logging.getLogger(__name__)

INTERRUPTS = (KeyboardInterrupt, SIGTERMException)


def run_folder(ckpt_path) -> Path | None:
    """The run folder of an existing `<run>/checkpoints/<name>.ckpt` (where every run writes its
    checkpoints): a resume continues there. None for a checkpoint kept anywhere else."""
    if not ckpt_path:
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file() or path.resolve().parent.name != "checkpoints":
        return None
    return path.resolve().parent.parent


RUN_LOCK = ".run.lock"


def hold_run_folder(folder: Path) -> Callable[[], None]:
    """Claim a run folder for this process until the returned release() (or the process's end, however
    it ends: the OS drops the lock of a killed process, so no stale lock outlives it). Two processes in
    one folder would interleave results.json, checkpoints and logs with exit 0; the second one raises
    OutputError instead, naming the process that holds the folder, before it writes anything."""
    try:
        import fcntl
    except ImportError:  # (no flock: Windows) unguarded, as before
        return lambda: None
    file = Path(folder) / RUN_LOCK
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)  # (the umask applies, as to every file the run writes)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # a filesystem without flock (Lustre mounted without -o flock: ENOSYS; some FUSE mounts) holds no
            # lock for anyone: refusing would refuse every run there, so run unguarded, as without fcntl
            os.close(fd)
            log.warning("%s: cannot lock %s (%s): this filesystem has no flock, so nothing stops a second "
                        "process from running in this folder at the same time", folder, file, err.strerror or err)
            return lambda: None
        holder = (os.pread(fd, 512, 0).decode(errors="replace").strip().splitlines() or ["unknown process"])[0]
        os.close(fd)
        raise OutputError(f"{folder} is in use by another run ({holder}): two processes in one run folder would "
                          "mix their results, checkpoints and logs. Wait for that run to end, or stop it, and "
                          "run this command again (a relaunched sweep or a resume goes on where it stopped)") from None
    import socket
    import time

    def release() -> None:
        try:
            os.close(fd)  # (closing the descriptor drops the lock)
        except OSError:
            pass

    try:  # who holds it, for the message of a process refused
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
    except BaseException:  # (a full disk): no claim is left behind in this process
        release()
        raise
    return release


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
    """On SIGTERM or SIGINT during training, save `<dirpath>/interrupted.ckpt` (resumable mid-epoch).

    A first Ctrl-C is handled like SIGTERM: training stops at the next batch boundary, so the
    checkpoint describes a finished step (a KeyboardInterrupt raised mid-step would not); a second
    Ctrl-C interrupts at once. Stopped inside a validation, the checkpoint says "this validation has
    not run" (its partial metrics are not in the checkpoint), so the resume runs all of it. Nothing is
    saved when the interrupt comes before training started (setup: resume from where you started) or
    after it ended (test: training is complete in last.ckpt). Other exceptions (a NaN loss, a bug)
    save nothing here: the last good checkpoints stay as they are.
    """

    received: str | None = None  # name of the signal that stopped the run, for the exit code
    saved: str | None = None  # the checkpoint written by the last interrupt, if any

    def __init__(self, dirpath: str, filename: str = "interrupted"):
        super().__init__(dirpath=dirpath, filename=filename)
        self._previous_sigint = None
        self._training_started = False
        self._saving = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._training_started = True
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
        if not isinstance(exception, INTERRUPTS):
            return
        InterruptCheckpoint.received = InterruptCheckpoint.received or (
            "SIGINT" if isinstance(exception, KeyboardInterrupt) else "SIGTERM")
        if not self._training_started or trainer.state.fn != TrainerFn.FITTING:
            return
        self._saving = True
        try:
            super().on_exception(trainer, pl_module, exception)
        finally:
            self._saving = False
        InterruptCheckpoint.saved = self.ckpt_path
        log.warning("interrupted: checkpoint saved to %s; resume with `python train.py ... ckpt_path=%s`",
                    self.ckpt_path, self.ckpt_path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._saving and trainer.validating:
            restart_validation(checkpoint["loops"]["fit_loop"])


def _evaluation_due(trainer) -> bool:
    """Whether the fit loop validates after the training batch that just ended (Lightning's own test)."""
    loop = trainer.fit_loop
    try:
        return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))
    except (AttributeError, TypeError):  # (a Lightning whose private loop API moved: compat.py pins the tested ones)
        return False


def _accumulating(trainer) -> bool:
    """Whether gradients of batches since the last optimizer step wait in .grad (Lightning's own test)."""
    try:
        return bool(trainer.fit_loop.epoch_loop._should_accumulate())
    except (AttributeError, TypeError):  # (see _evaluation_due)
        return False


def _evaluation_pending(fit_loop_state: dict) -> bool:
    """Whether a checkpoint's loop state is Lightning's "stopped inside a validation" (restart_validation's)."""
    try:
        total = fit_loop_state["epoch_loop.val_loop.batch_progress"]["total"]
    except (KeyError, TypeError):
        return False
    return total["ready"] == total["started"] == total["processed"] + 1 and total["completed"] == total["processed"]


def restart_validation(fit_loop_state: dict, started: bool = True) -> None:
    """Rewrite the loop state of a checkpoint written inside a validation (or, `started=False`, just
    before one) so that a resume runs the whole validation: Lightning's own "stopped inside a validation
    step" state (started one batch, processed none; `_EvaluationLoop.restarted_mid_evaluation`), at the
    validation's first batch. The batches already validated are forgotten: their metric updates are not
    in the checkpoint."""
    progress = fit_loop_state["epoch_loop.val_loop.batch_progress"]
    # batches of this validation that had run (before it started, `current` still counts the last one's)
    done = progress["current"]["completed"] if started else 0
    for key, before in (("total", progress["total"]["completed"] - done), ("current", 0)):
        progress[key].update(ready=before + 1, started=before + 1, processed=before, completed=before)
    progress["is_last_batch"] = False


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    # each DDP rank its own stream (rank 0 keeps the single-process seeds): ranks see different data
    # and must not share dropout masks
    key = f"{seed}/{epoch}/{batch_idx}" + (f"/rank{rank}" if rank else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative 63-bit seed


class ExactResume(Callback):
    """What a resume needs, besides Lightning's loop, optimizer and scheduler state, to finish with
    exactly the metrics of an uninterrupted run. Added to every run by `run.train`.

    - Dropout seeds: the global torch RNG is reseeded before every training batch from (seed, epoch,
      batch index). A batch's random numbers then never depend on what this process did before it
      (a resume, a validation, a data loader drawing a worker seed), which a saved RNG state cannot
      promise: the draws between the checkpoint and the next batch differ between the two runs.
    - The metrics logged so far travel in the checkpoint: a run resumed after its training was
      complete (interrupted in test) reports the same final metrics.
    - A run folder that was moved keeps its best-model record: ModelCheckpoint forgets it when the
      checkpoint's `dirpath` is not its own ("dirpath has changed"), so the paths are rebased onto the
      new folder when the files are there.
    - A checkpoint written at the end of a training batch after which a dev evaluation is due (a step
      checkpoint, `every_n_train_steps`, at an epoch's last batch) resumes with that evaluation: Lightning
      assumes it ran after the save and skips it ("fast forward ... to end of validation"), so a run
      killed in between lost an evaluation silently, or, when the skipped one was the best, tested a
      best checkpoint a later save had deleted. The checkpoint is written as one stopped at that
      evaluation's first batch, which Lightning runs again (as InterruptCheckpoint does inside one).
      A resume at `trainer.max_steps` runs it too: Lightning's fit loop would end before it, on the step
      count alone, so the last dev evaluation of a step budget was lost (max_steps is raised by one until
      that evaluation ends; the evaluation is the loop's first act, so no batch trains meanwhile).
    - A checkpoint written between two batches of one gradient-accumulation window (an interrupt, a dev
      evaluation or a step checkpoint there) keeps the gradients accumulated so far, which the next
      optimizer step adds to: the resume dropped them (single process: under DDP each rank holds its own).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._trainer = None
        self._metrics: dict[str, torch.Tensor] = {}
        self._after_batch = False  # between a training batch's end and its dev evaluation, if one is due
        self._pending_step: int | None = None  # a resume's checkpoint left an evaluation to run, at this update
        self._max_steps: int | None = None  # trainer.max_steps while raised for that evaluation
        self._gradients: dict[str, torch.Tensor] = {}  # a resume's accumulated gradients

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._after_batch = False
        torch.manual_seed(step_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._after_batch = True  # (checkpoint callbacks run after every other callback: their saves see this)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._after_batch = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._after_batch = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._after_batch and trainer.training and _evaluation_due(trainer):
            fit = checkpoint["loops"]["fit_loop"]
            for part in ("total", "current"):  # the batch counted complete, as Lightning has it when validating
                progress = fit["epoch_loop.batch_progress"][part]
                progress["completed"] = progress["processed"]
            restart_validation(fit, started=False)
        if trainer.state.fn == TrainerFn.FITTING and trainer.world_size == 1 and _accumulating(trainer):
            checkpoint["accumulated_gradients"] = {name: p.grad.detach().cpu().clone()
                                                   for name, p in pl_module.named_parameters() if p.grad is not None}

    def state_dict(self) -> dict[str, Any]:
        metrics = self._trainer.callback_metrics if self._trainer is not None else {}
        return {"callback_metrics": {k: torch.as_tensor(v).detach().cpu() for k, v in metrics.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._metrics = dict(state_dict.get("callback_metrics") or {})

    def on_fit_start(self, trainer, pl_module) -> None:
        # (Lightning clears the logged metrics after loading the checkpoint, before this hook)
        for k, v in self._metrics.items():
            trainer.callback_metrics.setdefault(k, v)
        self._metrics = {}
        loop = trainer.fit_loop.epoch_loop
        # (only when it can run: a resume that disabled validation would otherwise train one update too many)
        if self._pending_step is not None and 0 <= loop.max_steps <= self._pending_step and trainer.enable_validation:
            self._max_steps, loop.max_steps = loop.max_steps, self._pending_step + 1
        self._pending_step = None

    def on_train_start(self, trainer, pl_module) -> None:
        # (after Lightning restored the weights and optimizer; it zeroes .grad only where a window begins)
        if self._gradients:
            for name, p in pl_module.named_parameters():
                if name in self._gradients:
                    p.grad = self._gradients[name].to(device=p.device, dtype=p.dtype)
        self._gradients = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._max_steps is not None:  # the pending evaluation ran: the step budget is back
            trainer.fit_loop.epoch_loop.max_steps, self._max_steps = self._max_steps, None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
            self._pending_step = checkpoint.get("global_step") if _evaluation_pending(fit) else None
            self._gradients = dict(checkpoint.get("accumulated_gradients") or {})
        states = checkpoint.get("callbacks") or {}
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key) if isinstance(cb, ModelCheckpoint) else None
            if state and cb.dirpath and state.get("dirpath") and state["dirpath"] != cb.dirpath:
                _rebase_checkpoint_state(state, cb.dirpath)


def _rebase_checkpoint_state(state: dict, dirpath: str) -> None:
    """ModelCheckpoint state written in another folder -> the same files in `dirpath`, if they are all there."""
    old = state["dirpath"]

    def moved(path):
        if not path or not str(path).startswith(old.rstrip(os.sep) + os.sep):
            return path
        return os.path.join(dirpath, os.path.relpath(path, old))

    files = [state.get("best_model_path"), state.get("last_model_path"), *(state.get("best_k_models") or {})]
    if not all(os.path.isfile(moved(f)) for f in files if f):
        return  # not the same run's files: let ModelCheckpoint warn and start afresh
    log.info("checkpoint folder moved from %s to %s: keeping the best-model record", old, dirpath)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if state.get(key):
            state[key] = moved(state[key])
    state["best_k_models"] = {moved(k): v for k, v in (state.get("best_k_models") or {}).items()}
    state["dirpath"] = dirpath


def interrupt_on_sigterm() -> Callable[[], None]:
    """From now on, a SIGTERM that arrives outside a trainer run (model build, data loading, between
    fit and test, export) raises SIGTERMException at once, as Ctrl-C raises KeyboardInterrupt: the
    run ends as `interrupted` with its results.json. During a trainer run Lightning's own handler
    (which calls this one too) stops at the next batch boundary instead, and this one stands back.
    Returns the function that puts the previous handler back."""
    InterruptCheckpoint.received = InterruptCheckpoint.saved = None
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return lambda: None

    def handler(signum, frame):
        if _signal.getsignal(_signal.SIGTERM) is not handler:
            return  # called by Lightning's handler during a trainer run
        InterruptCheckpoint.received = "SIGTERM"
        raise SIGTERMException

    previous = _signal.signal(_signal.SIGTERM, handler)
    return lambda: _signal.signal(_signal.SIGTERM, previous)


def raise_if_sigterm_swallowed() -> None:
    """A SIGTERM that arrived outside a trainer run raised SIGTERMException wherever the program
    was, and a library may have caught it (datasets catches every error while it hashes a map
    function): the signal is recorded, so re-raise it at the next phase boundary, and the run ends
    as `interrupted`, never `completed`."""
    if InterruptCheckpoint.received == "SIGTERM":
        raise SIGTERMException


class FaultInjection(Callback):
    """Deliberate faults for testing recovery (`+callbacks.fault.<key>=...` on the command line).

    signal           SIGTERM | SIGINT | SIGKILL, sent to this process where `signal_in` says:
    signal_in        train:      after optimizer step `signal_at_step`
                     validation: after batch `signal_at_batch` of the first validation during fit
                                 at or after step `signal_at_step`
                     test:       after batch `signal_at_batch` of the test
                     init:       when this callback is built (model built, before the trainer)
                     setup:      in the trainer's setup (data just loaded, before fit starts)
    nan_at_step      poison a trainable tensor with NaN before this optimizer step
    """

    PHASES = ("train", "validation", "test", "init", "setup")

    def __init__(self, signal_at_step: int | None = None, signal: str = "SIGTERM", nan_at_step: int | None = None,
                 signal_in: str = "train", signal_at_batch: int = 0):
        if signal_in not in self.PHASES:
            raise ValueError(f"FaultInjection: signal_in must be one of {self.PHASES}, got {signal_in!r}")
        self.signal_at_step, self.signal, self.nan_at_step = signal_at_step, signal, nan_at_step
        self.signal_in, self.signal_at_batch = signal_in, signal_at_batch
        self._armed = signal_in != "train" or signal_at_step is not None
        if signal_in == "init":
            self._send()

    def _send(self) -> None:
        self._armed = False
        log.warning("FaultInjection: sending %s (%s)", self.signal, self.signal_in)
        os.kill(os.getpid(), getattr(_signal, self.signal))

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._armed and self.signal_in == "setup":
            self._send()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self._armed and self.signal_in == "train" and trainer.global_step == self.signal_at_step:
            self._send()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if (self._armed and self.signal_in == "validation" and trainer.state.fn == TrainerFn.FITTING
                and not trainer.sanity_checking and trainer.global_step >= (self.signal_at_step or 0)
                and batch_idx == self.signal_at_batch):
            self._send()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._armed and self.signal_in == "test" and batch_idx == self.signal_at_batch:
            self._send()

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.nan_at_step:
            param = next(p for p in pl_module.parameters() if p.requires_grad)
            with torch.no_grad():
                param.fill_(float("nan"))


def check_checkpoint(path) -> None:
    """Fail early and clearly on a missing, truncated, corrupt or unsafe resume checkpoint.

    Loaded with `weights_only=True`: tensors and plain containers only, so a crafted pickle cannot
    run code (our own checkpoints hold nothing else; Lightning loads them the same way, see run.py)."""
    path = Path(str(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found (ckpt_path)")
    try:
        with warnings.catch_warnings():  # (torch warns about the pickle protocol of foreign files)
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler met something else: refuse it
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise CheckpointError(
            f"checkpoint {path} refused: it holds Python objects beyond tensors and plain data"
            f"{f' ({found.group(1)})' if found else ''}, and loading them could run code; "
            "resume from a checkpoint this framework wrote"
        ) from None
    except Exception as err:  # torch raises several types for damaged zip archives
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}); "
                              "resume from another one, e.g. checkpoints/last.ckpt") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
