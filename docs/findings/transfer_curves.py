"""The transfer arm's curve figures quoted in docs/findings.md, from the records' CSV logs (the report
gives best dev and test; these are read along each run's dev curve):
    python docs/findings/transfer_curves.py [records folder, default docs/findings/runs/transfer_rt]
Per setting (init, train examples): mean dev over the seeds at update 150 and at 300 and its change; how many
runs had their best dev at the first evaluation; the mean train loss logged at update 40 or before."""
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "runs" / "transfer_rt")
runs = defaultdict(list)
for results in sorted(folder.glob("*/results.json")):
    record = json.loads(results.read_text())
    if record.get("status") != "completed":
        continue
    knobs = dict(o.split("=", 1) for o in record["overrides"] if "=" in o)
    rows = list(csv.DictReader(open(next(results.parent.glob("csv/version_*/metrics.csv")))))
    dev = {int(r["step"]) + 1: float(r["val/acc"]) for r in rows if r.get("val/acc")}  # update number: step + 1
    loss = [(int(r["step"]) + 1, float(r["train/loss"])) for r in rows if r.get("train/loss")]
    runs[(knobs["method.init"], int(knobs["data.train_examples"]))].append((dev, loss))

print("| init | train examples | seeds | mean dev at 150 | at 300 | change | best dev at the first evaluation | "
      "mean train loss, last logged at or before update 40 |")
print("|---|---|---|---|---|---|---|---|")
for (init, n), seeds in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    first = min(seeds[0][0])
    at = {u: statistics.mean(d[u] for d, _ in seeds) for u in (150, 300)}
    best_first = sum(max(d.values()) == d[first] for d, _ in seeds)
    early = statistics.mean([v for u, v in loss if u <= 40][-1] for _, loss in seeds)
    print(f"| {init} | {n} | {len(seeds)} | {at[150]:.4f} | {at[300]:.4f} | {at[300] - at[150]:+.4f} | "
          f"{best_first} of {len(seeds)} (update {first}) | {early:.3f} |")
