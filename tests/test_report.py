"""The comparison report reads a multirun's results.json files, whatever state each job ended in."""
import json
import shutil

import pandas as pd
import pytest

from peft_lightning.report import collect, main, summarize


def job(root, num, overrides, status="completed", acc=None, error=None, test=None, wall=None, earlier=()):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if status is None:  # killed before writing anything
        return
    results = {"status": status, "overrides": overrides,
               "metrics": {"test": {"test/acc": acc if test is None else test}, "best": {"val/acc_best": acc}},
               "parameters": {"trainable": 100, "trainable_pct": 0.5}, "train_seconds_per_epoch": [10.0, 12.0]}
    if error:
        results["error"] = error
    if wall is not None:  # this attempt's seconds; `earlier`: those of interrupted attempts before it
        # (CPU seconds: half the wall seconds here, as if the machine were shared)
        results["wall_time_s"], results["cpu_time_s"] = wall, wall / 2
        results["previous_attempts"] = [{"status": "interrupted", "wall_time_s": w, "cpu_time_s": w / 2}
                                        for w in earlier]
    (d / "results.json").write_text(json.dumps(results))


def test_report_groups_by_axes_averages_seeds_and_lists_failures(tmp_path, capsys):
    job(tmp_path, 0, ["method=lora", "seed=1"], acc=0.80)
    job(tmp_path, 1, ["method=lora", "seed=2"], acc=0.90)
    job(tmp_path, 2, ["method=adapter", "seed=1"], acc=0.70)
    job(tmp_path, 3, ["method=adapter", "seed=2"], status="failed", error="FloatingPointError: Loss became nan")
    job(tmp_path, 4, ["method=bitfit", "seed=1"], status=None)
    frame = collect(tmp_path)
    assert list(frame["status"]) == ["completed", "completed", "completed", "failed", "no results.json"]
    summary = summarize(frame).set_index("method")
    assert abs(summary.loc["lora", "test acc"] - 0.85) < 1e-9 and summary.loc["lora", "n"] == 2
    assert summary.loc["adapter", "n"] == 1
    assert summary.loc["lora", "train s/epoch"] == 11.0  # median of [10, 12] per job
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| lora") or line.startswith("| adapter")]
    assert rows[0].startswith("| lora | 0.8500 ± 0.0707")  # best first, mean ± std over seeds
    assert "job 3 (method=adapter): failed: FloatingPointError: Loss became nan" in text
    assert "job 4 (method=bitfit): no results.json" in text


def test_report_plots_metric_against_a_numeric_axis(tmp_path):
    for i, (method, length, seed, acc) in enumerate([("a", 4, 1, 0.6), ("a", 4, 2, 0.7), ("a", 16, 1, 0.8),
                                                      ("b", 4, 1, 0.5), ("b", 16, 1, 0.9)]):
        job(tmp_path, i, [f"method={method}", f"method.prefix_length={length}", f"seed={seed}"], acc=acc)
    assert main([str(tmp_path), "--out", str(tmp_path / "report" / "r.md")]) == 0
    text = (tmp_path / "report" / "r.md").read_text()
    png = tmp_path / "report" / "r_best_dev_acc_vs_method_prefix_length.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and f"({png.name})" in text


def test_two_reports_in_one_folder_keep_their_own_plots(tmp_path):
    """docs/findings/ holds a report per question; two of them plot the same axis (every method at 3
    and at 6 epochs). The second must not replace the picture the first report shows."""
    for i, (method, acc) in enumerate([("a", 0.6), ("b", 0.7)]):
        job(tmp_path / "three", i, [f"method={method}"], acc=acc)
        job(tmp_path / "six", i, [f"method={method}"], acc=acc + 0.2)
    docs = tmp_path / "docs"
    assert main([str(tmp_path / "three"), "--out", str(docs / "three.md")]) == 0
    first = (docs / "three_best_dev_acc_vs_method.png").read_bytes()
    assert main([str(tmp_path / "six"), "--out", str(docs / "six.md")]) == 0
    assert (docs / "three_best_dev_acc_vs_method.png").read_bytes() == first
    assert "(six_best_dev_acc_vs_method.png)" in (docs / "six.md").read_text()
    assert (docs / "six_best_dev_acc_vs_method.png").read_bytes() != first


@pytest.mark.parametrize("name", ["my report.md", "methods (v2).md"])
def test_a_report_named_with_spaces_or_brackets_links_its_plot(tmp_path, name):
    """The plot's name starts with the report's: a space or a bracket in it must not break the image
    link (CommonMark, as markdown-it renders it, shows a bare `![..](a b.png)` as text)."""
    from urllib.parse import unquote

    from markdown_it import MarkdownIt

    for i, (method, acc) in enumerate([("a", 0.6), ("b", 0.7)]):
        job(tmp_path / "runs", i, [f"method={method}"], acc=acc)
    out = tmp_path / "docs" / name
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    tokens = [t for block in MarkdownIt("commonmark").parse(out.read_text()) for t in block.children or []]
    images = [unquote(t.attrs["src"]) for t in tokens if t.type == "image"]
    assert images == [f"{out.stem}_best_dev_acc_vs_method.png"]
    assert (out.parent / images[0]).read_bytes()[:4] == b"\x89PNG"


def test_report_of_an_optuna_search_shows_its_best_trial_and_rounds_sampled_values(tmp_path):
    for i, (lr, acc) in enumerate([("0.0013292918943162175", 0.70), ("0.03142880890840111", 0.60)]):
        job(tmp_path, i, [f"method.optim.lr={lr}", "method.prefix_length=4"], acc=acc)
    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  method.optim.lr: 0.0013292918943162175\n  method.prefix_length: 4\nbest_value: 0.7\n")
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "Optuna's best trial: method.optim.lr=0.001329, method.prefix_length=4 (best dev acc 0.7)" in text
    assert "| 0.001329 | 0.7000 |" in text and "| 0.03143 | 0.6000 |" in text


def test_report_ranks_by_dev_not_by_test(tmp_path):
    """Where dev and test disagree, the order (and the pick) follows dev; test is shown beside it."""
    for i, (length, dev, test) in enumerate([(16, 0.68, 0.69), (64, 0.70, 0.70), (128, 0.71, 0.68), (4, 0.65, 0.66),
                                             (8, 0.68, 0.65)]):
        job(tmp_path, i, ["method=ptuning_v2", f"method.prefix_length={length}"], acc=dev, test=test)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "| method.prefix_length | best dev acc | test acc |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # by dev: 128 (0.71) first although its test is the lowest; the 0.68 tie keeps job order (16, then 8)
    assert [row.split(" | ")[0][2:] for row in rows] == ["128", "64", "16", "8", "4"]
    assert rows[0] == "| 128 | 0.7100 | 0.6800 | 100 | 0.500 |  | 11.0 |  |  |"  # (no CSV log, wall or CPU time)
    assert "Ranked by best dev acc" in text


# Student's t, two-sided 95% (0.975 quantile), from a printed table: an independent reference
T975 = {1: 12.7062, 2: 4.3027}


