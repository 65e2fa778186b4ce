"""The comparison report reads a multirun's results.json files, whatever state each job ended in."""
import json

from peft_lightning.report import collect, main, summarize


def job(root, num, overrides, status="completed", acc=None, error=None, test=None):
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
    assert rows[0] == "| 128 | 0.7100 | 0.6800 | 100 | 0.500 | 11.0 |"
    assert "Ranked by best dev acc" in text
