"""Task types beyond single sentences: each learns a small fixture made here, through the real
datamodule (local jsonl files) and Lightning loop, on tiny random models with a word-level
tokenizer built in the test. Plus: generation's KV-cached `generate` equals greedy decoding by
the teacher-forced forward for prefix, prompt and LoRA methods; labels never shift under prompts."""
import json
import random

import lightning as L
import pytest
import torch
from conftest import save_word_tokenizer, tiny_model
from omegaconf import OmegaConf

from peft_lightning.data import TaskDataModule
from peft_lightning.methods import METHODS

WORDS = "a b c d e f g h i j k l m n o p q r s t good bad yes no ann bob cal the answer is".split()
TAGS = ["O", "B-PER", "I-PER"]
NAMES = ["ann", "bob", "cal"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return save_word_tokenizer(folder, WORDS)


def _words(rng, n):
    return [rng.choice(WORDS[:20]) for _ in range(n)]


def fixture_rows(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if task == "pairs":  # the label is in the second text
            label = i % 2
            rows.append({"premise": " ".join(_words(rng, 4)),
                         "hypothesis": " ".join(_words(rng, 2) + ["yes" if label else "no"]), "y": ["no", "yes"][label]})
        elif task == "regression":  # how many "good" words
            k = i % 4
            words = _words(rng, 5 - k) + ["good"] * k
            rng.shuffle(words)
            rows.append({"s": " ".join(words), "score": k / 3})
        elif task == "multiple_choice":  # the choice with "good" in it
            right = i % 3
            choices = [" ".join(_words(rng, 2) + (["good"] if j == right else ["bad"])) for j in range(3)]
            rows.append({"ctx": " ".join(_words(rng, 3)), "c0": choices[0], "c1": choices[1], "c2": choices[2],
                         "answer": right})
        elif task == "tokens":  # names are persons
            words = _words(rng, 6)
            for _ in range(2):
                words[rng.randrange(6)] = rng.choice(NAMES)
            rows.append({"words": words, "tags": ["B-PER" if w in NAMES else "O" for w in words]})
        else:  # generation: answer with the first word, in a fixed format
            words = _words(rng, 3)
            rows.append({"mr": " ".join(words), "ref": f"yes the answer is {words[0]} good"})
    return rows


SETTINGS = {  # fixture -> (task, columns, labels, model, method, lr, epochs, metric)
    "pairs": ("classification", {"text": "premise", "text_pair": "hypothesis", "label": "y"}, ["no", "yes"],
              "bert", "lora", 1e-2, 8, "acc"),
    "regression": ("regression", {"text": "s", "label": "score"}, [], "roberta", "lora", 1e-2, 8, "pearson"),
    "multiple_choice": ("multiple_choice", {"text": "ctx", "choices": ["c0", "c1", "c2"], "label": "answer"},
                        ["0", "1", "2"], "bert", "adapter", 1e-2, 8, "acc"),
    "tokens": ("token_classification", {"tokens": "words", "label": "tags"}, TAGS, "deberta-v2", "ptuning_v2",
               3e-2, 8, "f1"),
    "generation_decoder": ("generation", {"text": "mr", "target": "ref"}, [], "gpt2", "finetune", 1e-2, 10, "bleu"),
    "generation_encdec": ("generation", {"text": "mr", "target": "ref"}, [], "t5", "prefix_tuning", 1e-2, 10, "bleu"),
}


def make_data(tmp_path, name, tokenizer, task_obj, columns, labels):
    files = {}
    fixture = name.split("_")[0] if name.startswith("generation") else name
    for split, n, seed in (("train", 96, 0), ("validation", 32, 1), ("test", 32, 2)):
        path = tmp_path / f"{name}_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in fixture_rows(fixture, n, seed)))
        files[split] = str(path)
    return TaskDataModule(tokenizer, source="", labels=labels, task=task_obj, columns=columns, files=files,
                          batch_size=16, eval_batch_size=32, max_length=24)


def build(name, tokenizer_dir, method=None):
    task, columns, labels, arch, default_method, lr, epochs, metric = SETTINGS[name]
    method = method or default_method
    cfg = dict(name=method, prefix_length=4, depth="deep", reparameterization="mlp" if method == "prefix_tuning"
               else "none", reparam_hidden=32, r=4, alpha=8, dropout=0.0, bottleneck=8, head={"dropout": 0.0},
               optim={"lr": lr})
    task_cfg = {"name": task, **({"max_new_tokens": 8} if task == "generation" else {})}
    module = METHODS[method](model={**tiny_model(arch), "tokenizer": tokenizer_dir}, method=cfg,
                             num_labels=len(labels), labels=labels, task=task_cfg)
    return module, columns, labels, epochs, metric


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("generation") else n
                                  for n in SETTINGS])
