"""Task data over HF `datasets`: load (embedded, hub, local files), split, tokenize (cached), batch.

Batches are padded per batch to their longest member (not to max_length, as the official
P-Tuning v2 code does), and with `group_by_length` similar lengths are batched together, so
little compute is spent on padding.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import datasets
import lightning as L
import numpy as np
import tokenizers
import torch
import transformers
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from peft_lightning.data.embedded import BUILDERS
from peft_lightning.data.files import hub_rows, read_rows, to_roles
from peft_lightning.errors import ConfigError, DataError
from peft_lightning.tasks import Task, make_task

log = logging.getLogger(__name__)


DATA_RULES = 2  # version of the reading, deduplication and split rules; in the cache key: bump on a change
INPUT_ROLES = ("text", "text_pair", "choices", "tokens")  # what an example's input is made of
DEV_FROM_TRAIN = {"fraction": 0.05, "min_size": 100, "max_fraction": 0.2, "seed": 42}
CROSS = (("validation", "train"), ("test", "train"), ("test", "validation"))


class Raw(NamedTuple):
    parts: datasets.DatasetDict  # train / validation / test, role-named columns
    identity: str  # a hash of every row of every split (the tokenization cache key's data part)
    stats: dict  # split sizes, duplicates removed, cross-split duplicates (results.json "data_stats")


def load_raw(source: str, split: dict, task: Task, columns: dict | None = None, files: dict | None = None,
             subset: str | None = None, splits: dict | None = None, dev_from_train: dict | None = None) -> Raw:
    """The train/validation/test splits with the task's role-named columns, their content identity
    and statistics.

    `source` is `embedded:NAME`, `hub:PATH` (with `subset` and `splits`: our split -> the hub's,
    e.g. {train: train, test: validation}; with `dev_from_train` (see DEV_FROM_TRAIN) the
    validation split is a seeded random share of the hub's train split) or a local
    csv/tsv/jsonl/parquet file (split by `split`); `files` maps train/validation/test to their own
    files instead. `columns` maps the task's roles to the data's column names.

    Whatever the framework splits itself (an embedded set, one local file, a hub train split that
    gives the dev set) is deduplicated first: one example per normalized input (casefolded,
    whitespace collapsed, over text, text_pair, choices and tokens), so no input is in two splits.
    Splits given as such (data.files, hub splits) are kept, and their overlaps counted and warned of.
    """
    columns = dict(columns or {r: r for r in task.roles})
    if files:
        missing = {"train", "validation", "test"} - set(files)
        if missing:
            raise ConfigError(f"data.files needs train, validation and test; missing {sorted(missing)}")
        tables = {name: to_roles(read_rows(path), columns, task, str(path)) for name, path in files.items()}
        stats = {"split_by": "data.files"}
        # one file in two roles is deliberate (an evaluation-only extra_eval set): not an overlap to warn of
        same = {(a, b) for a, b in CROSS if Path(files[a]).resolve() == Path(files[b]).resolve()}
    elif source.startswith("hub:"):
        hub, chosen = source[4:], {"train": "train", "validation": "validation", "test": "test", **(splits or {})}
        if dev_from_train is not None:
            if "validation" in (splits or {}):
                raise ConfigError("data.splits.validation and data.dev_from_train are both set; the dev set comes "
                                  "from one of them: drop data.splits.validation or set data.dev_from_train=null")
            chosen.pop("validation")
        tables = {name: to_roles(hub_rows(hub, subset, expr), columns, task, f"{source} {expr}")
                  for name, expr in chosen.items()}
        stats = {"split_by": "hub splits"}
        if dev_from_train is not None:
            spec = _dev_spec(dev_from_train)
            groups, stats = _deduplicate(tables["train"], f"{source} train")
            order = np.random.default_rng(spec["seed"]).permutation(len(groups)).tolist()
            n = len(groups)
            n_dev = min(max(math.ceil(round(spec["fraction"] * n, 6)), spec["min_size"]), int(spec["max_fraction"] * n))
            if n_dev < 1 or n_dev >= n:
                raise ConfigError(f"data.dev_from_train={spec} leaves {n_dev} of {n} training examples for dev; "
                                  "change its fraction / min_size / max_fraction")
            tables["validation"] = _take(tables["train"], groups, order[:n_dev])
            tables["train"] = _take(tables["train"], groups, order[n_dev:])
            stats["split_by"] = f"hub splits, dev = a seeded {n_dev} of the {n} training examples"
    else:
        if source.startswith("embedded:"):
            name = source.split(":", 1)[1]
            if name not in BUILDERS:
                raise ConfigError(f"Unknown embedded dataset '{name}'. Known: {', '.join(sorted(BUILDERS))}.")
            table, _ = BUILDERS[name]()
            missing = [r for r in task.roles if r not in table]
            if missing:
                raise ConfigError(f"embedded dataset '{name}' has columns {sorted(table)}, but data.task="
                                  f"{type(task).__name__} needs {list(task.roles)}")
            table = {r: v for r, v in table.items() if r in (*task.roles, *task.optional_roles)}
            if "label" in table:  # the same check as a file's labels: data.labels may not fit the set
                table["label"] = [task.label_value(v, f"embedded dataset '{name}', row {i}")
                                  for i, v in enumerate(table["label"])]
        else:
            table = to_roles(read_rows(source), columns, task, str(source))
        fractions = split_fractions(split)
        groups, stats = _deduplicate(table, source)
        # Seeded shuffle (the permutation Dataset.shuffle(seed) draws), then contiguous 80/10/10
        # slices: the split is a pure function of the seed and the deduplicated data.
        order = np.random.default_rng(split.get("seed", 42)).permutation(len(groups)).tolist()
        n = len(groups)
        n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
        cuts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        for part, chosen_groups in cuts.items():
            if not chosen_groups:
                raise DataError(f"data split '{part}' of {source} is empty: {n} rows split {fractions}; check data.split")
        tables = {part: _take(table, groups, chosen_groups) for part, chosen_groups in cuts.items()}
        stats["split_by"] = f"data.split {fractions} seed {split.get('seed', 42)}"
    stats = {"sizes": {name: len(next(iter(t.values()))) for name, t in tables.items()}, **stats,
             "cross_split_duplicates": _overlaps(tables, source, same if files else set())}
    parts = datasets.DatasetDict({name: datasets.Dataset.from_dict(tables[name])
                                  for name in ("train", "validation", "test")})
    return Raw(parts, _content_hash(tables), stats)


def normalized(text: str) -> str:
    """Text as duplicates are compared: casefolded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def input_keys(table: dict[str, list]) -> list[str]:
    """Each row's normalized input over every input role. The separators are whitespace, which
    `normalized` never leaves inside a string, so roles cannot run into each other."""
    roles = [r for r in INPUT_ROLES if r in table]

    def text(value):
        return "\x1e".join(normalized(v) for v in value) if isinstance(value, list) else normalized(value)

    return ["\x1f".join(text(table[r][i]) for r in roles) for i in range(len(table[roles[0]]))]


def _deduplicate(table: dict[str, list], source: str) -> tuple[list[list[int]], dict]:
    """Groups of row indices, one group per distinct input, and what was removed. Labelled data
    keeps the first row of each input. Generation keeps each input's distinct targets (several
    references of one input) together in one group, so an input never lands in two splits."""
    keys = input_keys(table)
    targets = table.get("target")
    labels = table.get("label")
    groups: list[list[int]] = []
    first: dict[str, int] = {}
    seen: dict[str, set] = {}
    removed = conflicts = 0
    for i, key in enumerate(keys):
        g = first.get(key)
        if g is None:
            first[key] = len(groups)
            groups.append([i])
            seen[key] = {normalized(targets[i])} if targets is not None else set()
        elif targets is not None and normalized(targets[i]) not in seen[key]:
            seen[key].add(normalized(targets[i]))
            groups[g].append(i)
        else:
            removed += 1
            conflicts += labels is not None and labels[i] != labels[groups[g][0]]
    if removed:
        log.info("%s: %d duplicate examples removed before the split (the same normalized input%s)", source,
                 removed, f"; {conflicts} of them with another label" if conflicts else "")
    return groups, {"duplicates_removed": removed, "duplicates_with_other_label": conflicts}


def _take(table: dict[str, list], groups: list[list[int]], chosen: list[int]) -> dict[str, list]:
    rows = [i for g in chosen for i in groups[g]]
    return {column: [values[i] for i in rows] for column, values in table.items()}


def _overlaps(tables: dict[str, dict], source: str, same: set = frozenset()) -> dict[str, int | str]:
    """How many rows of a later split repeat an input of an earlier one (normalized text);
    `same`: pairs of splits read from one file ("same file", not counted)."""
    keys = {name: input_keys(t) for name, t in tables.items()}
    out = {}
    for later, earlier in CROSS:
        if (later, earlier) in same:
            out[f"{later}~{earlier}"] = "same file"
            continue
        known = set(keys[earlier])
        out[f"{later}~{earlier}"] = sum(k in known for k in keys[later])
        if out[f"{later}~{earlier}"]:
            log.warning("%s: %d of %d %s examples repeat a %s input (normalized text); their scores overstate "
                        "generalization", source, out[f"{later}~{earlier}"], len(keys[later]), later, earlier)
    return out


def _content_hash(tables: dict[str, dict]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tables):
        for column in sorted(tables[name]):
            values = tables[name][column]
            digest.update(f"{name}/{column}/{len(values)}".encode())
            for start in range(0, len(values), 10_000):
                digest.update(json.dumps(values[start:start + 10_000]).encode())
    return digest.hexdigest()


def split_fractions(split: dict, where: str = "data") -> list[float]:
    """[train, validation, test] fractions of `data.split` (defaults 0.8 / 0.1 / 0.1), checked: the
    one check, used by validate_config before any model loads and here when the data is split."""
    unknown = sorted(set(split) - {"train", "validation", "test", "seed"})
    if unknown:
        raise ConfigError(f"{where}.split has unknown keys {unknown}; known: train, validation, test, seed")
    fractions = [split.get("train", 0.8), split.get("validation", 0.1), split.get("test", 0.1)]
    for name, value in zip(("train", "validation", "test"), fractions):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{where}.split.{name} must be a fraction in [0, 1], got {value!r}")
    if abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"{where}.split fractions must sum to 1, got {fractions}")
    return fractions