def hand_ci(values):
    """(mean, sample std, half-width of the 95% CI) by hand."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return mean, std, T975[n - 1] * std / n ** 0.5


def test_report_gives_confidence_intervals_paired_differences_and_wall_time(tmp_path, monkeypatch):
    runs = {  # method -> seed -> (dev, test, wall seconds)
        "a": {1: (0.80, 0.79, 10), 2: (0.82, 0.83, 11), 3: (0.78, 0.78, 12)},
        "b": {1: (0.75, 0.74, 20), 2: (0.80, 0.79, 21), 3: (0.74, 0.73, 22)},
        "c": {1: (0.70, 0.71, 5), 2: (0.72, 0.69, 7)},
    }
    num = 0
    for method, seeds in runs.items():
        for seed, (dev, test, wall) in seeds.items():
            earlier = [100] if (method, seed) == ("b", 3) else []  # interrupted once, after 100 s, then resumed
            job(tmp_path, num, [f"method={method}", f"seed={seed}"], acc=dev, test=test, wall=wall, earlier=earlier)
            num += 1
    bars = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, *a, **kw: bars.append(list(kw["yerr"])) or
                        original(self, *a, **kw))
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()

    def row(method):
        dev = hand_ci([v[0] for v in runs[method].values()])
        test = hand_ci([v[1] for v in runs[method].values()])
        return (f"| {method} | {dev[0]:.4f} ± {dev[1]:.4f} | [{dev[0] - dev[2]:.4f}, {dev[0] + dev[2]:.4f}] | "
                f"{test[0]:.4f} ± {test[1]:.4f} | [{test[0] - test[2]:.4f}, {test[0] + test[2]:.4f}] | ")
    for method in runs:
        assert row(method) in text, (row(method), text)
    # a: dev 0.80 ± 0.02, CI 0.80 ± 4.3027 * 0.02 / sqrt(3)
    assert "| method | best dev acc | dev 95% CI | test acc | test 95% CI | trainable |" in text
    assert "| a | 0.8000 ± 0.0200 | [0.7503, 0.8497] | 0.8000 ± 0.0265 | [0.7343, 0.8657] |" in text
    # wall and CPU time per job, every attempt counted: b = (20 + 21 + 100 + 22) / 3, CPU half of it
    assert "| b | " in text and [r for r in text.splitlines() if r.startswith("| b |")][0].endswith("| 54 | 27 | 3 |")
    assert "Wall time: 3 min 28 s for 8 jobs (mean 26 s per job); CPU time: 1 min 44 s (mean 13 s per job)." in text

    # paired by seed against the selected setting (a: best mean dev)
    assert "Paired by seed against method=a (the selected setting)" in text
    for method in ("b", "c"):
        shared = [s for s in runs[method] if s in runs["a"]]
        cells = []
        for i in (0, 1):  # dev, test
            mean, _, half = hand_ci([runs[method][s][i] - runs["a"][s][i] for s in shared])
            cells += [f"{mean:+.4f}", f"[{mean - half:+.4f}, {mean + half:+.4f}]"]
        assert f"| {method} | " + " | ".join(cells) + f" | {len(shared)} |" in text
    assert "| b | -0.0367 | [-0.0746, +0.0013] | -0.0467 | [-0.0610, -0.0323] | 3 |" in text

    # the plot's error bars are the same 95% half-widths (points: dev, then test, per method)
    expected_dev = [hand_ci([v[0] for v in runs[m].values()])[2] for m in runs]
    assert bars[0] == [pytest.approx(expected_dev, rel=1e-4)] * 2  # (below, above; the table's t to 5 digits)


def test_an_interval_past_the_metrics_range_is_cut_there_and_says_so(tmp_path, monkeypatch):
    """F1 of three seeds, one never left chance: the t-interval of the mean, 0.7667 +- 0.65, reaches past 1,
    which no F1 can. Table and plot cut it at 1 and mark it; the note gives the interval before the cut.
    An interval inside the range, and a paired difference inside [-1, 1], are neither cut nor marked."""
    runs = {"a": (0.975, 0.94, 0.5), "b": (0.97, 0.96, 0.975)}
    for num, (method, seed) in enumerate((m, s) for m in runs for s in (1, 2, 3)):
        job(tmp_path, num, [f"method={method}", f"seed={seed}"])
        results = json.loads((tmp_path / str(num) / "results.json").read_text())
        f1 = runs[method][seed - 1]
        results["metrics"] = {"test": {"test/f1": f1}, "best": {"val/f1_best": f1}}
        results["parameters"]["trainable_pct"] = (0.5, 0.9, 1.4)[seed - 1]  # (a column whose interval passes 1)
        (tmp_path / str(num) / "results.json").write_text(json.dumps(results))
    bars = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, x, y, **kw: bars.append(
        (list(y), kw["yerr"])) or original(self, x, y, **kw))
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    mean, _, half = hand_ci(runs["a"])
    assert mean + half > 1 and mean - half > 0  # (the case: past the top only)
    assert f"| a | {mean:.4f} ± " in text
    assert f"| [{mean - half:.4f}, 1.0000]† |" in text  # dev and test alike
    b_mean, _, b_half = hand_ci(runs["b"])
    assert f"| [{b_mean - b_half:.4f}, {b_mean + b_half:.4f}] |" in text  # inside: as it was
    note = next(line for line in text.splitlines() if line.startswith("†"))
    assert "f1 can take (0 to 1" in note and f"a, best dev f1: [{mean - half:.4f}, {mean + half:.4f}]" in note
    paired = next(line for line in text.splitlines() if line.startswith("| a | -"))
    assert "†" not in paired  # (a difference of two F1 values can reach -1 to 1)
    # the plot's bar for a: down to the interval's low end, up to 1 and no further
    ys, (below, above) = next((ys, yerr) for ys, yerr in bars if pytest.approx(mean) in ys)
    i = ys.index(pytest.approx(mean))
    assert below[i] == pytest.approx(half, rel=1e-4) and mean + above[i] == pytest.approx(1.0)
    # a plot of another column takes no metric's range: trainable % 0.93 +- 1.1 keeps both halves
    from peft_lightning.report import plots

    bars.clear()
    plots(collect(tmp_path), tmp_path, "other", metric="trainable %")
    pct, _, pct_half = hand_ci([0.5, 0.9, 1.4])
    ys, (below, above) = next((ys, yerr) for ys, yerr in bars if pytest.approx(pct) in ys)
    i = ys.index(pytest.approx(pct))
    assert below[i] == pytest.approx(pct_half, rel=1e-4) == above[i] and pct + pct_half > 1


def test_report_pairs_against_a_named_baseline(tmp_path):
    for num, (method, seed, acc) in enumerate([("a", 1, 0.8), ("a", 2, 0.9), ("b", 1, 0.7), ("b", 2, 0.75)]):
        job(tmp_path, num, [f"method={method}", f"seed={seed}"], acc=acc)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--baseline", "method=b", "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    mean, _, half = hand_ci([0.8 - 0.7, 0.9 - 0.75])
    assert "Paired by seed against method=b (the baseline)" in text
    assert f"| a | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |" in text


def test_a_comparison_with_an_arm_not_in_yet_writes_no_page_and_an_unpaired_one_says_so(tmp_path, capsys):
    """A page regenerated while an arm's records are not in yet must not read as a finished comparison:
    with only the baseline's jobs, only the other arm's, or an arm whose jobs are all running, the report
    writes nothing and exits 3 (regenerate.sh: skipped, not failed); a --baseline key no job has is a
    typo, exit 2; an arm that shares under two seeds with the baseline is said not to be paired."""
    only, page = tmp_path / "only", tmp_path / "r.md"

    def report(*extra):
        return main([str(only), "--out", str(page), "--no-plots", *extra])

    job(only, 0, ["method=b", "method.prefix_length=4", "seed=1"], acc=0.71)
    job(only, 1, ["method=b", "method.prefix_length=4", "seed=2"], acc=0.72)
    assert report("--baseline", "method.prefix_length=4") == 3 and not page.exists()  # one setting: no axis
    assert "every job ran it" in capsys.readouterr().err
    assert report("--baseline", "method.prefix_length=16") == 3 and not page.exists()  # only the other arm's
    assert "no job ran it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a typo is the command's mistake, not an arm not in yet
        report("--baseline", "method.prefix_lenght=4")
    assert stop.value.code == 2 and "method.prefix_lenght is no key of these jobs" in capsys.readouterr().err
    job(only, 2, ["method=b", "method.prefix_length=16", "seed=1"], status="running")  # the arm started
    assert report("--baseline", "method.prefix_length=4") == 3 and not page.exists()
    assert "none of the other settings' 1 job(s) counted yet (running)" in capsys.readouterr().err
    assert report("--baseline", "method.prefix_length=16") == 3 and not page.exists()  # the baseline running
    assert "none of its 1 job(s) counted yet (running)" in capsys.readouterr().err
    shutil.rmtree(only / "2")
    job(only, 2, ["method=b", "method.prefix_length=16", "seed=1"], acc=0.9)  # one seed shared: no interval
    assert report("--baseline", "method.prefix_length=4") == 0
    text = page.read_text()
    assert "Paired by seed" not in text
    assert ("Not paired by seed against method.prefix_length=4: no setting shares two seeds with it "
            "(seeds shared: method.prefix_length=16: 1).") in text
    assert report() == 0 and "Not paired" not in page.read_text()  # (no --baseline: a one-seed sweep says nothing)
    seedless = tmp_path / "seedless"  # completed jobs that name no seed: the command's to fix, not an arm not in
    job(seedless, 0, ["method=a"], acc=0.8)
    job(seedless, 1, ["method=b"], acc=0.7)
    with pytest.raises(SystemExit) as stop:
        main([str(seedless), "--out", str(page), "--no-plots", "--baseline", "method=b"])
    assert stop.value.code == 2 and "its 1 completed job(s) name no seed" in capsys.readouterr().err
    job(only, 3, ["method=b", "method.prefix_length=16", "seed=2"], acc=0.95)  # two shared: the table
    assert report("--baseline", "method.prefix_length=4") == 0
    mean, _, half = hand_ci([0.9 - 0.71, 0.95 - 0.72])
    assert f"| 16 | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |" in page.read_text()


def configured(root, num, method, config_yaml):
    """A job folder's Hydra record of what it ran with: the group choice and the composed config."""
    d = root / str(num) / ".hydra"
    (d / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      method: {method}\n      data: rt\n")
    (d / "config.yaml").write_text(config_yaml)


def test_report_joins_sweeps_filling_axes_a_job_left_at_its_default(tmp_path):
    """The dropout-on arm runs as its own sweep; its baseline (dropout off, the default) comes from the
    methods sweep, where `method.backbone_dropout` was never overridden: the report reads the value
    each job ran with from its .hydra config and pairs the two by seed."""
    methods, arm = tmp_path / "methods", tmp_path / "dropout"
    default = "method:\n  name: {}\n  backbone_dropout: false\n  depth: [3, 4, 5]\n"
    for i, (method, seed, acc) in enumerate([("ptuning_v2", 1, 0.80), ("ptuning_v2", 2, 0.82), ("lora", 1, 0.90)]):
        job(methods, i, [f"method={method}", "+sweeps=methods", f"seed={seed}"], acc=acc)
        configured(methods, i, method, default.format(method))
    for i, (seed, acc) in enumerate([(1, 0.83), (2, 0.86)]):
        job(arm, i, ["method=ptuning_v2", "method.backbone_dropout=true", f"seed={seed}", "task_name=dropout"], acc=acc)
        configured(arm, i, "ptuning_v2", default.format("ptuning_v2").replace("false", "true"))
    frame = collect([methods, arm], where={"method": "ptuning_v2"})
    assert sorted(frame["job"]) == ["dropout/0", "dropout/1", "methods/0", "methods/1"]  # lora filtered out
    assert list(frame.sort_values("job")["method.backbone_dropout"]) == ["true", "true", "false", "false"]
    from peft_lightning.report import axes
    assert axes(frame) == ["method.backbone_dropout"]  # sweeps/task_name are bookkeeping, method is fixed
    out = tmp_path / "r.md"
    assert main([str(methods), str(arm), "--where", "method=ptuning_v2", "--baseline",
                 "method.backbone_dropout=False", "--out", str(out), "--no-plots"]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| true |") and "+0.0" in line)
    assert row.startswith("| true | +0.0350 |")  # ((0.83 - 0.80) + (0.86 - 0.82)) / 2, paired by seed
    # the canonical spelling: an override "[3,4,5]" and a config's [3, 4, 5] are one value
    from peft_lightning.report import _canonical
    assert _canonical("[3,4,5]") == _canonical([3, 4, 5]) == "[3,4,5]" and _canonical(True) == _canonical("true")


# --- a hostile review's cases: silent wrong numbers ------------------------------------------------
def config(root, num, tree, method="ptuning_v2"):
    """A job's .hydra record: hydra.yaml's group choice and config.yaml's composed tree (a dict)."""
    import yaml

    d = root / str(num) / ".hydra"
    (d / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      method: {method}\n")
    (d / "config.yaml").write_text(yaml.safe_dump(tree))


def tree(seed=1, lr=0.01, dropout=False, depth="deep", name="ptuning_v2", epochs=3):
    return {"task_name": "x", "seed": seed, "paths": {"output_dir": "${hydra:runtime.output_dir}"},
            "logger": {"wandb": {"group": None}}, "trainer": {"max_epochs": epochs},
            "method": {"name": name, "depth": depth, "backbone_dropout": dropout, "optim": {"lr": lr}}}


def test_report_counts_each_job_folder_once_when_folders_overlap(tmp_path):
    """A sweep folder named twice, or a folder and its parent, is one set of jobs: n = 2, not 4."""
    sweep = tmp_path / "methods"
    for i, (seed, acc) in enumerate([(1, 0.80), (2, 0.90)]):
        job(sweep, i, ["method=lora", f"seed={seed}"], acc=acc)
    for folders in ([sweep, sweep], [tmp_path, sweep]):
        summary = summarize(collect(folders))
        assert list(summary["n"]) == [2] and summary["best dev acc std"][0] == pytest.approx(0.0707107, rel=1e-5)


def test_report_counts_a_setting_and_seed_once_across_joined_sweeps(tmp_path):
    """The depth sweep names the default (`method.depth=deep`) that the methods sweep ran too: joined,
    the same setting and seed is one run in the mean (the first folder's), and the other is listed."""
    methods, depth = tmp_path / "methods", tmp_path / "depth"
    for i, (seed, acc) in enumerate([(1, 0.80), (2, 0.82), (3, 0.84)]):
        job(methods, i, ["method=ptuning_v2", f"seed={seed}"], acc=acc)
        config(methods, i, tree(seed=seed))
    num = 0
    for value, accs in (("deep", [0.81, 0.83, 0.85]), ("embedding", [0.70, 0.71, 0.75])):
        for seed, acc in zip((1, 2, 3), accs):
            job(depth, num, ["method=ptuning_v2", f"method.depth={value}", f"seed={seed}"], acc=acc)
            config(depth, num, tree(seed=seed, depth=value))
            num += 1
    out = tmp_path / "r.md"
    assert main([str(methods), str(depth), "--out", str(out), "--no-plots"]) == 0
    summary = summarize(collect([methods, depth])).set_index("method.depth")
    assert summary.loc["deep", "n"] == 3 and summary.loc["deep", "best dev acc"] == pytest.approx(0.82)
    text = out.read_text()
    assert "| deep | 0.8200 ± 0.0200 |" in text
    assert "- job depth/0 (method.depth=deep): completed, the same setting and seed as job methods/0: not counted" \
        in text
    # paired against deep: embedding - deep on the first folder's runs, (-0.10, -0.11, -0.09)
    assert "| embedding | -0.1000 | [-0.1248, -0.0752] |" in text


def test_report_reads_a_seed_the_job_did_not_override_from_its_config(tmp_path):
    """A run left at the config's seed pairs with another sweep's `seed=` override of the same value."""
    base, arm = tmp_path / "base", tmp_path / "arm"
    job(base, 0, ["method=ptuning_v2"], acc=0.80)  # ran with the config's seed, 7
    config(base, 0, tree(seed=7))
    job(arm, 0, ["method=ptuning_v2", "method.backbone_dropout=true", "seed=7"], acc=0.84)
    config(arm, 0, tree(seed=7, dropout=True))
    from peft_lightning.report import paired

    frame = collect([base, arm])
    assert list(frame["seed"]) == ["7", "7"]
    reference, diffs = paired(frame, {"method.backbone_dropout": "false"})
    assert list(diffs["n"]) == [1] and diffs["best dev acc"][0] == pytest.approx(0.04)


def test_report_makes_a_config_difference_between_joined_sweeps_an_axis(tmp_path):
    """Sweeps run at different commits: the dropout arm's config has another default learning rate.
    Nobody overrode it, so it is no override axis, yet the two arms did not differ in dropout alone:
    the report shows it as an axis (and says so) instead of pooling or pairing as if only dropout
    changed. Keys a method choice sets (lora's lr) are not such a difference."""
    methods, arm = tmp_path / "methods", tmp_path / "dropout"
    num = 0
    for method, lr in (("ptuning_v2", 0.01), ("lora", 0.0005)):
        for seed, acc in ((1, 0.80), (2, 0.82)):
            job(methods, num, [f"method={method}", f"seed={seed}"], acc=acc)
            config(methods, num, tree(seed=seed, lr=lr, name=method), method=method)
            num += 1
    assert collect(methods).attrs["hidden"] == [] and summarize(collect(methods))["method"].tolist() == \
        ["ptuning_v2", "lora"]
    for i, (seed, acc) in enumerate([(1, 0.83), (2, 0.86)]):
        job(arm, i, ["method=ptuning_v2", "method.backbone_dropout=true", f"seed={seed}", "logger=csv"], acc=acc)
        config(arm, i, {**tree(seed=seed, lr=0.005, dropout=True), "logger": {"csv": {"name": "csv"}}})
    from peft_lightning.report import axes

    frame = collect([methods, arm], where={"method": "ptuning_v2"})
    assert axes(frame) == ["method.backbone_dropout", "method.optim.lr"]  # (where it logs is no setting)
    assert frame.attrs["hidden"] == ["method.optim.lr"]
    out = tmp_path / "r.md"
    assert main([str(methods), str(arm), "--where", "method=ptuning_v2", "--baseline", "method.backbone_dropout=false",
                 "--out", str(out), "--no-plots"]) == 0
    text = out.read_text()
    assert "| method.backbone_dropout | method.optim.lr | best dev acc |" in text
    assert "no job overrode but that differ between the jobs' .hydra/config.yaml (sweeps run at different commits, " \
        "a changed default): method.optim.lr." in text
    assert "| true | 0.005 | +0.0350 |" in text  # paired with the methods sweep's dropout off at lr 0.01, as shown


def test_report_compares_values_as_hydra_parses_them(tmp_path):
    """`method.optim.lr=1e-3` is Hydra's float 0.001 (config.yaml holds 0.001); `True` is true;
    `[3,4,5]` is the list. One setting each, and --where / --baseline in either spelling find it."""
    methods, arm = tmp_path / "methods", tmp_path / "arm"
    for i, (seed, acc) in enumerate([(1, 0.80), (2, 0.82)]):  # the default: lr 0.001, depth [3, 4, 5]
        job(methods, i, ["method=ptuning_v2", f"seed={seed}"], acc=acc)
        config(methods, i, tree(seed=seed, lr=0.001, depth=[3, 4, 5]))
    num = 0
    for lr in ("1e-3", "1e-2"):
        for seed, acc in ((1, 0.85), (2, 0.86)):
            job(arm, num, ["method=ptuning_v2", f"method.optim.lr={lr}", "method.depth=[3,4,5]",
                           "method.backbone_dropout=True", f"seed={seed}"], acc=acc if lr == "1e-3" else acc - 0.1)
            config(arm, num, tree(seed=seed, lr=float(lr), depth=[3, 4, 5], dropout=True))
            num += 1
    frame = collect([methods, arm])
    assert sorted(frame["method.optim.lr"].unique()) == ["0.001", "0.01"]
    assert sorted(frame["method.backbone_dropout"].unique()) == ["false", "true"]
    from peft_lightning.report import axes

    assert axes(frame) == ["method.optim.lr", "method.backbone_dropout"]  # depth: one value, [3,4,5]
    assert len(collect([methods, arm], where={"method.optim.lr": "1e-3"})) == 4
    assert len(collect([methods, arm], where={"method.optim.lr": "0.001", "method.backbone_dropout": "True"})) == 2
    out = tmp_path / "r.md"
    assert main([str(methods), str(arm), "--where", "method.optim.lr=0.001", "--baseline",
                 "method.backbone_dropout=False", "--out", str(out), "--no-plots"]) == 0
    assert "| true | +0.0450 |" in out.read_text()  # ((0.85 - 0.80) + (0.86 - 0.82)) / 2


def test_report_filters_that_match_nothing_are_user_errors(tmp_path, capsys):
    """--where or --baseline that no job has, a --baseline key that is no axis, a filter without `=`:
    one line and exit 2, not an empty table or a traceback."""
    for i, (method, seed, acc) in enumerate([("a", 1, 0.8), ("a", 2, 0.9), ("b", 1, 0.7), ("b", 2, 0.75)]):
        job(tmp_path, i, [f"method={method}", f"seed={seed}"], acc=acc)
    out = str(tmp_path / "r.md")
    for args, says in ((["--where", "method=c"], "no job has"), (["--baseline", "method=c"], "--baseline"),
                       (["--baseline", "lr=0.1"], "--baseline"), (["--where", "method"], "--where"),
                       (["--baseline", "method"], "--baseline")):
        with pytest.raises(SystemExit) as stop:
            main([str(tmp_path), "--out", out, "--no-plots", *args])
        assert stop.value.code == 2, args
        assert says in capsys.readouterr().err.splitlines()[-1], args


def test_report_leaves_out_a_completed_job_without_a_dev_value(tmp_path):
    """A run with no validation (its test is the last model's: selection `last`) has no best dev
    value: it is not averaged into the dev-selected runs' test mean, n counts what is averaged, and
    it is listed."""
    for i, (seed, acc) in enumerate([(1, 0.80), (2, 0.90), (3, None)]):
        job(tmp_path, i, ["method=lora", f"seed={seed}"], acc=acc, test=0.50 if acc is None else None)
    job(tmp_path, 3, ["method=adapter", "seed=1"], acc=0.70)
    summary = summarize(collect(tmp_path)).set_index("method")
    assert summary.loc["lora", "n"] == 2 and summary.loc["lora", "test acc"] == pytest.approx(0.85)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    assert "- job 2 (method=lora): completed, no best dev acc: not counted" in (tmp_path / "r.md").read_text()


def test_report_counts_the_dev_but_not_the_test_of_a_job_that_tested_its_last_model(tmp_path):
    """A job with dev values whose test is the last model's (selection `last`, callbacks=none) would mix
    a last-model test into the dev-selected test mean: its best dev value counts, its test does not,
    and it is listed. A job whose last updates no validation saw is counted and listed."""
    for i, (seed, acc, test) in enumerate([(1, 0.80, 0.81), (2, 0.90, 0.89), (3, 0.85, 0.10)]):
        job(tmp_path, i, ["method=lora", f"seed={seed}"], acc=acc, test=test)
    job(tmp_path, 3, ["method=adapter", "seed=1"], acc=0.70)
    results = json.loads((tmp_path / "2" / "results.json").read_text())
    results["selection"] = "last (no checkpoint callback monitors the dev metric)"
    (tmp_path / "2" / "results.json").write_text(json.dumps(results))
    results = json.loads((tmp_path / "3" / "results.json").read_text())
    results["unvalidated_updates"] = 6
    (tmp_path / "3" / "results.json").write_text(json.dumps(results))
    summary = summarize(collect(tmp_path)).set_index("method")
    assert summary.loc["lora", "n"] == 3 and summary.loc["lora", "best dev acc"] == pytest.approx(0.85)
    assert summary.loc["lora", "test acc"] == pytest.approx(0.85)  # (0.81 + 0.89) / 2: not the last model's 0.10
    assert summary.loc["adapter", "n"] == 1
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "- job 2 (method=lora): selection last (no checkpoint callback monitors the dev metric)" in text
    assert "- job 3 (method=adapter): the last 6 updates" in text


def test_report_averages_the_seeds_of_a_sweep_of_one_setting(tmp_path):
    """An arm run as its own sweep (`method.backbone_dropout=true seed=1,2,3`) has no axis: its
    seeds are still one setting, mean ± std and the 95% interval, not a row per seed."""
    for i, (seed, acc) in enumerate([(1, 0.83), (2, 0.86), (3, 0.84)]):
        job(tmp_path, i, ["method=ptuning_v2", "method.backbone_dropout=true", f"seed={seed}"], acc=acc)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    mean, std, half = hand_ci([0.83, 0.86, 0.84])
    row = f"| method=ptuning_v2, method.backbone_dropout=true | {mean:.4f} ± {std:.4f} | " \
          f"[{mean - half:.4f}, {mean + half:.4f}] |"
    assert row in (tmp_path / "r.md").read_text() and len(summarize(collect(tmp_path))) == 1


def test_report_plot_stars_the_setting_the_table_selects_on_a_tie(tmp_path, monkeypatch):
    """Tied best dev values: the table selects the first in job order (64 here); the plot's star
    must mark the same setting, not the smallest prefix length."""
    for i, (length, acc, test) in enumerate([(64, 0.80, 0.70), (16, 0.80, 0.75), (4, 0.70, 0.90)]):
        job(tmp_path, i, [f"method.prefix_length={length}"], acc=acc, test=test)
    stars = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **kw: (
        stars.append(a[0][0]) if kw.get("marker") == "*" else None) or original(self, *a, **kw))
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    rows = [line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("| 64") or
            line.startswith("| 16")]
    assert rows[0].startswith("| 64 |") and stars == [64.0]
    from peft_lightning.report import plots

    (tmp_path / "test").mkdir()
    assert plots(collect(tmp_path), tmp_path / "test", "r", metric="test acc") and stars == [64.0]  # test selects nothing


def test_report_says_whose_time_is_a_lower_bound(tmp_path):
    """An attempt killed outright (status running, no seconds) or written before cpu_time_s existed
    adds nothing to the job's sum: the report names those jobs instead of passing the sum as whole."""
    job(tmp_path, 0, ["method=a", "seed=1"], acc=0.8, wall=100)
    job(tmp_path, 1, ["method=a", "seed=2"], acc=0.8, wall=100)
    results = json.loads((tmp_path / "1" / "results.json").read_text())
    results["previous_attempts"] = [{"status": "running"}, {"status": "interrupted", "wall_time_s": 50}]
    (tmp_path / "1" / "results.json").write_text(json.dumps(results))
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "Wall time: 4 min 10 s for 2 jobs" in text  # 100 + 100 + 50: what was recorded
    assert "Wall seconds are lower bounds (an attempt recorded no wall time: killed outright, still running): " \
        "job 1." in text
    assert "CPU seconds are lower bounds (an attempt recorded no CPU time: killed outright, still running, or run " \
        "before cpu_time_s existed): job 1." in text
    shutil.rmtree(tmp_path / "1")  # one job: "1 job", not "1 jobs"
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    assert "Wall time: 1 min 40 s for 1 job (mean 100 s per job)" in (tmp_path / "r.md").read_text()


def test_train_seconds_per_epoch_count_every_batch_of_an_epoch_validated_mid_way(tmp_path):
    """The low-data sweeps validate every val_check_interval steps, across epoch ends (a budget of steps):
    most epochs are validated mid-way. Each epoch's seconds (the report's `train s/epoch`) are those of
    all its training batches, the clock paused, not stopped, while a validation runs. Reference: a
    training step that sleeps 50 ms, 4 a epoch; a validation that sleeps 400 ms, after steps 3, 6 and 9.
    The budget, 10 steps, ends mid-epoch: the last epoch's 2 batches count as 2 of its 4 (100 ms x 2)."""
    import time

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from peft_lightning.run import EpochTimer

    class Sleepy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            time.sleep(0.05)
            return (self.w * batch).sum()

        def validation_step(self, batch, batch_idx):
            time.sleep(0.4)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=-1, max_steps=10, check_val_every_n_epoch=None, val_check_interval=3,
                        limit_val_batches=1, callbacks=[timer], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    data = DataLoader(torch.ones(4, 1), batch_size=1)
    trainer.fit(Sleepy(), train_dataloaders=data, val_dataloaders=data)
    assert len(timer.seconds) == 3  # 10 steps: 2 epochs of 4 batches, validated after their 3rd and 2nd, and 2 batches
    for seconds in timer.seconds:  # 4 x 50 ms of training, no 400 ms validation
        assert 0.2 <= seconds < 0.2 + 0.35, timer.seconds


def record_plot(monkeypatch):
    """What the report draws: (points (label, xs, ys), stars (x, y), ticks (where, labels)), drawn as usual."""
    import matplotlib.axes

    points, stars, ticks = [], [], []
    errorbar, plot, set_xticks = (matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.plot,
                                  matplotlib.axes.Axes.set_xticks)
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, x, y, **kw: points.append(
        (kw["label"], list(x), list(y))) or errorbar(self, x, y, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **kw: (
        stars.append((a[0][0], a[1][0])) if kw.get("marker") == "*" else None) or plot(self, *a, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks", lambda self, where, labels=None, **kw: ticks.append(
        (list(where), [] if labels is None else list(labels))) or set_xticks(self, where, labels, **kw))
    return points, stars, ticks


def test_categorical_plot_puts_every_groups_points_and_star_over_their_own_category(tmp_path, monkeypatch):
    """Two categorical axes: one group lacks a method and lists the others in another order. Each point
    must sit over its own method's tick (within its slot), no two points share a place, and the star
    sits on the dev point of the setting the table selects."""
    runs = [("b", "pooler", 0.70), ("c", "pooler", 0.74),  # pooler: no method a, and b before c
            ("c", "linear", 0.80), ("a", "linear", 0.78), ("b", "linear", 0.90)]
    for num, (method, head, acc) in enumerate(runs):
        job(tmp_path, num, [f"method={method}", f"method.head.type={head}"], acc=acc)
    points, stars, ticks = record_plot(monkeypatch)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    where, labels = ticks[-1]
    tick = dict(zip(labels, where))
    assert set(tick) == {"a", "b", "c"}
    acc = {(m, h): a for m, h, a in runs}
    seen = []
    for label, xs, ys in points:
        if "best dev" not in label:
            continue
        head = "pooler" if "pooler" in label else "linear"
        for x, y in zip(xs, ys):
            method = min(tick, key=lambda m: abs(tick[m] - x))
            assert abs(tick[method] - x) < 0.4 and acc[(method, head)] == pytest.approx(y), (label, x, y)
            seen.append(round(x, 6))
    assert len(seen) == len(runs) == len(set(seen))  # every setting once, no two at one place
    # the table selects b with the linear head (0.90); a star per group, the linear group's on b's dev point
    linear_b = next(x for label, xs, ys in points if "linear" in label and "best dev" in label
                    for x, y in zip(xs, ys) if y == pytest.approx(0.90))
    assert (linear_b, pytest.approx(0.90)) in [(x, y) for x, y in stars]


def test_a_plotted_point_of_one_value_says_n_1_when_other_seeds_lack_that_metric(tmp_path, monkeypatch):
    """Three seeds of a, but only one has a test value (the others ran test=false): a's test point is
    one value with no interval, so it is labelled n=1 though the setting has 3 jobs; its dev point
    (3 values) and b's points (2 each) are not."""
    for num, (method, seed, acc) in enumerate([("a", 1, 0.80), ("a", 2, 0.82), ("a", 3, 0.81), ("b", 1, 0.90),
                                               ("b", 2, 0.92)]):
        job(tmp_path, num, [f"method={method}", f"seed={seed}"], acc=acc, test=acc - 0.05)
    for num in (1, 2):
        results = json.loads((tmp_path / str(num) / "results.json").read_text())
        results["metrics"]["test"] = {}
        (tmp_path / str(num) / "results.json").write_text(json.dumps(results))
    import matplotlib.axes

    notes = []
    annotate = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda self, text, xy, **kw: notes.append(
        (text, xy[1])) or annotate(self, text, xy, **kw))
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    assert notes == [("n=1", pytest.approx(0.75))]  # a's test point only


def test_a_plotted_point_of_one_seed_says_so(tmp_path, monkeypatch):
    """A point of one seed has no error bar: it is labelled n=1 (each metric's point), a point of 3 seeds is not."""
    for num, (method, seed, acc) in enumerate([("a", 1, 0.80), ("a", 2, 0.82), ("a", 3, 0.81), ("b", 1, 0.90)]):
        job(tmp_path, num, [f"method={method}", f"seed={seed}"], acc=acc)
    import matplotlib.axes

    notes = []
    annotate = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda self, text, xy, **kw: notes.append(
        (text, xy[1])) or annotate(self, text, xy, **kw))
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    assert sorted(notes) == [("n=1", pytest.approx(0.90))] * 2  # b's dev and test points; none for a