def test_task_type_learns(tmp_path, tokenizer_dir, name):
    torch.manual_seed(0)
    module, columns, labels, epochs, metric = build(name, tokenizer_dir)
    dm = make_data(tmp_path, name, module.tokenizer, module.task, columns, labels)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    module.reset_validation()
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"] * 0.8, (before, after)
    assert after[f"val/{metric}"] > before[f"val/{metric}"] + 0.2, (before, after)
    assert f"test/{metric}" in test and f"val/{metric}_best" in after
    if name.startswith("generation"):  # sample outputs are logged
        samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
        assert samples and {"generated", "reference"} <= set(samples[0])


def _greedy_by_forward(module, batch, steps):
    """Greedy decoding with the teacher-forced forward (no cache): what `generate` must match."""
    ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]
    out = []
    for row in range(ids.shape[0]):
        source = ids[row][mask[row].bool()].tolist()
        generated = []
        for _ in range(steps):
            if module.task.kind == "decoder":
                seq = torch.tensor([source + generated])
                b = {"input_ids": seq, "attention_mask": torch.ones_like(seq), "labels": seq}
                nxt = int(module(b)[0, -1].argmax())
            else:
                labels = torch.tensor([generated + [0]])
                b = {"input_ids": torch.tensor([source]), "attention_mask": torch.ones(1, len(source), dtype=torch.long),
                     "labels": labels}
                nxt = int(module(b)[0, -1].argmax())
            generated.append(nxt)
        out.append(generated)
    return out


