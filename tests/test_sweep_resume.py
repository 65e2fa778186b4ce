"""A sweep killed mid-way and relaunched with the same sweep dir finishes: every job completes once,
finished jobs are not run again, interrupted ones resume, and the results are those of an
uninterrupted sweep. Jobs find their folders by their overrides, never by their numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_lightning.multirun import job_subdir, resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# 3 jobs of a tiny random BERT: 2 epochs of 3, 6 and 2 batches (6, 12 and 4 steps)
SWEEP = ["model=tiny-bert", "logger=csv", "trainer.max_epochs=2", "+trainer.limit_train_batches=3,6,2",
         "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "data.batch_size=8", "data.max_length=32",
         "method.prefix_dropout=0.1"]
# SIGTERM after step 8: only the 12-step job gets there (and, resumed from step 8, never again)
FAULT = ["+callbacks.fault._target_=peft_lightning.faults.FaultInjection", "+callbacks.fault.signal_at_step=8"]


def launch(sweep_dir: Path, *extra, timeout=300):
    return subprocess.run([sys.executable, "train.py", "-m", *SWEEP, *extra, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def jobs(sweep_dir: Path) -> dict[str, dict]:
    """limit_train_batches -> results.json, for every job folder."""
    found = {}
    for file in sweep_dir.glob("*/results.json"):
        results = json.loads(file.read_text())
        batches = next(o.split("=")[1] for o in results["overrides"] if "limit_train_batches" in o)
        found[batches] = {**results, "folder": file.parent.name}
    return found


def test_killed_sweep_relaunched_completes_every_job_once_with_the_uninterrupted_results(tmp_path):
    first = launch(tmp_path / "sweep", *FAULT)
    assert first.returncode == 143, first.stderr[-3000:]  # the SIGTERM stopped the whole sweep at job 1
    before = jobs(tmp_path / "sweep")
    assert {k: v["status"] for k, v in before.items()} == {"3": "completed", "6": "interrupted"}
    assert before["6"]["global_step"] == 8 and before["6"]["resume_from"].endswith("1/checkpoints/interrupted.ckpt")
    done = tmp_path / "sweep" / "0"
    def stamps():  # every file of the finished job but its log, which says it was skipped
        return {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file() and p.name != "train.log"}
    before_relaunch = stamps()

    second = launch(tmp_path / "sweep", *FAULT)
    assert second.returncode == 0, second.stderr[-3000:]
    after = jobs(tmp_path / "sweep")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1", "2"]
    # every job completed exactly once; the interrupted one kept its first attempt on record
    assert {k: v["status"] for k, v in after.items()} == {"3": "completed", "6": "completed", "2": "completed"}
    assert [a["status"] for a in after["6"]["previous_attempts"]] == ["interrupted"]
    assert "previous_attempts" not in after["3"] and "previous_attempts" not in after["2"]
    # the finished job was not run again: none of its files (results, checkpoints, csv, .hydra) changed
    assert stamps() == before_relaunch
    skipped = "job 0 finished in an earlier launch of this sweep (completed): not run again"
    assert skipped in second.stdout and skipped in (done / "train.log").read_text().splitlines()[-1]
    assert "job 1 was interrupted in an earlier launch of this sweep: resuming from" in second.stdout

    straight = launch(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = jobs(tmp_path / "straight")
    for batches, results in reference.items():
        for part in ("best", "final", "test"):
            assert after[batches]["metrics"][part] == results["metrics"][part], (batches, part)
        assert after[batches]["global_step"] == results["global_step"]
        assert after[batches]["folder"] == results["folder"]  # the same job numbers as the uninterrupted sweep


def test_jobs_find_their_folders_by_overrides_not_by_number(tmp_path):
    """Optuna (or a relaunch with other overrides) may give job number 0 to another job: the folder
    of the same overrides is reused whatever the number, and a number whose folder holds another
    job's record moves on to a free one."""
    for name, overrides in (("0", ["a=1", "b=x"]), ("1", ["a=2", "b=x"])):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    assert job_subdir(tmp_path, 0, ["b=x", "a=2"]) == "1"  # same overrides, any order, another number
    assert job_subdir(tmp_path, 1, ["a=1", "b=x", "ckpt_path=/x/checkpoints/last.ckpt"]) == "0"
    assert job_subdir(tmp_path, 0, ["a=3", "b=x"]) == "2"  # 0 and 1 hold other jobs
    assert job_subdir(tmp_path, 0, ["a=3", "b=x"]) == "2"  # asked again (Hydra resolves lazily): the same answer
    assert job_subdir(tmp_path, 1, ["a=4", "b=x"]) == "3"  # 2 was claimed by the job before
    assert job_subdir(tmp_path, 7, ["a=5", "b=x"]) == "7"  # a free number stays the job's own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2", "3", "7"]


