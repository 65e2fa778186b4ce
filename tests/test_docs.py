"""The README's figures are the findings page's: its methods table is made from docs/findings/methods_rt6.md."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from peft_lightning import report

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_table", ROOT / "docs" / "findings" / "readme_table.py")
readme_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_table)


def test_the_readmes_methods_table_is_the_one_the_findings_page_gives():
    assert readme_table.main(["--check"]) == 0


def test_the_readme_table_takes_the_dev_interval_of_the_paired_table_not_the_test_one(tmp_path):
    """The report's paired table has two columns named "95% CI" (dev, then test): the README shows the dev one."""
    page = tmp_path / "m.md"
    page.write_text("\n".join([
        "| method | method.optim.lr_ratio | best dev acc | dev 95% CI | test acc | test 95% CI | trainable | trainable % | n |",
        "|---|---|---|---|---|---|---|---|---|",
        "| finetune |  | 0.8600 ± 0.0010 | [0.85, 0.87] | 0.8700 ± 0.0060 | [0.85, 0.88] | 1,000 | 99.000 | 3 |",
        "| lora | 16.0 | 0.8500 ± 0.0080 | [0.83, 0.87] | 0.8400 ± 0.0070 | [0.82, 0.86] | 10 | 0.100 | 3 |",
        "| lora | 1.0 | 0.8400 ± 0.0080 | [0.82, 0.86] | 0.8300 ± 0.0070 | [0.81, 0.85] | 10 | 0.100 | 3 |",
        "",
        "| method | method.optim.lr_ratio | Δ best dev acc | 95% CI | Δ test acc | 95% CI | seeds |",
        "|---|---|---|---|---|---|---|",
        "| lora | 16.0 | -0.0100 | [-0.0200, +0.0000] | -0.0300 | [-0.0900, +0.0300] | 3 |",
        "| lora | 1.0 | -0.0200 | [-0.0300, -0.0100] | -0.0400 | [-0.0800, +0.0000] | 3 |",
    ]) + "\n")
    rows = [line for line in readme_table.block(page).splitlines()[3:] if line.startswith("| ")]
    assert rows == [
        "| full fine-tuning (`finetune`) | 1,000 (99.000%) | 0.8600 ± 0.0010 | 0.8700 ± 0.0060 | (the reference) | 3 |",
        "| LoRA+ (`lora`, `method.optim.lr_ratio=16`) | 10 (0.100%) | 0.8500 ± 0.0080 | 0.8400 ± 0.0070 "
        "| -0.0100 [-0.0200, +0.0000] | 3 |",
        "| LoRA (`lora`) | 10 (0.100%) | 0.8400 ± 0.0080 | 0.8300 ± 0.0070 | -0.0200 [-0.0300, -0.0100] | 3 |",
    ]


def _job(folder: Path, method: str, seed: int, dev: float, test: float, ratio: float | None = None,
         override: bool = False):
    """A finished job as train.py leaves it: results.json and .hydra/ (lr_ratio in the config of the
    methods that have the key; overridden on the command line for LoRA+ only)."""
    overrides = [f"method={method}", *([f"method.optim.lr_ratio={ratio:g}"] if override else []), "+sweeps=methods",
                 f"seed={seed}"]
    optim = {"lr": 1e-3, **({"lr_ratio": ratio} if ratio is not None else {})}
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "method": {"name": method, "optim": optim}}))
    (folder / "results.json").write_text(json.dumps({
        "status": "completed", "overrides": overrides, "method": method, "seed": seed,
        "parameters": {"trainable": 1000, "trainable_pct": 1.0},
        "metrics": {"best": {"val/acc_best": dev}, "test": {"test/acc": test}}}))