def test_a_baseline_that_leaves_an_axis_free_pairs_within_each_of_its_values(tmp_path):
    """The transfer arm: `--baseline method.init=random` over train sizes pairs each size's transfer
    runs with that size's random runs, seed by seed (not all sizes against one)."""
    acc = {("random", 50, 1): 0.50, ("random", 50, 2): 0.55, ("random", 50, 3): 0.52,
           ("adapter", 50, 1): 0.60, ("adapter", 50, 2): 0.62, ("adapter", 50, 3): 0.58,
           ("random", 100, 1): 0.70, ("random", 100, 2): 0.72, ("random", 100, 3): 0.69,
           ("adapter", 100, 1): 0.69, ("adapter", 100, 2): 0.74, ("adapter", 100, 3): 0.70}
    for num, ((init, size, seed), value) in enumerate(acc.items()):
        job(tmp_path, num, [f"method.init={init}", f"data.train_examples={size}", f"seed={seed}"], acc=value)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots", "--baseline", "method.init=random"]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "Paired by seed against method.init=random at the same data.train_examples (the baseline)" in text
    for size in (50, 100):
        diffs = [acc[("adapter", size, s)] - acc[("random", size, s)] for s in (1, 2, 3)]
        mean, std, half = hand_ci(diffs)
        row = f"| adapter | {size} | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |"
        assert row in text, (row, text)
    assert text.count("| adapter |") == 2 + 2  # two summary rows, two paired rows: no random row paired


