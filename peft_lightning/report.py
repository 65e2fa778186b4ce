"""Compare the jobs of a multirun: a markdown table (and plots) from their results.json files.

    python -m peft_lightning.report outputs/methods/multiruns/<time> --out docs/methods.md

Every job writes results.json whatever happens (run.py), so the report needs nothing else: no
W&B. The sweep's axes are the overrides that differ between jobs; `seed` is averaged over
(mean +- std, a 95% confidence interval from the t-distribution, n). Jobs that failed or were
interrupted are listed with their error; each setting's wall time per job counts every attempt.

Settings are ranked, and the best one marked, by the best dev value of the selection metric
(`val/<metric>_best`), never by test: the test value is shown beside it, for the record.
Where settings share seeds, each is compared with the selected one (or `--baseline`) seed by
seed: the mean paired difference and its 95% confidence interval, which is narrower than the two
settings' own intervals when the seeds' draws (data order, initialisation) move both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

import pandas as pd



def _seconds(results: dict, key: str) -> float | None:
    """`key`'s seconds summed over every attempt of a job that recorded it (an interrupted run's
    earlier attempts too; one killed before it could write, or written before the key existed, adds
    nothing); None when no attempt recorded it."""
    attempts = [a for a in (*results.get("previous_attempts", []), results) if isinstance(a, dict)]
    times = [a[key] for a in attempts if a.get(key) is not None]
    return float(sum(times)) if times else None


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
        "train s/epoch": (("train_seconds_per_epoch",), "{:.1f}"),
        "wall s/job": (wall_time, "{:.0f}"),
        "CPU s/job": (cpu_time, "{:.0f}"),
    }


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


BOOKKEEPING = ("sweeps", "task_name", "hydra.", "ckpt_path")  # overrides that are not knobs


def _canonical(value) -> str:
    """One spelling per value, so an override (`[3,4,5]`, `true`) and the same value read from a job's
    config (`[3, 4, 5]`, True) compare equal."""
    import yaml

    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _overrides(job: Path, results: dict | None) -> dict[str, str]:
    listed = results.get("overrides") if results else None
    if listed is None:
        file = job / ".hydra" / "overrides.yaml"
        listed = [line[2:].strip() for line in file.read_text().splitlines() if line.startswith("- ")] \
            if file.is_file() else []
    pairs = (item.lstrip("+").split("=", 1) for item in listed if "=" in item)
    return {k: _canonical(v) for k, v in pairs if not k.startswith(BOOKKEEPING)}


def _configured(job: Path, key: str) -> str | None:
    """What a job ran with for `key` when it did not override it: a config group's choice
    (`method`, `data`) from .hydra/hydra.yaml, else the value at `key` in .hydra/config.yaml."""
    from omegaconf import OmegaConf

    try:
        choices = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.choices
        if key in choices:
            return _canonical(choices[key])
        value = OmegaConf.select(OmegaConf.load(job / ".hydra" / "config.yaml"), key, default="<missing>")
    except (OSError, ValueError, AttributeError):
        return None
    return None if value == "<missing>" else _canonical(OmegaConf.to_container(value)
                                                         if OmegaConf.is_config(value) else value)


def collect(multirun: Path | list[Path], where: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per job directory (any folder with results.json or .hydra/ under `multirun`, or under
    each of several sweep folders: arms of one question run as separate sweeps). An axis a job did not
    override holds the value it ran with (its .hydra config), so a default-setting job from one sweep
    pairs with the varied settings of another. `where`: keep the jobs with these values only."""
    folders = [multirun] if isinstance(multirun, Path) else list(multirun)
    rows, found = [], []
    jobs = [job for folder in folders for job in sorted(
        {p.parent for p in folder.rglob("results.json")} | {p.parent for p in folder.rglob(".hydra")},
        key=lambda p: (len(p.parts), p.name.zfill(6)))]
    for job in jobs:
        file = job / "results.json"
        results = json.loads(file.read_text()) if file.is_file() else None
        found.append((job, results))
    metric = next((m for _, r in found if (m := _selection_metric(r))), "acc")
    columns = metric_columns(metric)
    for job, results in found:
        name = job.name if len(folders) == 1 else f"{job.parent.name}/{job.name}"
        row = {"job": name, "_path": job, **_overrides(job, results)}
        row["status"] = results.get("status", "unknown") if results else "no results.json"
        row["error"] = (results or {}).get("error", "")
        for column, (path, _) in columns.items():
            row[column] = _get(results or {}, path)
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no job directories (results.json or .hydra/) under {', '.join(map(str, folders))}")
    frame = pd.DataFrame(rows)
    knobs = [c for c in frame.columns if c not in ("job", "_path", "status", "error", "seed", *columns)]
    for key in [*knobs, *(k for k in (where or {}) if k not in knobs)]:
        if key not in frame.columns:
            frame[key] = None
        missing = frame[key].isna()
        frame.loc[missing, key] = [_configured(p, key) for p in frame.loc[missing, "_path"]]
    for key, value in (where or {}).items():
        frame = frame[frame[key] == _canonical(value)]
    if frame.empty:
        raise FileNotFoundError(f"no job has {where}")
    frame.attrs["metric"] = metric
    return frame