@pytest.mark.parametrize("arch,method,depth", [
    ("gpt2", "ptuning_v2", "deep"), ("llama", "prompt_tuning", "embedding"), ("llama", "lora", "deep"),
    ("t5", "prefix_tuning", "deep"), ("t5", "p_tuning", "embedding"), ("bart", "prompt_tuning", "embedding"),
])
def test_generate_equals_greedy_forward(tokenizer_dir, arch, method, depth):
    """The cached, batched (left-padded) `generate` with the method's prefix or prompt gives the
    tokens that greedy decoding through the training forward gives, token for token."""
    torch.manual_seed(0)
    cfg = dict(name=method, prefix_length=3, depth=depth, reparameterization="mlp" if method != "ptuning_v2" else "none",
               reparam_hidden=16, r=4, alpha=8, dropout=0.0, head={}, optim={})
    module = METHODS[method](model={**tiny_model(arch), "tokenizer": tokenizer_dir}, method=cfg, num_labels=0,
                             task={"name": "generation"}).eval()
    with torch.no_grad():  # make the trained parts matter
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    rows = {"text": ["a b c", "d e", "f g h i"], "target": ["x", "y", "z"]}
    enc = module.task.tokenize(rows, module.tokenizer, 16)
    batch = module.task.collator(module.tokenizer)([{k: enc[k][i] for k in enc} for i in range(3)])
    steps = 5
    # (one token more than compared: BART's config forces an end-of-sequence token at the last one)
    ids = module.generate(batch["gen_input_ids"], batch["gen_attention_mask"], max_new_tokens=steps + 1,
                          min_new_tokens=steps + 1, do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
    if module.task.kind == "decoder":
        ids = ids[:, batch["gen_input_ids"].shape[1]:]
    else:
        ids = ids[:, 1:]  # the decoder start token
    assert ids[:, :steps].tolist() == _greedy_by_forward(module, batch, steps)


def test_prompt_keeps_token_labels_aligned(tokenizer_dir):
    """Input-level prompts are stripped from token-level outputs: one logit row per input token."""
    module, *_ = build("tokens", tokenizer_dir, method="prompt_tuning")
    rows = {"tokens": [["ann", "a", "b"], ["c", "bob"]], "label": [[1, 0, 0], [0, 1]]}
    enc = module.task.tokenize(rows, module.tokenizer, 16)
    batch = module.task.collator(module.tokenizer)([{k: enc[k][i] for k in enc} for i in range(2)])
    assert batch["labels"].tolist()[0] == [-100, 1, 0, 0, -100]
    assert module(batch).shape[:2] == batch["input_ids"].shape


# --- data configs ---------------------------------------------------------------------------------
HUB = {  # config -> (task, source, subset, columns, labels, metric): the datasets' own columns and label order
    "sst2": ("classification", "hub:nyu-mll/glue", "sst2", {"text": "sentence", "label": "label"},
             ["negative", "positive"], "acc"),
    "rte": ("classification", "hub:nyu-mll/glue", "rte", {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
            ["entailment", "not_entailment"], "acc"),
    "mrpc": ("classification", "hub:nyu-mll/glue", "mrpc",
             {"text": "sentence1", "text_pair": "sentence2", "label": "label"}, ["not_equivalent", "equivalent"], "f1"),
    "stsb": ("regression", "hub:nyu-mll/glue", "stsb", {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
             [], "pearson"),
    "boolq": ("classification", "hub:aps/super_glue", "boolq", {"text": "question", "text_pair": "passage", "label": "label"},
              ["False", "True"], "acc"),
    "cb": ("classification", "hub:aps/super_glue", "cb", {"text": "premise", "text_pair": "hypothesis", "label": "label"},
           ["entailment", "contradiction", "neutral"], "f1"),
    "copa": ("multiple_choice", "hub:aps/super_glue", "copa",
             {"text": "premise", "text_pair": "question", "choices": ["choice1", "choice2"], "label": "label"},
             ["choice1", "choice2"], "acc"),
    "wic": ("classification", "hub:aps/super_glue", "wic",
            {"text": ["word", "sentence1"], "text_pair": "sentence2", "label": "label"}, ["False", "True"], "acc"),
    "conll2003": ("token_classification", "hub:eriktks/conll2003", None, {"tokens": "tokens", "label": "ner_tags"},
                  ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"], "f1"),
    "e2e_nlg": ("generation", "hub:GEM/e2e_nlg", None, {"text": "meaning_representation", "target": "target"}, [], "bleu"),
    "xsum": ("generation", "hub:EdinburghNLP/xsum", None, {"text": "document", "target": "summary"}, [], "rougeL"),
}


@pytest.mark.parametrize("name", list(HUB))
def test_hub_data_config_carries_columns_labels_metric(name):
    from test_configs import compose_cfg

    from peft_lightning.tasks import make_task
    from peft_lightning.validation import validate_config

    task, source, subset, columns, labels, metric = HUB[name]
    overrides = [f"data={name}"] + (["model=gpt2"] if task == "generation" else [])
    cfg = compose_cfg(overrides)
    data = cfg.data
    assert (data.task, data.source, data.get("subset"), data.metric) == (task, source, subset, metric)
    assert OmegaConf.to_container(data.columns) == columns
    assert list(data.labels) == labels
    validate_config(cfg)  # the task accepts its columns, labels and metric
    made = make_task(task, labels, "decoder" if task == "generation" else "encoder", metric)
    assert made.metric == metric and metric in made.metrics().keys()
    splits = dict(data.splits)  # a dev set of its own, or one carved from train (dev_from_train)
    assert set(splits) == ({"train", "test"} if data.get("dev_from_train") else {"train", "validation", "test"})


def test_hub_offline_fails_at_once_naming_the_fix(monkeypatch):
    import time

    from huggingface_hub import constants

    from peft_lightning.data.datamodule import load_raw
    from peft_lightning.tasks import make_task

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"hub:nyu-mll/glue \(rte\).*data\.source=path/to/file"):
        load_raw("hub:nyu-mll/glue", {}, make_task("classification", ["entailment", "not_entailment"]),
                 {"text": "sentence1", "text_pair": "sentence2", "label": "label"}, subset="rte")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("task,rows,columns,labels,message", [
    ("regression", [{"s": "a b", "score": "high"}], {"text": "s", "label": "score"}, [],
     r"d.jsonl, line 1, column 'score': regression label 'high' is not a number"),
    ("multiple_choice", [{"ctx": "a", "c0": "b"}], {"text": "ctx", "choices": ["c0", "c1"], "label": "y"}, ["0", "1"],
     r"d.jsonl, line 1: column 'c1' missing"),
    ("multiple_choice", [{"ctx": "a", "c0": "b", "c1": "c", "y": 2}], {"text": "ctx", "choices": ["c0", "c1"],
                                                                        "label": "y"}, ["0", "1"],
     r"d.jsonl, line 1, column 'y': choice index 2, but data.labels names 2 choices"),
    ("token_classification", [{"w": ["a", "ann"], "t": ["O", "B-XYZ"]}], {"tokens": "w", "label": "t"}, TAGS,
     r"d.jsonl, line 1, column 't', tag 1: label 'B-XYZ' is not in data.labels"),
    ("classification", [{"a": "x", "y": "no"}], {"text": "a", "text_pair": "b", "label": "y"}, ["no", "yes"],
     r"d.jsonl, line 1: column 'b' missing"),
])
def test_bad_task_data_names_file_column_row(tmp_path, task, rows, columns, labels, message):
    from peft_lightning.data.files import read_rows, to_roles
    from peft_lightning.tasks import make_task

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises((ValueError, KeyError), match=message):
        to_roles(read_rows(path), columns, make_task(task, labels), str(path))


def test_embedded_sets_have_their_task_columns():
    from peft_lightning.data.embedded import BUILDERS

    expected = {"rotten_tomatoes": {"text", "label"}, "rotten_tomatoes_scores": {"text", "label"},
                "sms_spam": {"text", "label"}, "movie_dialog": {"text", "text_pair", "label"},
                "city_facts": {"text", "target"}}
    for name, columns in expected.items():
        table, _ = BUILDERS[name]()
        assert set(table) == columns and len({len(v) for v in table.values()}) == 1
    pairs, _ = BUILDERS["movie_dialog"]()
    assert 0.45 < sum(pairs["label"]) / len(pairs["label"]) < 0.55  # true replies vs drawn lines
    scores, _ = BUILDERS["rotten_tomatoes_scores"]()
    assert min(scores["label"]) >= -4 and max(scores["label"]) <= 4 and len(set(scores["label"])) > 100


def test_extra_evaluation_sets_log_under_their_own_names(tmp_path, tokenizer_dir):
    """data.extra_eval: the run is also tested on other sets (domain transfer), each as test_<name>/."""
    from peft_lightning.run import evaluate_extra_sets

    module, columns, labels, _, _ = build("pairs", tokenizer_dir)
    dm = make_data(tmp_path, "pairs", module.tokenizer, module.task, columns, labels)
    shifted = tmp_path / "shifted.jsonl"  # another distribution: longer premises
    shifted.write_text("".join(json.dumps({**r, "premise": r["premise"] + " q r s t"}) + "\n"
                               for r in fixture_rows("pairs", 20, 7)))
    cfg = OmegaConf.create({"seed": 0, "paths": {"cache_dir": None},
                            "data": {"source": "", "task": "classification", "labels": labels, "columns": columns,
                                     "files": dm.files, "max_length": 24, "batch_size": 16, "eval_batch_size": 8,
                                     "extra_eval": {"shifted": {"files": {"test": str(shifted)}}}}})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    own = trainer.test(module, datamodule=dm, verbose=False)[0]
    extra = evaluate_extra_sets(cfg, trainer, module, dm, None)
    assert set(extra) == {"test_shifted/acc", "test_shifted/f1", "test_shifted/mcc", "test_shifted/loss"}
    assert "test/acc" in own and module.test_prefix == "test/"
    # it is really the other set: 20 rows evaluated, so accuracy is a multiple of 1/20
    assert abs(extra["test_shifted/acc"] * 20 - round(extra["test_shifted/acc"] * 20)) < 1e-4


def test_predict_records_for_every_task_type(tokenizer_dir):
    """The predict CLI's core: one result per record, in order, shaped by the task (a tag per word,
    spans that cover their words, a score, a choice, generated text)."""
    from peft_lightning.predict import predict_records

    words = [["ann", "a", "b"], ["c", "bob", "cal", "d"]]
    module, *_ = build("tokens", tokenizer_dir)
    with torch.no_grad():  # a head that tags the names, so spans are predictable
        module.head.linear.weight.zero_()
        module.head.linear.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    out = predict_records(module, [{"tokens": w} for w in words], batch_size=1)
    assert [len(r["tags"]) for r in out] == [3, 4] and all(r["tags"] == ["O"] * len(r["tokens"]) for r in out)
    module.head.linear.bias.data = torch.tensor([-1.0, 1.0, 0.0])  # everything B-PER: one entity per word
    out = predict_records(module, [{"tokens": w} for w in words])
    assert [[(e["start"], e["end"], e["text"]) for e in r["entities"]] for r in out][1] == \
        [(0, 1, "c"), (1, 2, "bob"), (2, 3, "cal"), (3, 4, "d")]
    reg, *_ = build("regression", tokenizer_dir)
    scores = predict_records(reg, [{"text": "a b"}, {"text": "good good"}])
    assert [set(r) for r in scores] == [{"text", "score"}] * 2
    mc, *_ = build("multiple_choice", tokenizer_dir)
    picks = predict_records(mc, [{"text": "a", "choices": ["b good", "c bad", "d bad"]}])
    assert picks[0]["label"] in {"0", "1", "2"} and abs(sum(picks[0]["probabilities"].values()) - 1) < 1e-4
    gen, *_ = build("generation_encdec", tokenizer_dir)
    texts = predict_records(gen, [{"text": "a b c"}, {"text": "d"}])
    assert [r["text"] for r in texts] == ["a b c", "d"] and all(isinstance(r["generated"], str) for r in texts)


def test_embedded_labels_that_do_not_fit_data_labels_name_the_row():
    """An embedded set's labels pass the same check as a file's: a data.labels list too short for
    the set's classes is an error naming the set and row, not a silent out-of-range target."""
    from peft_lightning.data.datamodule import load_raw
    from peft_lightning.tasks import make_task

    with pytest.raises(ValueError, match=r"embedded dataset 'sms_spam', row \d+: label '1' is not in data.labels \['ham'\]"):
        load_raw("embedded:sms_spam", {"train": 0.8, "validation": 0.1, "test": 0.1}, make_task("classification", ["ham"]))