def test_lora_plus_and_plain_lora_are_two_rows_each_paired_with_fine_tuning_and_no_other_method_is_lora_plus(
        tmp_path, monkeypatch):
    """The report's page for a sweep where LoRA+ (method=lora method.optim.lr_ratio=16) joined the methods:
    fine-tuning and P-Tuning v2 have no lr_ratio in their configs (the report writes "(unset)"), plain LoRA
    has 1 from its config. The README rows: each labelled as what ran, each with its own paired difference
    (checked against a t-interval computed here), and a line naming what the table still lacks."""
    dev = {("finetune", None): [0.860, 0.862, 0.864], ("lora", 1.0): [0.850, 0.840, 0.852],
           ("lora", 16.0): [0.858, 0.861, 0.855], ("ptuning_v2", None): [0.830, 0.841]}
    test = {k: [v - 0.005 for v in values] for k, values in dev.items()}
    sweep, number = tmp_path / "sweep", 0
    for (method, ratio), values in dev.items():
        for seed, value in enumerate(values, 1):
            _job(sweep / str(number), method, seed, value, test[method, ratio][seed - 1], ratio, override=ratio == 16)
            number += 1
    page = tmp_path / "page.md"
    page.write_text(report.markdown(report.collect(sweep), "t", baseline={"method": "finetune"}))
    (tmp_path / "methods.yaml").write_text(yaml.safe_dump(
        {"hydra": {"sweeper": {"params": {"method": "ptuning_v2,lora,ia3,finetune"}}}}))
    monkeypatch.setattr(readme_table, "SWEEP", tmp_path / "methods.yaml", raising=False)

    def paired(key):  # mean of (setting - fine-tuning) by seed, and its 95% t-interval
        d = np.subtract(dev[key], dev["finetune", None][:len(dev[key])])
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        return f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"

    def spread(values):
        return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"

    lines = readme_table.block(page).splitlines()
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "`" in line}
    assert sorted(rows) == ["LoRA (`lora`)", "LoRA+ (`lora`, `method.optim.lr_ratio=16`)",
                            "P-Tuning v2 (`ptuning_v2`)", "full fine-tuning (`finetune`)"]
    assert rows["full fine-tuning (`finetune`)"].endswith(f"| {spread(dev['finetune', None])} | "
                                                           f"{spread(test['finetune', None])} | (the reference) | 3 |")
    for name, key in (("LoRA+ (`lora`, `method.optim.lr_ratio=16`)", ("lora", 16.0)), ("LoRA (`lora`)", ("lora", 1.0)),
                      ("P-Tuning v2 (`ptuning_v2`)", ("ptuning_v2", None))):
        assert rows[name].endswith(f"| {spread(dev[key])} | {spread(test[key])} | {paired(key)} | {len(dev[key])} |")
    assert lines[-2] == ("Provisional: P-Tuning v2 (`ptuning_v2`) has 2 of 3 seeds; not in the table yet "
                         "(no completed seed): (IA)³ (`ia3`).")


def test_a_page_paired_against_another_method_than_fine_tuning_is_refused(tmp_path):
    """The README's column says "vs full fine-tuning": a page whose paired table has another reference
    (a report run without --baseline method=finetune) must not fill it."""
    sweep = tmp_path / "sweep"
    for number, (method, values) in enumerate({"finetune": [0.80, 0.81], "lora": [0.85, 0.86]}.items()):
        for seed, value in enumerate(values, 1):
            _job(sweep / f"{number}{seed}", method, seed, value, value)
    page = tmp_path / "page.md"
    page.write_text(report.markdown(report.collect(sweep), "t"))  # (paired against the best: lora)
    try:
        readme_table.block(page)
    except ValueError as error:
        assert "not against method=finetune" in str(error)
    else:
        raise AssertionError("a page paired against lora filled the README's column")


def test_the_unset_cell_is_the_reports():
    assert readme_table.UNSET == report.UNSET


