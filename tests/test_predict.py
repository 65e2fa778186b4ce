"""Train -> save -> predict reproduces the validation metric the run logged."""
import json
import subprocess
import sys

import pytest
from test_reliability import ROOT, run

from peft_lightning.data.datamodule import load_raw
from peft_lightning.tasks import make_task


def test_predict_reproduces_the_logged_validation_accuracy(tmp_path):
    proc, results = run(tmp_path / "run", "data.eval_batch_size=64")  # SMALL: 2 validation batches
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = results["metrics"]["best"]["val/acc_best"]
    validation = load_raw("embedded:rotten_tomatoes", {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 42},
                          make_task("classification", ["negative", "positive"]))[0]["validation"]
    examples = validation.select(range(128))  # the two validation batches the run scored
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in examples["text"]))
    out = subprocess.run([sys.executable, "-m", "peft_lightning.predict", results["adapter"], "--input",
                          str(tmp_path / "in.jsonl"), "--batch-size", "50"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in rows] == examples["text"]
    labels = ["negative", "positive"]
    accuracy = sum(labels.index(r["label"]) == y for r, y in zip(rows, examples["label"])) / len(rows)
    assert abs(accuracy - logged) < 1e-6, (accuracy, logged)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)


def test_predict_names_a_bad_adapter_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "peft_lightning.predict", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, input="hello\n")
    assert out.returncode == 2 and "adapter_config.json not found" in out.stderr


def pair_classifier():
    """A tiny random BERT classifier with a real (embedded) tokenizer: enough to tell inputs apart."""
    from conftest import tiny_model

    from peft_lightning.methods import METHODS

    spec = tiny_model("bert")
    spec["config"].update(vocab_size=30522, max_position_embeddings=64)  # the embedded tokenizer's vocabulary
    spec["tokenizer"] = "embedded:minilm"
    method = dict(name="ptuning_v2", prefix_length=4, depth="deep", reparameterization="none", head={"dropout": 0.0})
    return METHODS["ptuning_v2"](model=spec, method=method, num_labels=3, labels=["a", "b", "c"])


def test_a_batch_mixing_pairs_and_single_texts_predicts_each_as_alone():
    """Each record is encoded with its own fields: with and without text_pair in one batch, every
    record gets the probabilities it gets on its own (the pair was dropped for the whole batch)."""
    from peft_lightning.predict import predict_records

    m = pair_classifier()
    records = [{"text": "a gorgeous witty film", "text_pair": "i loved it"}, {"text": "dull and long"},
               {"text": "fine", "text_pair": "not at all bad, really"}, {"text": "so so", "text_pair": None}]
    together = predict_records(m, records, batch_size=4)
    for record, row in zip(records, together):
        alone = predict_records(m, [record], batch_size=1)[0]
        assert row == {**record, **{k: row[k] for k in ("label", "probability", "probabilities")}}
        for name, p in alone["probabilities"].items():
            assert abs(row["probabilities"][name] - p) <= 2e-6, (record, row, alone)
    # the pair counts: without it the first record is scored differently
    unpaired = predict_records(m, [{"text": records[0]["text"]}])[0]["probabilities"]
    assert max(abs(unpaired[k] - together[0]["probabilities"][k]) for k in unpaired) > 1e-4


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "-3"), ("--max-length", "0"),
                                        ("--batch-size", "two")])
def test_predict_refuses_a_count_below_one(tmp_path, capsys, flag, value):
    from peft_lightning.predict import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m peft_lightning.predict: error: argument " + flag), err


def test_predict_cli_echoes_pairs_it_used_and_names_bad_input_lines(tmp_path):
    from peft_lightning.checkpoint import save_pretrained

    adapter = save_pretrained(pair_classifier(), tmp_path / "adapter")
    lines = [json.dumps({"text": "a gorgeous witty film", "text_pair": "i loved it"}), "dull and long"]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "peft_lightning.predict", str(adapter), "--input",
                          str(tmp_path / "in.jsonl"), "--batch-size", "2"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    alone = subprocess.run([sys.executable, "-m", "peft_lightning.predict", str(adapter), "--input",
                            str(tmp_path / "in.jsonl"), "--batch-size", "1"], cwd=ROOT, capture_output=True, text=True)
    for row, single in zip(rows, [json.loads(line) for line in alone.stdout.splitlines()], strict=True):
        assert row["text_pair" in row and "text_pair" or "text"] == single.get("text_pair", single["text"])
        assert all(abs(row["probabilities"][k] - p) <= 2e-6 for k, p in single["probabilities"].items())
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n\n" + json.dumps({"text_pair": "no text"}) + "\n")
    bad = subprocess.run([sys.executable, "-m", "peft_lightning.predict", str(adapter), "--input",
                          str(tmp_path / "bad.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'bad.jsonl'}, line 3: missing field(s) "
                                                   "['text']; this adapter reads ['text'] (optional ['text_pair'])")
