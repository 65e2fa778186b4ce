#!/bin/bash
# One worker of the findings queue: takes the jobs of docs/findings/jobs.txt one at a time, in order
# (a job no worker has claimed and whose record is not yet in docs/findings/runs/done.txt), and runs it as
#   nice -n 19 python train.py -m <the line, with $R = the sweeps folder>
# After a job that exits 0 it copies the record of its sweep (archive.py: results, configs, CSV logs, run
# logs; no checkpoints) into docs/findings/runs/, where regenerate.sh reads by default: commit that folder
# and every report regenerates from the repository alone, whatever happens to the sweeps folder
# (a new one adds its jobs to the records: archive.py keeps a job's record by its overrides, not its folder number).
#   bash docs/findings/queue.sh <sweeps folder> [worker name]      # one worker per core
# Each line is one seed of one setting. A worker claims a job by holding an flock on its file in
# <sweeps>/queue/claims/ while the job runs (train.py inherits it): the OS drops it when the job ends or dies,
# so a claim never outlives its job and a relaunch after a reboot or a killed session takes the unfinished
# jobs again without clean-up; a worker with no job left waits for the jobs still running (one whose worker
# was killed goes on, and is archived by the worker that takes it when it ends). Blank and # lines are no jobs.
# A job that fails is tried once more, then skipped (listed in
# <sweeps>/queue/skipped.txt, its logs beside it; remove it there to try again). A job is its overrides, so a
# relaunched worker resumes an interrupted job from its checkpoint (the sweep's own resume).
# Env: JOBS (the job list), RECORDS (the records folder), PYTHON. The queue's state (claims, failures, each
# worker's current log) is in <sweeps>/queue/; the commands as run, with commit and exit status, in RECORDS/commands.log.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
R=${1:?usage: queue.sh <sweeps folder> [worker name]}
[[ $R == /* ]] || R=$PWD/$R
name=${2:-$$}
# the jobs' interpreter, one path (spaces kept), for the jobs and the archive alike: a PYTHON with arguments
# (`python3 -X utf8`) ran the jobs (eval split it) and failed every archive ("$7" did not): every job trained,
# none recorded
python=${PYTHON:-python}
[[ $python == */* && $python != /* ]] && python=$PWD/$python  # (the caller's, as R: the jobs run from the root)
command -v -- "$python" > /dev/null \
    || { echo "queue.sh: PYTHON=$python is no command (a path, no arguments)" >&2; exit 2; }
JOBS=${JOBS:-$here/jobs.txt}
RECORDS=${RECORDS:-$here/runs}
state=$R/queue
mkdir -p "$state" "$RECORDS"
mkdir -p "$state/claims"
touch "$RECORDS/done.txt" "$state/failed.txt" "$state/skipped.txt"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
cd "$root" || exit 1
while true; do
    # the first job not done, not skipped, and not claimed (its claim file's lock free), taken under the queue lock.
    # The lock's fd is opened here and closed before the job starts: a job inheriting it (and a process the job
    # leaves behind, which keeps it open) would keep the lock for good after a worker killed while selecting.
    job="" claim="" busy=""
    exec {queue}>"$state/.lock"
    flock "$queue"
    while IFS= read -r line; do
        # spaces around a line are no part of the job (" a" and "a" would be two claims: one job run twice at
        # once); blank and # lines are no jobs (either ran `train.py -m` alone: the default sweep, trained)
        [[ $line =~ ^[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]] || continue
        line=${BASH_REMATCH[1]}
        [[ $line == \#* ]] && continue
        grep -qxF -- "$line" "$RECORDS/done.txt" "$state/skipped.txt" && continue
        exec {claim}>"$state/claims/$(md5sum <<< "$line" | cut -c1-16)"
        if flock -n "$claim"; then job=$line; break; fi
        busy=${busy:-$line}
        exec {claim}>&-
    done < "$JOBS"
    exec {queue}>&-
    if [ -z "$job" ] && [ -n "$busy" ]; then
        # no free job, but one still running: wait for it and look again. Its worker may be gone (killed; the
        # job goes on, orphaned), and then nobody archives the job when it ends: a worker that left now would
        # leave its record out of the records and of done.txt, the queue "empty"
        echo "$(date -Is) $name: waiting for a job still running: $busy"
        flock "$state/claims/$(md5sum <<< "$busy" | cut -c1-16)" true
        continue
    fi
    if [ -z "$job" ]; then
        if [ -n "$(tail -c 1 "$JOBS")" ]; then  # (read drops a last line with no newline: a job never run)
            echo "queue.sh: the last line of $JOBS has no newline, so it is not taken: add one" >&2
            exit 2
        fi
        echo "$(date -Is) $name: queue empty"; exit ${skipped:-0}
    fi
    echo "$(date -Is) $name $(git rev-parse --short HEAD): $job" | tee -a "$RECORDS/commands.log"
    # ($R quoted, expanded by eval: a folder with a space stays one word, and `&` in it is no pattern
    # replacement (bash 5.2 patsub_replacement turned ${job//\$R/$R} under /a&b into "$Rb": unbound, worker gone)
    eval "nice -n 19 \"\$python\" train.py -m ${job//\$R/\"\$R\"}" > "$state/$name.log" 2>&1
    rc=$?
    echo "$(date -Is) $name: exit $rc: $job" | tee -a "$RECORDS/commands.log"
    if [ $rc -eq 0 ]; then
        sweep=$(sed -E 's/.*hydra\.sweep\.dir=\$R\/([^ ]+).*/\1/' <<< "$job")
        # under the lock: two workers archiving one sweep at once delete each other's copies (FileNotFoundError)
        # (with the jobs' interpreter: a `python` of another environment lacks their packages, and every job that
        # trained would fail here, unrecorded: the GPU trial of 2026-11-30, docs/findings/gpu/trial-2026-11-30)
        flock "$state/.lock" bash -c '"$7" "$1" "$2" "$3" "$4" && echo "$5" >> "$6"' _ \
            "$here/archive.py" "$R" "$RECORDS" "$sweep" "$job" "$RECORDS/done.txt" "$python"
        # a job not archived is no result: failed, so it is taken again and archived then (the sweep does
        # not train a completed job again)
        rc=$?
    fi
    if [ $rc -ne 0 ]; then
        # its log kept (the next job overwrites the worker's); tried once more (a passing fault), then skipped,
        # and the queue goes on: one bad job must not stop a night of runs. Exit status 1 when one was skipped.
        cp "$state/$name.log" "$state/failed-$(date +%Y%m%dT%H%M%S)-$name.log"
        if grep -qxF -- "$job" "$state/failed.txt"; then
            echo "$(date -Is) $name: failed twice, skipped (see $state/skipped.txt and failed-*.log): $job"
            echo "$job" >> "$state/skipped.txt"
            skipped=1
        else
            echo "$job" >> "$state/failed.txt"
        fi
    fi
    exec {claim}>&-  # the claim ends with the job
done
