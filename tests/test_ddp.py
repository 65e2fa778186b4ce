"""DDP over 2 CPU processes (gloo) with a frozen backbone: no unused-parameter errors, one run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_two_cpu_processes_one_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "model=tiny-bert", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "debug=limit", "logger=wandb", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and results["metrics"]["test"]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # one W&B run, not one per rank
    # both ranks trained the same number of steps, in one output directory
    assert results["global_step"] == 10
    assert len(list(tmp_path.glob("checkpoints/*.ckpt"))) >= 1


def test_ddp_inside_a_multirun_one_run_per_job(tmp_path):
    """Two multirun jobs, each DDP over 2 CPU processes: each job finishes once, in its own
    directory, with one results.json and one offline W&B run; nothing else is launched."""
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "model=tiny-bert", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", "debug=limit", "logger=wandb", "method.prefix_length=2,4",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["0", "1"], jobs  # no duplicated jobs, no stray run directories
    for job, length in (("0", 2), ("1", 4)):
        results = json.loads((tmp_path / job / "results.json").read_text())
        assert results["status"] == "completed" and results["global_step"] == 10
        assert f"method.prefix_length={length}" in results["overrides"]
        assert len(list((tmp_path / job / "wandb").glob("offline-run-*"))) == 1


WORDS = ["good", "bad", "fine", "dull", "great", "awful", "witty", "long", "sharp", "flat", "warm", "cold"]


def sentences(n: int, offset: int) -> list[dict]:
    return [{"text": " ".join(WORDS[(offset + i * k) % len(WORDS)] for k in (1, 3, 5)[: 1 + (i % 3)]),
             "label": "positive" if (offset + i) % 3 else "negative"} for i in range(n)]


def test_unpadded_sampler_splits_every_example_once():
    from peft_lightning.data.datamodule import UnpaddedDistributedSampler

    for size, world in [(7, 2), (9, 2), (10, 3), (5, 4), (1, 1)]:
        shares = [list(UnpaddedDistributedSampler(range(size), world, rank)) for rank in range(world)]
        assert shares == [list(range(rank, size, world)) for rank in range(world)]  # rank::world_size, in order
        assert sorted(i for share in shares for i in share) == list(range(size))  # all, none twice
        assert [len(UnpaddedDistributedSampler(range(size), world, r)) for r in range(world)] == \
            [len(share) for share in shares]


def test_eval_loaders_under_ddp_keep_their_own_sampler_and_refuse_a_split_smaller_than_the_world():
    from types import SimpleNamespace

    from peft_lightning.data.datamodule import TaskDataModule, UnpaddedDistributedSampler
    from peft_lightning.errors import DataError

    dm = TaskDataModule(None, "", labels=["negative", "positive"], eval_batch_size=2)
    dm.data = {"validation": list(range(7)), "test": [0]}
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    loader = dm.val_dataloader()
    assert isinstance(loader.sampler, UnpaddedDistributedSampler) and list(loader.sampler) == [1, 3, 5]
    with pytest.raises(DataError, match="data split 'test' has 1 examples, fewer than the 2 DDP processes"):
        dm.test_dataloader()
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    assert list(dm.val_dataloader().sampler) == list(range(7))


@pytest.mark.parametrize("name,kind", [("classification", "encoder"), ("token_classification", "encoder"),
                                       ("generation", "decoder"), ("generation", "encoder-decoder")])
def test_batch_losses_weighted_by_loss_terms_give_the_whole_set_loss(name, kind):
    """How evaluation (and DDP ranks) combine batch losses: a MeanMetric weighted by each batch's
    loss terms. Split anywhere, the set's loss is the one of the whole set in one batch (token
    losses average over labelled tokens: a per-example weight would be wrong)."""
    import torch
    from torchmetrics import MeanMetric

    from peft_lightning.tasks import make_task

    task = make_task(name, ["O", "B", "I"] if name != "generation" else [], kind)
    g = torch.Generator().manual_seed(0)
    if name == "classification":
        logits, labels = torch.randn(7, 3, generator=g), torch.randint(0, 3, (7,), generator=g)
    else:
        logits, labels = torch.randn(7, 6, 3, generator=g), torch.randint(0, 3, (7, 6), generator=g)
        labels[torch.rand(7, 6, generator=g) < 0.4] = -100  # unlabelled positions, unevenly per row
    whole = task.loss(logits, {"labels": labels})
    mean = MeanMetric()
    for part in (slice(0, 2), slice(2, 3), slice(3, 7)):
        batch = {"labels": labels[part]}
        mean.update(task.loss(logits[part], batch), weight=task.loss_terms(batch))
    torch.testing.assert_close(mean.compute(), whole, atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # ~40 s on 2 idle cores (two processes start): the sampler tests above run by default
def test_ddp_evaluation_equals_single_process_on_odd_sized_sets(tmp_path):
    """7 validation and 9 test rows over 2 gloo processes, 2 per batch (uneven numbers of batches
    per rank): the metrics the DDP run logs equal a single-process evaluation of its adapter, loss
    to float precision and the counted metrics exactly; nothing is counted twice."""
    import lightning as L

    from peft_lightning.checkpoint import load_pretrained
    from peft_lightning.data.datamodule import TaskDataModule

    files = {}
    for split, n, offset in (("train", 16, 0), ("validation", 7, 1), ("test", 9, 2)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in sentences(n, offset)))
    proc = subprocess.run(
        [sys.executable, "train.py", "model=tiny-bert", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.max_epochs=1", "logger=csv", "callbacks.progress_bar=null", "data.batch_size=4",
         "data.eval_batch_size=2", "method.prefix_length=2",
         f"++data.files={{train:{files['train']},validation:{files['validation']},test:{files['test']}}}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 2
    module = load_pretrained(results["adapter"])  # the weights validated (one epoch) and tested
    dm = TaskDataModule(module.tokenizer, "", labels=["negative", "positive"], task=module.task,
                        files={k: str(v) for k, v in files.items()}, eval_batch_size=64)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    single = {**trainer.validate(module, datamodule=dm, verbose=False)[0],
              **trainer.test(module, datamodule=dm, verbose=False)[0]}
    ddp = {**results["metrics"]["final"], **results["metrics"]["test"]}
    for stage, n in (("val", 7), ("test", 9)):
        for name in ("acc", "f1", "mcc", "loss"):
            key = f"{stage}/{name}"
            assert abs(ddp[key] - single[key]) < 1e-6, (key, ddp[key], single[key])
        assert abs(ddp[f"{stage}/acc"] * n - round(ddp[f"{stage}/acc"] * n)) < 1e-6  # counts of n, not n + 1
