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
    assert cells[4].endswith("2 of 3 seeds: no verdict") and cells[5] == "not both tasks yet"


def test_a_paired_interval_cut_at_the_metrics_range_is_read_as_the_page_shows_it(tmp_path):
    """Seeds that disagree wildly: the paired t-interval of dropout on - off reaches past -1 and +1, which no
    difference of two F1 values can; the page shows it cut to [-1, +1] and marked, and the verdict reads that."""
    for task in ("rt6", "sms6"):
        _arm(tmp_path / task, False, [0.05, 0.95, 0.05], "f1")
        _arm(tmp_path / task, True, [0.95, 0.75, 0.95], "f1")  # differences +0.9, -0.2, +0.9
        assert report.main([str(tmp_path / task), "--where", "method=ptuning_v2", "--baseline",
                            "method.backbone_dropout=false", "--no-plots", "--out", str(tmp_path / f"dropout_{task}.md")]) == 0
    assert "| +0.5333 | [-1.0000, +1.0000]† |" in (tmp_path / "dropout_sms6.md").read_text()
    row = next(line for line in verdicts.block(tmp_path).splitlines() if line.startswith("| backbone dropout"))
    assert "+0.5333 [-1.0000, +1.0000], no difference the seeds support" in row, row


def _ran(folder: Path, name: str, overrides: list[str], config: dict, dev: float, metric: str, rising: bool = False):
    """A completed job as train.py leaves it: its overrides, its composed config (`method.x.y` keys), its
    results, and its dev curve (csv/version_0), still rising over the last third of six evaluations or flat."""
    job, seed = folder / name, int(next(o for o in overrides if o.startswith("seed="))[5:])
    tree = {"seed": seed, "data": {"metric": metric}, "method": {"name": "ptuning_v2"}}
    for key, value in config.items():
        node = tree
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = value
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(tree))
    (job / "results.json").write_text(json.dumps({
        "status": "completed", "overrides": overrides, "method": "ptuning_v2", "seed": seed,
        "parameters": {"trainable": 1000, "trainable_pct": 1.0},
        "metrics": {"best": {f"val/{metric}_best": dev}, "test": {f"test/{metric}": dev}}}))
    curve = ([dev - 0.1, dev - 0.08, dev - 0.06, dev - 0.05, dev - 0.02, dev] if rising
             else [dev - 0.05, dev, dev, dev, dev, dev])
    (job / "csv" / "version_0").mkdir(parents=True)
    (job / "csv" / "version_0" / "metrics.csv").write_text("\n".join(
        [f"epoch,step,val/{metric}"] + [f"{e},{100 * (e + 1)},{v}" for e, v in enumerate(curve)]) + "\n")


def _page(tmp_path: Path, out: str, folders: list[str], baseline: str) -> None:
    assert report.main([*(str(tmp_path / f) for f in folders), "--where", "method=ptuning_v2", "--baseline", baseline,
                        "--no-plots", "--out", str(tmp_path / out)]) == 0


def _rows(tmp_path: Path, question: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in verdicts.block(tmp_path).splitlines()
            if line.startswith(f"| {question}")]


def test_a_setting_meets_itself_across_tasks_when_one_tasks_page_has_an_extra_axis(tmp_path):
    """Rotten Tomatoes' default arm (budget_rt) ran before a config key existed: its page has that key as an
    extra axis, SMS spam's not. Each depth setting is still one row, its two tasks side by side and judged
    across (they were two rows, each "not run yet" on the other task, never a verdict across); the list
    value's commas split nothing, and its still-rising flag is read."""
    for task, metric in (("rt6", "acc"), ("sms6", "f1")):
        for seed, dev in enumerate([0.80, 0.81, 0.82], 1):
            _ran(tmp_path / f"base_{task}", f"b{seed}", ["method=ptuning_v2", f"seed={seed}"],
                 {"method.depth": "deep", **({"method.new_knob": 1} if task == "sms6" else {})}, dev, metric)
            for depth, delta in (("embedding", -0.1), ("[3,4,5]", 0.03 + seed / 1000)):
                _ran(tmp_path / f"depth_{task}", f"{depth}{seed}",
                     ["method=ptuning_v2", f"method.depth={depth}", f"seed={seed}"],
                     {"method.depth": yaml.safe_load(depth), "method.new_knob": 1}, dev + delta, metric, rising=True)
        _page(tmp_path, f"depth_{task}.md", [f"base_{task}", f"depth_{task}"], "method.depth=deep")
    assert "method.new_knob" in (tmp_path / "depth_rt6.md").read_text().split("| method.depth")[0]  # (RT's extra axis)
    rows = {row[1]: row for row in _rows(tmp_path, "depth vs deep")}
    assert sorted(rows) == ["method.depth=[3,4,5]", "method.depth=embedding"]
    top = rows["method.depth=[3,4,5]"]
    assert top[3] == "+0.0320 [+0.0295, +0.0345], better at 6 epochs (this task's run also has method.new_knob=1)"
    assert top[4] == "+0.0320 [+0.0295, +0.0345], better at 6 epochs"
    # the per-task "at 6 epochs" (rule 4) stays in the summary across the tasks, on the tasks it qualifies
    assert top[5] == "holds on both tasks (better; Rotten Tomatoes at 6 epochs, SMS spam at 6 epochs)"
    assert rows["method.depth=embedding"][5] == "holds on both tasks (worse; Rotten Tomatoes at 6 epochs, SMS spam at 6 epochs)"


