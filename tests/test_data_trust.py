"""Data that must not silently train or score on the wrong thing (issue 14: items 1-4, 7, 15's data
parts): a cache key that covers every input, byte-level BPE tokenizers on pre-split words,
duplicates across splits, seeded hub dev sets, and files that parse but are wrong."""
import json
import logging
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from conftest import save_word_tokenizer

import peft_lightning.data.datamodule as dmod
from peft_lightning.backbone import BackboneSpec, load_tokenizer
from peft_lightning.data import TaskDataModule
from peft_lightning.data.datamodule import load_raw
from peft_lightning.data.files import read_rows, to_roles
from peft_lightning.errors import ConfigError, DataError, UserError
from peft_lightning.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
BAD = Path(__file__).parent / "data" / "bad"
WORDS = "a b c d e f g h i j k l m n o p q r s t u v w x y z good bad the is".split()
LABELS = ["neg", "pos"]


def word_tokenizer(folder: Path, shuffle: int = 0) -> str:
    """A word-level tokenizer saved in `folder`; `shuffle` rotates the word ids (another vocabulary
    under the same name)."""
    return save_word_tokenizer(folder, WORDS[shuffle:] + WORDS[:shuffle])


def byte_level_tokenizer(folder: Path, tokenizer_class: str = "RobertaTokenizer") -> str:
    """A small byte-level BPE tokenizer (vocab.json + merges.txt learnt here) in `folder`, loaded
    like a hub RoBERTa / GPT-2 one: add_prefix_space is off, as in their shipped configs."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # learn the word-initial Ġ pieces
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["Hello world , New York is a big city in the world",
                             "John lives in New York and says hello to the world"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(folder))  # vocab.json, merges.txt
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
    return str(folder)


def rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        a = " ".join(rng.choice(WORDS[:20]) for _ in range(3)) + (" good" if label else " bad") + f" {WORDS[i % 26]}"
        b = " ".join(rng.choice(WORDS[:26]) for _ in range(6))
        out.append({"a": a, "b": b, "y": LABELS[label]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# --- item 1: the tokenization cache key covers every input -------------------------------------
def tokenized(kwargs: dict, cache: Path | None) -> dict:
    tokenizer = load_tokenizer(BackboneSpec(tokenizer=kwargs["tokenizer"]), )
    for key, value in kwargs.get("tokenizer_attrs", {}).items():
        setattr(tokenizer, key, value)
    task = kwargs.get("task") or make_task("classification", kwargs["labels"])
    dm = TaskDataModule(tokenizer, cache_dir=str(cache) if cache else None, task=task,
                        **{k: v for k, v in kwargs.items() if k not in ("tokenizer", "tokenizer_attrs", "task")})
    dm.setup()
    return {s: {c: dm.data[s][c] for c in ("input_ids", "labels")} for s in ("train", "validation", "test")}


@pytest.fixture
def base(tmp_path):
    """Two data layouts (one file split by data.split; data.files), a tokenizer folder, a cache."""
    data = tmp_path / "data"
    data.mkdir()
    one = write_jsonl(data / "all.jsonl", rows(40))
    files = {s: write_jsonl(data / f"{s}.jsonl", rows(12, seed)) for seed, s in enumerate(("train", "validation", "test"))}
    tok = word_tokenizer(tmp_path / "tok")
    common = {"tokenizer": tok, "labels": LABELS, "columns": {"text": "a", "label": "y"}, "max_length": 8}
    return {"source": {**common, "source": one, "split": {"train": 0.6, "validation": 0.2, "test": 0.2, "seed": 1}},
            "files": {**common, "source": "", "files": files}}


def _rewrite_same_size_and_mtime(kwargs):
    """Other words in the text column, the same byte size and mtime: only the content tells."""
    path = Path(kwargs["files"]["train"] if kwargs.get("files") else kwargs["source"])
    stat = path.stat()
    text = path.read_text()
    swapped = text.replace('"a": "a ', '"a": "b ').replace('"a": "c ', '"a": "d ')
    assert swapped != text and len(swapped) == len(text)
    path.write_text(swapped)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return kwargs


def _other_vocabulary(kwargs):
    word_tokenizer(Path(kwargs["tokenizer"]), shuffle=5)  # same folder, same name_or_path
    return kwargs


CHANGES = {
    "file content (same size and mtime)": _rewrite_same_size_and_mtime,
    "text column": lambda k: {**k, "columns": {"text": "b", "label": "y"}},
    "label order": lambda k: {**k, "labels": ["pos", "neg"]},
    "split seed": lambda k: {**k, "split": {**k.get("split", {}), "seed": 2}},
    "split fractions": lambda k: {**k, "split": {"train": 0.4, "validation": 0.3, "test": 0.3, "seed": 1}},
    "max_length": lambda k: {**k, "max_length": 4},
    "tokenizer vocabulary": _other_vocabulary,
    "tokenizer setting (truncation side)": lambda k: {**k, "max_length": 4, "tokenizer_attrs": {"truncation_side": "left"}},
}
CASES = [("files", c) for c in ("file content (same size and mtime)", "text column", "label order", "max_length",
                                "tokenizer vocabulary")] + [("source", c) for c in CHANGES]


@pytest.mark.parametrize("layout,change", CASES)
def test_each_input_changes_the_cached_batches(tmp_path, base, layout, change):
    """Change one input: the cached run must give exactly what an uncached run gives, which
    differs from before (today's key missed labels, columns with data.files, file contents and
    the vocabulary, and served the old batches)."""
    cache = tmp_path / "cache"
    kwargs = base[layout]
    if change == "tokenizer setting (truncation side)":
        kwargs = {**kwargs, "max_length": 4}  # so only the truncation side differs
    before = tokenized(kwargs, cache)
    changed = CHANGES[change](dict(kwargs))
    after = tokenized(changed, cache)
    assert after == tokenized(changed, None), f"{change}: the cache served stale batches"
    assert after != before, f"{change}: the change did not reach the batches"


def test_task_options_are_in_the_cache_key(tmp_path, base):
    """A generation separator (the prompt template between source and target) changes the ids."""
    cache = tmp_path / "cache"
    kwargs = {**base["source"], "columns": {"text": "a", "target": "b"}, "labels": [], "max_length": 24}
    before = tokenized({**kwargs, "task": make_task("generation", [], "decoder", separator=" the ")}, cache)
    changed = {**kwargs, "task": make_task("generation", [], "decoder", separator=" is ")}
    after = tokenized(changed, cache)
    assert after == tokenized(changed, None) and after != before


def test_unchanged_inputs_hit_the_cache(tmp_path, base, monkeypatch):
    cache = tmp_path / "cache"
    first = tokenized(base["files"], cache)

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again: the cache missed")

    from peft_lightning.tasks.base import Task

    monkeypatch.setattr(Task, "tokenize", no_tokenizing)
    assert tokenized(base["files"], cache) == first
    assert len(list((cache / "tokenized").iterdir())) == 1
    monkeypatch.setattr(dmod, "DATA_RULES", dmod.DATA_RULES + 1)  # a new dedup/reading rule: a new key
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenized(base["files"], cache)


# --- item 2: byte-level BPE tokenizers on pre-split words ----------------------------------------
@pytest.mark.parametrize("tokenizer_class", ["RobertaTokenizer", "GPT2Tokenizer", "generic"])
def test_byte_level_tokenizers_mark_every_word_start(tmp_path, tokenizer_class):
    """Words map to word-initial ("Ġ") tokens, the ones the same word gets inside a sentence, and
    each tag sits on its word's first sub-token. Detected from the backend's ByteLevel
    pre-tokenizer, so a tokenizer of any class is covered."""
    folder = byte_level_tokenizer(tmp_path / "bpe", "RobertaTokenizer" if tokenizer_class == "generic" else tokenizer_class)
    tok = load_tokenizer(BackboneSpec(tokenizer=folder))
    if tokenizer_class == "generic":  # the same backend behind the base class
        tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", eos_token="</s>")
    words = ["Hello", "world", "New", "York", "Johnny"]
    tags = ["B-PER", "O", "B-LOC", "I-LOC", "B-PER"]
    task = make_task("token_classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    labels = [task.label_value(tags, "test")]
    enc = task.tokenize({"tokens": [words], "label": labels}, tok, 32)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0])
    firsts = [i for i, (w, prev) in enumerate(zip(enc.word_ids(0), [None, *enc.word_ids(0)])) if w is not None and w != prev]
    assert [pieces[i] for i in firsts] == ["ĠHello", "Ġworld", "ĠNew", "ĠYork", "ĠJohn"]
    for word, i in zip(words, firsts):  # the id the word has in running text, after a space
        assert enc["input_ids"][0][i] == tok(" " + word, add_special_tokens=False)["input_ids"][0]
    assert [enc["labels"][0][i] for i in firsts] == labels[0]
    assert [x for i, x in enumerate(enc["labels"][0]) if i not in firsts] == [-100] * (len(pieces) - len(firsts))
    # the tokenizer itself is untouched: plain text keeps its usual first token
    plain = tok.convert_ids_to_tokens(tok("Hello world", add_special_tokens=False)["input_ids"])
    assert not plain[0].startswith("Ġ") and plain[-1] == "Ġworld"


def test_byte_level_token_classification_through_the_datamodule(tmp_path):
    folder = byte_level_tokenizer(tmp_path / "bpe")
    tok = load_tokenizer(BackboneSpec(tokenizer=folder))
    records = [{"w": ["John", "lives", "in", "New", "York"], "t": ["B-PER", "O", "O", "B-LOC", "I-LOC"]}] * 10
    path = write_jsonl(tmp_path / "ner.jsonl", [dict(r, w=r["w"] + [str(i)]) | {"t": r["t"] + ["O"]}
                                                for i, r in enumerate(records)])
    dm = TaskDataModule(tok, source=path, labels=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], task="token_classification",
                        columns={"tokens": "w", "label": "t"}, split={"train": 0.6, "validation": 0.2, "test": 0.2})
    dm.setup()
    ids, labels = dm.data["train"]["input_ids"][0], dm.data["train"]["labels"][0]
    kept = [tok.convert_ids_to_tokens(i) for i, y in zip(ids, labels) if y != -100]
    assert kept[:5] == ["ĠJohn", "Ġlives", "Ġin", "ĠNew", "ĠYork"]
    assert [y for y in labels if y != -100][:5] == [1, 0, 0, 3, 4]


# --- item 3: duplicates across splits ------------------------------------------------------------
def normalized(text: str) -> str:  # the rule, written out independently of the code under test
    return " ".join(text.casefold().split())


def _disjoint(parts) -> dict:
    keys = {s: {normalized(t) for t in parts[s]["text"]} for s in parts}
    return {"validation~train": len(keys["validation"] & keys["train"]), "test~train": len(keys["test"] & keys["train"]),
            "test~validation": len(keys["test"] & keys["validation"])}


def test_embedded_sms_spam_is_deduplicated_before_the_split():
    """Today 47 of 483 validation and 42 of 485 test messages are copies of training messages."""
    raw = load_raw("embedded:sms_spam", {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 42},
                   make_task("classification", ["ham", "spam"]))
    parts, stats = raw[0], raw[2]
    assert _disjoint(parts) == {"validation~train": 0, "test~train": 0, "test~validation": 0}
    assert stats["duplicates_removed"] == 326 and stats["sizes"] == {"train": 3608, "validation": 451, "test": 452}
    assert stats["cross_split_duplicates"] == {"validation~train": 0, "test~train": 0, "test~validation": 0}


def test_a_local_file_is_deduplicated_on_normalized_text_over_every_input(tmp_path):
    records = [{"text": f"sentence {i}", "pair": "p", "label": "neg"} for i in range(20)]
    records += [{"text": "  Sentence   3 ", "pair": "P", "label": "pos"},  # case and spaces: a duplicate
                {"text": "sentence 4", "pair": "another pair", "label": "neg"}]  # another pair: not one
    path = write_jsonl(tmp_path / "d.jsonl", records)
    raw = load_raw(path, {"train": 0.5, "validation": 0.25, "test": 0.25}, make_task("classification", LABELS),
                   {"text": "text", "text_pair": "pair", "label": "label"})
    assert raw.stats["duplicates_removed"] == 1 and raw.stats["duplicates_with_other_label"] == 1
    assert sum(raw.stats["sizes"].values()) == 21
    texts = [(t, p) for s in raw.parts.values() for t, p in zip(s["text"], s["text_pair"])]
    assert ("sentence 3", "p") in texts and ("  Sentence   3 ", "P") not in texts and ("sentence 4", "another pair") in texts


def test_generation_keeps_an_inputs_references_together(tmp_path):
    """Several references of one input stay (and in one split); exact repeats go."""
    records = [{"src": f"input {i}", "tgt": f"output {i}"} for i in range(30)]
    records += [{"src": f"input {i}", "tgt": f"other output {i}"} for i in range(10)]
    records += [{"src": "input 0", "tgt": "Output  0"}]  # an exact (normalized) repeat
    path = write_jsonl(tmp_path / "g.jsonl", records)
    raw = load_raw(path, {"train": 0.6, "validation": 0.2, "test": 0.2}, make_task("generation", [], "decoder"),
                   {"text": "src", "target": "tgt"})
    assert raw.stats["duplicates_removed"] == 1 and sum(raw.stats["sizes"].values()) == 40
    assert _disjoint(raw.parts) == {"validation~train": 0, "test~train": 0, "test~validation": 0}


def test_given_splits_are_kept_and_their_overlaps_counted(tmp_path, caplog):
    train = [{"text": f"t {i}", "label": "neg"} for i in range(10)]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", train),
             "validation": write_jsonl(tmp_path / "val.jsonl", [{"text": "T  0", "label": "neg"}, {"text": "v", "label": "pos"}]),
             "test": write_jsonl(tmp_path / "test.jsonl", [{"text": "t 1", "label": "neg"}, {"text": "t 2", "label": "pos"},
                                                          {"text": "v", "label": "pos"}])}
    with caplog.at_level(logging.WARNING):
        raw = load_raw("", {}, make_task("classification", LABELS), None, files)
    assert raw.stats["sizes"] == {"train": 10, "validation": 2, "test": 3}
    assert raw.stats["cross_split_duplicates"] == {"validation~train": 1, "test~train": 2, "test~validation": 1}
    assert "2 of 3 test examples repeat a train input" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # one file in every role (an extra_eval test set): no warning
        raw = load_raw("", {}, make_task("classification", LABELS), None, dict.fromkeys(files, files["test"]))
    assert set(raw.stats["cross_split_duplicates"].values()) == {"same file"} and "repeat" not in caplog.text


@pytest.mark.slow  # a real run: about a minute on 2 shared cores
def test_results_json_records_the_data_stats(tmp_path):
    """A real run (tiny model, a few batches) puts the split sizes and duplicates in results.json."""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "model=tiny-bert", "data=sms_spam", "logger=csv",
                           "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
                           "+trainer.limit_test_batches=1", "data.batch_size=4", f"hydra.run.dir={out}",
                           f"paths.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "results.json").read_text())["data_stats"]
    assert stats["sizes"] == {"train": 3608, "validation": 451, "test": 452} and stats["duplicates_removed"] == 326
    assert stats["cross_split_duplicates"] == {"validation~train": 0, "test~train": 0, "test~validation": 0}


# --- item 4: hub dev sets are a seeded share of train -------------------------------------------
def fake_hub(monkeypatch, n_train: int, n_validation: int = 30):
    calls = []

    def hub_rows(path, subset, split):
        calls.append(split)
        n = {"train": n_train, "validation": n_validation}[split]  # no slices: the framework splits
        for i in range(n):
            yield f"hub:{path} {split} row {i}", {"sentence": f"{split} example {i}", "label": i % 2}

    monkeypatch.setattr(dmod, "hub_rows", hub_rows)
    return calls


def hub(dev_from_train, seed=None):
    spec = dict(dev_from_train or {}) | ({"seed": seed} if seed is not None else {})
    return load_raw("hub:fake", {}, make_task("classification", LABELS), {"text": "sentence", "label": "label"},
                    splits={"train": "train", "test": "validation"}, dev_from_train=spec)


@pytest.mark.parametrize("n_train,n_dev", [(1000, 100), (4000, 200), (250, 50), (400, 80)])
def test_hub_dev_set_is_a_seeded_shuffled_share_of_train(monkeypatch, n_train, n_dev):
    """max(5%, 100) examples, at most 20% of train; drawn with the seed, not the file's tail."""
    calls = fake_hub(monkeypatch, n_train)
    raw = hub({})
    assert set(calls) == {"train", "validation"}
    dev, train = raw.parts["validation"]["text"], raw.parts["train"]["text"]
    assert len(dev) == n_dev and len(train) == n_train - n_dev and not set(dev) & set(train)
    tail = [f"train example {i}" for i in range(n_train - n_dev, n_train)]
    assert sorted(dev) != sorted(tail)
    indices = sorted(int(t.split()[-1]) for t in dev)
    assert indices[0] < n_train / 4 and indices[-1] > 3 * n_train / 4  # spread over the file
    assert hub({}).parts["validation"]["text"] == dev  # same seed, same split
    assert hub({}, seed=7).parts["validation"]["text"] != dev
    assert raw.parts["test"]["text"][0] == "validation example 0"
    assert raw.stats["sizes"] == {"train": n_train - n_dev, "test": 30, "validation": n_dev}


