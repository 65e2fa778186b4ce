"""Task data over HF `datasets`: load (embedded, hub, local files), split, tokenize (cached), batch.

Batches are padded per batch to their longest member (not to max_length, as the official
P-Tuning v2 code does), and with `group_by_length` similar lengths are batched together, so
little compute is spent on padding.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from peft_lightning.data.embedded import BUILDERS
from peft_lightning.data.files import hub_rows, read_rows, to_roles
from peft_lightning.errors import DataError
from peft_lightning.tasks import Task, make_task

log = logging.getLogger(__name__)


def load_raw(source: str, split: dict, task: Task, columns: dict | None = None, files: dict | None = None,
             subset: str | None = None, splits: dict | None = None) -> tuple[datasets.DatasetDict, str]:
    """(train/validation/test DatasetDict with the task's role-named columns, a content identity
    for caching).

    `source` is `embedded:NAME`, `hub:PATH` (with `subset` and `splits`: our split -> the hub's,
    slices allowed, e.g. {train: "train[:90%]", validation: "train[90%:]", test: validation}) or a
    local csv/tsv/jsonl/parquet file (split by `split`); `files` maps train/validation/test to
    their own files instead. `columns` maps the task's roles to the data's column names.
    """
    columns = dict(columns or {r: r for r in task.roles})
    if files:
        missing = {"train", "validation", "test"} - set(files)
        if missing:
            raise ValueError(f"data.files needs train, validation and test; missing {sorted(missing)}")
        parts = datasets.DatasetDict({
            name: datasets.Dataset.from_dict(to_roles(read_rows(path), columns, task, str(path)))
            for name, path in files.items()
        })
        return parts, "|".join(f"{p}:{_stamp(Path(p))}" for p in files.values())
    if source.startswith("hub:"):
        hub, chosen = source[4:], {"train": "train", "validation": "validation", "test": "test", **(splits or {})}
        parts = datasets.DatasetDict({
            name: datasets.Dataset.from_dict(to_roles(hub_rows(hub, subset, expr), columns, task, f"{source} {expr}"))
            for name, expr in chosen.items()
        })
        return parts, f"{source}|{subset}|{json.dumps(chosen, sort_keys=True)}|{json.dumps(columns, sort_keys=True)}"
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        if name not in BUILDERS:
            raise ValueError(f"Unknown embedded dataset '{name}'. Known: {', '.join(sorted(BUILDERS))}.")
        table, path = BUILDERS[name]()
        missing = [r for r in task.roles if r not in table]
        if missing:
            raise ValueError(f"embedded dataset '{name}' has columns {sorted(table)}, but data.task="
                             f"{type(task).__name__} needs {list(task.roles)}")
        table = {r: v for r, v in table.items() if r in (*task.roles, *task.optional_roles)}
        if "label" in table:  # the same check as a file's labels: data.labels may not fit the set
            table["label"] = [task.label_value(v, f"embedded dataset '{name}', row {i}")
                              for i, v in enumerate(table["label"])]
    else:
        path = Path(source)
        table = to_roles(read_rows(path), columns, task, str(path))
    full = datasets.Dataset.from_dict(table)
    fractions = [split.get("train", 0.8), split.get("validation", 0.1), split.get("test", 0.1)]
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"data.split fractions must sum to 1, got {fractions}")
    # Seeded shuffle, then contiguous 80/10/10 slices: the split is a pure function of the seed.
    shuffled = full.shuffle(seed=split.get("seed", 42))
    n = len(shuffled)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    for name, size in (("train", n_train), ("validation", n_val), ("test", n - n_train - n_val)):
        if size == 0:
            raise ValueError(f"data split '{name}' of {source} is empty: {n} rows split {fractions}; check data.split")
    parts = datasets.DatasetDict(
        train=shuffled.select(range(n_train)),
        validation=shuffled.select(range(n_train, n_train + n_val)),
        test=shuffled.select(range(n_train + n_val, n)),
    )
    return parts, f"{source}|{path}|{_stamp(path)}|{json.dumps(split, sort_keys=True)}|{json.dumps(columns, sort_keys=True)}"


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


class EpochSeededSampler(Sampler[int]):
    """Training order as a pure function of (seed, epoch): shuffled, or length-grouped shuffled.

    Lightning calls `set_epoch` at every epoch start. A run resumed mid-epoch replays the same
    order and skips the samples already trained on (`resume`: the datamodule's record of where the
    interrupted epoch stopped), so an interrupted run finishes exactly like an uninterrupted one.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool, resume=None):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group_by_length, self.epoch = group_by_length, 0
        self.resume = resume  # callable: epoch -> number of samples to skip (consumed once)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.group_by_length:
            order = get_length_grouped_indices(self.lengths, self.batch_size, generator=g)
        else:
            order = torch.randperm(len(self.lengths), generator=g).tolist()
        skip = self.resume(self.epoch) if self.resume else 0
        return iter(order[skip:])


