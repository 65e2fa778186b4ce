"""The comparison report reads a multirun's results.json files, whatever state each job ended in."""
import json

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
    png = tmp_path / "report" / "best_dev_acc_vs_method_prefix_length.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and f"({png.name})" in text


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
    assert rows[0] == "| 128 | 0.7100 | 0.6800 | 100 | 0.500 | 11.0 |  |  |"  # (no wall or CPU time recorded)
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

    original = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, *a, **kw: bars.append(list(kw["yerr"])) or
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

    # the plot's error bars are the same 95% half-widths (bars: dev, then test, per method)
    expected_dev = [hand_ci([v[0] for v in runs[m].values()])[2] for m in runs]
    assert bars[0] == pytest.approx(expected_dev, rel=1e-4)  # (the table's t to 5 digits)


def test_report_pairs_against_a_named_baseline(tmp_path):
    for num, (method, seed, acc) in enumerate([("a", 1, 0.8), ("a", 2, 0.9), ("b", 1, 0.7), ("b", 2, 0.75)]):
        job(tmp_path, num, [f"method={method}", f"seed={seed}"], acc=acc)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--baseline", "method=b", "--no-plots"]) == 0
    text = (tmp_path / "r.md").read_text()
    mean, _, half = hand_ci([0.8 - 0.7, 0.9 - 0.75])
    assert "Paired by seed against method=b (the baseline)" in text
    assert f"| a | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |" in text


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
