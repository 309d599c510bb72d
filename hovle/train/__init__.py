"""HoVLE training: stage I (distill), stage II (align), stage III (sft) with one trainer.

    from hovle.train import TrainConfig, train
    train(TrainConfig.load("examples/train/sft.yaml", ["train.max_steps=100"]))
"""

from hovle.train.cli import add_train_parser
from hovle.train.config import TrainConfig
from hovle.train.trainer import Trainer, freeze_for_stage, train

__all__ = ["TrainConfig", "Trainer", "add_train_parser", "freeze_for_stage", "train"]
