#!/bin/bash
# One worker of the findings queue: takes the jobs of docs/findings/jobs.txt one at a time, in order
# (a job nobody has claimed and whose record is not yet in docs/findings/runs/done.txt), and runs it as
#   nice -n 19 python train.py -m <the line, with $R = the sweeps folder>
# After a job that exits 0 it copies the record of its sweep (archive.py: results, configs, CSV logs, run
# logs; no checkpoints) into docs/findings/runs/, where regenerate.sh reads by default: commit that folder
# and every report regenerates from the repository alone, whatever happens to the sweeps folder
# (a new one adds its jobs to the records: archive.py keeps a job's record by its overrides, not its folder number).
#   bash docs/findings/queue.sh <sweeps folder> [worker name]      # one worker per core
# Each line is one seed of one setting, so two workers never run the same job; a job that fails is tried once
# more, then skipped (listed in <sweeps>/queue/failed.txt, its logs beside it). A job is its overrides,
# so a relaunched worker resumes an interrupted job from its checkpoint (the sweep's own resume). A claim means
# a worker is running the job: when every worker is gone (a reboot, a killed session), empty
# <sweeps>/queue/claimed.txt before relaunching, or their last jobs stay claimed and are never run.
# Env: JOBS (the job list), RECORDS (the records folder), PYTHON. The queue's state (claims, failures, each
# worker's current log) is in <sweeps>/queue/; the commands as run, with commit and exit status, in RECORDS/commands.log.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
R=${1:?usage: queue.sh <sweeps folder> [worker name]}
[[ $R == /* ]] || R=$PWD/$R
name=${2:-$$}
JOBS=${JOBS:-$here/jobs.txt}
RECORDS=${RECORDS:-$here/runs}
state=$R/queue
mkdir -p "$state" "$RECORDS"
touch "$state/claimed.txt" "$RECORDS/done.txt"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
cd "$root" || exit 1
while true; do
    job=$(flock "$state/.lock" bash -c '
        while IFS= read -r line; do
            [ -z "$line" ] && continue
            grep -qxF -- "$line" "$1" "$2" && continue
            echo "$line" >> "$1"; echo "$line"; break
        done < "$3"' _ "$state/claimed.txt" "$RECORDS/done.txt" "$JOBS")
    [ -z "$job" ] && { echo "$(date -Is) $name: queue empty"; exit ${skipped:-0}; }
    echo "$(date -Is) $name $(git rev-parse --short HEAD): $job" | tee -a "$RECORDS/commands.log"
    # ($R quoted, expanded by eval: a folder with a space stays one word, and `&` in it is no pattern
    # replacement (bash 5.2 patsub_replacement turned ${job//\$R/$R} under /a&b into "$Rb": unbound, worker gone)
    eval "nice -n 19 ${PYTHON:-python} train.py -m ${job//\$R/\"\$R\"}" > "$state/$name.log" 2>&1
    rc=$?
    echo "$(date -Is) $name: exit $rc: $job" | tee -a "$RECORDS/commands.log"
    if [ $rc -eq 0 ]; then
        sweep=$(sed -E 's/.*hydra\.sweep\.dir=\$R\/([^ ]+).*/\1/' <<< "$job")
        # under the lock: two workers archiving one sweep at once delete each other's copies (FileNotFoundError)
        flock "$state/.lock" bash -c 'python "$1" "$2" "$3" "$4" && echo "$5" >> "$6"' _ \
            "$here/archive.py" "$R" "$RECORDS" "$sweep" "$job" "$RECORDS/done.txt"
        # a job not archived is no result: unclaimed like a failed job, so a relaunch archives it (the sweep
        # does not train a completed job again); left claimed, no worker would ever take it or record it
        rc=$?
    fi
    if [ $rc -ne 0 ]; then
        # its log kept (the next job overwrites the worker's); tried once more (a passing fault), then left
        # claimed, so no worker takes it again until a relaunch clears the claims, and the queue goes on:
        # one bad job must not stop a night of runs. The worker's exit status is 1 when it skipped one.
        cp "$state/$name.log" "$state/failed-$(date +%Y%m%dT%H%M%S)-$name.log"
        if grep -qxF -- "$job" "$state/failed.txt" 2>/dev/null; then
            echo "$(date -Is) $name: failed twice, skipped (left claimed; logs: $state/failed-*.log): $job"
            skipped=1
        else
            flock "$state/.lock" sed -i "\\|^$(sed 's/[|.[\*^$]/\\&/g' <<< "$job")\$|d" "$state/claimed.txt"
            echo "$job" >> "$state/failed.txt"
        fi
    fi
done