def test_the_summary_across_tasks_keeps_each_tasks_budget_qualifier():
    """Rule 4's "at 6 epochs" qualifies one task's verdict; the across-task cell summarising it said "worse on
    Rotten Tomatoes only" or "holds on both tasks (worse)" without it, wider than the cells it summarises."""
    assert verdicts.across({"rt6": -1, "sms6": 0}, True, {"rt6": "at 6 epochs"}) == (
        "worse on Rotten Tomatoes only, at 6 epochs; no difference the seeds support on the other")
    assert verdicts.across({"rt6": -1, "sms6": -1}, True, {"rt6": "at 6 epochs"}) == (
        "holds on both tasks (worse; Rotten Tomatoes at 6 epochs)")
    assert verdicts.across({"rt6": 0, "sms6": 1}, True, {}) == (
        "better on SMS spam only; no difference the seeds support on the other")
    assert verdicts.across({"rt6": -1, "sms6": 1}, True, {"rt6": "at 6 epochs"}) == "task-dependent"


def test_a_setting_dropped_on_one_task_has_no_verdict_there_and_none_across(tmp_path):
    """P-Tuning v2's MLP at 1e-2 ran on Rotten Tomatoes and was dropped on SMS spam before it ran (DROPPED): its
    SMS cell says so, and across the tasks it is no verdict, not "not both tasks yet" (which waits for a run
    that will never come)."""
    arms = {"rt6": [("none", "0.01"), ("mlp", "0.01"), ("mlp", "0.0005")], "sms6": [("none", "0.01"), ("mlp", "0.0005")]}
    for task, settings in arms.items():
        metric = "acc" if task == "rt6" else "f1"
        for reparam, lr in settings:
            for seed, dev in enumerate([0.80, 0.81, 0.83], 1):
                _ran(tmp_path / f"reparam_{task}", f"{reparam}{lr}{seed}",
                     ["method=ptuning_v2", f"method.reparameterization={reparam}", f"method.optim.lr={lr}", f"seed={seed}"],
                     {"method.reparameterization": reparam, "method.optim.lr": float(lr)},
                     dev + (0.05 if reparam == "mlp" else 0), metric)
        _page(tmp_path, f"reparam_ptuning_v2_{task}.md", [f"reparam_{task}"], "method.reparameterization=none")
    rows = {row[1]: row for row in _rows(tmp_path, "reparameterization vs none (P-Tuning v2)")}
    dropped = rows["method.reparameterization=mlp, method.optim.lr=0.01"]
    assert dropped[3].endswith(", better") and dropped[4] == "dropped before it ran (see the rules): no verdict"
    assert dropped[5] == verdicts.NO_ACROSS
    assert rows["method.reparameterization=mlp, method.optim.lr=0.0005"][5] == "holds on both tasks (better)"


def test_a_default_named_with_its_axes_in_another_order_is_one_default():
    """Prefix tuning's preset pages name the same default with the rate first on SMS spam (its 12-epoch default
    arm's sweep overrode the rate) and third on Rotten Tomatoes: the table showed it twice, joined by " / "."""
    rt = "experiment=null, method.prefix_length=16, method.optim.lr=0.0005"
    sms = "method.optim.lr=0.0005, experiment=null, method.prefix_length=16"
    assert verdicts.defaults_named([rt, sms]) == rt
    assert verdicts.defaults_named([rt, "method.optim.lr=0.001, experiment=null, method.prefix_length=16"]) == (
        rt + " / method.optim.lr=0.001, experiment=null, method.prefix_length=16")
    assert verdicts.defaults_named(["", rt]) == rt


