"""Per-batch augmentation on the training device: mirror, masks composited from precomputed layers, and the
misalignment of a masked face detected afresh.

Every random choice of a step is drawn from a generator seeded by (seed, step) for the whole global batch, so a
run is the same on one process or several (each takes its slice) and after a resume.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# Scene lighting of the template masks, as edge_mfr.masks.apply does it on photos: the 75th percentile of the
# lower face's luminance against a reference level, followed slightly less than proportionally.
REFERENCE_LIT_LEVEL = 165.0
LUMINANCE_EXPONENT = 0.8
GAIN_RANGE = (0.2, 1.35)
LOWER_FACE = (0.62, 0.86, 0.30, 0.70)  # rows and columns of the chip, as fractions: cheeks, mouth, chin


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


class BatchAugment:
    """Draws and applies mirror and mask choices for a global batch of uint8 BGR chips (B, s, s, 3).

    `masked_view_alignment` (8 floats: mean then standard deviation of shift x, shift y as fractions of the
    side, log-scale and angle in degrees, or empty) moves each masked view by a similarity drawn from that
    normal distribution: an unlock aligns a masked probe with points detected on the masked photo, which sit
    elsewhere than on the clean photo its clean template came from (benchmarks/masked_alignment_error.py).
    """

    def __init__(self, mask_colour, mask_alpha, mask_lit, mask_probability: float, jitter: float, flip: bool,
                 device: torch.device, masked_view_alignment: tuple[float, ...] = ()):
        self.colour = torch.as_tensor(mask_colour).to(device).permute(0, 3, 1, 2).float()  # premultiplied BGR
        self.alpha = torch.as_tensor(mask_alpha).to(device)[:, None].float() / 255.0
        self.lit = torch.as_tensor(mask_lit, dtype=torch.bool).to(device)
        self.p = mask_probability
        self.jitter = jitter
        self.flip = flip
        self.device = device
        self.view_alignment = torch.tensor(masked_view_alignment, dtype=torch.float32).reshape(2, 4) \
            if masked_view_alignment else None

    def draw(self, batch: int, generator: torch.Generator, realign: bool = True) -> dict[str, torch.Tensor]:
        """The random choices of one global batch (CPU tensors: identical on every process). `realign=False`
        leaves masked views where the clean points put them (the hold-out, comparable across runs)."""
        choice = {
            "flip": (torch.rand(batch, generator=generator) < 0.5) & self.flip,
            "masked": torch.rand(batch, generator=generator) < self.p,
            "layer": torch.randint(len(self.alpha), (batch,), generator=generator),
            "affine": torch.randn(batch, 4, generator=generator),  # dx, dy, log-scale, angle
            "tint": 1.0 + 0.1 * torch.randn(batch, 3, generator=generator),
        }
        if self.view_alignment is not None and realign:
            mean, std = self.view_alignment
            choice["view"] = mean + std * torch.randn(batch, 4, generator=generator)
        return choice

    def apply(self, crops: torch.Tensor, choice: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (b, s, s, 3) -> float32 (b, s, s, 3) in 0..255: mirrored where drawn, then masked where drawn."""
        choice = {k: v.to(self.device) for k, v in choice.items()}
        x = crops.float()
        x = torch.where(choice["flip"][:, None, None, None], x.flip(2), x)
        masked = choice["masked"]
        if not bool(masked.any()):
            return x
        rows = masked.nonzero().squeeze(1)
        faces = x[rows].permute(0, 3, 1, 2)
        layer = choice["layer"][rows]
        colour, alpha = self._placed(self.colour[layer], self.alpha[layer], choice["affine"][rows])
        gain = torch.where(self.lit[layer], self._lighting_gain(faces), torch.ones_like(layer, dtype=x.dtype))
        colour = colour * (gain[:, None] * choice["tint"][rows])[..., None, None]
        composite = (faces * (1.0 - alpha) + colour).clamp(0.0, 255.0).round()
        if "view" in choice:
            composite = self._realigned(composite, choice["view"][rows])
        x[rows] = composite.permute(0, 2, 3, 1)
        return x

    @staticmethod
    def _realigned(faces: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Each face (b, 3, s, s) as a chip aligned by points that moved by the similarity `view` (dx, dy,
        log-scale, degrees): a clean-chip point u lands at exp(log-scale) R(angle) u + 2 (dx, dy) in the
        normalised frame, so the output samples the input at the inverse of that."""
        scale = torch.exp(view[:, 2])
        angle = torch.deg2rad(view[:, 3])
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        shift = 2.0 * view[:, :2]
        tx = -(cos * shift[:, 0] + sin * shift[:, 1])
        ty = -(-sin * shift[:, 0] + cos * shift[:, 1])
        theta = torch.stack([torch.stack([cos, sin, tx], 1), torch.stack([-sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(faces.shape), align_corners=False)
        # the chip's edge continues outwards: a real re-alignment would show more of the photo there
        out = F.grid_sample(faces, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.clamp(0.0, 255.0).round()

    def _placed(self, colour, alpha, affine):
        """Layers moved by a small random similarity: where a detector would have put the face, roughly."""
        j = self.jitter
        scale = torch.exp(0.5 * j * affine[:, 2])
        angle = 0.5 * j * affine[:, 3] * math.pi
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, 2 * j * affine[:, 0]], 1),
                             torch.stack([sin, cos, 2 * j * affine[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(alpha.shape), align_corners=False)
        stacked = torch.cat([colour, alpha], 1)
        out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out[:, :3], out[:, 3:].clamp(0.0, 1.0)

    @staticmethod
    def _lighting_gain(faces: torch.Tensor) -> torch.Tensor:
        s = faces.shape[-1]
        r0, r1, c0, c1 = (int(round(f * s)) for f in LOWER_FACE)
        b, g, r = faces[:, 0, r0:r1, c0:c1], faces[:, 1, r0:r1, c0:c1], faces[:, 2, r0:r1, c0:c1]
        grey = (0.114 * b + 0.587 * g + 0.299 * r).flatten(1)
        lit_level = torch.quantile(grey, 0.75, dim=1).clamp_min(1.0)
        return ((lit_level / REFERENCE_LIT_LEVEL) ** LUMINANCE_EXPONENT).clamp(*GAIN_RANGE)


def student_input(chips: torch.Tensor, arch: str, teacher_mean_rgb, input_size: int) -> torch.Tensor:
    """float BGR chips (b, s, s, 3) in 0..255 -> the network's input, normalised as its package will declare.
    The teacher's network is fully convolutional up to its global mean, so it takes any `input_size` (the
    crops are resized to it: 150 is the teacher's own, smaller sides are cheaper students)."""
    from edge_mfr.train.teacher import chip_input

    if arch == "dlib_resnet":
        return chip_input(chips, teacher_mean_rgb, input_size)
    return (chips.flip(-1).permute(0, 3, 1, 2) - 127.5) / 127.5  # input_size == crop size (checked by the trainer)
