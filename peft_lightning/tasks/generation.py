"""Generation: a source text -> a target text, with a decoder (GPT-2, Llama: E2E NLG, the
Prefix-Tuning setting) or an encoder-decoder (T5, BART: XSum).

Training is teacher-forced cross-entropy on the target tokens only. A decoder reads
`source + separator + target + eos` with the source positions masked out of the loss; an
encoder-decoder encodes the source and decodes the target. Validation and test also decode
(`generate`: greedy, or beam search with `num_beams`) through the method's own generation inputs
(prefix, prompt, LoRA ...), score BLEU and ROUGE-L (torchmetrics, sacreBLEU's 13a tokenizer) and
log sample outputs.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.text import ROUGEScore, SacreBLEUScore

from peft_lightning.tasks.base import Task

log = logging.getLogger(__name__)
IGNORE = -100
DEFAULTS = {"separator": " = ", "max_new_tokens": 48, "num_beams": 1, "samples": 3}


class _Rouge(ROUGEScore):
    """ROUGE-L F-measure as a single number (ROUGEScore returns a dict)."""

    def __init__(self):
        super().__init__(rouge_keys="rougeL")

    def compute(self):
        return super().compute()["rougeL_fmeasure"]


class Generation(Task):
    roles = ("text", "target")
    optional_roles = ()
    metric = "bleu"
    needs_lm = True

    def __init__(self, labels: list[str], kind: str = "decoder", metric: str | None = None, **options):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"data.generation has unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.options = {**DEFAULTS, **options}
        super().__init__(labels, kind, metric)
        if kind not in ("decoder", "encoder-decoder"):
            raise ValueError(f"data.task=generation needs a decoder or an encoder-decoder backbone, not an {kind}")

    @property
    def num_outputs(self) -> int:
        return 0

    def label_value(self, value, where):
        return value

    # --- data ---------------------------------------------------------------------------------
    def tokenize(self, rows, tokenizer, max_length):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"data.task=generation needs a tokenizer with an end-of-sequence token; {type(tokenizer).__name__} has none")
        if self.kind == "encoder-decoder":
            enc = tokenizer(rows["text"], truncation=True, max_length=max_length)
            targets = tokenizer(text_target=rows["target"], truncation=True, max_length=max_length)["input_ids"]
            enc["labels"] = targets
            enc["gen_input_ids"] = enc["input_ids"]
        else:
            sources = tokenizer([t + self.options["separator"] for t in rows["text"]], truncation=True,
                                max_length=max_length // 2)["input_ids"]
            targets = tokenizer(rows["target"], add_special_tokens=False)["input_ids"]
            enc = {"input_ids": [], "attention_mask": [], "labels": [], "gen_input_ids": sources}
            for source, target in zip(sources, targets):
                ids = (source + target + [eos])[:max_length]
                enc["input_ids"].append(ids)
                enc["attention_mask"].append([1] * len(ids))
                enc["labels"].append(([IGNORE] * len(source) + target + [eos])[:max_length])
        enc["reference"] = rows["target"]
        return enc

    def collator(self, tokenizer):
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def pad(rows, value, left=False):
            width = max(len(r) for r in rows)
            fill = [[value] * (width - len(r)) for r in rows]
            return torch.tensor([f + r if left else r + f for r, f in zip(rows, fill)])

        def collate(features):
            batch = {
                "input_ids": pad([f["input_ids"] for f in features], pad_id),
                "attention_mask": pad([[1] * len(f["input_ids"]) for f in features], 0),
                "labels": pad([f["labels"] for f in features], IGNORE),
                # decoding starts from the source alone, left-padded so every row ends at its source
                "gen_input_ids": pad([f["gen_input_ids"] for f in features], pad_id, left=True),
                "gen_attention_mask": pad([[1] * len(f["gen_input_ids"]) for f in features], 0, left=True),
                "reference": [f["reference"] for f in features],
            }
            return batch

        return collate

    # --- model --------------------------------------------------------------------------------
    def head(self, hidden, head_cfg, kind):
        return None  # the backbone's own (frozen) LM head

    def logits(self, module, batch):
        if self.kind == "encoder-decoder":
            batch = {**batch, **decoder_inputs(batch["labels"], module.backbone.config)}
        return module.encode(batch)  # (batch, length, vocab): the backbone is the LM here

    def loss(self, logits, batch):
        labels = batch["labels"]
        if self.kind == "decoder":  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)

    def loss_terms(self, batch):
        labels = batch["labels"][:, 1:] if self.kind == "decoder" else batch["labels"]
        return int((labels != IGNORE).sum())

    def metrics(self) -> MetricCollection:
        return MetricCollection({"bleu": SacreBLEUScore(tokenize="13a"), "rougeL": _Rouge()})

    def update(self, metrics, logits, batch, module):
        texts = self.generate(module, batch)
        references = batch["reference"]
        metrics.update(texts, [[r] for r in references])
        if getattr(module, "_samples_logged", True) is False:
            module._samples_logged = True
            for text, ref in list(zip(texts, references))[: self.options["samples"]]:
                log.info("sample | generated: %r | reference: %r", text, ref)
            module.log_samples(list(zip(texts, references))[: self.options["samples"]])

    @torch.no_grad()
    def generate(self, module, batch) -> list[str]:
        ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]
        tokenizer = module.tokenizer
        out = module.generate(ids, mask, max_new_tokens=self.options["max_new_tokens"],
                              num_beams=self.options["num_beams"], do_sample=False,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
        if self.kind == "decoder":
            out = out[:, ids.shape[1]:]
        return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]

    def predictions(self, logits, batch, module):
        return self.generate(module, batch)


def decoder_inputs(labels: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """Teacher forcing for an encoder-decoder: the target shifted right behind the start token."""
    start = config.decoder_start_token_id
    pad = config.pad_token_id
    shifted = torch.cat([labels.new_full((labels.shape[0], 1), start), labels[:, :-1]], dim=1)
    mask = torch.cat([labels.new_ones(labels.shape[0], 1), (labels[:, :-1] != IGNORE).long()], dim=1)
    return {"decoder_input_ids": shifted.masked_fill(shifted == IGNORE, pad), "decoder_attention_mask": mask}
