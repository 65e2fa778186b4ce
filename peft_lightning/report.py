"""Compare the jobs of a multirun: a markdown table (and plots) from their results.json files.

    python -m peft_lightning.report outputs/methods/multiruns/<time> --out docs/methods.md

Every job writes results.json whatever happens (run.py), so the report needs nothing else: no
W&B. The sweep's axes are the overrides that differ between jobs; `seed` is averaged over
(mean +- std, n). Jobs that failed or were interrupted are listed with their error.

Settings are ranked, and the best one marked, by the best dev value of the selection metric
(`val/<metric>_best`), never by test: the test value is shown beside it, for the record.
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



def metric_columns(metric: str = "acc") -> dict[str, tuple[tuple, str]]:
    """Report column -> (results.json path, format), for the sweep's selection metric (data.metric).
    The first column, the best dev value, is the criterion: settings are ranked and picked by it.
    The test value (of the best-dev checkpoint) is shown beside it and never ranks anything:
    choosing by test would report a test score that was selected on test."""
    return {
        f"best dev {metric}": (("metrics", "best", f"val/{metric}_best"), "{:.4f}"),
        f"test {metric}": (("metrics", "test", f"test/{metric}"), "{:.4f}"),
        "trainable": (("parameters", "trainable"), "{:,.0f}"),
        "trainable %": (("parameters", "trainable_pct"), "{:.3f}"),
        "train s/epoch": (("train_seconds_per_epoch",), "{:.1f}"),
    }


def _selection_metric(results: dict | None) -> str | None:
    best = (results or {}).get("metrics", {}).get("best", {})
    return next((k[4:-5] for k in best if k.startswith("val/") and k.endswith("_best")), None)


def _get(data: dict, path: tuple):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    if isinstance(data, list):  # per-epoch seconds: their median (robust to one disturbed epoch)
        return float(pd.Series(data).median()) if data else None
    return data


def _overrides(job: Path, results: dict | None) -> dict[str, str]:
    listed = results.get("overrides") if results else None
    if listed is None:
        file = job / ".hydra" / "overrides.yaml"
        listed = [line[2:].strip() for line in file.read_text().splitlines() if line.startswith("- ")] \
            if file.is_file() else []
    return dict(item.lstrip("+").split("=", 1) for item in listed if "=" in item)


def collect(multirun: Path) -> pd.DataFrame:
    """One row per job directory (any folder with results.json or .hydra/ under `multirun`)."""
    rows, found = [], []
    jobs = sorted({p.parent for p in multirun.rglob("results.json")} | {p.parent for p in multirun.rglob(".hydra")},
                  key=lambda p: (len(p.parts), p.name.zfill(6)))
    for job in jobs:
        file = job / "results.json"
        results = json.loads(file.read_text()) if file.is_file() else None
        found.append((job, results))
    metric = next((m for _, r in found if (m := _selection_metric(r))), "acc")
    columns = metric_columns(metric)
    for job, results in found:
        row = {"job": job.name, **_overrides(job, results)}
        row["status"] = results.get("status", "unknown") if results else "no results.json"
        row["error"] = (results or {}).get("error", "")
        for column, (path, _) in columns.items():
            row[column] = _get(results or {}, path)
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no job directories (results.json or .hydra/) under {multirun}")
    frame = pd.DataFrame(rows)
    frame.attrs["metric"] = metric
    return frame


def _columns(frame: pd.DataFrame) -> dict[str, tuple[tuple, str]]:
    return metric_columns(frame.attrs.get("metric", "acc"))


def axes(frame: pd.DataFrame) -> list[str]:
    """The overrides that vary between jobs (the sweep's axes), seed excluded."""
    skip = {"job", "status", "error", "seed", *_columns(frame)}
    return [c for c in frame.columns if c not in skip and frame[c].astype(str).nunique() > 1]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Completed jobs grouped by the sweep's axes: mean (+- std over seeds) of every metric."""
    done = frame[frame["status"] == "completed"]
    keys = axes(frame) or ["job"]
    columns = list(_columns(frame))
    grouped = done.groupby(keys, sort=False, dropna=False)
    out = grouped[columns].mean()
    std = grouped[columns].std()
    out["n"] = grouped.size()
    for column in columns:
        out[column + " std"] = std[column]
    return out.reset_index()


def markdown(frame: pd.DataFrame, title: str, command: str | None = None, preface: list[str] = ()) -> str:
    summary = summarize(frame)
    columns = _columns(frame)
    dev, test = list(columns)[:2]
    keys = [c for c in summary.columns if c not in columns and not c.endswith(" std") and c != "n"]
    many = bool((summary["n"] > 1).any())
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Produced by `{command}`", ""]
    lines += [_machine(), "", *preface]
    lines += [f"Ranked by {dev} (the selection metric; ties in job order); {test} is the test score of each "
              "run's best-dev checkpoint, shown alongside, never used to rank.", ""]
    header = keys + list(columns) + (["n"] if many else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in rank(summary, dev).iterrows():
        cells = [_setting(row[k]) for k in keys]
        for column, (_, fmt) in columns.items():
            value, spread = row[column], row[column + " std"]
            cell = "" if pd.isna(value) else fmt.format(value)
            if many and not pd.isna(spread) and column in (test, dev):
                cell += " ± " + fmt.format(spread)
            cells.append(cell)
        if many:
            cells.append(str(int(row["n"])))
        lines.append("| " + " | ".join(cells) + " |")
    failed = frame[frame["status"] != "completed"]
    if len(failed):
        lines += ["", "Jobs that did not complete:", ""]
        for _, row in failed.iterrows():
            what = ", ".join(f"{k}={row[k]}" for k in axes(frame)) or row["job"]
            lines.append(f"- job {row['job']} ({what}): {row['status']}{': ' + row['error'] if row['error'] else ''}")
    return "\n".join(lines) + "\n"


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
    """PNG plots of the selection metric (mean, error bars = std over seeds): the best dev value
    (solid; a star marks each line's best-dev setting, the one selection picks) with the test
    value of the same runs beside it (dashed), against each numeric axis (a line per combination
    of the other axes), or as grouped bars when every axis is categorical. `metric`: one report
    column alone instead."""
    summary = summarize(frame)
    keys = [c for c in axes(frame) if c in summary.columns]
    dev, test = list(_columns(frame))[:2]
    return plot_summary(summary, keys, directory, [metric] if metric else [dev, test])


def plot_summary(summary: pd.DataFrame, keys: list[str], directory: Path, metrics: list[str]) -> list[Path]:
    """The plots of `plots` from a summary (summarize's frame: the metric columns, their " std"
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
                    ax.errorbar(part[x].astype(float), part[metric], yerr=part[metric + " std"].fillna(0), capsize=3,
                                marker="o" if i == 0 else "s", linestyle="-" if i == 0 else "--",
                                mfc=color if i == 0 else "none", **style)
                else:
                    where = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(part))]
                    ax.bar(where, part[metric], width, yerr=part[metric + " std"].fillna(0), capsize=3,
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
        ax.set_ylabel(" / ".join(metrics))
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
    parser.add_argument("multirun", type=Path, help="a multirun directory (outputs/<task>/multiruns/<time>)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: <multirun>/report.md)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--no-plots", action="store_true", help="the table only")
    args = parser.parse_args(argv)
    if not args.multirun.is_dir():
        parser.error(f"{args.multirun} is not a directory")
    frame = collect(args.multirun)
    out = args.out or args.multirun / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m peft_lightning.report " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(frame, args.title or f"Results of {args.multirun}", command,
                    preface=_optuna_best(args.multirun, frame.attrs["metric"]))
    if not args.no_plots:
        for path in plots(frame, out.parent):
            text += f"\n![{path.stem}]({path.name})\n"
    out.write_text(text)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