def test_hub_configs_carve_dev_from_train_not_a_slice():
    import yaml

    for name in ("boolq", "cb", "copa", "wic", "rte", "mrpc", "sst2", "stsb"):
        cfg = yaml.safe_load((ROOT / "conf" / "data" / f"{name}.yaml").read_text())
        assert "[" not in json.dumps(cfg["splits"]), f"{name}: a sliced split"
        assert cfg["splits"] == {"train": "train", "test": "validation"} and cfg["dev_from_train"]["min_size"] == 100


def test_dev_from_train_settings_are_checked(monkeypatch):
    fake_hub(monkeypatch, 100)
    with pytest.raises(ConfigError, match=r"data.dev_from_train.fraction must be a fraction in \(0, 1\), got 1.5"):
        hub({"fraction": 1.5})
    with pytest.raises(ConfigError, match=r"data.dev_from_train has unknown keys \['min'\]"):
        hub({"min": 10})
    with pytest.raises(ConfigError, match="data.splits.validation and data.dev_from_train are both set"):
        load_raw("hub:fake", {}, make_task("classification", LABELS), {"text": "sentence", "label": "label"},
                 splits={"validation": "train"}, dev_from_train={})


# --- item 7 and item 15: files that parse but are wrong, and files that are fine --------------------
def read(path, columns=None, task="classification", labels=LABELS):
    return to_roles(read_rows(path), columns or {"text": "text", "label": "label"}, make_task(task, labels), str(path))


