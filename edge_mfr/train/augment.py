"""Per-batch augmentation on the training device: mirror, masks composited from precomputed layers, the
misalignment of a masked face detected afresh, and (for a teacher run on every view) scene changes and blends of
two faces.

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
# Scene changes (`scene_augment`): what another camera, light or alignment does to the same face. Standard
# deviations of shift x, shift y (fractions of the side), log-scale, angle (degrees), then of the log gains of
# brightness, contrast and saturation; a view is grey with GREY_PROBABILITY.
SCENE_STD = (0.03, 0.03, 0.05, 6.0, 0.15, 0.15, 0.25)
GREY_PROBABILITY = 0.1
MIX_WEIGHT_MAX = 0.5  # a blended view keeps at least half of its own face


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
                 device: torch.device, masked_view_alignment: tuple[float, ...] = (), scene: bool = False,
                 mix_probability: float = 0.0):
        self.colour = torch.as_tensor(mask_colour).to(device).permute(0, 3, 1, 2).float()  # premultiplied BGR
        self.alpha = torch.as_tensor(mask_alpha).to(device)[:, None].float() / 255.0
        self.lit = torch.as_tensor(mask_lit, dtype=torch.bool).to(device)
        self.p = mask_probability
        self.jitter = jitter
        self.flip = flip
        self.device = device
        self.view_alignment = torch.tensor(masked_view_alignment, dtype=torch.float32).reshape(2, 4) \
            if masked_view_alignment else None
        self.scene = scene
        self.mix_probability = mix_probability

    def draw(self, batch: int, generator: torch.Generator, training: bool = True) -> dict[str, torch.Tensor]:
        """The random choices of one global batch (CPU tensors: identical on every process). `training=False`
        leaves masked views where the clean points put them and draws no scene change or blend (the hold-out,
        comparable across runs). Draws added later come after the older ones, so runs without them keep their
        sequence."""
        choice = {
            "flip": (torch.rand(batch, generator=generator) < 0.5) & self.flip,
            "masked": torch.rand(batch, generator=generator) < self.p,
            "layer": torch.randint(len(self.alpha), (batch,), generator=generator),
            "affine": torch.randn(batch, 4, generator=generator),  # dx, dy, log-scale, angle
            "tint": 1.0 + 0.1 * torch.randn(batch, 3, generator=generator),
        }
        if self.view_alignment is not None and training:
            mean, std = self.view_alignment
            choice["view"] = mean + std * torch.randn(batch, 4, generator=generator)
        if self.scene and training:
            choice["scene"] = torch.randn(batch, len(SCENE_STD), generator=generator) * torch.tensor(SCENE_STD)
            choice["grey"] = torch.rand(batch, generator=generator) < GREY_PROBABILITY
        if self.mix_probability > 0 and training:
            # a partner is a row of the same global batch, so every process has its pixels
            choice["mix_partner"] = torch.randint(batch, (batch,), generator=generator)
            mixed = torch.rand(batch, generator=generator) < self.mix_probability
            choice["mix_weight"] = mixed * MIX_WEIGHT_MAX * torch.rand(batch, generator=generator)
        return choice

    def apply(self, crops: torch.Tensor, choice: dict[str, torch.Tensor],
              partners: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (b, s, s, 3) -> float32 (b, s, s, 3) in 0..255: the view the student sees (`views`)."""
        return self.views(crops, choice, partners)[1]

    def views(self, crops: torch.Tensor, choice: dict[str, torch.Tensor],
              partners: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (b, s, s, 3) -> (clean, student) float32 (b, s, s, 3) in 0..255. Blended with `partners` (the
        partner rows' crops) where drawn, mirrored, the scene's light changed, then masked where drawn; the
        scene's geometry moves both last, so a mask stays where it sits on the face. `clean` is the same view
        without its mask: what a teacher run on every view embeds."""
        choice = {k: v.to(self.device) for k, v in choice.items()}
        x = crops.float()
        if "mix_weight" in choice:
            if partners is None:
                raise ValueError("a draw with blends needs the partner rows' crops")
            weight = choice["mix_weight"][:, None, None, None]
            x = (1.0 - weight) * x + weight * partners.float()
        x = torch.where(choice["flip"][:, None, None, None], x.flip(2), x)
        if "scene" in choice:
            x = self._relit(x, choice["scene"][:, 4:], choice["grey"])
        student = self._masked(x, choice)
        if "scene" in choice:
            geometry = choice["scene"][:, :4]
            moved = self._realigned(torch.cat([x, student]).permute(0, 3, 1, 2), geometry.repeat(2, 1))
            x, student = moved.permute(0, 2, 3, 1).chunk(2)
        return x, student

    @staticmethod
    def _relit(x: torch.Tensor, gains: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation by exp(log gains) (b, 3) around the face's own levels; grey views."""
        def luma(views: torch.Tensor) -> torch.Tensor:  # (b, s, s, 3) BGR -> (b, s, s, 1)
            return views @ views.new_tensor([0.114, 0.587, 0.299])[:, None]

        brightness, contrast, saturation = torch.exp(gains).T[..., None, None, None]
        grey_level = luma(x)
        x = grey_level + saturation * (x - grey_level)
        level = grey_level.mean(dim=(1, 2, 3), keepdim=True)
        x = level + contrast * (x - level)
        x = torch.where(grey[:, None, None, None], luma(x).expand_as(x), x)
        return (brightness * x).clamp(0.0, 255.0)

    def _masked(self, x: torch.Tensor, choice: dict[str, torch.Tensor]) -> torch.Tensor:
        """A copy of the float views x with masks composited where drawn (and moved by `view` where drawn)."""
        masked = choice["masked"]
        if not bool(masked.any()):
            return x
        x = x.clone()
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
