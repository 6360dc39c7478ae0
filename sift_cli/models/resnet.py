"""torchvision ResNets for image classification, behind the model contract.

Exit points are the four residual stages. Stages 1..3 each get a small exit head (global average
pool + linear), exit 4 is the network's own `fc`. The heads learn from the training forward at
almost no cost: they read each stage's features detached, so they never change the backbone.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from sift_cli.config import ConfigError
from sift_cli.selection import prediction_scores

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VARIANTS = ("auto", "cifar", "imagenet")
SCORE_BN = ("batch", "running")
SMALL_IMAGE = 64  # variant=auto keeps full resolution in the stem up to this size (CIFAR, digits)


def exit_head(channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class ResNetClassifier(nn.Module):
    task = "image"
    depth = 4  # residual stages

    def __init__(self, arch: str, num_classes: int, image_size: int, variant: str = "auto",
                 score_bn: str = "batch"):
        super().__init__()
        if score_bn not in SCORE_BN:
            raise ConfigError(f"model.score_bn={score_bn} is not allowed; choose one of: {', '.join(SCORE_BN)}")
        self.score_bn = score_bn
        if arch not in ARCHS:
            raise ConfigError(f"model.arch={arch} is not a known ResNet; choose one of: {', '.join(ARCHS)}")
        if variant not in VARIANTS:
            raise ConfigError(f"model.variant={variant} is not allowed; choose one of: {', '.join(VARIANTS)}")
        self.variant = variant if variant != "auto" else ("cifar" if image_size <= SMALL_IMAGE else "imagenet")
        self.net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        if self.variant == "cifar":
            # the "modified ResNet" for small inputs: a 3x3 stride-1 stem and no max-pool, so a
            # 32 px image reaches the last stage at 4x4 rather than 1x1
            self.net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.net.maxpool = nn.Identity()
        self.stages = [self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4]
        self.exits = nn.ModuleList(
            exit_head(stage[-1].expansion * 64 * 2**i, num_classes) for i, stage in enumerate(self.stages[:-1])
        )

    def _features(self, images: Tensor, k: int) -> list[Tensor]:
        """The output of each of the first k stages."""
        net = self.net
        h = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        features = []
        for stage in self.stages[:k]:
            h = stage(h)
            features.append(h)
        return features

    def _logits(self, features: Tensor, k: int) -> Tensor:
        """Class logits from stage k's features: exit head k, or the network's own head for k == depth."""
        if k == self.depth:
            return self.net.fc(torch.flatten(self.net.avgpool(features), 1))
        return self.exits[k - 1](features)

    @contextlib.contextmanager
    def scoring_mode(self, score_bn: Optional[str] = None):
        """The cheap pass's mode: no dropout, and batch norm with the statistics score_bn (default: the
        model's) names: `batch`, those the update normalises with, or `running`, the lagging averages
        evaluation uses. In training mode without tracking, batch norm normalises by the batch and
        neither reads nor writes the running buffers, so scoring leaves them as they were."""
        self.eval()
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        batch_stats = (score_bn or self.score_bn) == "batch"
        for m in norms if batch_stats else []:
            m.train()
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in norms:
                m.track_running_stats = True
            self.train()

    def exit_scores(self, batch: dict, k: int, criterion: str, features: bool = False):
        """Per-image scores from stage k; with features, also the stage's globally pooled features."""
        stage = self._features(batch["images"], k)[-1]
        scores = prediction_scores(self._logits(stage, k), batch["labels"], criterion)
        return (scores, stage.float().mean((2, 3))) if features else scores

    def loss(self, batch: dict) -> Tensor:
        """The network's cross-entropy, with the exit heads' losses riding along for their gradients only.

        The heads read detached features, so their losses never reach the backbone; the one optimizer
        steps them with everything else. `main + (heads - heads.detach())` has the value of the main
        loss, so the logged train_loss is the network's own loss (comparable with vanilla), while the
        heads still get their gradients.
        """
        labels = batch["labels"]
        features = self._features(batch["images"], self.depth)
        main = F.cross_entropy(self._logits(features[-1], self.depth).float(), labels)
        heads = sum(F.cross_entropy(self._logits(f.detach(), k).float(), labels)
                    for k, f in enumerate(features[:-1], 1))
        return main + (heads - heads.detach())

    def forward(self, batch: dict) -> Tensor:
        """The training loss: DistributedDataParallel and torch.compile wrap the module's call."""
        return self.loss(batch)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, Tensor]:
        labels = batch["labels"]
        features = self._features(batch["images"], self.depth)
        logits = self._logits(features[-1], self.depth).float()
        sums = {
            "loss_sum": F.cross_entropy(logits, labels, reduction="sum"),
            "correct": (logits.argmax(-1) == labels).sum(),
            "count": torch.tensor(len(labels), device=labels.device),
        }
        for k, f in enumerate(features[:-1], 1):  # logged as val_exit{k}_acc
            sums[f"exit{k}_correct"] = (self._logits(f, k).argmax(-1) == labels).sum()
        return sums