def test_a_setting_no_default_seed_paired_and_a_page_with_no_paired_table_are_no_verdict_not_a_crash(tmp_path):
    """SMS spam's default arm has seeds 1 and 2 done, `lstm` only seed 3: its paired row is empty (the verdicts
    crashed on it). Rotten Tomatoes ran one seed of each: the page has no paired table, which is "run, nothing
    paired yet", not "not run yet"."""
    none, mlp = {"method.reparameterization": "none"}, {"method.reparameterization": "mlp"}
    _ran(tmp_path / "base_rt6", "b1", ["method=ptuning_v2", "seed=1"], none, 0.8, "acc")
    _ran(tmp_path / "reparam_rt6", "m1", ["method=ptuning_v2", "method.reparameterization=mlp", "seed=1"], mlp, 0.82, "acc")
    for seed in (1, 2):
        _ran(tmp_path / "base_sms6", f"b{seed}", ["method=ptuning_v2", f"seed={seed}"], none, 0.8 + seed / 100, "f1")
    for seed in (1, 2, 3):
        _ran(tmp_path / "reparam_sms6", f"m{seed}", ["method=ptuning_v2", "method.reparameterization=mlp", f"seed={seed}"],
             mlp, 0.85 + seed / 100, "f1")
    _ran(tmp_path / "reparam_sms6", "l3", ["method=ptuning_v2", "method.reparameterization=lstm", "seed=3"],
         {"method.reparameterization": "lstm"}, 0.9, "f1")
    for task in ("rt6", "sms6"):
        _page(tmp_path, f"reparam_ptuning_v2_{task}.md", [f"base_{task}", f"reparam_{task}"],
              "method.reparameterization=none")
    rows = {row[1]: row for row in _rows(tmp_path, "reparameterization vs none")}
    assert rows["method.reparameterization=lstm"][3:] == [verdicts.NOTHING_PAIRED, "0 of 3 seeds: no verdict",
                                                          "not both tasks yet"]
    assert rows["method.reparameterization=mlp"][3:] == [
        verdicts.NOTHING_PAIRED, "+0.0500 [+0.0500, +0.0500], 2 of 3 seeds: no verdict", "not both tasks yet"]
    (tmp_path / "reparam_ptuning_v2_sms6.md").unlink()
    assert _rows(tmp_path, "reparameterization vs none") == [
        ["reparameterization vs none (P-Tuning v2)", "", "", verdicts.NOTHING_PAIRED, "not run yet", ""]]


def test_a_default_arm_that_leaves_an_axis_free_is_each_settings_own_default(tmp_path):
    """The default arm ran at two values of a config key (a relaunch at a changed default): the report pairs
    each setting with the default at its own value ("against ... at the same method.foo"). The setting's own
    default is still rising, so the verdict is "at 6 epochs" (the free-axis clause was read as part of the
    default's value, so it never matched); a setting at a value no default ran is listed, not dropped."""
    for foo in (1, 2):
        for seed, dev in enumerate([0.80, 0.81, 0.82], 1):
            _ran(tmp_path / "base", f"b{foo}{seed}", ["method=ptuning_v2", f"seed={seed}"],
                 {"method.backbone_dropout": False, "method.foo": foo}, dev, "acc", rising=foo == 2)
    for seed, dev in enumerate([0.83, 0.845, 0.85], 1):
        _ran(tmp_path / "dropout", f"d{seed}", ["method=ptuning_v2", "method.backbone_dropout=true", f"seed={seed}"],
             {"method.backbone_dropout": True, "method.foo": 2}, dev, "acc")
    _ran(tmp_path / "dropout", "e1", ["method=ptuning_v2", "method.backbone_dropout=true", "seed=1"],
         {"method.backbone_dropout": True, "method.foo": 3}, 0.9, "acc")
    _page(tmp_path, "dropout_rt6.md", ["base", "dropout"], "method.backbone_dropout=false")
    rows = _rows(tmp_path, "backbone dropout")
    assert [row[1:4] for row in rows] == [
        ["method.backbone_dropout=true, method.foo=2", "method.backbone_dropout=false at the same method.foo",
         "+0.0317 [+0.0245, +0.0388], better at 6 epochs"],
        ["method.backbone_dropout=true, method.foo=3", "method.backbone_dropout=false at the same method.foo",
         "no default run at its values of the other axes: no verdict"]]


def test_a_value_that_holds_a_comma_is_one_value_of_one_axis(tmp_path):
    """A config string that differs between the arms (a prompt template changed between commits) becomes an
    axis whose value holds ", ": the still-rising line that names it is read, not split at that comma (it
    crashed the verdicts)."""
    for seed, dev in enumerate([0.80, 0.81, 0.82], 1):
        _ran(tmp_path / "base", f"b{seed}", ["method=ptuning_v2", f"seed={seed}"],
             {"method.backbone_dropout": False, "data.template": "Review: {text}, sentiment:"}, dev, "acc", rising=True)
        _ran(tmp_path / "dropout", f"d{seed}", ["method=ptuning_v2", "method.backbone_dropout=true", f"seed={seed}"],
             {"method.backbone_dropout": True, "data.template": "{text}, so it was"}, dev + 0.02 + seed / 1000, "acc")
    _page(tmp_path, "dropout_rt6.md", ["base", "dropout"], "method.backbone_dropout=false")
    assert "data.template=Review: {text}, sentiment: (+0.0500" in (tmp_path / "dropout_rt6.md").read_text()
    [row] = _rows(tmp_path, "backbone dropout")
    assert row[1] == "method.backbone_dropout=true, data.template={text}, so it was"
    assert row[3] == "+0.0220 [+0.0195, +0.0245], better at 6 epochs"  # (the default is the one rising)


