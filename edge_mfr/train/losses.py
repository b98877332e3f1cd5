"""Losses of the recipes: ElasticFace-Arc, squared error and cosine to teacher templates, batch-hard triplet."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ElasticArcHead(nn.Module):
    """ElasticFace-Arc logits: s * cos(theta_y + m) with m ~ N(margin, std) drawn per sample (Boutros et al.).

    The class prototypes are trained with the network and thrown away after training. Margins come from the
    caller's generator so that every process of a distributed run draws the same ones.
    """

    def __init__(self, embedding_size: int, classes: int, scale: float = 64.0, margin: float = 0.5,
                 margin_std: float = 0.05):
        super().__init__()
        self.scale, self.margin, self.margin_std = scale, margin, margin_std
        self.prototypes = nn.Parameter(torch.empty(classes, embedding_size))
        nn.init.normal_(self.prototypes, std=0.01)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, margin_noise: torch.Tensor) -> torch.Tensor:
        """margin_noise: (B,) standard normal draws, one per sample."""
        cosine = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.prototypes.float(), dim=1))
        margins = self.margin + self.margin_std * margin_noise.to(cosine)
        target = cosine.gather(1, labels[:, None]).clamp(-1 + 1e-6, 1 - 1e-6)
        theta = torch.acos(target) + margins[:, None]
        # Past theta = pi, cos(theta + m) would increase again: keep the target logit monotone in theta.
        adjusted = torch.where(theta < torch.pi, torch.cos(theta), -1.0 - (theta - torch.pi))
        return self.scale * cosine.scatter(1, labels[:, None], adjusted)


def squared_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples and dimensions, in the teacher's own (raw, unnormalised) descriptor space."""
    return F.mse_loss(student.float(), teacher.float())


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over anchors of relu(d(a, hardest positive) - d(a, hardest negative) + margin), L2-normalised."""
    x = F.normalize(embeddings.float(), dim=1)
    distance = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    hardest_positive = distance.masked_fill(~same | eye, -1.0).max(1).values
    hardest_negative = distance.masked_fill(same, 10.0).min(1).values
    valid = (same & ~eye).any(1) & (~same).any(1)
    losses = F.relu(hardest_positive - hardest_negative + margin)
    return losses[valid].mean() if bool(valid.any()) else embeddings.sum() * 0.0