@pytest.mark.parametrize("name,columns,task,message", [
    ("duplicate_column.csv", None, "classification",
     r"duplicate_column.csv, line 1 \(the header\): column 'text' appears 2 times"),
    ("duplicate_key.jsonl", None, "classification", r"duplicate_key.jsonl, line 2: key 'text' appears twice"),
    ("null_text.jsonl", None, "classification", r"null_text.jsonl, line 2, column 'text': expected text, got null; fix the row"),
    ("number_text.jsonl", None, "classification", r"number_text.jsonl, line 1, column 'text': expected text, got a number 12345"),
    ("list_text.jsonl", None, "classification", r"list_text.jsonl, line 1, column 'text': expected text, got a list"),
    ("null_label.jsonl", None, "classification", r"null_label.jsonl, line 1, column 'label': the label is empty \(null\)"),
    ("inf_label.csv", {"text": "text", "label": "score"}, "regression",
     r"inf_label.csv, line 3, column 'score': regression label 'inf' is not a finite number"),
    ("nan_label.jsonl", {"text": "text", "label": "score"}, "regression",
     r"nan_label.jsonl, line 2, column 'score': regression label nan is not a finite number"),
    ("overflow_label.tsv", {"text": "text", "label": "score"}, "regression",
     r"overflow_label.tsv, line 2, column 'score': regression label '1e999' is not a finite number"),
    ("tokens_string.jsonl", {"tokens": "words", "label": "tags"}, "token_classification",
     r"tokens_string.jsonl, line 1, column 'words': expected a list of words, got a str"),
    ("tags_length.jsonl", {"tokens": "words", "label": "tags"}, "token_classification",
     r"tags_length.jsonl, line 1: 3 words but 2 tags"),
])
def test_files_that_parse_but_are_wrong_name_file_line_column(name, columns, task, message):
    labels = ["O", "B-PER"] if task == "token_classification" else LABELS
    with pytest.raises(DataError, match=message):
        read(BAD / name, columns, task, labels)


