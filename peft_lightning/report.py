"""Compare the jobs of a multirun: a markdown table (and plots) from their results.json files.

    python -m peft_lightning.report outputs/methods/multiruns/<time> --out docs/findings/methods.md

Every job writes results.json whatever happens (run.py), so the report needs nothing else: no
W&B. The sweep's axes are the overrides that differ between jobs, and any config key that differs
between them without an override (sweeps run at different commits); `seed` is averaged over
(mean +- std, a 95% confidence interval from the t-distribution, cut and marked where it reaches past
what the metric can take, n). Values compare as Hydra
parses them (`1e-3` is 0.001). Jobs that failed, were interrupted, have no dev value, or repeat a
setting and seed another folder's job ran are listed, not averaged; each setting's wall time per
job counts every attempt, and the jobs whose time is a lower bound are named.

Settings are ranked, and the best one marked, by the best dev value of the selection metric
(`val/<metric>_best`), never by test: the test value is shown beside it, for the record.
Where settings share seeds, each is compared with the selected one (or `--baseline`) seed by
seed: the mean paired difference and its 95% confidence interval, which is narrower than the two
settings' own intervals when the seeds' draws (data order, initialisation) move both alike.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import sys
from datetime import date
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from peft_lightning.errors import UserError



def _seconds(results: dict, key: str) -> float | None:
    """`key`'s seconds summed over every attempt of a job that recorded it (an interrupted run's
    earlier attempts too; one killed before it could write, or written before the key existed, adds
    nothing); None when no attempt recorded it."""
    attempts = [a for a in (*results.get("previous_attempts", []), results) if isinstance(a, dict)]
    times = [a[key] for a in attempts if a.get(key) is not None]
    return float(sum(times)) if times else None


def _unrecorded(results: dict, key: str) -> bool:
    """Whether the job's `key` seconds are a lower bound: some attempt recorded it and another did
    not (killed outright, still running, or, for CPU seconds, run before the key existed)."""
    attempts = [a for a in (*results.get("previous_attempts", []), results) if isinstance(a, dict)]
    return _seconds(results, key) is not None and any(a.get(key) is None for a in attempts)


def wall_time(results: dict) -> float | None:
    """Seconds a job took, every attempt counted; a paused or shared machine inflates it."""
    return _seconds(results, "wall_time_s")


def cpu_time(results: dict) -> float | None:
    """CPU seconds of the job's process, every attempt counted: its cost, whatever else ran beside it."""
    return _seconds(results, "cpu_time_s")


