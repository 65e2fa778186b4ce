"""The GPU trial of 2026-11-30 from its run logs (docs/findings/gpu/trial-2026-11-30/logs): one row per job, and
each setting against prefix length 16 paired by seed on best dev, mean and 95% t-interval over the 3 seeds.

    python docs/findings/gpu/trial.py            # prints the table and the pairs as Markdown

The jobs trained and tested, but none was archived (queue.sh ran archive.py with another environment's `python`),
so only each job's log came back: its best checkpoint's epoch and dev metric (in the file name, 4 decimals) and
its test table. No dev curve: rule 4 (still rising) cannot be read, and these are no findings; they are kept to
set beside the CPU arm of the same question when it completes (the same jobs on other hardware).
"""
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from scipy import stats

LOGS = Path(__file__).resolve().parent / "trial-2026-11-30" / "logs"


def rows():
    for log in sorted(LOGS.glob("*.log")):
        text = log.read_text()
        overrides = re.search(r"#0 : (.*)", text).group(1).split()
        get = dict(o.split("=", 1) for o in overrides)
        best = re.search(r"checkpoints/epoch(\d+)-(acc|f1)(\d\.\d+?)\.ckpt", text)
        test = {k: float(v) for k, v in re.findall(r"test/(acc|f1)\s+│\s+([0-9.]+)", text)}
        yield {"task": "SMS spam" if get.get("data") == "sms_spam" else "Rotten Tomatoes", "method": get["method"],
               "P": int(get["method.prefix_length"]), "seed": int(get["seed"]), "best_epoch": int(best.group(1)),
               "metric": best.group(2), "best_dev": float(best.group(3)), **{f"test_{k}": v for k, v in test.items()}}


def main() -> int:
    table = list(rows())
    print("| task | method | P | seed | best epoch | best dev | test acc | test F1 |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(table, key=lambda r: (r["task"], r["method"], r["P"], r["seed"])):
        print(f"| {r['task']} | {r['method']} | {r['P']} | {r['seed']} | {r['best_epoch'] + 1} | {r['best_dev']:.4f} "
              f"({r['metric']}) | {r['test_acc']:.4f} | {r['test_f1']:.4f} |")
    by = defaultdict(dict)
    for r in table:
        by[(r["task"], r["method"], r["P"])][r["seed"]] = r
    print("\n| task | method | P vs 16 | Δ best dev [95% CI] | Δ test (acc; F1 on SMS spam) [95% CI] |\n|---|---|---|---|---|")
    for (task, method, p), runs in sorted(by.items()):
        base = by[(task, method, 16)]
        if p == 16 or sorted(runs) != sorted(base):
            continue
        test = "test_f1" if task == "SMS spam" else "test_acc"
        cells = []
        for key in ("best_dev", test):
            d = [runs[s][key] - base[s][key] for s in sorted(runs)]
            m, half = statistics.mean(d), stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
            cells.append(f"{m:+.4f} [{m - half:+.4f}, {m + half:+.4f}]")
        print(f"| {task} | {method} | {p} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