def test_null_or_list_text_in_parquet_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["fine", None], "label": ["neg", "pos"]}), path)
    with pytest.raises(DataError, match=r"d.parquet, row 1, column 'text': expected text, got null;"):
        read(path)
    pq.write_table(pa.table({"text": [["a", "b"]], "label": ["neg"]}), path)
    with pytest.raises(DataError, match=r"d.parquet, row 0, column 'text': expected text, got a list"):
        read(path)


def test_numeric_label_names_are_names_never_indices(tmp_path):
    """data.labels=[1, 2] (numbers in the yaml) are the names "1" and "2": the value 1 is the
    first label, not index 1; 2.0 reads as "2"; a value outside them is an error that says what
    data.labels means (today "1" was read as index 1 and "2" was "not in data.labels [1, 2]")."""
    task = make_task("classification", [1, 2])
    assert task.labels == ["1", "2"]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "2"},
                                              {"text": "c", "label": 2.0}])
    assert to_roles(read_rows(path), {"text": "text", "label": "label"}, task, path)["label"] == [0, 1, 1]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(DataError, match=r"bad.jsonl, line 1, column 'label': label '0' is not in data.labels \['1', '2'\] "
                                        r"\(data.labels: the label names in index order; the names are numbers, so a "
                                        r"value must be one of them, never an index\)"):
        to_roles(read_rows(bad), {"text": "text", "label": "label"}, task, bad)
    # names that are words still accept indices (hub and embedded sets store 0/1)
    assert make_task("classification", LABELS).label_value(1, "x") == 1