def test_a_sweep_that_tested_only_last_models_ranks_and_pairs_on_dev_alone(tmp_path):
    """A smoke sweep with callbacks=none: every job's test is its last model's. Ranked and paired by dev,
    the test columns empty (not the last models' tests, not a crash on the missing values)."""
    for num, (method, seed, acc) in enumerate([("a", 1, 0.80), ("a", 2, 0.84), ("b", 1, 0.70), ("b", 2, 0.76)]):
        job(tmp_path, num, [f"method={method}", f"seed={seed}"], acc=acc, test=0.5)
        results = json.loads((tmp_path / str(num) / "results.json").read_text())
        results["selection"] = "last (no checkpoint callback monitors the dev metric)"
        (tmp_path / str(num) / "results.json").write_text(json.dumps(results))
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    mean, std, half = hand_ci([0.70 - 0.80, 0.76 - 0.84])
    assert f"| b | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |  |  | 2 |" in text, text
    assert "0.5000" not in text  # no last-model test anywhere


def test_a_preset_pairs_with_its_methods_default_whatever_else_the_preset_sets(tmp_path):
    """The presets question: `experiment=ptuning_v2_official,prefix_tuning_official` against the
    defaults, `--baseline experiment=null` leaving `method` free. The presets change keys no job
    overrode (head type, warmup: hidden axes); grouping by those too would find no baseline run at
    the presets' values and drop every comparison without a word. Each preset pairs with its own
    method's default, seed by seed."""
    acc = {("ptuning_v2", None, 1): 0.80, ("ptuning_v2", None, 2): 0.82,
           ("ptuning_v2", "p2_official", 1): 0.83, ("ptuning_v2", "p2_official", 2): 0.86,
           ("prefix_tuning", None, 1): 0.70, ("prefix_tuning", None, 2): 0.74,
           ("prefix_tuning", "pt_official", 1): 0.69, ("prefix_tuning", "pt_official", 2): 0.71}
    for num, ((method, preset, seed), value) in enumerate(acc.items()):
        overrides = [f"experiment={preset}" if preset else f"method={method}", f"seed={seed}"]
        job(tmp_path, num, overrides, acc=value)
        config(tmp_path, num, {**tree(seed=seed, name=method), "experiment": preset,
                               "head": "pooler" if preset == "p2_official" else "linear",
                               "warmup": 0 if preset else 0.06}, method=method)
    out = tmp_path / "r.md"
    assert main([str(tmp_path), "--out", str(out), "--no-plots", "--baseline", "experiment=null"]) == 0
    text = out.read_text()
    assert "Paired by seed against experiment=null at the same method (the baseline)" in text
    for method, preset in (("ptuning_v2", "p2_official"), ("prefix_tuning", "pt_official")):
        mean, _, half = hand_ci([acc[(method, preset, s)] - acc[(method, None, s)] for s in (1, 2)])
        assert f"| {method} | {preset} |" in text and f"| {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |" \
            in text, text
    assert "Not paired" not in text
    # the keys the preset sets are said to come from it, not only from "sweeps run at different commits"
    assert "(the experiment= preset some jobs ran, or sweeps run at different commits with a changed default)" in text


