"""The README's methods table, made from the findings page's report (docs/findings/methods_rt6.md), so the
README never carries a hand-copied figure:

    python docs/findings/readme_table.py          # rewrite the README's block between its two markers
    python docs/findings/readme_table.py --check  # exit 1 when the README's block is not the page's

docs/findings/regenerate.sh runs it after the methods report; tests/test_docs.py runs --check.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "findings" / "methods_rt6.md"
README = ROOT / "README.md"
BEGIN = "<!-- methods table: made by docs/findings/readme_table.py from docs/findings/methods_rt6.md; do not edit -->"
END = "<!-- end of methods table -->"
NAMES = {"finetune": "full fine-tuning", "unipelt": "UniPELT", "dora": "DoRA", "lora": "LoRA", "adapter": "adapter (Houlsby)",
         "ptuning_v2": "P-Tuning v2", "prefix_tuning": "prefix tuning", "ia3": "(IA)³", "bitfit": "BitFit",
         "prompt_tuning": "prompt tuning", "p_tuning": "P-tuning"}


def tables(lines: list[str]) -> list[list[dict[str, str]]]:
    """Every markdown table of a page, as rows of {header: cell}."""
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            # (the paired table has a "95% CI" after each difference: name each after its own column)
            head = [f"{head[j - 1]} {h}" if h == "95% CI" and j else h for j, h in enumerate(head)]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, (c.strip() for c in lines[i].strip().strip("|").split("|")))))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


RATIO = "method.optim.lr_ratio"
UNSET = "(unset)"  # the report's cell for a key a job's config lacks (peft_lightning.report.UNSET): finetune's lr_ratio
SWEEP = ROOT / "sweeps" / "methods.yaml"  # the methods the table is to hold
SEEDS = 3


def _ratio(row: dict[str, str]) -> str:
    """The row's LoRA+ learning-rate ratio; "" for none: 1 (plain LoRA), or a method without the key."""
    value = row.get(RATIO, "")
    try:
        return "" if float(value) == 1 else f"{float(value):g}"
    except ValueError:  # ("", the report's "(unset)", "nan" where a job had no config)
        return ""


def label(row: dict[str, str], axes: list[str]) -> str:
    """The method's name, and any other axis set on it (LoRA+: `method=lora method.optim.lr_ratio=16`)."""
    method, ratio = row["method"], _ratio(row)
    extra = [f"`{RATIO}={ratio}`"] if ratio else []
    extra += [f"`{k}={row[k]}`" for k in axes if k not in ("method", RATIO) and row.get(k, UNSET) != UNSET]
    name = "LoRA+" if method == "lora" and ratio else NAMES.get(method, method)
    return f"{name} ({', '.join([f'`{method}`', *extra])})"


def pending(main: list[dict[str, str]]) -> str:
    """What the table still lacks: a method of the sweep (or LoRA+) with no row, or one with fewer seeds."""
    import yaml

    wanted = [(m, "") for m in yaml.safe_load(SWEEP.read_text())["hydra"]["sweeper"]["params"]["method"].split(",")]
    wanted.append(("lora", "16"))  # LoRA+, docs/findings.md's command
    rows = {(r["method"], _ratio(r)): r for r in main}
    name = lambda m, ratio: label({"method": m, RATIO: ratio}, [])  # noqa: E731
    short = [f"{name(*w)} has {rows[w]['n']} of {SEEDS} seeds" for w in wanted if w in rows and int(rows[w]["n"]) < SEEDS]
    missing = [name(*w) for w in wanted if w not in rows]
    parts = short + ([f"not in the table yet (no completed seed): {', '.join(missing)}"] if missing else [])
    return f"\n\nProvisional: {'; '.join(parts)}." if parts else ""


def rising(lines: list[str]) -> str:
    """The report's sentence naming the settings whose dev was still rising at the end of the budget,
    each named as in the table."""
    import re

    line = next((line for line in lines if line.startswith("Best dev still rising")), None)
    if line is None:
        return ""
    named = []
    for part in line.split(" may move ", 1)[1].split(": ", 1)[1].rstrip(".").split("; "):
        found = re.fullmatch(r"(.*) \(([+-][0-9.]+)(?: > ([0-9.]+))?(, one seed)?\)", part)
        if found is None:
            raise ValueError(f"unexpected setting in the report's still-rising sentence: {part!r}")
        row = dict(pair.split("=", 1) for pair in found[1].split(", "))
        spread = f"seed std {found[3]}" if found[3] else "one seed"
        named.append(f"{label(row, list(row))} {found[2]} ({spread})")
    return ("\n\nStill rising at the end of the 6 epochs (the report's check: best dev gained more in the last third "
            f"of the evaluations than the seeds' std), so a longer budget may move them: {'; '.join(named)}.")


def block(page: Path = PAGE) -> str:
    lines = page.read_text().splitlines()
    main, *rest = [t for t in tables(lines) if t and "method" in t[0]]
    paired = next((t for t in rest if "Δ best dev acc" in t[0]), [])
    head = list(main[0])
    axes = head[:head.index("best dev acc")]  # (the setting's columns: method, and lr_ratio once LoRA+ is in)
    key = lambda r: tuple(r.get(a, "") for a in axes)  # noqa: E731
    delta = {key(r): r for r in paired}
    out = ["| method | trainable | best dev acc | test acc | Δ dev vs full fine-tuning, paired [95% CI] | seeds |",
           "|---|---|---|---|---|---|"]
    for row in main:  # (the report's order: ranked by best dev)
        d = delta.get(key(row))
        if (d is None) != (row["method"] == "finetune"):  # the header says the paired table is against it
            raise ValueError(f"{page}: the paired table is not against method=finetune alone "
                             f"({label(row, axes)} has {'no' if d is None else 'a'} paired difference)")
        diff = f"{d['Δ best dev acc']} {d['Δ best dev acc 95% CI']}".strip() if d else "(the reference)"
        out.append(f"| {label(row, axes)} | {row['trainable']} ({row['trainable %']}%) | {row['best dev acc']} | "
                   f"{row['test acc']} | {diff} | {row['n']} |")
    return "\n".join([BEGIN, *out]) + rising(lines) + pending(main) + "\n" + END


def current(readme: str) -> str:
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[start:end]


def main(argv: list[str]) -> int:
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        print(f"{README}: no methods table markers ({BEGIN!r} ... {END!r})", file=sys.stderr)
        return 1
    try:
        new = block()
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    if "--check" in argv:
        if current(readme) != new:
            print(f"{README}'s methods table is not the one {PAGE} gives: run python docs/findings/readme_table.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(readme.replace(current(readme), new))
    print(f"wrote the methods table of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
