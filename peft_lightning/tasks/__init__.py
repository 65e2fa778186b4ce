"""Task types (`data.task`): how examples become batches, and the head, loss and metrics on top
of whatever a method makes of the backbone. Every method runs every task type: a method only
decides how the backbone is run (`encode`), a task decides what is read from it.

  classification        one text or a pair -> one of `labels` (GLUE, SuperGLUE BoolQ/CB/WiC)
  regression            one text or a pair -> a number (STS-B)
  multiple_choice       a context and N candidate continuations -> the right one (COPA)
  token_classification  a pre-split word sequence -> one tag per word (CoNLL-2003 NER)
  generation            a source text -> a target text (E2E NLG with a decoder, XSum with an
                        encoder-decoder), decoded greedily or with beam search during validation
"""
from __future__ import annotations

from peft_lightning.tasks.base import Task
from peft_lightning.tasks.generation import Generation
from peft_lightning.tasks.sequence import Classification, MultipleChoice, Regression
from peft_lightning.tasks.tokens import TokenClassification

TASKS: dict[str, type[Task]] = {
    "classification": Classification,
    "regression": Regression,
    "multiple_choice": MultipleChoice,
    "token_classification": TokenClassification,
    "generation": Generation,
}


def make_task(name: str, labels: list[str] | None = None, kind: str = "encoder", metric: str | None = None,
              **options) -> Task:
    """A task for a backbone of `kind` (encoder | decoder | encoder-decoder); `options` are the
    task's own settings (data.generation for generation)."""
    if name not in TASKS:
        raise ValueError(f"data.task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](list(labels or []), kind, metric, **options)


__all__ = ["TASKS", "Classification", "Task", "make_task"]