def test_a_hidden_key_that_differs_between_the_baselines_runs_pairs_within_its_values(tmp_path):
    """Two sweeps run at commits with different default learning rates: `--baseline method=a` matches
    a run at each lr. Each other setting pairs with the baseline run at its own lr, not with one
    picked by job order."""
    runs = [("a", 0.01, 1, 0.80), ("a", 0.02, 1, 0.70), ("b", 0.01, 1, 0.60), ("a", 0.01, 2, 0.82),
            ("a", 0.02, 2, 0.71), ("b", 0.01, 2, 0.65), ("b", 0.02, 1, 0.50), ("b", 0.02, 2, 0.52)]
    for num, (method, lr, seed, value) in enumerate(runs):
        job(tmp_path, num, [f"method={method}", f"seed={seed}"], acc=value)
        config(tmp_path, num, tree(seed=seed, name=method, lr=lr), method=method)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots", "--baseline", "method=a"]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "against method=a at the same method.optim.lr (the baseline)" in text
    for lr, a, b in ((0.01, (0.80, 0.82), (0.60, 0.65)), (0.02, (0.70, 0.71), (0.50, 0.52))):
        mean, _, half = hand_ci([b[0] - a[0], b[1] - a[1]])
        assert f"| b | {lr} | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |" in text, text


def test_settings_without_a_baseline_run_at_their_free_values_are_listed_not_dropped(tmp_path):
    """The transfer arm with one size's random runs missing: its transfer runs cannot be paired, and
    the report says so instead of leaving them out silently."""
    acc = {("random", 50, 1): 0.50, ("random", 50, 2): 0.55, ("adapter", 50, 1): 0.60, ("adapter", 50, 2): 0.62,
           ("adapter", 100, 1): 0.69, ("adapter", 100, 2): 0.74, ("random", 500, 1): 0.80, ("random", 500, 2): 0.8}
    for num, ((init, size, seed), value) in enumerate(acc.items()):
        job(tmp_path, num, [f"method.init={init}", f"data.train_examples={size}", f"seed={seed}"], acc=value)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots", "--baseline", "method.init=random"]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "Not paired (no method.init=random run at their values of the other axes):\n\n" \
           "- method.init=adapter, data.train_examples=100" in text, text


def dev_log(root, num, version, steps_values, metric="acc"):
    """A job's CSV log as Lightning's CSVLogger writes it: train rows without a dev value between."""
    d = root / str(num) / "csv" / f"version_{version}"
    d.mkdir(parents=True)
    lines = [f"epoch,step,train/loss,val/{metric}"]
    for epoch, (step, value) in enumerate(steps_values):
        lines += [f"{epoch},{step - 1},0.5,", f"{epoch},{step},,{value}"]
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_the_report_says_which_settings_were_still_rising_at_the_end_of_the_budget(tmp_path):
    """The budget question for every arm, not only the default: each run's best dev over its six
    evaluations minus its best over the first four, averaged over seeds, and the settings whose gain
    exceeds their seeds' spread named. A resumed job's two CSV versions make one curve (the later
    attempt's value where a step was logged twice)."""
    curves = {("a", 1): [0.70, 0.75, 0.78, 0.80, 0.79, 0.80], ("a", 2): [0.71, 0.76, 0.79, 0.81, 0.80, 0.80],
              ("b", 1): [0.60, 0.65, 0.70, 0.72, 0.76, 0.78], ("b", 2): [0.61, 0.66, 0.69, 0.73, 0.77, 0.79]}
    for num, ((method, seed), curve) in enumerate(curves.items()):
        job(tmp_path, num, [f"method={method}", f"seed={seed}"], acc=max(curve))
        steps = [(100 * (e + 1), v) for e, v in enumerate(curve)]
        if num == 2:  # killed after epoch 4 and resumed: version_1 re-logs epoch 4 (a stale value first) and goes on
            dev_log(tmp_path, num, 0, steps[:3] + [(400, 0.50)])
            dev_log(tmp_path, num, 1, steps[3:])
        else:
            dev_log(tmp_path, num, 0, steps)
    from peft_lightning.report import dev_curve
    assert dev_curve(tmp_path / "2", "acc") == curves[("b", 1)]
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    gain_b = ((0.78 - 0.72) + (0.79 - 0.73)) / 2  # hand: best of 6 minus best of the first 4, per seed
    row = {}  # (the main table's rows: the paired table's come after them)
    for line in text.splitlines():
        if line[:4] in ("| a ", "| b "):
            row.setdefault(line[2], line.split(" | "))
    header = next(line for line in text.splitlines() if line.startswith("| method |")).split(" | ")
    at = header.index("dev gain, last third")
    assert row["a"][at] == "+0.0000" and row["b"][at] == f"{gain_b:+.4f}", text
    std_b = pd.Series([0.78, 0.79]).std()
    assert f"a longer budget may move this setting: method=b ({gain_b:+.4f} > {std_b:.4f})." in text


def test_the_late_gain_leaves_out_the_untrained_models_dev_value(tmp_path):
    """eval_before_training=true logs the untrained model's dev value at step 0 in the same CSV: no
    evaluation of the budget (val/acc_best forgets it). SMS spam's majority class scores 0.87 untrained;
    counted, it would be the best "in the first two thirds" and hide a run still rising (and shift
    the thirds: 7 values for 6 epochs)."""
    curve = [0.60, 0.70, 0.80, 0.84, 0.85, 0.86]
    job(tmp_path, 0, ["method=a", "seed=1"], acc=max(curve))
    d = tmp_path / "0" / "csv" / "version_0"
    d.mkdir(parents=True)  # as run.py's validate() before fit() logs it: step 0, then the fit's epochs
    rows = ["epoch,step,train/loss,val/acc", "0,0,,0.87"]
    rows += [f"{e},{100 * (e + 1) - 1},0.5,\n{e},{100 * (e + 1)},,{v}" for e, v in enumerate(curve)]
    (d / "metrics.csv").write_text("\n".join(rows) + "\n")
    from peft_lightning.report import dev_curve
    assert dev_curve(tmp_path / "0", "acc") == curve
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    gain = 0.86 - 0.84  # hand: best of the 6 epochs minus best of the first 4
    assert f"may move this setting: job=0 ({gain:+.4f}, one seed)." in (tmp_path / "r.md").read_text()


def test_a_nan_dev_value_is_no_best_and_drops_no_seed_from_the_late_gain(tmp_path):
    """A Pearson correlation of constant predictions (an STS-B run's first epoch) is NaN; MaxMetric
    (val/pearson_best) skips it. Python's max() keeps a leading NaN: that seed's gain came out NaN and
    the setting's 'mean over seeds' silently became the other seed's gain."""
    from peft_lightning.report import late_gain
    nan = float("nan")
    curves = {1: [nan, 0.50, 0.60, 0.65, 0.70, 0.80], 2: [0.30, 0.50, 0.60, 0.65, 0.70, 0.71]}
    for seed, curve in curves.items():
        job(tmp_path, seed, ["method=a", f"seed={seed}"], acc=max(curve[1:]))
        dev_log(tmp_path, seed, 0, [(100 * (e + 1), v) for e, v in enumerate(curve)])
    job(tmp_path, 3, ["method=b", "seed=1"], acc=0.5)
    assert late_gain([nan, nan, nan, 0.5]) is None  # nothing in the first two thirds to rise from
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    gain = ((0.80 - 0.65) + (0.71 - 0.65)) / 2  # hand: per seed, best of 6 minus best of the first 4 (NaN skipped)
    header = next(line for line in text.splitlines() if line.startswith("| method |")).split(" | ")
    row = next(line for line in text.splitlines() if line.startswith("| a |")).split(" | ")
    assert row[header.index("dev gain, last third")] == f"{gain:+.4f}", text