LONG = "word " * 40_000  # 200,000 characters: over the csv module's 128 KiB field limit


@pytest.mark.parametrize("name,content,texts", [
    ("bom.csv", None, ["good film", "bad film"]),
    ("semicolon.csv", None, ["good film", "bad film"]),
    ("tab_in.csv", None, ["good film", "bad film"]),
    ("long.csv", f'text,label\n"{LONG}",pos\n', [LONG]),
    ("line_separator.jsonl", None, ["one\u2028two", "three\u2029four"]),
    ("line_separator.csv", "text,label\none\u2028two,pos\n\"three\nfour\",neg\n", ["one\u2028two", "three\nfour"]),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 and "\n" not in v else "")
def test_files_that_are_fine_read_correctly(tmp_path, caplog, name, content, texts):
    """A UTF-8 BOM, a ';' or tab delimiter in a .csv, a field over 128 KiB, U+2028/U+2029 inside a
    JSONL string or a csv field, a quoted line break: each reads as the text it holds."""
    path = BAD / name
    if content is not None:
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        table = read(path)
    assert table["text"] == texts and table["label"] == [1, 0][: len(texts)]
    if name in ("semicolon.csv", "tab_in.csv"):
        assert f"{name} is {';' if name == 'semicolon.csv' else chr(9)!r}-separated, not ','" in caplog.text


def test_negative_split_fractions_name_data_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(20))
    for split, message in [({"train": 0.9, "validation": 0.2, "test": -0.1}, r"data.split.test must be a fraction "
                                                                             r"in \[0, 1\], got -0.1"),
                           ({"train": 0.8, "validation": 0.1, "tests": 0.1}, r"data.split has unknown keys \['tests'\]")]:
        with pytest.raises(ConfigError, match=message):
            load_raw(path, split, make_task("classification", LABELS), {"text": "a", "label": "y"})