def subsample(part: datasets.Dataset, size: int | float, seed: int) -> datasets.Dataset:
    """`size` examples (int) or that fraction (float) of `part`, drawn with `seed`."""
    n = len(part)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
        raise ValueError(f"data.train_examples must be a positive count or a fraction in (0, 1], got {size!r}")
    if isinstance(size, float):
        if size > 1:
            raise ValueError(f"data.train_examples as a fraction must be at most 1, got {size}")
        size = max(1, round(size * n))
    if size > n:
        raise ValueError(f"data.train_examples={size} but the training split has only {n} examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return part.select(sorted(order.tolist()))


class TaskDataModule(L.LightningDataModule):
    """Batches for any task type (`task`: a Task, or its name); see `load_raw` for the sources."""

    def __init__(
        self,
        tokenizer,
        source: str,
        labels: list[str] | None = None,
        task: Task | str = "classification",
        columns: dict | None = None,
        subset: str | None = None,
        splits: dict | None = None,
        split: dict | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        group_by_length: bool = True,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 42,
        files: dict | None = None,
        train_examples: int | float | None = None,
        **_: object,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.source, self.labels = source, list(labels or [])
        self.task = make_task(task, self.labels) if isinstance(task, str) else task
        self.columns, self.subset, self.splits = dict(columns) if columns else None, subset, splits
        self.split = dict(split or {})
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.group_by_length, self.num_workers = group_by_length, num_workers
        self.seed = seed
        self.files = dict(files) if files else None
        # low-data regime: keep this many (int) or this fraction (float in (0, 1]) of the training
        # split, sampled with the run's seed (so seeds give different subsets, reproducibly)
        self.train_examples = train_examples
        self._resume_point: tuple[int, int] | None = None  # (epoch, samples to skip) after a mid-epoch resume
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if tokenizer is not None and tokenizer.pad_token is None:  # GPT-2, Llama: pad with end-of-sequence
            tokenizer.pad_token = tokenizer.eos_token
        self.collate = self.task.collator(tokenizer) if tokenizer is not None else None
        self.data: datasets.DatasetDict | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def _cache_files(self, identity: str) -> dict[str, str] | None:
        if self.cache_dir is None:
            return None
        key = json.dumps(
            [identity, self.tokenizer.name_or_path, type(self.tokenizer).__name__, self.max_length,
             type(self.task).__name__, self.task.kind, getattr(self.task, "options", None), datasets.__version__],
            sort_keys=True, default=str,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        folder = self.cache_dir / "tokenized" / digest
        folder.mkdir(parents=True, exist_ok=True)
        return {s: str(folder / f"{s}.arrow") for s in ("train", "validation", "test")}

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        raw, identity = load_raw(self.source, self.split, self.task, self.columns, self.files, self.subset,
                                 self.splits)
        for name, part in raw.items():
            if len(part) == 0:
                where = self.files[name] if self.files else self.source
                raise ValueError(f"data split '{name}' ({where}) is empty; check data.split / data.files")

        def tokenize(batch):
            return self.task.tokenize(batch, self.tokenizer, self.max_length)

        self.data = raw.map(
            tokenize, batched=True, remove_columns=raw["train"].column_names,
            cache_file_names=self._cache_files(identity), desc="tokenize",
        )
        if self.train_examples is not None:
            self.data["train"] = subsample(self.data["train"], self.train_examples, self.seed)
        # token counts for length grouping, once (Lightning asks for the train loader more than once)
        self.train_lengths = [len(x) for x in self.data["train"]["input_ids"]]
        # tensors are made by the task's collator (some columns are lists, or text references)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        part = self.data[split]
        if not shuffle:
            # under DDP each rank evaluates its own share, each example exactly once; Lightning keeps
            # a DistributedSampler it is given (its own would pad the ranks with repeated examples)
            trainer = self.trainer
            sampler = None
            if trainer is not None and trainer.world_size > 1:
                if len(part) < trainer.world_size:
                    raise DataError(f"data split '{split}' has {len(part)} examples, fewer than the "
                                    f"{trainer.world_size} DDP processes that evaluate it; give it at least "
                                    f"{trainer.world_size} (or evaluate on fewer devices)")
                sampler = UnpaddedDistributedSampler(part, trainer.world_size, trainer.global_rank)
            return DataLoader(part, batch_size=self.eval_batch_size, shuffle=False, sampler=sampler,
                              collate_fn=self.collate, num_workers=self.num_workers)
        sampler = EpochSeededSampler(self.train_lengths, self.batch_size, self.seed, self.group_by_length, self._samples_to_skip)
        return DataLoader(part, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.num_workers)

    # --- mid-epoch resume: where in the epoch's order training stopped --------------------------
    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.current.completed,
                "epoch_finished": progress.is_last_batch, "world_size": self.trainer.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state and not state["epoch_finished"] and state["batches_done"]:
            # with DDP each rank took every world_size-th sample of this order
            self._resume_point = (state["epoch"], state["batches_done"] * self.batch_size * state["world_size"])

    def _samples_to_skip(self, epoch: int) -> int:
        if self._resume_point is None or self._resume_point[0] != epoch:
            return 0
        skip, self._resume_point = self._resume_point[1], None
        return skip

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("validation", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        return self._loader("test", shuffle=False)


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation under DDP: rank r takes indices r, r + world_size, ... in order, so every example
    is evaluated exactly once (ranks differ by at most one example; torchmetrics gathers uneven
    states). torch's DistributedSampler instead pads every rank to the same size with repeated
    examples, which counts up to world_size - 1 of them twice in the metrics."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


TextClassificationDataModule = TaskDataModule  # the name before other task types existed