def test_regenerate_sh_names_a_question_it_does_not_know_and_reads_a_relative_folder_from_the_callers(tmp_path):
    """docs/findings/regenerate.sh: a mistyped question name (the sweep's name, methods_rt, for the
    question's, methods_3epochs) regenerated nothing and exited 0; a relative sweeps folder was read
    from the repository root, not where the caller stands ("skipped budget: no runs/methods_rt" beside
    a folder that is there); a report that failed left the exit status 0."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "findings" / "regenerate.sh"
    run = lambda *args: subprocess.run(["bash", str(script), *args], cwd=tmp_path, capture_output=True,  # noqa: E731
                                       text=True, timeout=120)
    typo = run(str(tmp_path), "methods_rt")
    assert typo.returncode == 1 and "no question named methods_rt" in typo.stderr, typo
    for sweep in ("methods_rt", "budget_rt"):
        (tmp_path / "runs" / sweep).mkdir(parents=True)  # there, but with no jobs: the report refuses them
    empty = run("runs", "budget")
    assert "skipped" not in empty.stdout and f"no job directories (results.json or .hydra/) under {tmp_path}/runs/" \
        in empty.stderr, empty
    assert empty.returncode == 1 and "FAILED budget" in empty.stderr, empty


def test_regenerate_sh_removes_a_pages_old_plots_only_once_it_is_written_and_shown_by_no_page(tmp_path):
    """regenerate.sh removed <question>_*.png before the report ran: a report that failed left the old page
    showing plots that were gone (the test above, run in a checkout, deleted docs/findings/budget_*.png), and
    the glob takes any plot of a question whose name starts with this one's and `_`. Now a plot goes after
    the page is written, if no page shows it. (A fake repository: `python` on the PATH writes the page.)"""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = tmp_path / "repo"
    findings = repo / "docs" / "findings"
    for sweep in ("methods_rt", "budget_rt"):
        (findings / "runs" / sweep).mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "docs" / "findings" / "regenerate.sh", findings)
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\n[ -n "$FAIL" ] && exit 1\nwhile [ "$1" != --out ]; do shift; done\n'
                    'printf "%s" "$PAGE" > "$2"\n')
    fake.chmod(0o755)
    (findings / "budget.md").write_text("![a](budget_old.png)\n")
    (findings / "other.md").write_text("![b](budget_other.png)\n")  # another page's plot the glob matches
    for png in ("budget_old.png", "budget_other.png"):
        (findings / png).write_bytes(b"png")

    def run(**env):
        return subprocess.run(["bash", str(findings / "regenerate.sh"), "docs/findings/runs", "budget"], cwd=repo,
                              env={**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", **env},
                              capture_output=True, text=True, timeout=60)

    failed = run(FAIL="1")
    assert failed.returncode == 1 and "FAILED budget" in failed.stderr, failed
    assert (findings / "budget_old.png").exists()  # the old page still shows it
    (findings / "budget_new.png").write_bytes(b"png")  # (as the report writes it)
    written = run(PAGE="![a](budget_new.png)\n")
    assert written.returncode == 0 and "wrote docs/findings/budget.md" in written.stdout, written
    assert sorted(p.name for p in findings.glob("*.png")) == ["budget_new.png", "budget_other.png"]


def test_regenerate_sh_keeps_a_page_whose_arms_are_not_all_in(tmp_path):
    """methods_rt's records hold only P-Tuning v2's 3 seeds (the budget check's arm run again after the
    2026-11-29 sweeps folder was lost): regenerate.sh overwrote the every-method page with that one row.
    Now that page is paired against its reference (--baseline method=finetune): where the report finds no
    finetune job it writes nothing (exit 3) and regenerate.sh names the page skipped, exit 0, not FAILED.
    (A fake repository: `python` on the PATH writes the page, fails, or says nothing to compare.)"""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = tmp_path / "repo"
    findings = repo / "docs" / "findings"
    findings.mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "docs" / "findings" / "regenerate.sh", findings)
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\n[ -n "$FAIL" ] && exit 1\n'
                    '[[ " $* " == *" --baseline method=finetune "* ]] || exit 1\n'  # (paired against its reference)
                    '[ -n "$LATE" ] && { echo "a warning" >&2; echo "nothing to compare, no page written: $LATE" >&2;'
                    ' exit 3; }\nwhile [ "$1" != --out ]; do shift; done\nprintf "new page" > "$2"\n')
    fake.chmod(0o755)
    (findings / "methods_3epochs.md").write_text("the lost runs' page")
    for num, method in enumerate(["ptuning_v2", "ptuning_v2", "finetune"]):
        (findings / "runs" / "methods_rt" / str(num) / ".hydra").mkdir(parents=True)

    def run(methods, **env):
        for num, method in enumerate(methods):
            (findings / "runs" / "methods_rt" / str(num) / ".hydra" / "overrides.yaml").write_text(
                f"- method={method}\n- +sweeps=methods\n- seed={num + 1}\n")
        return subprocess.run(["bash", str(findings / "regenerate.sh"), "docs/findings/runs", "methods_3epochs"],
                              cwd=repo, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", **env})

    kept = run(["ptuning_v2", "ptuning_v2", "ptuning_v2"], LATE="--baseline method=finetune: no job ran it")
    assert kept.returncode == 0 and kept.stdout.startswith("skipped methods_3epochs: --baseline method=finetune"), kept
    assert (findings / "methods_3epochs.md").read_text() == "the lost runs' page"
    late = run(["ptuning_v2", "ptuning_v2", "finetune"], LATE="the other arm not in yet")
    assert late.returncode == 0 and late.stdout == "skipped methods_3epochs: the other arm not in yet\n", late
    assert (findings / "methods_3epochs.md").read_text() == "the lost runs' page"
    written = run(["ptuning_v2", "ptuning_v2", "finetune"])
    assert written.returncode == 0 and "wrote docs/findings/methods_3epochs.md" in written.stdout, written
    assert (findings / "methods_3epochs.md").read_text() == "new page"
    shutil.rmtree(findings / "runs" / "methods_rt")
    gone = run([], FAIL="1")
    assert gone.returncode == 0 and gone.stdout == "skipped methods_3epochs: no docs/findings/runs/methods_rt\n", gone


def test_a_late_gain_over_fewer_seeds_than_the_row_says_how_many(tmp_path):
    """A seed without a CSV log (logger=wandb only, a deleted folder) has no curve: the row's late gain
    is the mean over the seeds that have one, and the cell says over how many, not passing for all."""
    curves = {1: [0.60, 0.70, 0.72, 0.74, 0.76, 0.80], 2: [0.61, 0.71, 0.73, 0.75, 0.77, 0.78]}
    for num, (seed, curve) in enumerate(curves.items()):
        job(tmp_path, num, ["method=a", f"seed={seed}"], acc=max(curve))
        dev_log(tmp_path, num, 0, [(100 * (e + 1), v) for e, v in enumerate(curve)])
    job(tmp_path, 2, ["method=a", "seed=3"], acc=0.79)  # no CSV
    job(tmp_path, 3, ["method=b", "seed=1"], acc=0.70)
    dev_log(tmp_path, 3, 0, [(100, 0.65), (200, 0.66), (300, 0.70)])
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method |")).split(" | ")
    at = header.index("dev gain, last third")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line[:4] in ("| a ", "| b ")}
    gain_a = ((0.80 - 0.74) + (0.78 - 0.75)) / 2  # hand: best of 6 minus best of the first 4, the 2 seeds with a log
    assert rows["a"][at] == f"{gain_a:+.4f} (2 of 3 seeds)", text
    assert rows["b"][at] == f"{0.70 - 0.66:+.4f}", text  # every seed has its log: no note


def test_a_late_gain_the_report_cannot_measure_is_said_to_be_unmeasured_not_left_blank(tmp_path):
    """city_facts runs 2 epochs: 2 dev evaluations, too few for a last third. The cell was blank and
    nothing said why, so a setting still rising read like one that had settled: the page names each
    such job with its reason (a job the table does not count, a failed one, is not named)."""
    nan = float("nan")
    job(tmp_path, 0, ["method=a", "seed=1"], acc=0.80)
    dev_log(tmp_path, 0, 0, [(100, 0.30), (200, 0.80)])  # 2 evaluations
    job(tmp_path, 1, ["method=a", "seed=2"], acc=0.79)  # no CSV log
    job(tmp_path, 2, ["method=b", "seed=1"], acc=0.70)
    dev_log(tmp_path, 2, 0, [(100, 0.65), (200, 0.66), (300, 0.70)])  # 3: measured, not named
    job(tmp_path, 3, ["method=b", "seed=2"], acc=0.71)
    dev_log(tmp_path, 3, 0, [(100, nan), (200, nan), (300, 0.71)])  # nothing in the first two thirds
    job(tmp_path, 4, ["method=c", "seed=1"], acc=0.72)
    dev_log(tmp_path, 4, 0, [(100, 0.72)])  # 1 evaluation
    job(tmp_path, 5, ["method=c", "seed=2"], status="failed")  # not counted: not named
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    assert ('The "dev gain, last third" is not measured for 4 of the 5 jobs this table counts, so this page does not '
            "say whether their budget had settled: job 0 (2 dev evaluations, and the measure needs 3; the curve is in "
            "the CSV log); job 1 (no CSV log with a dev value); job 3 (no dev value in the first two thirds of the "
            "evaluations); job 4 (1 dev evaluation, and the measure needs 3; the curve is in the CSV log).") in text, text

    for num in (1, 3, 5):  # every counted job with 2 evaluations: one sentence for the table, no job list
        shutil.rmtree(tmp_path / str(num))
    for num in (2, 4):
        shutil.rmtree(tmp_path / str(num) / "csv")
        dev_log(tmp_path, num, 0, [(100, 0.6), (200, 0.7)])
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    assert ('The "dev gain, last third" is not measured for any job of this table (2 dev evaluations, and the measure '
            "needs 3; the curve is in the CSV log), so this page does not say whether any setting's budget had "
            "settled.") in text, text


def test_a_knob_some_methods_lack_names_those_settings_on_the_plot_not_a_group_and_star_each(tmp_path, monkeypatch):
    """LoRA+ in the methods sweep: method.optim.lr_ratio is 16 for it, 1 for plain LoRA (its config) and
    "(unset)" for fine-tuning and P-Tuning v2 (no such key). A line and a star per lr_ratio value would star
    three "selected" settings; the knob is part of the LoRA settings' names instead: one star, on the
    setting the table selects, and a tick per setting."""
    from test_docs import _job

    dev = {("finetune", None): [0.860, 0.864], ("lora", 1.0): [0.850, 0.852], ("lora", 16.0): [0.858, 0.855],
           ("ptuning_v2", None): [0.830, 0.841]}
    number = 0
    for (method, ratio), values in dev.items():
        for seed, value in enumerate(values, 1):
            _job(tmp_path / str(number), method, seed, value, value - 0.01, ratio, override=ratio == 16)
            number += 1
    _, stars, ticks = record_plot(monkeypatch)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    where, labels = ticks[-1]
    assert sorted(labels) == ["finetune", "lora, lr_ratio=1", "lora, lr_ratio=16", "ptuning_v2"], labels
    assert len(stars) == 1 and stars[0][1] == pytest.approx(0.862)  # fine-tuning's mean best dev
    assert min(zip(where, labels), key=lambda t: abs(t[0] - stars[0][0]))[1] == "finetune"  # over its own tick


def test_archived_records_give_the_same_report_as_the_sweep_and_keep_no_weights(tmp_path):
    """docs/findings/archive.py copies each completed job's record (results, configs, CSV logs, run log)
    into a folder kept in git, so a report survives the loss of the sweeps folder (a machine replaced
    between sessions lost every run once). The report on the records must equal the report on the
    sweep, and no weights or unfinished job may enter the records."""
    import subprocess
    import sys
    from pathlib import Path

    sweep = tmp_path / "runs" / "s"
    for num, (method, seed, curve) in enumerate([("a", 1, [0.6, 0.7, 0.8]), ("a", 2, [0.62, 0.72, 0.75]),
                                                 ("b", 1, [0.5, 0.6, 0.7])]):
        job(sweep, num, [f"method={method}", f"seed={seed}"], acc=max(curve), wall=100.0)
        dev_log(sweep, num, 0, [(10 * (e + 1), v) for e, v in enumerate(curve)])
        (sweep / str(num) / "checkpoints").mkdir()
        (sweep / str(num) / "checkpoints" / "best.ckpt").write_bytes(b"weights")
        (sweep / str(num) / "job.log").write_text("log\n")
        for file in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json",  # (as a real job has them)
                     "wandb/offline-run-1/run-1.wandb", "wandb/offline-run-1/logs/debug.log", "wandb/debug.log"):
            (sweep / str(num) / file).parent.mkdir(parents=True, exist_ok=True)
            (sweep / str(num) / file).write_text("weights, or W&B's copy")
    job(sweep, 3, ["method=b", "seed=2"], status="failed", error="killed")
    script = Path(__file__).resolve().parents[1] / "docs" / "findings" / "archive.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), str(tmp_path / "records"), "s"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "s: 3 completed jobs" in done.stdout, done
    records = tmp_path / "records" / "s"
    kept = sorted(str(f.relative_to(records)) for f in records.rglob("*") if f.is_file())
    assert kept == [f"{n}/{name}" for n in range(3)
                    for name in (".hydra/overrides.yaml", "csv/version_0/metrics.csv", "job.log", "results.json")]
    reports = []
    for folder in (sweep, records):
        assert main([str(folder), "--out", str(tmp_path / folder.parent.name / "r.md"), "--no-plots"]) == 0
        reports.append([line for line in (tmp_path / folder.parent.name / "r.md").read_text().splitlines()
                        if line.startswith(("|", "Best dev still rising", "Wall time"))])  # (not the failed job)
    assert reports[0] == reports[1] and any(line.startswith("| a | 0.7750") for line in reports[0])


def test_a_sweeps_folder_started_afresh_adds_its_jobs_to_the_records_and_replaces_no_other_job(tmp_path):
    """A sweep names its job folders 0, 1, ... in launch order. The sweeps folder lost and the queue
    relaunched on a new one (the jobs done.txt lists not run again), the new folder's job 0 is another job
    than the record 0 kept in git: archive.py must add it beside, not over it (it replaced the record of
    seed 1, which done.txt still listed as done: a seed gone for good, silently). The same job run again
    replaces its own record, with nothing of the older copy left behind."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "findings" / "archive.py"

    def archive(sweeps):
        done = subprocess.run([sys.executable, str(script), str(sweeps), str(tmp_path / "records"), "s"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done

    job(tmp_path / "old" / "s", 0, ["method=a", "seed=1"], acc=0.80)
    job(tmp_path / "old" / "s", 1, ["method=a", "seed=2"], acc=0.70)
    archive(tmp_path / "old")
    (tmp_path / "records" / "s" / "1" / "stale.log").write_text("the older run's\n")
    job(tmp_path / "new" / "s", 0, ["method=a", "seed=3"], acc=0.75)  # (the old folder is gone)
    job(tmp_path / "new" / "s", 1, ["seed=2", "method=a"], acc=0.72)  # seed 2 run again (overrides in any order)
    archive(tmp_path / "new")
    records = tmp_path / "records" / "s"
    found = {tuple(json.loads((f / "results.json").read_text())["overrides"]): f.name for f in records.iterdir()}
    assert sorted(found) == [("method=a", "seed=1"), ("method=a", "seed=3"), ("seed=2", "method=a")], found
    assert found[("method=a", "seed=1")] == "0" and found[("seed=2", "method=a")] == "1"
    assert not (records / "1" / "stale.log").exists()
    frame = collect(records)
    assert sorted(frame["seed"]) == ["1", "2", "3"] and not frame["_skip"].any()
    assert frame.set_index("seed").loc["2", "test acc"] == pytest.approx(0.72)


def test_the_queue_keeps_a_job_it_could_not_archive_and_takes_any_sweeps_folder(tmp_path):
    """docs/findings/queue.sh with a stand-in for train.py. A sweeps folder whose path has a space and a `&`
    reaches train.py whole (bash 5.2's ${job//\\$R/$R} made `&` the matched "$R": an unbound $Rb ended the
    worker, its job claimed for good). A job that exits 0 but whose record is not archived counts as failed
    (it stayed claimed and out of done.txt: no worker ever took it again, nothing said so); failing twice, it
    is skipped and the queue goes on. A claim is a lock held while the job runs: a job another process holds
    is left to it while it runs (and taken when it ends unarchived: see the next test), and a claim file left by
    a worker that died (a reboot, a killed session) is no claim."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("flock") is None:
        pytest.skip("flock (util-linux) is not installed")
    queue = Path(__file__).resolve().parents[1] / "docs" / "findings" / "queue.sh"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\n" + """import json, os, pathlib, sys
if sys.argv[1].endswith("archive.py"):  # the archive, with the jobs' interpreter (this one's python)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
args = [a for a in sys.argv[3:] if not a.startswith("hydra.")]
sweep = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("hydra.sweep.dir="))
job = pathlib.Path(sweep) / "0"
(job / ".hydra").mkdir(parents=True, exist_ok=True)
(job / ".hydra" / "overrides.yaml").write_text("".join(f"- {a}\\n" for a in args))
(job / "results.json").write_text(json.dumps({"status": "completed", "overrides": args}))
""")
    fake.chmod(0o755)
    # `python` on the PATH is another environment's, without the jobs' packages: the archive must run with
    # $PYTHON, the jobs' own (it ran with `python`: every job of the GPU trial trained and none was recorded)
    other = tmp_path / "bin" / "python"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\necho 'No module named yaml' >&2; exit 1\n")
    other.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "RECORDS": str(tmp_path / "records"),
           "PATH": f"{other.parent}{os.pathsep}{os.environ['PATH']}"}

    def run(lines, sweeps):
        (tmp_path / "jobs.txt").write_text("".join(line + "\n" for line in lines))
        return subprocess.run(["bash", str(queue), str(sweeps), "w"], env={**env, "JOBS": str(tmp_path / "jobs.txt")},
                              capture_output=True, text=True, timeout=120)

    line = "method=a method.depth='[3,4,5]' seed=1 hydra.sweep.dir=$R/s"
    done = run([line], tmp_path / "my sweeps & more")
    assert done.returncode == 0, done
    record = json.loads((tmp_path / "records" / "s" / "0" / "results.json").read_text())
    assert record["overrides"] == ["method=a", "method.depth=[3,4,5]", "seed=1"]
    assert (tmp_path / "records" / "done.txt").read_text() == line + "\n"
    # ${R} is not the `$R/` archive.py's sweep name is read from: the job ran, its record cannot be archived
    # (tried twice, then skipped, and the queue goes on)
    unarchived, after = "method=a seed=2 hydra.sweep.dir=${R}/s", "method=a seed=3 hydra.sweep.dir=$R/t"
    done = run([unarchived, after], tmp_path / "other")
    assert done.returncode == 1 and "failed twice, skipped" in done.stdout, done
    assert (tmp_path / "other" / "queue" / "skipped.txt").read_text() == unarchived + "\n"
    assert (tmp_path / "other" / "queue" / "failed.txt").read_text() == unarchived + "\n"
    assert len(list((tmp_path / "other" / "queue").glob("failed-*-w.log"))) >= 1
    assert (tmp_path / "records" / "done.txt").read_text() == line + "\n" + after + "\n"
    # claims: a job whose claim another process holds is left to it while it runs; a claim file left behind is none
    held, free = "method=b seed=1 hydra.sweep.dir=$R/u", "method=b seed=2 hydra.sweep.dir=$R/u"
    claims = tmp_path / "third" / "queue" / "claims"
    claims.mkdir(parents=True)
    import hashlib
    claim = lambda job: claims / hashlib.md5((job + "\n").encode()).hexdigest()[:16]  # noqa: E731 (md5sum <<< line)
    claim(free).write_text("")  # a dead worker's: nobody holds its lock
    holder = subprocess.Popen(["flock", str(claim(held)), "sleep", "60"], start_new_session=True)
    try:
        import time
        for _ in range(100):  # (until the holder has its lock)
            if subprocess.run(["flock", "-n", str(claim(held)), "true"]).returncode:
                break
            time.sleep(0.05)
        (tmp_path / "jobs.txt").write_text(held + "\n" + free + "\n")
        worker = subprocess.Popen(["bash", str(queue), str(tmp_path / "third"), "w"],
                                  env={**env, "JOBS": str(tmp_path / "jobs.txt")}, stdout=subprocess.PIPE, text=True)
        for _ in range(600):  # (until the free job is done: the worker is waiting for the held one)
            if free in (tmp_path / "records" / "done.txt").read_text():
                break
            time.sleep(0.05)
        time.sleep(0.3)
        assert worker.poll() is None, worker.communicate()
    finally:
        os.killpg(holder.pid, 9)  # (flock and its sleep, which holds the lock too)
        holder.wait()
    out, _ = worker.communicate(timeout=60)  # the holder gone: its job is taken
    assert worker.returncode == 0, out
    assert out.index(f"exit 0: {free}") < out.index(f"waiting for a job still running: {held}") < out.index(
        f"exit 0: {held}"), out


def test_the_queue_takes_python_as_one_path_for_the_jobs_and_the_archive(tmp_path):
    """$PYTHON ran the jobs split into words (eval) and the archive as one word ("$7"): a path with a space failed
    every job (exit 127), and a PYTHON with arguments (`python3 -X utf8`) trained every job and recorded none.
    Now it is one path for both, and one that is no command stops the queue before any job (exit 2)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("flock") is None:
        pytest.skip("flock (util-linux) is not installed")
    queue = Path(__file__).resolve().parents[1] / "docs" / "findings" / "queue.sh"
    fake = tmp_path / "my env" / "python"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n" + """import json, os, pathlib, sys
if sys.argv[1].endswith("archive.py"):
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
sweep = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("hydra.sweep.dir="))
(pathlib.Path(sweep) / "0" / ".hydra").mkdir(parents=True)
(pathlib.Path(sweep) / "0" / ".hydra" / "overrides.yaml").write_text("- seed=1\\n")
(pathlib.Path(sweep) / "0" / "results.json").write_text(json.dumps({"status": "completed", "overrides": ["seed=1"]}))
""")
    fake.chmod(0o755)
    (tmp_path / "jobs.txt").write_text("seed=1 hydra.sweep.dir=$R/s\n")

    def run(python, sweeps):
        env = {**os.environ, "PYTHON": python, "RECORDS": str(tmp_path / "records"), "JOBS": str(tmp_path / "jobs.txt")}
        return subprocess.run(["bash", str(queue), str(tmp_path / sweeps), "w"], env=env, capture_output=True,
                              text=True, timeout=120)

    with_args = run(f"{fake} -X utf8", "a")
    assert with_args.returncode == 2 and f"PYTHON={fake} -X utf8 is no command" in with_args.stderr, with_args
    assert not (tmp_path / "a" / "s").exists()  # no job trained
    done = run(str(fake), "b")
    assert done.returncode == 0, done
    assert (tmp_path / "records" / "done.txt").read_text() == "seed=1 hydra.sweep.dir=$R/s\n"
    assert (tmp_path / "records" / "s" / "0" / "results.json").exists()


def test_the_queue_waits_for_an_orphaned_job_and_no_job_keeps_its_lock(tmp_path):
    """docs/findings/queue.sh, hostile cases. (1) A worker killed mid-job leaves its job running (orphaned,
    claimed); a relaunched worker that ran out of other jobs left "queue empty" before it ended: nobody archived
    its record, nor listed it in done.txt. It now waits for the job and takes it then. (2) The queue lock's fd
    went to every job: a process a job left behind (close_fds=False, a shell's `&`) kept it, and a worker
    killed while selecting left the lock held by it: every worker blocked for good. (3) Blank and # lines ran
    `train.py -m` alone (the default sweep), spaces around a line made it a second job, and a last line with
    no newline was never run while the queue said "empty"."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    if shutil.which("flock") is None:
        pytest.skip("flock (util-linux) is not installed")
    queue = Path(__file__).resolve().parents[1] / "docs" / "findings" / "queue.sh"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\n" + """import json, os, pathlib, subprocess, sys, time
if sys.argv[1].endswith("archive.py"):  # the archive, with the jobs' interpreter (this one's python)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
args = [a for a in sys.argv[3:] if not a.startswith("hydra.")]
sweep = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("hydra.sweep.dir="))
tmp = pathlib.Path(os.environ["TMP"])
with open(tmp / "ran.txt", "a") as f:
    f.write(" ".join(args) + "\\n")