def test_every_plot_in_docs_findings_is_shown_by_a_page():
    """A page regenerated with another axis (reparam_prefix_tuning_rt6 gained method.optim.lr) writes a new plot;
    the old one stayed beside it, shown by no page, read as current by anyone browsing the folder.
    regenerate.sh now removes a question's plots that no page shows once its page is written."""
    pages = "".join(p.read_text() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("docs/findings/*.md")])
    unshown = [p.name for p in sorted((ROOT / "docs" / "findings").glob("*.png")) if p.name not in pages]
    assert not unshown, unshown


def test_a_task_whose_default_had_not_flattened_is_read_at_its_longer_budget(tmp_path):
    """Prefix tuning's default arm (the MLP) on SMS spam was still at chance after 6 epochs for one seed, and
    still rising at 12: the reparameterization pair there runs at 24 epochs too (reparam_prefix_tuning_sms24),
    and the verdict table reads that page for SMS spam in place of the 6-epoch one, saying which it read; "at
    24 epochs", not 6, where a setting is still rising. Before that page exists the cell waits for it: the
    shorter pages' verdicts (here "better" at 6 epochs) are no verdict, since their default had not flattened."""
    def arm(folder, setting, devs, rising=False):
        for seed, dev in enumerate(devs, 1):
            overrides = ["method=ptuning_v2", f"seed={seed}",
                         *([f"method.reparameterization={setting}"] if setting != "mlp" else [])]
            _ran(tmp_path / folder, f"{setting}{seed}", overrides, {"method.reparameterization": setting}, dev, "f1",
                 rising)
    arm("s6", "mlp", [0.90, 0.91, 0.92]), arm("s6", "none", [0.95, 0.965, 0.97])  # 6 epochs: better
    arm("s24", "mlp", [0.96, 0.97, 0.975]), arm("s24", "none", [0.95, 0.955, 0.96], rising=True)  # 24: worse
    for folder, page in (("s6", "reparam_prefix_tuning_sms6.md"), ("s6", "reparam_prefix_tuning_sms12.md"),
                         ("s24", "reparam_prefix_tuning_sms24.md")):
        _page(tmp_path, page, [folder], "method.reparameterization=mlp")
    row = next(r for r in _rows(tmp_path, "reparameterization vs MLP (prefix tuning)"))
    d = np.subtract([0.95, 0.955, 0.96], [0.96, 0.97, 0.975])
    assert row[4].startswith(f"{d.mean():+.4f} ["), row
    assert row[4].endswith(", worse at 24 epochs (24 epochs: reparam_prefix_tuning_sms24.md)"), row
    (tmp_path / "reparam_prefix_tuning_sms24.md").unlink()  # not run yet: waited for, not a shorter page's verdict
    row = next(r for r in _rows(tmp_path, "reparameterization vs MLP (prefix tuning)"))
    assert row[4] == "waiting for reparam_prefix_tuning_sms24.md: 6 and 12 epochs were no real budget for the default", row


def test_every_sweep_the_queue_runs_is_read_by_a_report():
    """A sweep added to jobs.txt that no report of regenerate.sh reads (reparam_sms12 was added with its report;
    forgetting one leaves CPU-hours of runs in no table). regenerate.sh names a task's sweeps as <name>_${task}6.
    transfer_source is read by the transfer jobs themselves (its prefix), not by a report."""
    import re

    jobs = (ROOT / "docs" / "findings" / "jobs.txt").read_text()
    script = (ROOT / "docs" / "findings" / "regenerate.sh").read_text()
    sweeps = set(re.findall(r"hydra\.sweep\.dir=\$R/(\S+)", jobs)) - {"transfer_source"}
    words = set(re.findall(r"[\w${}]+", script))
    unread = [s for s in sorted(sweeps) if s not in words and re.sub(r"_(rt|sms)6$", r"_${task}6", s) not in words]
    assert sweeps and not unread, unread


def test_the_page_scripts_run_as_regenerate_sh_runs_them():
    """regenerate.sh runs verdicts.py and readme_table.py as scripts from the repository root, where only
    their own folder is on the path: an import that works in-process under pytest must not hide there."""
    import subprocess
    import sys

    for script in ("verdicts.py", "readme_table.py"):
        done = subprocess.run([sys.executable, f"docs/findings/{script}", "--check"], cwd=ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 0, (script, done.stderr)
