"""Models and objects real training code pickles, shared by the real-world and fuzz tests.

A module of its own (not a test module), so pickles that name these classes load back in
the test process with ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import pathlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


# -- what real training code pickles beside its tensors -------------------------------------
class Stage(enum.Enum):
    PRETRAIN = "pretrain"
    FINETUNE = "finetune"


@dataclasses.dataclass
class TrainConfig:
    lr: float = 3e-4
    widths: tuple[int, ...] = (4, 3, 2)
    data: pathlib.PurePosixPath = dataclasses.field(
        default_factory=lambda: pathlib.PurePosixPath("/data/train"))
    stage: Stage = Stage.FINETUNE


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.layer(x)))


class TiedNet(nn.Module):
    """Frozen first layer, BatchNorm, a bias-less layer, an embedding tied to the output
    head and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(),
                                     nn.Linear(4, 4, bias=False))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)) * self.scale)


def tied_model() -> TiedNet:
    torch.manual_seed(0)
    model = TiedNet()
    model.encoder[0].requires_grad_(False)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 10, (8,)))  # non-trivial BatchNorm statistics
    return model


def lightning_checkpoint(path: Path) -> None:
    """A real Trainer run: fit one epoch on random batches, then save_checkpoint."""
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self, args: argparse.Namespace, config: TrainConfig, stage: Stage) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = nn.Linear(4, 3)
            self.bn = nn.BatchNorm1d(3)
            self.head = nn.Linear(3, 2)

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.bn(self.layer(x))), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class BestScore(L.Callback):
        """A callback whose state holds numpy scalars (saved under ``callbacks``)."""

        def state_dict(self) -> dict[str, Any]:
            return {"best": np.float64(0.125), "history": [np.float32(1.5), np.int64(3)]}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    model = Classifier(argparse.Namespace(lr=0.1, name="run-7", layers=[4, 3]),
                       TrainConfig(), Stage.PRETRAIN)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        default_root_dir=path.parent,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[BestScore()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(path)


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    net = TinyNet()
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 4))
    return net.state_dict()
