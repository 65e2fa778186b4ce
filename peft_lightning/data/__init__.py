from peft_lightning.data.datamodule import TextClassificationDataModule, load_raw

__all__ = ["TextClassificationDataModule", "load_raw"]
