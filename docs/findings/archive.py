"""Copy the record of each completed job of some sweeps into a folder kept in git (docs/findings/runs):

    python docs/findings/archive.py <sweeps folder> <records folder> <sweep> [<sweep> ...]

A record is everything the report reads and a reader may want to check (results.json, .hydra/*.yaml,
the CSV logs, the run logs), and none of the weights: checkpoints and exported adapters stay in the sweeps
folder. Only jobs whose results.json says `completed` are copied (a running or failed job is not a result),
each to <records>/<sweep>/<job>/, replacing an older copy; `python -m peft_lightning.report <records>/<sweep>`
then gives the same tables as the sweep folder itself.
"""
import json
import shutil
import sys
from pathlib import Path

KEEP = {".json", ".yaml", ".csv", ".log", ".txt"}  # text a reader can check; every weight file is left out
LARGEST = 5_000_000  # bytes: a text file larger than this is not a record (and would bloat the repository)


def archive(sweeps: Path, records: Path, sweep: str) -> int:
    copied = 0
    for results in sorted((sweeps / sweep).rglob("results.json")):
        job = results.parent
        if json.loads(results.read_text()).get("status") != "completed":
            continue
        target = records / sweep / job.relative_to(sweeps / sweep)
        files = [f for f in job.rglob("*") if f.is_file() and f.suffix in KEEP and f.stat().st_size <= LARGEST
                 and "checkpoints" not in f.relative_to(job).parts]
        shutil.rmtree(target, ignore_errors=True)
        for file in files:
            (target / file.relative_to(job)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target / file.relative_to(job))
        copied += 1
    return copied


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    sweeps, records = Path(sys.argv[1]), Path(sys.argv[2])
    for sweep in sys.argv[3:]:
        if not (sweeps / sweep).is_dir():
            sys.exit(f"error: no sweep folder {sweeps / sweep}")
        print(f"{sweep}: {archive(sweeps, records, sweep)} completed jobs in {records / sweep}")
