"""The verdict table of docs/findings.md, made from the question pages by the rules the page fixed before the
ablation arms ran ("How each ablation verdict is read"), so no verdict is a hand-copied or hand-judged figure:

    python docs/findings/verdicts.py          # rewrite docs/findings.md's block between its two markers
    python docs/findings/verdicts.py --check  # exit 1 when the block is not what the pages give

Per question and task, each setting against the question's default arm, paired by seed on best dev:
"better" or "worse" only when the 95% interval excludes 0, else "no difference the seeds support"; "at N
epochs" (the page's budget) when the report flags the setting or the default as still rising; fewer than 3
paired seeds is no verdict. Where a question's default arm had not flattened on a task at 6 epochs (prefix
tuning on SMS spam: nor at 12), its page at a longer budget (LONGER) is read for that task instead (and waited
for until it exists), and the cell says so. Across the
two tasks: "holds on both tasks" (both exclude 0 the same way), "task-dependent"
(opposite ways), else the task where the seeds support it is named. A setting is matched across the tasks by
the axes both pages have (one task's page can have an extra one: a default changed between its arms' commits).
docs/findings/regenerate.sh runs it.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_table import tables  # noqa: E402  (one reader of the report's tables)

ROOT = Path(__file__).resolve().parents[2]
PAGES = ROOT / "docs" / "findings"
FINDINGS = ROOT / "docs" / "findings.md"
BEGIN = "<!-- verdicts: made by docs/findings/verdicts.py from the question pages; do not edit -->"
END = "<!-- end of verdicts -->"
CUT = "†"  # the report's mark of an interval cut at the metric's range (peft_lightning.report.CUT)
SEEDS = 3
TASKS = {"rt6": "Rotten Tomatoes (acc)", "sms6": "SMS spam (F1)"}
# a question's page on one task at a longer budget, read in place of the shorter pages: the question's default arm
# had not flattened at 6 epochs there (prefix tuning's MLP on SMS spam: 678 updates), so the shorter pages give no
# verdict; until the longer page exists, the cell says it waits for it. Prefix tuning's official-settings preset
# is paired with the same default on SMS spam, so it is read at the longer budget too. That default was still
# rising at 12 epochs (sms12, 1,356 updates), so both are read at 24 (the fourth change in docs/findings.md);
# each entry: (the page's budget suffix, the shorter budgets that were no real one)
LONGER = {("reparam_prefix_tuning", "sms6"): ("sms24", "6 and 12 epochs were"),
          ("presets_prefix_tuning", "sms6"): ("sms24", "6 and 12 epochs were")}
# settings dropped on one task before they ran (docs/findings.md says why): no verdict there, and none to wait for
DROPPED = {("reparam_ptuning_v2", "sms6", "method.reparameterization=mlp, method.optim.lr=0.01"):
           "dropped before it ran (see the rules): no verdict"}
QUESTIONS = {  # page stem -> the question, as docs/findings/regenerate.sh names its reports
    "dropout": "backbone dropout on vs off (P-Tuning v2)",
    "depth": "depth vs deep (P-Tuning v2, P = 16)",
    "reparam_ptuning_v2": "reparameterization vs none (P-Tuning v2)",
    "reparam_prefix_tuning": "reparameterization vs MLP (prefix tuning)",
    "prefix_length_ptuning_v2": "prefix length vs 16 (P-Tuning v2)",
    "prefix_length_prompt_tuning": "prefix length vs 16 (prompt tuning)",
    "presets_ptuning_v2": "official settings vs ours (P-Tuning v2)",
    "presets_prefix_tuning": "official settings vs ours (prefix tuning)",
}


def _interval(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.removesuffix(CUT).strip("[]").split(","))
    return low, high


def _setting(text: str) -> dict[str, str]:
    """`k=v, k=v` as the report writes a setting; split only before a next `key=`, so a value that holds
    ", " (a string read from a job's config) stays whole."""
    return dict(pair.split("=", 1) for pair in re.split(r", (?=[\w.]+=)", text))


def _label(setting: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def page_verdicts(page: Path) -> tuple[str, list[tuple[dict[str, str], dict]]]:
    """(the default arm, [(setting, {delta, low, high, seeds, rising})]) from one question page: the paired
    table's settings, then those the page lists as not paired (the default arm left an axis free and has no
    run at their values of it: {"unpaired": True})."""
    lines = page.read_text().splitlines()
    found = [t for t in tables(lines) if t and any(k.startswith("Δ best dev") for k in t[0])]
    against = next((re.search(r"Paired by seed against (.*?)(?: at the same (.*?))? \(the baseline\)", line)
                    for line in lines if line.startswith("Paired by seed against")), None)
    baseline = against[0][len("Paired by seed against "):-len(" (the baseline)")] if against else ""
    # (each setting's own default: the baseline at the setting's values of the axes it leaves free)
    base, free = (_setting(against[1]), against[2].split(", ") if against[2] else []) if against else ({}, [])
    line = next((line for line in lines if line.startswith("Best dev still rising")), "")
    rising = [_setting(re.sub(r" \([^)]*\)$", "", part))
              for part in line.split(" may move ", 1)[-1].split(": ", 1)[-1].rstrip(".").split("; ")] if line else []
    flagged = lambda setting: any(all(r.get(k) == v for k, v in setting.items()) for r in rising)  # noqa: E731
    out = []
    if found:
        rows = found[0]
        dev = next(k for k in rows[0] if k.startswith("Δ best dev") and not k.endswith("95% CI"))
        axes = list(rows[0])[:list(rows[0]).index(dev)]
        for row in rows:
            setting = {k: row[k] for k in axes}
            # (no seed shared with the default: no difference at all, an empty cell)
            low, high = _interval(row[f"{dev} 95% CI"]) if row[f"{dev} 95% CI"] else (float("nan"),) * 2
            out.append((setting, {
                "delta": float(row[dev]) if row[dev] else float("nan"), "low": low, "high": high,
                "seeds": int(row["seeds"]),
                "rising": flagged(setting) or (bool(base) and flagged({**base, **{k: setting[k] for k in free}}))}))
    if any(line.startswith("Not paired (") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Not paired ("))
        for line in lines[start + 2:]:
            if not line.startswith("- "):
                break
            out.append((_setting(line[2:]), {"unpaired": True}))
    return baseline, out


def verdict(cell: dict | None, epochs: int = 6) -> tuple[str, int]:
    """(the per-task verdict, its direction: +1 better, -1 worse, 0 none or not yet)."""
    if cell is None:
        return "not run yet", 0
    if cell.get("unpaired"):
        return "no default run at its values of the other axes: no verdict", 0
    if cell["seeds"] < SEEDS:
        return f"{cell['seeds']} of {SEEDS} seeds: no verdict", 0
    direction = 1 if cell["low"] > 0 else -1 if cell["high"] < 0 else 0
    said = {1: "better", -1: "worse", 0: "no difference the seeds support"}[direction]
    return said + (f" at {epochs} epochs" if direction and cell["rising"] else ""), direction


def across(directions: dict[str, int], complete: bool, budgets: dict[str, str] | None = None) -> str:
    """Rule 3 over the per-task directions; budgets ({task: "at 6 epochs"}, the per-task verdicts' rule-4
    qualifier) stays on the task it qualifies, so the summary never reads wider than its cells."""
    if not complete:
        return "not both tasks yet"
    budgets, name = budgets or {}, {t: TASKS[t].split(" (")[0] for t in TASKS}
    ways = {d for d in directions.values() if d}
    if len(ways) == 2:
        return "task-dependent"
    word = "better" if ways == {1} else "worse"
    if ways and all(directions.values()):
        qualified = ", ".join(f"{name[t]} {budgets[t]}" for t in directions if budgets.get(t))
        return f"holds on both tasks ({word}{'; ' + qualified if qualified else ''})"
    if ways:
        where = next(t for t, d in directions.items() if d)
        return (f"{word} on {name[where]} only{', ' + budgets[where] if budgets.get(where) else ''}; "
                "no difference the seeds support on the other")
    return "no difference the seeds support on either task"


def defaults_named(baselines: list[str]) -> str:
    """The tasks' default arms, each named once: the same setting with its axes in another order (the
    report orders a page's axes by its own sweeps) is one default, not two joined by " / "."""
    named: dict[tuple, str] = {}
    for baseline in filter(None, baselines):
        setting, _, free = baseline.partition(" at the same ")
        named.setdefault((tuple(sorted(_setting(setting).items())), tuple(sorted(free.split(", ")))), baseline)
    return " / ".join(named.values())


NO_ACROSS = "no verdict across the tasks: dropped on one before it ran"
NOTHING_PAIRED = "run; no setting paired with the default on 2 seeds yet"


def _labels(found: dict[str, list[tuple[dict, dict]]]) -> dict[str, dict[str, tuple[dict, str]]]:
    """Per task, {the setting's name in the table: (its cell, the axes only that task's page has)}. A setting
    is named by the axes every task's page has, so the same setting meets itself across tasks when one page
    has an axis the other lacks (a config key that differs between that task's sweeps only: a default
    changed between the commits its arms ran at); by all its axes where the shared ones would not tell a
    page's settings apart."""
    keys = [list(settings[0][0]) for settings in found.values() if settings]
    shared = [k for k in keys[0] if all(k in other for other in keys)] if keys else []
    distinct = shared and all(len({_label({k: s[k] for k in shared}) for s, _ in settings}) == len(settings)
                              for settings in found.values())
    named = {}
    for task, settings in found.items():
        named[task] = {}
        for setting, cell in settings:
            own = {k: v for k, v in setting.items() if k not in shared} if distinct else {}
            named[task][_label({k: setting[k] for k in shared} if distinct else setting)] = (cell, _label(own))
    return named


def block(pages: Path = PAGES) -> str:
    out = ["| question | setting | default | " + " | ".join(f"{t}: Δ best dev [95% CI], verdict" for t in TASKS.values())
           + " | across the two tasks |", "|" + "---|" * (4 + len(TASKS))]
    intervals = 0
    for stem, question in QUESTIONS.items():
        page = {task: f"{stem}_{LONGER.get((stem, task), (task,))[0]}" for task in TASKS}
        pages_found = {task: page_verdicts(pages / f"{page[task]}.md") for task in TASKS
                       if (pages / f"{page[task]}.md").is_file()}
        named = _labels({task: settings for task, (_, settings) in pages_found.items()})
        settings = list(dict.fromkeys(s for cells in named.values() for s in cells))
        # (a page with no paired table ran, with fewer than 2 seeds paired: not "not run yet")
        absent = {task: NOTHING_PAIRED if task in pages_found and not named[task] else
                  f"waiting for {page[task]}.md: {LONGER[stem, task][1]} no real budget for the default" if (stem, task) in LONGER
                  else "not run yet" for task in TASKS}
        if not settings:
            out.append(f"| {question} | | | " + " | ".join(absent.values()) + " | |")
            continue
        default = defaults_named([b for b, _ in pages_found.values()])
        for setting in settings:
            cells, directions, budgets, complete = [], {}, {}, True
            dropped = any((stem, task, setting) in DROPPED for task in TASKS)  # (never both tasks: none across)
            for task in TASKS:
                cell, own = named.get(task, {}).get(setting, (None, ""))
                epochs = int(re.search(r"(\d+)$", page[task]).group(1))
                said, directions[task] = verdict(cell, epochs)
                if said.endswith(f" at {epochs} epochs"):
                    budgets[task] = f"at {epochs} epochs"
                complete &= cell is not None and not cell.get("unpaired") and cell["seeds"] >= SEEDS
                if cell is None:
                    said = DROPPED.get((stem, task, setting), absent[task])
                elif not cell.get("unpaired") and cell["delta"] == cell["delta"]:  # (NaN: no seed paired)
                    shown = f"{cell['delta']:+.4f}"
                    if cell["low"] == cell["low"]:
                        intervals += 1
                        shown += f" [{cell['low']:+.4f}, {cell['high']:+.4f}]"
                    said = f"{shown}, {said}"
                cells.append(said + (f" (this task's run also has {own})" if own else "")
                             + (f" ({epochs} epochs: {page[task]}.md)" if cell is not None and epochs != 6 else ""))
            out.append(f"| {question} | {setting} | {default} | " + " | ".join(cells)
                       + f" | {NO_ACROSS if dropped else across(directions, complete, budgets)} |")
    note = (f"\n\n{intervals} interval{'' if intervals == 1 else 's'}, none corrected for the others: at 95%, "
            "about one in twenty excludes 0 by chance alone.")
    return "\n".join([BEGIN, *out]) + note + "\n" + END


def main(argv: list[str]) -> int:
    text = FINDINGS.read_text()
    if BEGIN not in text or END not in text:
        print(f"{FINDINGS}: no verdict markers ({BEGIN!r} ... {END!r})", file=sys.stderr)
        return 1
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = block()
    if "--check" in argv:
        if text[start:end] != new:
            print(f"{FINDINGS}'s verdict table is not the one the pages give: run python docs/findings/verdicts.py",
                  file=sys.stderr)
            return 1
        return 0
    FINDINGS.write_text(text[:start] + new + text[end:])
    print(f"wrote the verdict table of {FINDINGS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
