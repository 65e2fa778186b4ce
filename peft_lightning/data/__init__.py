from peft_lightning.data.datamodule import TaskDataModule, TextClassificationDataModule, load_raw

__all__ = ["TaskDataModule", "TextClassificationDataModule", "load_raw"]