def test_unfinished_job_resumes_from_its_newest_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name, step in (("interrupted.ckpt", 5), ("last.ckpt", 12)):
        torch.save({"global_step": step}, ckpts / name)
    os.utime(ckpts / "interrupted.ckpt", ns=(1, 10**18))  # an old interrupt, resumed past: stale
    os.utime(ckpts / "last.ckpt", ns=(1, 2 * 10**18))
    assert resume_checkpoint(tmp_path, {"status": "running"}) == str(ckpts / "last.ckpt")  # killed: names none
    named = {"status": "interrupted", "resume_from": str(ckpts / "interrupted.ckpt")}
    assert resume_checkpoint(tmp_path, named) == str(ckpts / "interrupted.ckpt")  # what the interrupt wrote
    (ckpts / "interrupted.ckpt").unlink()
    (ckpts / "last.ckpt").unlink()
    assert resume_checkpoint(tmp_path, named) is None  # nothing left: the job starts afresh


def test_two_launches_never_share_a_folder(tmp_path):
    """The default run and sweep folders are <start time>_<random id>: launches in the same second differ."""
    script = ("import os, train\nfrom hydra import compose, initialize_config_dir\n"
              "with initialize_config_dir(config_dir=os.path.abspath('conf'), version_base='1.3'):\n"
              "    cfg = compose('train', return_hydra_config=True)\n"
              "print(cfg.hydra.sweep.dir, cfg.hydra.run.dir)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    (sweep_a, run_a), (sweep_b, run_b) = outs
    assert sweep_a != sweep_b and run_a != run_b
    assert Path(sweep_a).name == Path(run_a).name  # one launch, one name
    stamp, token = Path(sweep_a).name.rsplit("_", 1)
    assert len(stamp) == len("2026-11-28_23-15-30") and len(token) == 6 and int(token, 16) >= 0


@pytest.mark.slow  # ~3 minutes: up to 4 launches of an Optuna study of 3 trials, and one uninterrupted
def test_seeded_optuna_study_resumes_by_replay(tmp_path):
    """Optuna (sweeps/optuna.yaml, seeded TPE) over lr x prefix length x the batches of SWEEP: the
    relaunched study proposes the same trials again (same seed, same recorded values), the finished
    ones return their recorded values at once and the interrupted one resumes."""
    search = ["+sweeps=optuna", "hydra.sweeper.n_trials=3"]
    for _ in range(4):  # each launch stops at the next trial that gets past step 8, once
        proc = launch(tmp_path / "sweep", *search, *FAULT)
        if proc.returncode == 0:
            break
        assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = launch(tmp_path / "straight", *search)
    assert straight.returncode == 0, straight.stderr[-3000:]

    def trials(folder):
        found = {}
        for file in folder.glob("*/results.json"):
            r = json.loads(file.read_text())
            swept = tuple(o for o in r["overrides"] if o.split("=")[0].lstrip("+") in
                          ("method.optim.lr", "method.prefix_length", "trainer.limit_train_batches"))
            found[file.parent.name] = (swept, r["status"], r["metrics"]["best"], r["metrics"]["test"])
        return found
    assert trials(tmp_path / "sweep") == trials(tmp_path / "straight")
    best = [(p / "optimization_results.yaml").read_text() for p in (tmp_path / "sweep", tmp_path / "straight")]
    assert best[0] == best[1]