def test_data_errors_are_user_errors(tmp_path):
    """Each is a UserError, so train.py prints one line and exits 2."""
    for call in (lambda: read(tmp_path / "missing.csv"), lambda: read(BAD / "null_text.jsonl"),
                 lambda: read(BAD / "duplicate_column.csv")):
        with pytest.raises(UserError):
            call()


# --- quotes in delimited files: a stray '"' must never merge rows silently ---

def test_tsv_quotes_are_text(tmp_path):
    """GLUE convention: a '"' opening a sentence and another rows later keep every row apart."""
    f = tmp_path / "d.tsv"
    f.write_text('sentence\tlabel\n"Hello, she said\t1\nplain\t0\nanother" one\t1\nlast\t0\n')
    got = [row for _, row in read_rows(f)]
    assert [r["sentence"] for r in got] == ['"Hello, she said', "plain", 'another" one', "last"]
    assert [r["label"] for r in got] == ["1", "0", "1", "0"]


def test_csv_stray_quote_swallowing_rows_is_an_error(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,label\nfine,1\n"oops a stray quote,0\nsecond,1\nthird",0\nlast,1\n')
    with pytest.raises(DataError, match=r"d\.csv, line 3: a quote opened here runs over 2 lines that each look "
                                        r"like a row; close the quote"):
        list(read_rows(f))


def test_csv_quoted_line_break_still_reads(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,label\n"first line\nsecond line",1\nnext,0\n')
    got = [(where, row) for where, row in read_rows(f)]
    assert [r for _, r in got] == [{"text": "first line\nsecond line", "label": "1"}, {"text": "next", "label": "0"}]
    assert got[1][0].endswith("line 4")


def test_json_array_file_says_json_lines(tmp_path):
    f = tmp_path / "arr.json"
    f.write_text('[{"text": "a", "label": 0}]\n')
    with pytest.raises(DataError, match=r"arr\.json, line 1: expected a JSON object, got list; \.json files are read "
                                        r"as JSON Lines \(one object per line\)"):
        list(read_rows(f))