def _columns(frame: pd.DataFrame) -> dict[str, tuple[tuple, str]]:
    return metric_columns(frame.attrs.get("metric", "acc"))


def axes(frame: pd.DataFrame) -> list[str]:
    """The overrides that vary between jobs (the sweep's axes), seed excluded."""
    skip = {"job", "_path", "status", "error", "seed", *_columns(frame)}
    return [c for c in frame.columns if c not in skip and frame[c].astype(str).nunique() > 1]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Completed jobs grouped by the sweep's axes: mean, std over seeds and the half-width of the
    95% confidence interval of the mean (`<column> ci`; t-distribution, n - 1 df) of every metric."""
    done = frame[frame["status"] == "completed"]
    keys = axes(frame) or ["job"]
    columns = list(_columns(frame))
    grouped = done.groupby(keys, sort=False, dropna=False)
    out = grouped[columns].mean()
    std = grouped[columns].std()
    count = grouped[columns].count()
    out["n"] = grouped.size()
    for column in columns:
        out[column + " std"] = std[column]
        out[column + " ci"] = [ci_half_width(s, n) for s, n in zip(std[column], count[column])]
    return out.reset_index()


def paired(frame: pd.DataFrame, baseline: dict[str, str] | None = None) -> tuple[dict, pd.DataFrame]:
    """Every setting against one reference, seed by seed, over the seeds both ran: (the reference
    setting, one row per other setting with n and, for the dev and the test metric, the mean
    difference setting - reference and the half-width of its 95% confidence interval). The
    reference is `baseline` (axis -> value), else the setting selection picks (best mean dev)."""
    keys = axes(frame)
    dev, test = list(_columns(frame))[:2]
    done = frame[frame["status"] == "completed"]
    if not keys or "seed" not in done.columns:
        return {}, pd.DataFrame()
    if baseline is None:
        top = rank(summarize(frame), dev).iloc[0]
        baseline = {k: str(top[k]) for k in keys}
    if sorted(baseline) != sorted(keys):
        raise ValueError(f"--baseline must name a value for each axis of this sweep, {keys}; got {sorted(baseline)}")

    def setting(row) -> tuple:
        return tuple(str(row[k]) for k in keys)

    reference = tuple(str(baseline.get(k, "")) for k in keys)
    by_setting: dict[tuple, dict[str, pd.Series]] = {}
    for _, row in done.iterrows():
        by_setting.setdefault(setting(row), {})[str(row["seed"])] = row
    if reference not in by_setting:
        raise ValueError(f"no completed job has the baseline setting {baseline}")
    rows = []
    for other, runs in by_setting.items():
        if other == reference:
            continue
        seeds = [s for s in runs if s in by_setting[reference]]
        row = dict(zip(keys, other), n=len(seeds))
        for column in (dev, test):
            diffs = pd.Series([runs[s][column] - by_setting[reference][s][column] for s in seeds], dtype=float).dropna()
            row[column] = diffs.mean() if len(diffs) else float("nan")
            row[column + " ci"] = ci_half_width(diffs.std(), len(diffs)) if len(diffs) > 1 else float("nan")
        rows.append(row)
    return dict(zip(keys, reference)), pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, title: str, command: str | None = None, preface: list[str] = (),
             baseline: dict[str, str] | None = None) -> str:
    summary = summarize(frame)
    columns = _columns(frame)
    dev, test = list(columns)[:2]
    keys = [c for c in summary.columns if c not in columns and not c.endswith((" std", " ci")) and c != "n"]
    many = bool((summary["n"] > 1).any())
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Produced by `{command}`", ""]
    lines += [_machine(), "", *preface]
    lines += [f"Ranked by {dev} (the selection metric; ties in job order); {test} is the test score of each "
              "run's best-dev checkpoint, shown alongside, never used to rank."
              + (" Over seeds: mean ± std, and the 95% confidence interval of the mean (t-distribution)."
                 if many else "") + " wall s/job and CPU s/job count every attempt of a job that recorded them (a process killed outright records nothing); CPU s/job (the job "
              "process's CPU seconds, every thread) is its cost whatever else shared or paused the machine, which "
              "wall time is not.", ""]
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
            cells.append(cell)
            if many and column in (dev, test):
                cells.append("" if pd.isna(half) else f"[{fmt.format(value - half)}, {fmt.format(value + half)}]")
        if many:
            cells.append(str(int(row["n"])))
        lines.append("| " + " | ".join(cells) + " |")
    wall, cpu = frame["wall s/job"].dropna(), frame["CPU s/job"].dropna()
    if len(wall):
        line = f"Wall time: {_duration(wall.sum())} for {len(wall)} jobs (mean {wall.mean():.0f} s per job)"
        if len(cpu):
            line += (f"; CPU time: {_duration(cpu.sum())}"
                     + (f" for {len(cpu)} of them" if len(cpu) != len(wall) else "")
                     + f" (mean {cpu.mean():.0f} s per job)")
        lines += ["", line + "."]
    reference, diffs = paired(frame, baseline)
    if len(diffs) and (diffs["n"] > 1).any():
        name = ", ".join(f"{k}={_setting(v)}" for k, v in reference.items())
        lines += ["", f"Paired by seed against {name} ({'the baseline' if baseline else 'the selected setting'}): "
                  f"the mean of (setting - {name}) over the seeds both ran, and its 95% confidence interval. "
                  "An interval that excludes 0 is a difference the seeds support.", ""]
        header = list(reference) + [f"Δ {dev}", "95% CI", f"Δ {test}", "95% CI", "seeds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        fmt = columns[dev][1]
        for _, row in diffs.sort_values(dev, ascending=False, kind="stable").iterrows():
            cells = [_setting(row[k]) for k in reference]
            for column in (dev, test):
                value, half = row[column], row[column + " ci"]
                cells.append("" if pd.isna(value) else f"{value:+.4f}")
                cells.append("" if pd.isna(half) else f"[{value - half:+.4f}, {value + half:+.4f}]")
            cells.append(str(int(row["n"])))
            lines.append("| " + " | ".join(cells) + " |")
    failed = frame[frame["status"] != "completed"]
    if len(failed):
        lines += ["", "Jobs that did not complete:", ""]
        for _, row in failed.iterrows():
            what = ", ".join(f"{k}={row[k]}" for k in axes(frame)) or row["job"]
            lines.append(f"- job {row['job']} ({what}): {row['status']}{': ' + row['error'] if row['error'] else ''}")
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


def plots(frame: pd.DataFrame, directory: Path, metric: str | None = None) -> list[Path]:
    """PNG plots of the selection metric (mean, error bars = 95% CI over seeds): the best dev value
    (solid; a star marks each line's best-dev setting, the one selection picks) with the test
    value of the same runs beside it (dashed), against each numeric axis (a line per combination
    of the other axes), or as grouped bars when every axis is categorical. `metric`: one report
    column alone instead."""
    summary = summarize(frame)
    keys = [c for c in axes(frame) if c in summary.columns]
    dev, test = list(_columns(frame))[:2]
    return plot_summary(summary, keys, directory, [metric] if metric else [dev, test])


def plot_summary(summary: pd.DataFrame, keys: list[str], directory: Path, metrics: list[str]) -> list[Path]:
    """The plots of `plots` from a summary (summarize's frame: the metric columns, their " ci"
    columns and the axis columns `keys`); the first of `metrics` is the criterion, starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not keys or summary[metrics[0]].isna().all():
        return []
    written = []
    numeric = [k for k in keys if _numeric(summary[k].dropna())]
    for x in numeric or keys[:1]:
        others = [k for k in keys if k != x]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        groups = summary.groupby(others, sort=False) if others else [((), summary)]
        width = 0.8 / len(metrics)
        for number, (label, part) in enumerate(groups):
            label = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,)))
            part = part.sort_values(x, key=lambda c: c.astype(float)) if x in numeric else part
            color = f"C{number % 10}"
            for i, metric in enumerate(metrics):
                name = f"{label}, {metric}" if label else metric
                style = dict(label=name, color=color, alpha=1.0 if i == 0 else 0.6)
                if x in numeric:
                    ax.errorbar(part[x].astype(float), part[metric], yerr=part[metric + " ci"].fillna(0), capsize=3,
                                marker="o" if i == 0 else "s", linestyle="-" if i == 0 else "--",
                                mfc=color if i == 0 else "none", **style)
                else:
                    where = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(part))]
                    ax.bar(where, part[metric], width, yerr=part[metric + " ci"].fillna(0), capsize=3,
                           hatch="" if i == 0 else "//", **style)
                    ax.set_xticks(range(len(part)), part[x].astype(str))
            if part[metrics[0]].notna().any():  # the setting selection picks: best dev, not best test
                best = part.loc[part[metrics[0]].idxmax()]
                shift = (len(metrics) - 1) / 2 * width  # the criterion's bar is the first of each group
                at = float(best[x]) if x in numeric else list(part.index).index(best.name) - shift
                ax.plot([at], [best[metrics[0]]], marker="*", markersize=16, color=color, markeredgecolor="black",
                        linestyle="none", label=f"selected: highest {metrics[0]}" if number == 0 else None)
        spread = summary[x].astype(float).max() / max(summary[x].astype(float).min(), 1e-12) if x in numeric else 1
        if spread > 10:  # prefix lengths, example counts: powers of 2; learning rates: decades
            ax.set_xscale("log", base=10 if spread > 1000 else 2)
        ax.set_xlabel(x)
        seeds = int(summary["n"].max()) if "n" in summary else 1
        ax.set_ylabel(" / ".join(metrics))
        if seeds > 1:
            ax.set_title(f"mean over seeds (up to {seeds}); error bars: 95% confidence interval", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = directory / f"{metrics[0].replace(' ', '_')}_vs_{x.replace('.', '_')}.png"
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
    where = dict(item.split("=", 1) for item in args.where.split(",")) if args.where else None
    try:
        frame = collect(args.multirun, where)
    except FileNotFoundError as error:  # no jobs, or none with --where's values: a user error
        parser.error(str(error))
    out = args.out or args.multirun[0] / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m peft_lightning.report " + " ".join(sys.argv[1:] if argv is None else argv)
    baseline = {k: _canonical(v) for k, v in (item.split("=", 1) for item in args.baseline.split(","))} \
        if args.baseline else None
    text = markdown(frame, args.title or f"Results of {', '.join(map(str, args.multirun))}", command,
                    preface=[line for f in args.multirun for line in _optuna_best(f, frame.attrs["metric"])],
                    baseline=baseline)
    if not args.no_plots:
        for path in plots(frame, out.parent):
            text += f"\n![{path.stem}]({path.name})\n"
    out.write_text(text)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