def _dev_spec(spec) -> dict:
    if not isinstance(spec, dict):
        raise ConfigError(f"data.dev_from_train must be a mapping like {DEV_FROM_TRAIN} (or null), got {spec!r}")
    unknown = sorted(set(spec) - set(DEV_FROM_TRAIN))
    if unknown:
        raise ConfigError(f"data.dev_from_train has unknown keys {unknown}; known: {sorted(DEV_FROM_TRAIN)}")
    spec = {**DEV_FROM_TRAIN, **spec}
    for key in ("fraction", "max_fraction"):
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"data.dev_from_train.{key} must be a fraction in (0, 1), got {value!r}")
    for key in ("min_size", "seed"):
        if isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 0:
            raise ConfigError(f"data.dev_from_train.{key} must be a non-negative integer, got {spec[key]!r}")
    return spec


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
        raise ConfigError(f"data.train_examples must be a positive count or a fraction in (0, 1], got {size!r}")
    if isinstance(size, float):
        if size > 1:
            raise ConfigError(f"data.train_examples as a fraction must be at most 1, got {size}")
        size = max(1, round(size * n))
    if size > n:
        raise ConfigError(f"data.train_examples={size} but the training split has only {n} examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return part.select(sorted(order.tolist()))


def _plain(value):
    """JSON for a fingerprint: objects without a stable text (a tokenizer object) by type name."""
    return getattr(value, "content", None) or type(value).__name__  # AddedToken -> its text


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything of a tokenizer that decides its ids: class, name, vocabulary, the fast backend's
    full spec (merges, normalizer, pre-tokenizer, post-processor template), init settings."""
    if tokenizer is None:
        return "none"
    spec = {
        "class": type(tokenizer).__name__, "name": tokenizer.name_or_path,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "backend": tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else None,
        "init": tokenizer.init_kwargs, "special": tokenizer.special_tokens_map,
        "truncation_side": getattr(tokenizer, "truncation_side", None),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=_plain).encode()).hexdigest()


def task_fingerprint(task: Task) -> dict:
    """The task's type and every public setting (label names, kind, options such as a template)."""
    return {"class": type(task).__name__, **{k: v for k, v in vars(task).items() if not k.startswith("_")}}


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
        dev_from_train: dict | None = None,
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
        self.dev_from_train = dict(dev_from_train) if dev_from_train is not None else None
        # low-data regime: keep this many (int) or this fraction (float in (0, 1]) of the training
        # split, sampled with the run's seed (so seeds give different subsets, reproducibly)
        self.train_examples = train_examples
        self._resume_point: tuple[int, int] | None = None  # (epoch, samples to skip) after a mid-epoch resume
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if tokenizer is not None and tokenizer.pad_token is None:  # GPT-2, Llama: pad with end-of-sequence
            tokenizer.pad_token = tokenizer.eos_token
        self.collate = self.task.collator(tokenizer) if tokenizer is not None else None
        self.data: datasets.DatasetDict | None = None
        self.stats: dict = {}  # split sizes and duplicates (load_raw); run.py puts it in results.json

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def _recipe(self) -> dict:
        """Every setting the tokenized splits depend on, in one place: `setup` passes these (and
        nothing else) to load_raw and the task's tokenize, and the cache key hashes all of them,
        so a new input cannot be left out of the key."""
        return {
            "load": {"source": self.source, "split": self.split, "columns": self.columns, "files": self.files,
                     "subset": self.subset, "splits": self.splits, "dev_from_train": self.dev_from_train},
            "tokenize": {"max_length": self.max_length},
        }

    def _cache_files(self, recipe: dict, rows: str) -> dict[str, str] | None:
        """Cache files named by a hash of the recipe, the rows themselves (`rows`: load_raw's
        content hash: files' contents, columns, label ids, split, deduplication), the task (type,
        label names, options such as a generation separator), the tokenizer (vocabulary, rules,
        init settings such as add_prefix_space) and the versions of the code that tokenizes."""
        if self.cache_dir is None:
            return None
        folder = self.cache_dir / "tokenized" / self._digest(recipe, rows)
        folder.mkdir(parents=True, exist_ok=True)
        return {s: str(folder / f"{s}.arrow") for s in ("train", "validation", "test")}

    def _digest(self, recipe: dict, rows: str) -> str:
        key = json.dumps({
            "recipe": recipe, "rows": rows, "task": task_fingerprint(self.task),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "versions": [DATA_RULES, datasets.__version__, transformers.__version__, tokenizers.__version__],
        }, sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        recipe = self._recipe()
        raw = load_raw(task=self.task, **recipe["load"])
        for name, part in raw.parts.items():
            if len(part) == 0:
                where = self.files[name] if self.files else self.source
                raise DataError(f"data split '{name}' ({where}) is empty; check data.split / data.files")

        def tokenize(batch):
            return self.task.tokenize(batch, self.tokenizer, **recipe["tokenize"])

        # the fingerprint is our own key (it covers every input): datasets would otherwise hash the
        # `tokenize` closure with dill, slowly, and fall back to a random hash when it cannot
        files, digest = self._cache_files(recipe, raw.identity), self._digest(recipe, raw.identity)
        self.data = datasets.DatasetDict({
            name: part.map(tokenize, batched=True, remove_columns=part.column_names, desc=f"tokenize {name}",
                           cache_file_name=files[name] if files else None, new_fingerprint=f"{digest}-{name}")
            for name, part in raw.parts.items()
        })
        self.stats = raw.stats
        if self.train_examples is not None:
            self.data["train"] = subsample(self.data["train"], self.train_examples, self.seed)
            self.stats = {**raw.stats, "train_examples": len(self.data["train"])}
        log.info("data: %s", self.stats)
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
        # processed, not completed: a checkpoint written at a batch's end (on_train_batch_end: a step checkpoint,
        # every_n_train_steps) has that batch trained but not yet counted completed; a resume skipping one
        # batch too few trained it twice
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.current.processed,
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