if "hold=1" in args:  # runs until released
    while not (tmp / "release").exists():
        time.sleep(0.05)
if "leave=1" in args:  # leaves a process behind (a daemon: its own session), with the job's fds
    left = subprocess.Popen(["sleep", "60"], close_fds=False, start_new_session=True)
    (tmp / "left.pid").write_text(str(left.pid))
    (tmp / "slow").touch()  # (the worker's next selection stops)
job = pathlib.Path(sweep) / "-".join(args).replace("=", "_")
(job / ".hydra").mkdir(parents=True, exist_ok=True)
(job / ".hydra" / "overrides.yaml").write_text("".join(f"- {a}\\n" for a in args))
(job / "results.json").write_text(json.dumps({"status": "completed", "overrides": args}))
""")
    fake.chmod(0o755)
    # an md5sum that, once told to (by the leave=1 job), stops in the queue's selection (under its lock) until
    # the worker is killed
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "md5sum").write_text(f"#!/bin/bash\n[ -e {tmp_path}/slow ] && touch {tmp_path}/selecting && sleep 30\n"
                                 f"exec {shutil.which('md5sum')} \"$@\"\n")
    (shim / "md5sum").chmod(0o755)
    jobs, records = tmp_path / "jobs.txt", tmp_path / "records"
    env = {**os.environ, "PYTHON": str(fake), "RECORDS": str(records), "JOBS": str(jobs), "TMP": str(tmp_path),
           "PATH": f"{shim}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    worker = lambda sweeps: subprocess.Popen(  # noqa: E731 (its own session: killing it leaves its job running)
        ["bash", str(queue), str(sweeps), "w"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)

    def until(check, what):
        for _ in range(600):
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def done():
        return (records / "done.txt").read_text().splitlines() if (records / "done.txt").exists() else []

    # (1) the orphaned job
    held, other = "hold=1 hydra.sweep.dir=$R/s", "seed=2 hydra.sweep.dir=$R/s"
    jobs.write_text(held + "\n" + other + "\n")
    first = worker(tmp_path / "one")
    try:
        until(lambda: (tmp_path / "ran.txt").exists(), "the held job to start")
        first.kill()
        first.wait()
        second = worker(tmp_path / "one")
        until(lambda: other in done(), "the other job")
        time.sleep(0.5)  # (the old worker left here, the held job still running)
    finally:
        (tmp_path / "release").touch()  # the orphan ends
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0 and f"exit 0: {held}" in out, (out, err)
    assert sorted(done()) == sorted([held, other])
    assert (records / "s" / "hold_1" / "results.json").exists()

    # (2) a process left behind by a job, and a worker killed while it held the queue lock
    first_job, second_job = "leave=1 hydra.sweep.dir=$R/t", "seed=3 hydra.sweep.dir=$R/t"
    jobs.write_text(first_job + "\n" + second_job + "\n")
    first = worker(tmp_path / "two")
    try:
        until(lambda: (tmp_path / "selecting").exists(), "the next selection")
        os.killpg(first.pid, signal.SIGKILL)  # (the worker and its md5sum; not the process the job left)
        first.wait()
        (tmp_path / "slow").unlink()
        second = worker(tmp_path / "two")
        try:
            out, err = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
            raise AssertionError("the queue lock is held for good by the process a job left behind") from None
        assert second.returncode == 0 and f"exit 0: {second_job}" in out, (out, err)
    finally:
        if (tmp_path / "left.pid").exists():
            os.kill(int((tmp_path / "left.pid").read_text()), signal.SIGKILL)

    # (3) blank lines, comments, spaces around a line; a last line with no newline
    (tmp_path / "ran.txt").unlink(missing_ok=True)
    line = "seed=4 hydra.sweep.dir=$R/u"
    jobs.write_text(f"# seed 4 only\n   \n\n  {line} \n{line}\r\n\t{line}\n")
    run = subprocess.run(["bash", str(queue), str(tmp_path / "three"), "w"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run
    assert (tmp_path / "ran.txt").read_text() == "seed=4\n"  # once, and nothing else
    assert done()[-1] == line and done().count(line) == 1
    jobs.write_text(f"{line}\nseed=5 hydra.sweep.dir=$R/u")
    run = subprocess.run(["bash", str(queue), str(tmp_path / "three"), "w"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "no newline" in run.stderr and run.stderr.count("\n") == 1, run
    assert (tmp_path / "ran.txt").read_text() == "seed=4\n"


def test_a_plot_with_a_missing_metric_does_not_say_its_bars_were_cut(tmp_path, monkeypatch):
    """b's seeds ran test=false: its test mean is missing (NaN), which is no interval past the range; the
    plot's title says bars were cut only when one was."""
    for num, (method, seed, acc) in enumerate([("a", 1, 0.50), ("a", 2, 0.52), ("b", 1, 0.60), ("b", 2, 0.62)]):
        job(tmp_path, num, [f"method={method}", f"seed={seed}"], acc=acc)  # (intervals 0.13 wide: inside [0, 1])
        if method == "b":
            results = json.loads((tmp_path / str(num) / "results.json").read_text())
            results["metrics"]["test"] = {}
            (tmp_path / str(num) / "results.json").write_text(json.dumps(results))
    import matplotlib.axes

    titles = []
    set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, text, **kw: titles.append(text) or
                        set_title(self, text, **kw))
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    assert titles == ["mean over seeds (up to 2); error bars: 95% confidence interval"]


def test_the_produced_by_line_is_a_command_a_shell_runs_as_given(tmp_path):
    """A title has spaces and parentheses: the page's command, pasted into a shell, must give the same arguments
    (joined unquoted, `--title Depth (RT)` ran as a syntax error or as a report titled 'Depth')."""
    import shlex

    job(tmp_path, 0, ["method=a", "seed=1"], acc=0.8)
    argv = [str(tmp_path), "--title", "Depth: deep vs top half (RT, 3 seeds)", "--out", str(tmp_path / "r.md"),
            "--no-plots"]
    assert main(argv) == 0
    line = next(line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("Produced by"))
    assert shlex.split(line.removeprefix("Produced by `").removesuffix("`")) == \
        ["python", "-m", "peft_lightning.report", *argv]
