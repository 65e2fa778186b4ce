"""Compare the jobs of a multirun: a markdown table (and plots) from their results.json files.

    python -m peft_lightning.report outputs/methods/multiruns/<time> --out docs/methods.md

Every job writes results.json whatever happens (run.py), so the report needs nothing else: no
W&B. The sweep's axes are the overrides that differ between jobs; `seed` is averaged over
(mean +- std, n). Jobs that failed or were interrupted are listed with their error.
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
    """Report column -> (results.json path, format), for the sweep's selection metric (data.metric)."""
    return {
        f"test {metric}": (("metrics", "test", f"test/{metric}"), "{:.4f}"),
        f"best dev {metric}": (("metrics", "best", f"val/{metric}_best"), "{:.4f}"),
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
    test, dev = list(columns)[:2]
    keys = [c for c in summary.columns if c not in columns and not c.endswith(" std") and c != "n"]
    many = bool((summary["n"] > 1).any())
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Produced by `{command}`", ""]
    lines += [_machine(), "", *preface]
    header = keys + list(columns) + (["n"] if many else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.sort_values(test, ascending=False, na_position="last").iterrows():  # selection maximizes
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
    """PNG plots of `metric` (default: the test value of the selection metric; mean, error bars =
    std over seeds): against each numeric axis (a line per combination of the other axes), or as
    grouped bars when every axis is categorical."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or next(iter(_columns(frame)))
    summary = summarize(frame)
    keys = [c for c in axes(frame) if c in summary.columns]
    if not keys or summary[metric].isna().all():
        return []
    written = []
    numeric = [k for k in keys if _numeric(summary[k].dropna())]
    for x in numeric or keys[:1]:
        others = [k for k in keys if k != x]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        groups = summary.groupby(others, sort=False) if others else [((), summary)]
        for label, part in groups:
            label = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,)))
            part = part.sort_values(x, key=lambda c: c.astype(float)) if x in numeric else part
            xs = part[x].astype(float) if x in numeric else part[x].astype(str)
            if x in numeric:
                ax.errorbar(xs, part[metric], yerr=part[metric + " std"].fillna(0), marker="o", capsize=3,
                            label=label or None)
            else:
                ax.bar(xs, part[metric], yerr=part[metric + " std"].fillna(0), capsize=3, label=label or None)
        spread = summary[x].astype(float).max() / max(summary[x].astype(float).min(), 1e-12) if x in numeric else 1
        if spread > 10:  # prefix lengths, example counts: powers of 2; learning rates: decades
            ax.set_xscale("log", base=10 if spread > 1000 else 2)
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"{metric.replace(' ', '_')}_vs_{x.replace('.', '_')}.png"
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