def test_the_still_rising_line_names_settings_as_the_table_does():
    """The report writes `method=finetune, method.optim.lr_ratio=(unset) (+0.0051 > 0.0011)`; the README names
    the method (and LoRA+ by its ratio), its gain and the seed std, and a setting with one seed says so."""
    line = ("Best dev still rising in the last third of the evaluations (by more than the seeds' std of best dev, or "
            "with one seed): a longer budget may move these settings: method=finetune, method.optim.lr_ratio=(unset) "
            "(+0.0051 > 0.0011); method=lora, method.optim.lr_ratio=16 (+0.0100, one seed).")
    assert readme_table.rising(["", line]).split("may move them: ", 1)[1] == (
        "full fine-tuning (`finetune`) +0.0051 (seed std 0.0011); "
        "LoRA+ (`lora`, `method.optim.lr_ratio=16`) +0.0100 (one seed).")
    assert readme_table.rising(["no such line"]) == ""


spec = importlib.util.spec_from_file_location("verdicts", ROOT / "docs" / "findings" / "verdicts.py")
verdicts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(verdicts)


def test_the_findings_verdict_table_is_the_one_the_question_pages_give():
    assert verdicts.main(["--check"]) == 0


def _arm(folder: Path, dropout: bool, devs: list[float], metric: str):
    for seed, dev in enumerate(devs, 1):
        job = folder / f"{int(dropout)}{seed}"
        overrides = ["method=ptuning_v2", f"seed={seed}", *([f"method.backbone_dropout={str(dropout).lower()}"]
                                                             if dropout else [])]
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
            {"seed": seed, "method": {"name": "ptuning_v2", "backbone_dropout": dropout}, "data": {"metric": metric}}))
        (job / "results.json").write_text(json.dumps({
            "status": "completed", "overrides": overrides, "method": "ptuning_v2", "seed": seed,
            "parameters": {"trainable": 1000, "trainable_pct": 1.0},
            "metrics": {"best": {f"val/{metric}_best": dev}, "test": {f"test/{metric}": dev}}}))


def test_verdicts_follow_the_rules_fixed_before_the_runs(tmp_path):
    """Real report pages (peft_lightning.report over fake jobs) for one question on two tasks: on Rotten
    Tomatoes the paired interval excludes 0 (dropout on is better), on SMS spam it does not. The rules of
    docs/findings.md, by hand: "better" on the one task, "no difference the seeds support" on the other, and
    across tasks the task where the seeds support it named; a third seed missing is no verdict at all."""
    rt = {False: [0.80, 0.81, 0.82], True: [0.83, 0.845, 0.85]}
    sms = {False: [0.90, 0.91, 0.92], True: [0.91, 0.90, 0.93]}
    for task, arms, metric in (("rt6", rt, "acc"), ("sms6", sms, "f1")):
        for dropout, devs in arms.items():
            _arm(tmp_path / task, dropout, devs, metric)
        assert report.main([str(tmp_path / task), "--where", "method=ptuning_v2", "--baseline",
                            "method.backbone_dropout=false", "--no-plots", "--out", str(tmp_path / f"dropout_{task}.md")]) == 0
    row = next(line for line in verdicts.block(tmp_path).splitlines() if line.startswith("| backbone dropout"))
    for task, arms in (("rt", rt), ("sms", sms)):  # the paired mean and t-interval, by hand (scipy)
        d = np.subtract(arms[True], arms[False])
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        expect = f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"
        assert expect in row, (task, expect, row)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "method.backbone_dropout=true" and cells[2] == "method.backbone_dropout=false"
    assert cells[3].endswith(", better") and cells[4].endswith(", no difference the seeds support")
    assert cells[5] == "better on Rotten Tomatoes only; no difference the seeds support on the other"
    # the third SMS seed gone: no verdict on SMS spam, none across
    for job in (tmp_path / "sms6").glob("?3"):
        for file in job.rglob("*"):
            if file.is_file():
                file.unlink()
    assert report.main([str(tmp_path / "sms6"), "--where", "method=ptuning_v2", "--baseline",
                        "method.backbone_dropout=false", "--no-plots", "--out", str(tmp_path / "dropout_sms6.md")]) == 0
    row = next(line for line in verdicts.block(tmp_path).splitlines() if line.startswith("| backbone dropout"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4].endswith("2 of 3 seeds: no verdict yet") and cells[5] == "not both tasks yet"
