"""Models as users write them: nested submodules, batch norm, a module called twice, a Lightning MLP.

They live in a module of their own so that a pickled model (Lightning autolog) can name an
importable class, as a user's package would.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SmallConvNet(nn.Module):
    """features.0 (a ConvBlock), features.1 (pooling), an encoder with fc1, a head; ``encoder.act`` runs twice."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(ConvBlock(1, 4), nn.MaxPool2d(2))
        self.encoder = nn.ModuleDict({"fc1": nn.Linear(4 * 4 * 4, 16), "fc2": nn.Linear(16, 16), "act": nn.Tanh()})
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        h = self.encoder["act"](self.encoder["fc1"](h))
        h = self.encoder["act"](self.encoder["fc2"](h))  # the same module, called a second time
        return self.head(h)


class Regressor(nn.Module):
    def __init__(self, n_in: int = 5) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(n_in, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class LitRegressor(L.LightningModule):
    """What a Lightning user logs with mlflow.pytorch.autolog()."""

    def __init__(self, n_in: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)