def t_quantile(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def ci_half_width(std: float, n: int) -> float:
    """Half the 95% confidence interval of a mean of n values with sample std `std` (t, n - 1 df)."""
    return t_quantile(n - 1) * std / n ** 0.5 if n > 1 else float("nan")


# What each selection metric can take. A t-interval is symmetric and can reach past it (3 seeds, one at chance:
# F1 0.77 +- 0.65): it is shown cut at the bound. The mean lies inside the range, so the cut interval holds it
# exactly when the t-interval does. A metric not named here is never cut.
RANGE = {"acc": (0.0, 1.0), "f1": (0.0, 1.0), "bleu": (0.0, 1.0), "rougeL": (0.0, 1.0),
         "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0)}
CUT = "†"  # marks an interval cut at the metric's range


def bounded(value: float, half: float, bounds: tuple[float, float] | None) -> tuple[float, float, bool]:
    """(low, high, cut): value +- half, cut to `bounds` (a RANGE entry; for a paired difference, the range
    a difference of two such values can take); cut says whether either end moved."""
    low, high = value - half, value + half
    if bounds is None or not low <= high:  # (no range; a missing value or interval, NaN: nothing to cut)
        return low, high, False
    inside = max(low, bounds[0]), min(high, bounds[1])
    return *inside, inside != (low, high)


def metric_columns(metric: str = "acc") -> dict[str, tuple[tuple, str]]:
    """Report column -> (results.json path, or a function of it; format), for the sweep's selection metric (data.metric).
    The first column, the best dev value, is the criterion: settings are ranked and picked by it.
    The test value (of the best-dev checkpoint) is shown beside it and never ranks anything:
    choosing by test would report a test score that was selected on test."""
    return {
        f"best dev {metric}": (("metrics", "best", f"val/{metric}_best"), "{:.4f}"),
        f"test {metric}": (("metrics", "test", f"test/{metric}"), "{:.4f}"),
        "trainable": (("parameters", "trainable"), "{:,.0f}"),
        "trainable %": (("parameters", "trainable_pct"), "{:.3f}"),
        LATE: (None, "{:+.4f}"),  # read from the job's CSV log (collect), not results.json
        "train s/epoch": (("train_seconds_per_epoch",), "{:.1f}"),
        "wall s/job": (wall_time, "{:.0f}"),
        "CPU s/job": (cpu_time, "{:.0f}"),
    }


LATE = "dev gain, last third"


def dev_curve(job: Path, metric: str) -> list[float]:
    """The job's dev values of `metric` in update order, from its CSV log (csv/version_*/metrics.csv:
    a resumed job's attempts each write a version; a step logged twice keeps the later attempt's);
    [] without a CSV log (logger=none). A value at step 0 is the untrained model's (eval_before_training:
    no update yet), no evaluation of the budget: left out, as val/<metric>_best forgets it (reset_validation)."""
    import csv

    values: dict[int, float] = {}
    for file in sorted(job.glob("csv/version_*/metrics.csv"), key=lambda f: int(f.parent.name.split("_")[-1])):
        with open(file, newline="") as handle:
            for row in csv.DictReader(handle):
                value = row.get(f"val/{metric}")
                if value not in (None, "") and row.get("step") not in (None, "") and int(row["step"]) > 0:
                    values[int(row["step"])] = float(value)
    return [values[step] for step in sorted(values)]


def late_gain(curve: list[float]) -> float | None:
    """How much the best dev value rose in the last third of a run's dev evaluations: the best over
    all of them minus the best over the first two thirds (rounded up: 4 of 6 epochs). 0: selection
    had its value by two thirds of the budget; a gain beyond the seeds' spread: the budget had not
    settled for that setting. A NaN value (a Pearson correlation of constant predictions) is an
    evaluation that gives no best, as val/<metric>_best (MaxMetric) skips it. None for fewer than 3
    evaluations, or no value in the first two thirds."""
    if len(curve) < 3:
        return None
    first = [v for v in curve[:-(-2 * len(curve) // 3)] if v == v]  # (NaN != NaN; max() keeps a leading NaN)
    return max(v for v in curve if v == v) - max(first) if first else None


def _selection_metric(results: dict | None) -> str | None:
    best = (results or {}).get("metrics", {}).get("best", {})
    return next((k[4:-5] for k in best if k.startswith("val/") and k.endswith("_best")), None)


def _get(data: dict, path):
    if callable(path):
        return path(data)
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    if isinstance(data, list):  # per-epoch seconds: their median (robust to one disturbed epoch)
        return float(pd.Series(data).median()) if data else None
    return data


# overrides and config keys that are not knobs: they change where a job writes or logs, not what it computes
BOOKKEEPING = ("sweeps", "task_name", "hydra", "ckpt_path", "paths", "logger")


@functools.cache  # (built once per report, not once per cell)
def _hydra_parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _canonical(value, parse: bool = True) -> str:
    """One spelling per value, so an override and the same value read from a job's config compare
    equal: `1e-3` and 0.001, `True` and true, `[3,4,5]` and [3, 4, 5], 3.0 and 3. A string (an
    override, a --where or --baseline value) is read as Hydra reads the override, the job's own
    reading of it; `parse=False`: a config's value, already typed (a string there stays one)."""
    from hydra.errors import HydraException

    if isinstance(value, str) and parse:
        try:
            parsed = _hydra_parser().parse_override(f"k={value}").value()
        except HydraException:  # not an override value Hydra would take: as written
            return value
        if not isinstance(parsed, (str, int, float, bool, list, dict, type(None))):
            return value  # (a sweep, `a,b`: never a job's value)
        value = parsed
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canonical(v, parse=False) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_canonical(v, parse=False)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)  # (a float: its shortest repr, 0.001)


def _overrides(job: Path, results: dict | None) -> dict[str, str]:
    listed = results.get("overrides") if results else None
    if listed is None:
        file = job / ".hydra" / "overrides.yaml"
        listed = [line[2:].strip() for line in file.read_text().splitlines() if line.startswith("- ")] \
            if file.is_file() else []
    pairs = (item.lstrip("+").split("=", 1) for item in listed if "=" in item)
    return {k: _canonical(v) for k, v in pairs if not k.startswith(BOOKKEEPING)}


UNSET = "(unset)"  # a key a job's config does not have (a sweep run before the key existed)


@functools.cache
def _job_config(job: Path) -> tuple[dict, dict] | None:
    """A job's Hydra record: (its config groups' choices from .hydra/hydra.yaml, its composed
    config from .hydra/config.yaml, interpolations unresolved); None where it has none."""
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml"), resolve=False)
        try:
            choices = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.choices)
        except (OSError, ValueError, AttributeError):
            choices = {}
    except (OSError, ValueError):
        return None
    return choices, config


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a config tree; a list is one value."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def _configured(job: Path, key: str) -> str | None:
    """What a job ran with for `key` when it did not override it: a config group's choice
    (`method`, `data`) from .hydra/hydra.yaml, else the value at `key` in .hydra/config.yaml
    (UNSET where that config has no such key); None: the job has no config."""
    record = _job_config(job)
    if record is None:
        return None
    choices, node = record
    if key in choices:
        return _canonical(choices[key], parse=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return UNSET
        node = node[part]
    return _canonical(node, parse=False)


def _hidden_axes(frame: pd.DataFrame, knobs: list[str]) -> list[str]:
    """Config keys no job overrode whose value differs between the jobs (sweeps run at different
    commits, a default changed): the jobs did not differ in their override axes alone. A key a
    config group's choice sets (method.optim.lr under `method`) is no such difference where it is
    one value within each choice."""
    leaves, ignore = {}, (*BOOKKEEPING, "seed")
    for i, job in frame["_path"].items():
        record = _job_config(job)
        if record is not None:
            leaves[i] = {k: _canonical(v, parse=False) for k, v in _leaves(record[1]) if not k.startswith(ignore)}
    if len(leaves) < 2:
        return []
    table = pd.DataFrame.from_dict(leaves, orient="index").fillna(UNSET)
    found = []
    for key in table.columns:
        if key in frame.columns or table[key].nunique() < 2:
            continue
        groups = [k for k in knobs if key.startswith(k + ".")]
        if any((table[key].groupby(frame.loc[table.index, k].astype(str)).nunique() <= 1).all() for k in groups):
            continue
        found.append(key)
    for key in found:
        frame[key] = table[key].reindex(frame.index)
    return found


def collect(multirun: Path | list[Path], where: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per job directory (any folder with results.json or .hydra/ under `multirun`, or under
    each of several sweep folders: arms of one question run as separate sweeps; a folder named
    twice, or inside another named one, counts once). An axis a job did not override holds the
    value it ran with (its .hydra config), so a default-setting job from one sweep pairs with the
    varied settings of another; so does `seed`. A config key no job overrode that still differs
    between jobs becomes an axis too (`attrs["hidden"]`). `where`: keep the jobs with these values
    only. `_skip` says why a job is not counted: it did not complete, it has no best dev value, or
    an earlier folder's job already ran its setting and seed."""
    folders = [multirun] if isinstance(multirun, Path) else list(multirun)
    _job_config.cache_clear()  # (a sweep in progress rewrites its folders: read them afresh)
    rows, found, seen = [], [], set()
    for folder in folders:
        for job in sorted({p.parent for p in folder.rglob("results.json")} | {p.parent for p in folder.rglob(".hydra")},
                          key=lambda p: (len(p.parts), p.parent.as_posix(), p.name.zfill(6))):
            if job.resolve() in seen:
                continue
            seen.add(job.resolve())
            file = job / "results.json"
            results = json.loads(file.read_text()) if file.is_file() else None
            relative = job.relative_to(folder).as_posix()
            found.append((relative if len(folders) == 1 else f"{folder.name}/{relative}", job, results))
    metric = next((m for _, _, r in found if (m := _selection_metric(r))), "acc")
    columns = metric_columns(metric)
    for name, job, results in found:
        row = {"job": name, "_path": job, **_overrides(job, results)}
        row["status"] = results.get("status", "unknown") if results else "no results.json"
        row["error"] = (results or {}).get("error", "")
        row["_selection"] = str((results or {}).get("selection", ""))
        row["_unvalidated"] = (results or {}).get("unvalidated_updates") or 0
        for column, (path, _) in columns.items():
            row[column] = _get(results or {}, path) if path is not None else None
        # (a finished job's log only: a running one's is being rewritten, and it is not counted anyway)
        curve = dev_curve(job, metric) if row["status"] == "completed" else []
        row[LATE], row["_evals"] = (late_gain(curve) if row["status"] == "completed" else None), len(curve)
        row["_unrecorded"] = [key for key in ("wall_time_s", "cpu_time_s") if _unrecorded(results or {}, key)]
        if row["_selection"].startswith("last"):  # its test is the last model's, not a best-dev checkpoint's:
            row[list(columns)[1]] = float("nan")  # its dev value counts (the best dev seen), its test does not
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no job directories (results.json or .hydra/) under {', '.join(map(str, folders))}")
    frame = pd.DataFrame(rows)
    knobs = [c for c in frame.columns if c not in (*META, "seed", *columns)]
    for key in [*knobs, "seed", *(k for k in (where or {}) if k not in knobs)]:
        if key not in frame.columns:
            frame[key] = None
        missing = frame[key].isna()
        frame.loc[missing, key] = [_configured(p, key) for p in frame.loc[missing, "_path"]]
    for key, value in (where or {}).items():
        frame = frame[frame[key] == _canonical(value)]
    if frame.empty:
        raise UserError(f"--where: no job has {where}")
    frame = frame.copy()
    frame.attrs["hidden"] = _hidden_axes(frame, knobs)
    frame.attrs["metric"] = metric
    dev = list(columns)[0]

    def skip(row) -> str:
        if row["status"] != "completed":
            return f"{row['status']}: {row['error']}" if row["error"] else row["status"]
        if pd.isna(row[dev]):
            return f"completed, no {dev}: not counted"
        return ""

    frame["_skip"] = [skip(row) for _, row in frame.iterrows()]
    first: dict[tuple, str] = {}  # (every knob's value, seed) -> the job counted for it
    setting = [c for c in frame.columns if c not in (*META, *columns)]
    for i, row in frame.iterrows():
        if row["_skip"] or pd.isna(row["seed"]) or row["seed"] == UNSET:
            continue
        key = tuple(str(row[c]) for c in setting)
        if key in first:
            frame.loc[i, "_skip"] = f"completed, the same setting and seed as job {first[key]}: not counted"
        else:
            first[key] = row["job"]
    return frame


def _columns(frame: pd.DataFrame) -> dict[str, tuple[tuple, str]]:
    return metric_columns(frame.attrs.get("metric", "acc"))


# a job's record, not its settings
META = ("job", "_path", "_unrecorded", "_skip", "_selection", "_unvalidated", "_evals", "status", "error")


def axes(frame: pd.DataFrame) -> list[str]:
    """The overrides that vary between jobs (the sweep's axes), seed excluded, and the config keys
    that differ without an override (collect's `hidden`)."""
    skip = {*META, "seed", *_columns(frame)}
    return [c for c in frame.columns if c not in skip and frame[c].astype(str).nunique() > 1]


def _counted(frame: pd.DataFrame) -> pd.DataFrame:
    """The jobs the table averages: completed, with a best dev value, each setting and seed once."""
    return frame[frame["_skip"] == ""] if "_skip" in frame else frame[frame["status"] == "completed"]


def _cell(value) -> str:
    """An axis value as the settings are told apart (a missing one is 'nan', wherever it was read)."""
    return "nan" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Counted jobs grouped by the sweep's axes: mean, std over seeds and the half-width of the
    95% confidence interval of the mean (`<column> ci`; t-distribution, n - 1 df) of every metric.
    Without axes, one setting: its seeds are averaged (`setting` names its fixed overrides), and
    where no seeds tell its jobs apart, a row per job."""
    done = _counted(frame)
    keys = axes(frame)
    if not keys:
        seeds = done["seed"].dropna() if "seed" in done else []
        if len(set(seeds)) > 1:
            fixed = [c for c in frame.columns if c not in (*META, "seed", *_columns(frame)) and c in done]
            label = ", ".join(f"{c}={_setting(done[c].iloc[0])}" for c in fixed if not pd.isna(done[c].iloc[0]))
            done, keys = done.assign(setting=label or "all jobs"), ["setting"]
        else:
            keys = ["job"]
    columns = list(_columns(frame))
    grouped = done.groupby(keys, sort=False, dropna=False)
    out = grouped[columns].mean()
    std = grouped[columns].std()
    count = grouped[columns].count()
    out["n"] = grouped.size()
    if LATE in columns:
        out[LATE + " n"] = count[LATE]  # the seeds whose CSV log gave a curve
    for column in columns:
        out[column + " std"] = std[column]
        out[column + " ci"] = [ci_half_width(s, n) for s, n in zip(std[column], count[column])]
    return out.reset_index()


class NothingToCompare(UserError):
    """A comparison whose arms are not all in yet (one arm's jobs missing, running, failed or without a
    seed): no page, rather than one that reads as a finished comparison. Exit 3, which regenerate.sh
    reports as a skipped page, not a failed one."""

    exit_code = 3


def _pairs(values: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def _check_baseline(frame: pd.DataFrame, keys: list[str], done: pd.DataFrame, baseline: dict[str, str]) -> None:
    """Before pairing: a --baseline key no job has is a typo (exit 2); a baseline with nothing to pair
    against it, or no counted run of its own, is a comparison not in yet (NothingToCompare)."""
    def value(row, key):  # what the job ran with: its override, else its config's value
        cell = row[key] if key in frame.columns else None
        return _configured(row["_path"], key) if cell is None or pd.isna(cell) else cell

    known = [k for k in baseline if k in frame.columns
             or any(_configured(p, k) not in (None, UNSET) for p in frame["_path"])]
    unknown = sorted(set(baseline) - set(known))
    if unknown:
        raise UserError(f"--baseline: {', '.join(unknown)} is no key of these jobs (their axes: "
                        f"{', '.join(keys) or 'none, one setting'})")
    is_base = [all(_cell(value(row, k)) == _cell(v) for k, v in baseline.items()) for _, row in frame.iterrows()]
    counted = frame.index.isin(done.index)
    mine, others = frame[is_base], frame[[not b for b in is_base]]
    if not len(mine):
        raise (NothingToCompare if keys == [] else UserError)(
            f"--baseline {_pairs(baseline)}: no job ran it" + (" (its arm not in yet?)" if not keys else ""))

    def none_counted(jobs: pd.DataFrame, whose: str) -> None:
        if frame.index[counted].isin(jobs.index).any():
            return
        seedless = jobs[jobs["_skip"] == ""]  # (completed, but no seed to pair by: the command's to fix)
        if len(seedless):
            raise UserError(f"--baseline {_pairs(baseline)}: {whose} {len(seedless)} completed job(s) name no seed, "
                            "and the comparison pairs by seed")
        raise NothingToCompare(f"--baseline {_pairs(baseline)}: none of {whose} {len(jobs)} job(s) counted yet "
                               f"({', '.join(sorted(set(jobs['_skip'])))})")

    none_counted(mine, "its")
    if not len(others):
        raise NothingToCompare(f"--baseline {_pairs(baseline)}: every job ran it, nothing to compare with it "
                               "(the other arm's folder missing or not in yet?)")
    none_counted(others, "the other settings'")


def paired(frame: pd.DataFrame, baseline: dict[str, str] | None = None) -> tuple[dict, pd.DataFrame]:
    """Every setting against one reference, seed by seed, over the seeds both ran: (the reference
    setting, one row per other setting with n and, for the dev and the test metric, the mean
    difference setting - reference and the half-width of its 95% confidence interval). The
    reference is `baseline` (axis -> value: values of some axes), else the setting selection picks
    (best mean dev). A baseline that matches several settings (it leaves an axis free, like the train
    size of a transfer sweep) is a reference per value of the free axes: each setting is paired with the
    baseline setting at its own values of them, and the returned reference is `baseline` itself. The free
    axes are those whose value differs between the baseline's settings: an axis where they all agree
    tells no reference from another, and grouping by it would leave unpaired every setting that differs
    there (`--baseline experiment=null`: a preset's head type and warmup, which no default run has).
    The settings left without a reference: `diffs.attrs["unpaired"]`."""
    keys = axes(frame)
    dev, test = list(_columns(frame))[:2]
    done = _counted(frame)
    if "seed" in done.columns:
        done = done[done["seed"].notna() & (done["seed"] != UNSET)]  # (a job without a known seed pairs with none)
    if baseline is not None:  # (a comparison page that compares nothing, an arm not in yet, would read as finished)
        _check_baseline(frame, keys, done, baseline)
    if not keys or "seed" not in done.columns:  # (no job names a seed: ranked, not paired; the page says so)
        return {}, pd.DataFrame()

    def setting(row) -> tuple:
        return tuple(_cell(row[k]) for k in keys)

    by_setting: dict[tuple, dict[str, pd.Series]] = {}
    for _, row in done.iterrows():
        by_setting.setdefault(setting(row), {})[str(row["seed"])] = row
    free: list[int] = []  # axes the reference leaves free: each setting is paired at its own values of them
    if baseline is None:
        ranked = [setting(row) for _, row in rank(summarize(frame), dev).iterrows()]
        reference = next((s for s in ranked if s in by_setting), None)
        if reference is None:
            return {}, pd.DataFrame()
        references = {(): reference}
    else:
        unknown = sorted(set(baseline) - set(keys))
        if unknown:
            raise UserError(f"--baseline: {', '.join(unknown)} is not an axis of this table "
                            f"(its axes: {', '.join(keys)})")
        matches = [s for s in by_setting if all(s[keys.index(k)] == _cell(v) for k, v in baseline.items())]
        if not matches:
            raise UserError(f"--baseline: no completed job with a seed has {baseline}")
        # `method.init=random` over train sizes: a reference per train size (every setting the baseline
        # matches is a reference: they differ in at least one free axis)
        free = [i for i in range(len(keys)) if len({s[i] for s in matches}) > 1]
        references = {tuple(s[i] for i in free): s for s in matches}
    rows, unpaired = [], []
    for other, runs in by_setting.items():
        reference = references.get(tuple(other[i] for i in free))
        if reference is None:  # no baseline run at its values of the free axes
            unpaired.append(dict(zip(keys, other)))
        if reference is None or other == reference:
            continue
        seeds = [s for s in runs if s in by_setting[reference]]
        row = dict(zip(keys, other), n=len(seeds))
        for column in (dev, test):
            diffs = (pd.to_numeric(pd.Series([runs[s][column] for s in seeds], dtype=object), errors="coerce")
                     - pd.to_numeric(pd.Series([by_setting[reference][s][column] for s in seeds], dtype=object),
                                     errors="coerce")).dropna()  # (a missing value: None or NaN, not paired)
            row[column] = diffs.mean() if len(diffs) else float("nan")
            row[column + " ci"] = ci_half_width(diffs.std(), len(diffs)) if len(diffs) > 1 else float("nan")
        rows.append(row)
    label = dict(baseline) if free else dict(zip(keys, next(iter(references.values()))))
    diffs = pd.DataFrame(rows)
    diffs.attrs["unpaired"], diffs.attrs["free"] = unpaired, [keys[i] for i in free]
    return label, diffs


def markdown(frame: pd.DataFrame, title: str, command: str | None = None, preface: list[str] = (),
             baseline: dict[str, str] | None = None) -> str:
    summary = summarize(frame)
    columns = _columns(frame)
    dev, test = list(columns)[:2]
    keys = [c for c in summary.columns if c not in columns and not c.endswith((" std", " ci", " n")) and c != "n"]
    many = bool((summary["n"] > 1).any())
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Produced by `{command}`", ""]
    lines += [_machine(), "", *preface]
    if frame.attrs.get("hidden"):
        # (an experiment= preset sets knobs no override names: its arm differs in those by design, not by a commit)
        cause = ("the experiment= preset some jobs ran, or sweeps run at different commits with a changed default"
                 if "experiment" in frame.columns else "sweeps run at different commits, a changed default")
        lines += ["Axes that no job overrode but that differ between the jobs' .hydra/config.yaml "
                  f"({cause}): {', '.join(frame.attrs['hidden'])}.", ""]
    lines += [f"Ranked by {dev} (the selection metric; ties in job order); {test} is the test score of each "
              "run's best-dev checkpoint, shown alongside, never used to rank."
              + (" Over seeds: mean ± std, and the 95% confidence interval of the mean (t-distribution)."
                 if many else "") + " wall s/job and CPU s/job count every attempt of a job that recorded them (a process killed outright records nothing); CPU s/job (the job "
              "process's CPU seconds, every thread) is its cost whatever else shared or paused the machine, which "
              f"wall time is not. {LATE}: the best dev value over all of a run's evaluations minus the best over "
              "its first two thirds (mean over seeds): a setting still rising at the end of the budget.", ""]
    bounds = RANGE.get(frame.attrs.get("metric", "acc"))
    uncut = []  # the t-intervals shown cut at the metric's range (CUT), as they were

    def interval_cell(value: float, half: float, fmt: str, name: str, within=bounds) -> str:
        low, high, moved = bounded(value, half, within)
        uncut.extend([f"{name}: [{fmt.format(value - half)}, {fmt.format(value + half)}]"] if moved else [])
        return f"[{fmt.format(low)}, {fmt.format(high)}]" + (CUT if moved else "")

    header = []
    for column in columns:
        header += [column] + ([f"{'dev' if column == dev else 'test'} 95% CI"] if many and column in (dev, test) else [])
    header = keys + header + (["n"] if many else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in rank(summary, dev).iterrows():
        cells = [_setting(row[k]) for k in keys]
        for column, (_, fmt) in columns.items():
            value, spread, half = row[column], row[column + " std"], row[column + " ci"]
            cell = "" if pd.isna(value) else fmt.format(value)
            if many and not pd.isna(spread) and column in (test, dev):
                cell += " ± " + fmt.format(spread)
            if column == LATE and cell and row[LATE + " n"] < row["n"]:  # (seeds without a CSV log: not averaged in)
                cell += f" ({int(row[LATE + ' n'])} of {int(row['n'])} seeds)"
            cells.append(cell)
            if many and column in (dev, test):
                cells.append("" if pd.isna(half) else interval_cell(
                    value, half, fmt, f"{', '.join(_setting(row[k]) for k in keys)}, {column}"))
        if many:
            cells.append(str(int(row["n"])))
        lines.append("| " + " | ".join(cells) + " |")
    rising = [(row, row[LATE], row[dev + " std"]) for _, row in rank(summary, dev).iterrows()
              if row[LATE] > 0 and (pd.isna(row[dev + " std"]) or row[LATE] > row[dev + " std"])]
    if rising:  # (a flat noisy curve gains a little by the max of more evaluations too: hence beyond the spread)
        lines += ["", "Best dev still rising in the last third of the evaluations (by more than the seeds' std of best "
                  "dev, or with one seed): a longer budget may move "
                  + ("this setting" if len(rising) == 1 else "these settings") + ": "
                  + "; ".join(f"{', '.join(f'{k}={_setting(row[k])}' for k in keys)} ({gain:+.4f}"
                              + (f" > {std:.4f})" if not pd.isna(std) else ", one seed)") for row, gain, std in rising)
                  + "."]
    counted = _counted(frame)
    unmeasured = counted[counted[LATE].isna()]
    if len(unmeasured):  # (a blank gain is no "settled": say whose budget this page cannot judge, and why)
        why: dict[str, list[str]] = {}
        for _, row in unmeasured.iterrows():
            n = int(row["_evals"])
            why.setdefault("no CSV log with a dev value" if n == 0
                           else f"{n} dev evaluation{'s' * (n != 1)}, and the measure needs 3; the curve is in the CSV log"
                           if n < 3 else "no dev value in the first two thirds of the evaluations", []).append(str(row["job"]))
        if len(unmeasured) == len(counted) and len(why) == 1:
            lines += ["", f"The \"{LATE}\" is not measured for any job of this table ({next(iter(why))}), so this page "
                      "does not say whether any setting's budget had settled."]
        else:
            lines += ["", f"The \"{LATE}\" is not measured for {len(unmeasured)} of the {len(counted)} jobs this table "
                      "counts, so this page does not say whether their budget had settled: "
                      + "; ".join("job " + ", ".join(jobs[:8]) + (f" and {len(jobs) - 8} more" if len(jobs) > 8 else "")
                                  + f" ({reason})" for reason, jobs in why.items()) + "."]
    wall, cpu = frame["wall s/job"].dropna(), frame["CPU s/job"].dropna()
    if len(wall):
        n_jobs = f"{len(wall)} job{'s' * (len(wall) != 1)}"
        line = f"Wall time: {_duration(wall.sum())} for {n_jobs} (mean {wall.mean():.0f} s per job)"
        if len(cpu):
            line += (f"; CPU time: {_duration(cpu.sum())}"
                     + (f" for {len(cpu)} of them" if len(cpu) != len(wall) else "")
                     + f" (mean {cpu.mean():.0f} s per job)")
        lines += ["", line + "."]
        for key, what in (("wall_time_s", "wall"), ("cpu_time_s", "CPU")):
            partial = [row["job"] for _, row in frame.iterrows() if key in row["_unrecorded"]]
            if partial:
                lines += ["", f"{what.capitalize() if what == 'wall' else what} seconds are lower bounds (an attempt "
                          f"recorded no {what} time: killed outright, still running"
                          + (", or run before cpu_time_s existed" if what == "CPU" else "")
                          + f"): job {', '.join(partial)}."]
    reference, diffs = paired(frame, baseline)
    if len(diffs) and (diffs["n"] > 1).any():
        name = ", ".join(f"{k}={_setting(v)}" for k, v in reference.items())
        shown = [k for k in axes(frame) if k in diffs.columns]  # every axis: a grouped baseline leaves some free
        within = diffs.attrs["free"]
        at = f" at the same {', '.join(within)}" if within else ""
        lines += ["", f"Paired by seed against {name}{at} ({'the baseline' if baseline else 'the selected setting'}): "
                  f"the mean of (setting - {name}) over the seeds both ran, and its 95% confidence interval. "
                  "An interval that excludes 0 is a difference the seeds support.", ""]
        header = shown + [f"Δ {dev}", "95% CI", f"Δ {test}", "95% CI", "seeds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        fmt = columns[dev][1]
        for _, row in diffs.sort_values(dev, ascending=False, kind="stable").iterrows():
            cells = [_setting(row[k]) for k in shown]
            for column in (dev, test):
                value, half = row[column], row[column + " ci"]
                cells.append("" if pd.isna(value) else f"{value:+.4f}")
                span = bounds and (bounds[0] - bounds[1], bounds[1] - bounds[0])  # (setting - reference)
                cells.append("" if pd.isna(half) else interval_cell(
                    value, half, "{:+.4f}", f"{', '.join(_setting(row[k]) for k in shown)}, Δ {column}", span))
            cells.append(str(int(row["n"])))
            lines.append("| " + " | ".join(cells) + " |")
    elif baseline is not None and not len(diffs):
        lines += ["", f"Not paired by seed against {_pairs(baseline)}: no job names a seed."]
    elif len(diffs) and baseline is not None:  # (no interval from under two seeds: said, so a page without the table reads as unfinished)
        name = ", ".join(f"{k}={_setting(v)}" for k, v in reference.items())
        shared = [", ".join(f"{k}={_setting(row[k])}" for k in axes(frame) if k in diffs.columns)
                  + f": {int(row['n'])}" for _, row in diffs.iterrows()]
        lines += ["", f"Not paired by seed against {name}: no setting shares two seeds with it (seeds shared: "
                  f"{'; '.join(shared)})."]
    if diffs.attrs.get("unpaired"):  # (a baseline that leaves axes free: none at these settings' values of them)
        lines += ["", f"Not paired (no {', '.join(f'{k}={v}' for k, v in reference.items())} run at their values "
                  "of the other axes):", ""]
        lines += [f"- {', '.join(f'{k}={_setting(v)}' for k, v in s.items())}" for s in diffs.attrs["unpaired"]]
    skipped = frame[frame["_skip"] != ""]
    if len(skipped):
        lines += ["", "Jobs not counted:", ""]
        for _, row in skipped.iterrows():
            what = ", ".join(f"{k}={row[k]}" for k in axes(frame)) or row["job"]
            lines.append(f"- job {row['job']} ({what}): {row['_skip']}")
    last = _counted(frame)
    last = last[last["_selection"].str.startswith("last")]
    if len(last):
        lines += ["", f"Jobs whose {test} is not counted (they tested the last model, not a best-dev checkpoint; "
                  f"their {dev} is):", ""]
        for _, row in last.iterrows():
            what = ", ".join(f"{k}={row[k]}" for k in axes(frame)) or row["job"]
            lines.append(f"- job {row['job']} ({what}): selection {row['_selection']}")
    cut = _counted(frame)
    cut = cut[cut["_unvalidated"] > 0]
    if len(cut):  # counted (dev still selected what it saw), but the budget is not what the command says
        lines += ["", "Jobs whose last updates no validation saw (their selection never saw them):", ""]
        for _, row in cut.iterrows():
            what = ", ".join(f"{k}={row[k]}" for k in axes(frame)) or row["job"]
            lines.append(f"- job {row['job']} ({what}): the last {int(row['_unvalidated'])} updates")
    if uncut:
        metric = frame.attrs.get("metric", "acc")
        lines += ["", f"{CUT} The t-interval reaches past what {metric} can take ({bounds[0]:g} to {bounds[1]:g}; a "
                  f"paired difference {bounds[0] - bounds[1]:g} to {bounds[1] - bounds[0]:g}): shown cut at the "
                  "bound. The mean lies inside the range, so the cut interval holds it exactly when the t-interval "
                  "does. An interval past the range says the t-interval's normal model fits these seeds poorly (a "
                  "mean near the bound, or seeds that disagree). "
                  f"Before the cut: {'; '.join(uncut)}."]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"


def rank(summary: pd.DataFrame, dev: str) -> pd.DataFrame:
    """Best dev value first (selection maximizes); a stable sort, so ties keep the sweep's job order."""
    return summary.sort_values(dev, ascending=False, na_position="last", kind="stable")


def _setting(value) -> str:
    """An axis value for the table: Optuna's sampled floats to 4 significant digits."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return text if number.is_integer() else f"{number:.4g}"


def _optuna_best(multirun: Path, metric: str) -> list[str]:
    """The Optuna sweeper's verdict (optimization_results.yaml), when the multirun has one."""
    file = multirun / "optimization_results.yaml"
    if not file.is_file():
        return []
    import yaml

    found = yaml.safe_load(file.read_text()) or {}
    params = ", ".join(f"{k}={_setting(v)}" for k, v in (found.get("best_params") or {}).items())
    return [f"Optuna's best trial: {params} (best dev {metric} {found.get('best_value')})", ""]


def _numeric(values) -> bool:
    try:
        [float(v) for v in values]
        return True
    except (TypeError, ValueError):
        return False


def plots(frame: pd.DataFrame, directory: Path, stem: str = "report", metric: str | None = None) -> list[Path]:
    """PNG plots of the selection metric (mean, error bars = 95% CI over seeds): the best dev value
    (solid; a star marks each line's best-dev setting, the one selection picks) with the test
    value of the same runs beside it (dashed), against each numeric axis (a line per combination
    of the other axes), or as points side by side when every axis is categorical. `stem`: the report's
    file name, which starts each plot's. `metric`: one report column alone instead."""
    summary = summarize(frame)
    keys = [c for c in axes(frame) if c in summary.columns]
    dev, test = list(_columns(frame))[:2]
    # (the range is the selection metric's: another column, trainable % or s/job, is never cut)
    bounds = RANGE.get(frame.attrs.get("metric", "acc")) if metric in (None, dev, test) else None
    return plot_summary(summary, keys, directory, stem, [metric] if metric else [dev, test], bounds)


def plot_summary(summary: pd.DataFrame, keys: list[str], directory: Path, stem: str, metrics: list[str],
                 bounds: tuple[float, float] | None = None) -> list[Path]:
    """The plots of `plots` from a summary (summarize's frame: the metric columns, their " ci"
    columns and the axis columns `keys`); the first of `metrics`, where it is the best dev value
    (the criterion), is starred. Error bars are cut at `bounds`, the metrics' range (as the table's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not keys or summary[metrics[0]].isna().all():
        return []
    written = []
    numeric = [k for k in keys if _numeric(summary[k].dropna())]
    for x in numeric or keys[:1]:
        others = [k for k in keys if k != x]
        data = summary
        if x not in numeric:
            # a knob some settings do not have (LoRA+'s method.optim.lr_ratio beside methods without it) is part
            # of those settings' names, not a crossing: a group per value would give its (unset) settings a
            # line and a star of their own
            fold = [k for k in others if (summary[k].astype(str) == UNSET).any()]
            if fold:
                data = summary.assign(**{x: [", ".join([str(row[x]), *(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in fold
                                                                      if str(row[k]) != UNSET)])
                                             for _, row in summary.iterrows()]})
                others = [k for k in others if k not in fold]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        groups = list(data.groupby(others, sort=False)) if others else [((), data)]
        # categorical x: one category order for every group (a group may lack a category or list them in
        # another order), and a slot per (group, metric) inside each category, so no two points share a place
        cats = list(dict.fromkeys(data[x].astype(str))) if x not in numeric else []
        slots = len(groups) * len(metrics)
        width = 0.8 / slots
        place = lambda number, i: (number * len(metrics) + i - (slots - 1) / 2) * width  # noqa: E731
        starred = False
        for number, (label, part) in enumerate(groups):
            label = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,)))
            part = part.sort_values(x, key=lambda c: c.astype(float)) if x in numeric else part
            color = f"C{number % 10}"
            for i, metric in enumerate(metrics):
                name = f"{label}, {metric}" if label else metric
                ends = [bounded(v, h, bounds)[:2] for v, h in zip(part[metric], part[metric + " ci"].fillna(0))]
                yerr = [[v - low for v, (low, _) in zip(part[metric], ends)],
                        [high - v for v, (_, high) in zip(part[metric], ends)]]
                style = dict(label=name, color=color, alpha=1.0 if i == 0 else 0.6)
                if x in numeric:
                    where = list(part[x].astype(float))
                    ax.errorbar(where, part[metric], yerr=yerr, capsize=3,
                                marker="o" if i == 0 else "s", linestyle="-" if i == 0 else "--",
                                mfc=color if i == 0 else "none", **style)
                else:  # points, not bars: a bar starts at 0, and 0.01 apart at 0.85 would look equal
                    where = [cats.index(v) + place(number, i) for v in part[x].astype(str)]
                    ax.errorbar(where, part[metric], yerr=yerr, capsize=3,
                                marker="o" if i == 0 else "s", linestyle="none", mfc=color if i == 0 else "none",
                                **style)
                # a single value has no interval: without a word its bare point would look exact. Its own
                # count, not the setting's jobs (n): seeds without this metric (test=false) leave one value
                for at, value, ci in zip(where, part[metric], part[metric + " ci"]):
                    if pd.notna(value) and pd.isna(ci):  # (ci_half_width: NaN for fewer than 2 values)
                        ax.annotate("n=1", (at, value), textcoords="offset points", xytext=(4, -9),
                                    fontsize=6, color=color)
            # the setting selection picks: best dev, never best test (a plot of test alone has no star)
            if metrics[0].startswith("best dev") and part[metrics[0]].notna().any():
                best = rank(part.sort_index(), metrics[0]).iloc[0]  # (a tie: the first in job order, as the table)
                at = float(best[x]) if x in numeric else cats.index(str(best[x])) + place(number, 0)
                ax.plot([at], [best[metrics[0]]], marker="*", markersize=16, color=color, markeredgecolor="black",
                        linestyle="none", label=None if starred else f"selected: highest {metrics[0]}")
                starred = True
        if cats:
            tilt = sum(map(len, cats)) > 40  # (method names side by side would overlap)
            ax.set_xticks(range(len(cats)), cats, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        spread = data[x].astype(float).max() / max(data[x].astype(float).min(), 1e-12) if x in numeric else 1
        if spread > 10:  # prefix lengths, example counts: powers of 2; learning rates: decades
            ax.set_xscale("log", base=10 if spread > 1000 else 2)
        ax.set_xlabel(x)
        seeds = int(data["n"].max()) if "n" in data else 1
        ax.set_ylabel(" / ".join(metrics))
        if seeds > 1:
            cut = any(bounded(v, h, bounds)[2] for m in metrics for v, h in zip(data[m], data[m + " ci"].fillna(0)))
            ax.set_title(f"mean over seeds (up to {seeds}); error bars: 95% confidence interval"
                         + (f" (cut at {metrics[0].split()[-1]}'s range)" if cut else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        # named after the report too: two reports in one folder (docs/findings/) never overwrite each other's plot
        path = directory / f"{stem}_{metrics[0].replace(' ', '_')}_vs_{x.replace('.', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu})"
    return (f"Machine: {device}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
            f"{transformers.__version__}; report written {date.today().isoformat()}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_lightning.report", description=__doc__.splitlines()[0])
    parser.add_argument("multirun", type=Path, nargs="+",
                        help="a multirun directory (outputs/<task>/multiruns/<time>), or several: one table")
    parser.add_argument("--where", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                        help="only the jobs that ran with these values (e.g. method=ptuning_v2)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: <multirun>/report.md)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--no-plots", action="store_true", help="the table only")
    parser.add_argument("--baseline", default=None, metavar="AXIS=VALUE[,AXIS=VALUE]",
                        help="the setting paired comparisons are made against (default: the selected one)")
    args = parser.parse_args(argv)
    for folder in args.multirun:
        if not folder.is_dir():
            parser.error(f"{folder} is not a directory")

    def pairs(text: str | None, flag: str) -> dict[str, str] | None:
        items = [item.split("=", 1) for item in text.split(",")] if text else []
        if any(len(item) != 2 for item in items):
            parser.error(f"{flag} takes KEY=VALUE[,KEY=VALUE], got {text!r}")
        return {k: _canonical(v) for k, v in items} or None

    where, baseline = pairs(args.where, "--where"), pairs(args.baseline, "--baseline")
    # shell-quoted, so the page's command pastes as run (titles have spaces and parentheses)
    command = "python -m peft_lightning.report " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:  # no jobs, none with --where's values, a --baseline key no job has: user errors, one line, exit 2
        frame = collect(args.multirun, where)
        text = markdown(frame, args.title or f"Results of {', '.join(map(str, args.multirun))}", command,
                        preface=[line for f in args.multirun for line in _optuna_best(f, frame.attrs["metric"])],
                        baseline=baseline)
    except NothingToCompare as error:  # (not a mistake in the command: an arm not in yet; regenerate.sh skips it)
        print(f"nothing to compare, no page written: {error}", file=sys.stderr)
        return error.exit_code
    except (FileNotFoundError, UserError) as error:
        parser.error(str(error))
    out = args.out or args.multirun[0] / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        for path in plots(frame, out.parent, out.stem):
            text += f"\n![{path.stem}]({quote(path.name)})\n"  # (quoted: the report's name may hold a space)
    out.write_text(text)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
