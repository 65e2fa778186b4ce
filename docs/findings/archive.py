"""Copy the record of each completed job of some sweeps into a folder kept in git (docs/findings/runs):

    python docs/findings/archive.py <sweeps folder> <records folder> <sweep> [<sweep> ...]

A record is everything the report reads and a reader may want to check (results.json, .hydra/*.yaml,
the CSV logs, the run log), and none of the weights: checkpoints and exported adapters stay in the sweeps
folder. Only jobs whose results.json says `completed` are copied (a running or failed job is not a result),
each to <records>/<sweep>/<job>/, replacing the older copy of the same job (the same overrides, not the same
folder name: see destination); `python -m peft_lightning.report <records>/<sweep>` then gives the same tables
as the sweep folder itself.
"""
import itertools
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # (the repository's package, from any folder)
from peft_lightning.multirun import job_key, recorded_overrides  # noqa: E402

KEEP = {".json", ".yaml", ".csv", ".log", ".txt"}  # text a reader can check; every weight file is left out
# not records: the weights, and W&B's offline run folder (its binary run file, 200 kB a job, would be most of
# the repository; its text logs repeat train.log: W&B's copy of a run stays with the sweeps folder)
LEAVE = {"checkpoints", "adapter", "wandb"}
LARGEST = 5_000_000  # bytes: a text file larger than this is not a record (and would bloat the repository)


def destination(folder: Path, job: Path, kept: dict[Path, dict]) -> Path:
    """Where `job`'s record goes in `folder`: the record of the same job (its overrides, as the sweep finds
    a job's folder: multirun.job_subdir), else the job's own folder name, else the next free number. Not the
    name alone: a sweep numbers its folders in launch order, so a sweeps folder started afresh (the old one
    lost) names other jobs 0, 1, ... and each would replace the record of another job kept from before.
    `kept`: each records folder's {record: its job's key}, read once and updated here."""
    if folder not in kept:
        found = [f for f in folder.iterdir() if f.is_dir()] if folder.is_dir() else []
        kept[folder] = {f: job_key(o) for f in found if (o := recorded_overrides(f)) is not None}
    key = job_key(recorded_overrides(job) or [])
    same = sorted((f for f, k in kept[folder].items() if k == key), key=lambda f: (len(f.name), f.name))
    taken = {f.name for f in folder.iterdir()} if folder.is_dir() else set()
    if same:
        target = same[0]
    elif job.name not in taken:
        target = folder / job.name
    else:
        start = max([int(n) for n in taken if n.isdigit()], default=0) + 1
        target = folder / str(next(n for n in itertools.count(start) if str(n) not in taken))
    kept[folder][target] = key
    return target


def archive(sweeps: Path, records: Path, sweep: str) -> int:
    copied, kept = 0, {}
    for results in sorted((sweeps / sweep).rglob("results.json")):
        job = results.parent
        if json.loads(results.read_text()).get("status") != "completed":
            continue
        target = destination(records / sweep / job.relative_to(sweeps / sweep).parent, job, kept)
        files = [f for f in job.rglob("*") if f.is_file() and f.suffix in KEEP and f.stat().st_size <= LARGEST
                 and not LEAVE & set(f.relative_to(job).parts[:-1])]
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
