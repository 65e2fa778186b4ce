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


def label(row: dict[str, str]) -> str:
    """The method's name, and any other axis set on it (LoRA+: method.optim.lr_ratio=16)."""
    name = f"{NAMES.get(row['method'], row['method'])} (`{row['method']}`)"
    ratio = row.get("method.optim.lr_ratio", "")
    if ratio not in ("", "1", "1.0", "nan", "None", "null"):
        name = f"LoRA+ (`{row['method']}`, `method.optim.lr_ratio={ratio}`)"
    return name


def block(page: Path = PAGE) -> str:
    main, *rest = [t for t in tables(page.read_text().splitlines()) if t and "method" in t[0]]
    paired = next((t for t in rest if "Δ best dev acc" in t[0]), [])
    key = lambda r: (r["method"], r.get("method.optim.lr_ratio", ""))  # noqa: E731
    delta = {key(r): r for r in paired}
    out = ["| method | trainable | best dev acc | test acc | Δ dev vs full fine-tuning, paired [95% CI] | seeds |",
           "|---|---|---|---|---|---|"]
    for row in main:  # (the report's order: ranked by best dev)
        d = delta.get(key(row))
        diff = f"{d['Δ best dev acc']} {d['Δ best dev acc 95% CI']}".strip() if d else "(the reference)"
        out.append(f"| {label(row)} | {row['trainable']} ({row['trainable %']}%) | {row['best dev acc']} | "
                   f"{row['test acc']} | {diff} | {row['n']} |")
    return "\n".join([BEGIN, *out, END])


def current(readme: str) -> str:
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[start:end]


def main(argv: list[str]) -> int:
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        print(f"{README}: no methods table markers ({BEGIN!r} ... {END!r})", file=sys.stderr)
        return 1
    new = block()
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
