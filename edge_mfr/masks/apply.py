"""Putting a synthetic mask on a face: type registry, scene lighting, warping and compositing."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache, partial
from typing import Callable

import cv2
import numpy as np

from edge_mfr.align import check_image, template_for_size
from edge_mfr.errors import InputError

from .canvas import Canvas, MaskLayer
from .geometry import CANVAS_ORIGIN, JAW, FaceWarp, one_face_landmarks
from .nist import paint_nist
from .templates import paint_cloth, paint_kn95, paint_n95, paint_surgical

PAINTERS: dict[str, Callable[[Canvas, np.random.Generator], MaskLayer]] = {
    "surgical": paint_surgical,
    "n95": paint_n95,
    "kn95": paint_kn95,
    "cloth": paint_cloth,
    # NIST FRVT face-mask study (NISTIR 8311): outline shape x how much of the nose is covered.
    "nist_a": partial(paint_nist, shape="wide", coverage="high"),
    "nist_b": partial(paint_nist, shape="round", coverage="high"),
    "nist_c": partial(paint_nist, shape="wide", coverage="medium"),
    "nist_d": partial(paint_nist, shape="round", coverage="medium"),
    "nist_e": partial(paint_nist, shape="wide", coverage="low"),
    "nist_f": partial(paint_nist, shape="round", coverage="low"),
}
MASK_TYPES: tuple[str, ...] = tuple(PAINTERS)
FAMILIES: dict[str, tuple[str, ...]] = {
    "template": ("surgical", "n95", "kn95", "cloth"),
    "nist": ("nist_a", "nist_b", "nist_c", "nist_d", "nist_e", "nist_f"),
}

# The face's lit level is the 75th percentile of its lower-face luminance (lit skin, not shadows or
# lips); a face lit this brightly leaves mask colours as painted.
LIT_PERCENTILE = 75
REFERENCE_LIT_LEVEL = 165.0
# Mask brightness follows the lit level slightly less than proportionally: a dark face is partly dark
# skin rather than dim light, and a white mask on it should still read as fairly light.
LUMINANCE_EXPONENT = 0.8
GAIN_RANGE = (0.2, 1.35)
SHADING_RANGE = (0.7, 1.35)
CONTACT_SHADOW_WIDTH = 1.0  # canonical units
CONTACT_SHADOW_STRENGTH = 0.35
MAX_RENDER_SCALE = 4.0  # canvas pixels per canonical unit; bigger faces get a slightly upsampled mask


def as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    """The caller's generator, or a new one seeded with the caller's integer."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise InputError(f"seed must be a non-negative integer, got {rng}")
        return np.random.default_rng(int(rng))
    raise InputError(f"rng must be a numpy.random.Generator or an integer seed, got {type(rng).__name__}")


def check_mask_type(mask_type: str) -> str:
    if not isinstance(mask_type, str) or mask_type not in PAINTERS:
        raise InputError(f"unknown mask type {mask_type!r}; valid types: {', '.join(MASK_TYPES)}")
    return mask_type


def random_mask_type(rng: np.random.Generator | int, family: str | None = None) -> str:
    """A mask type drawn uniformly from all types, or from one family ('template' or 'nist')."""
    if family is None:
        choices = MASK_TYPES
    elif family in FAMILIES:
        choices = FAMILIES[family]
    else:
        raise InputError(f"unknown mask family {family!r}; valid families: {', '.join(FAMILIES)}")
    return choices[int(as_generator(rng).integers(len(choices)))]


def _render_scale(face_scale: float) -> float:
    """Canvas resolution matched to the face's size in the photo, in half-unit steps."""
    return float(np.clip(np.round(face_scale * 2.0) / 2.0, 1.0, MAX_RENDER_SCALE))


@lru_cache(maxsize=1)
def _skin_probe_points() -> np.ndarray:
    """Canonical points, one per unit, over the lower face (cheeks, nose tip, mouth, chin)."""
    probe = Canvas(1.0)
    skin = probe.polygon(JAW[1:16]) > 0.5
    return np.stack([probe.x[skin], probe.y[skin]], axis=1).astype(np.float64)


def _scene_lighting(image: np.ndarray, warp: FaceWarp, canvas: Canvas) -> tuple[float, np.ndarray]:
    """How brightly the face is lit and how the light falls across it, from the skin the mask will cover.

    Returns a global gain and a per-canvas-pixel shading factor: a plane fitted (robustly, so lips,
    nostrils or a beard do not dominate) to the luminance of the lower face, relative to its median.
    """
    points = _skin_probe_points()
    at = warp.to_image(points).astype(np.float32)
    h, w = image.shape[:2]
    inside = (at[:, 0] >= 0) & (at[:, 0] <= w - 1) & (at[:, 1] >= 0) & (at[:, 1] <= h - 1)
    flat = np.ones((canvas.height, canvas.width), np.float32)
    if inside.sum() < 30:  # the face is (nearly) all outside the photo: nothing to measure
        return 1.0, flat
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
    samples = cv2.remap(grey, at[inside, 0].reshape(-1, 1), at[inside, 1].reshape(-1, 1), cv2.INTER_LINEAR).ravel()
    median = float(np.median(samples))
    lit_level = float(np.percentile(samples, LIT_PERCENTILE))
    gain = float(np.clip((max(lit_level, 1.0) / REFERENCE_LIT_LEVEL) ** LUMINANCE_EXPONENT, *GAIN_RANGE))

    design = np.column_stack([np.ones(inside.sum()), points[inside, 0] - 56.0, points[inside, 1] - 90.0])
    keep = np.ones(len(samples), bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[keep], samples[keep], rcond=None)
        residual = samples - design @ coef
        spread = 1.4826 * np.median(np.abs(residual[keep])) + 1.0
        keep = np.abs(residual) < 2.5 * spread
    plane = coef[0] + coef[1] * (canvas.x - 56.0) + coef[2] * (canvas.y - 90.0)
    shading = np.clip(plane / max(median, 1.0), *SHADING_RANGE).astype(np.float32)
    return gain, shading


def _paint(mask_type: str, rng: np.random.Generator, image: np.ndarray | None, warp: FaceWarp) -> tuple[np.ndarray, float]:
    """Painted, lit mask as a premultiplied BGRA float canvas, and that canvas's scale."""
    scale = _render_scale(warp.scale)
    canvas = Canvas(2.0 * scale)  # painted at twice the resolution, then area-averaged: anti-aliasing
    layer = PAINTERS[mask_type](canvas, rng)
    colour, alpha = layer.colour, layer.alpha
    if layer.lit:
        if image is not None:  # None: neutral light, for layers lit later (see render_mask_layer)
            gain, shading = _scene_lighting(image, warp, canvas)
            colour = colour * (gain * shading)[..., None]
        # Soft contact shadow where the mask stands off the face: a faint dark halo just outside its edge,
        # composited as black under the mask (it only adds coverage, never colour).
        halo = cv2.GaussianBlur(alpha, (0, 0), CONTACT_SHADOW_WIDTH * canvas.scale)
        alpha = alpha + (1.0 - alpha) * CONTACT_SHADOW_STRENGTH * halo
    premultiplied = np.dstack([colour * layer.alpha[..., None], alpha]).astype(np.float32)
    small = cv2.resize(premultiplied, (premultiplied.shape[1] // 2, premultiplied.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if warp.scale < 0.9:  # the face is smaller than a 112 crop: low-pass before the warp shrinks it
        small = cv2.GaussianBlur(small, (0, 0), 0.45 * (1.0 / warp.scale - 1.0) * scale)
    return small, scale


def _warp_layer(shape: tuple[int, ...], warp: FaceWarp, layer: np.ndarray, scale: float):
    """The premultiplied mask canvas warped into image pixels around the face.

    Returns (warped (h', w', 4) float32, (top, bottom, left, right)) or None when the mask misses the image.
    """
    ys, xs = np.nonzero(layer[..., 3] > 1e-3)
    if len(xs) == 0:
        return None
    (x0, y0), (x1, y1) = (np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.max() + 1]]) + 0.5) / scale - 0.5 + CANVAS_ORIGIN
    # The mask's canonical bounding box, traced densely: the spline bends its edges in the photo.
    gx, gy = np.meshgrid(np.linspace(x0, x1, 17), np.linspace(y0, y1, 17))
    around = warp.to_image(np.stack([gx.ravel(), gy.ravel()], axis=1))
    h, w = shape[:2]
    left, top = np.floor(around.min(0)).astype(int) - 2
    right, bottom = np.ceil(around.max(0)).astype(int) + 3
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, w), min(bottom, h)
    if left >= right or top >= bottom:
        return None
    # The spline is smooth: evaluate it on a grid of about 48 x 48 nodes and interpolate between them.
    step = int(max(1, min(bottom - top, right - left) // 48))
    nodes_x, nodes_y = np.meshgrid(np.arange(left, right - 1 + step, step), np.arange(top, bottom - 1 + step, step))
    canonical = warp.to_canonical(np.stack([nodes_x, nodes_y], axis=-1).astype(np.float64))
    nodes = ((canonical - CANVAS_ORIGIN + 0.5) * scale - 0.5).astype(np.float32)
    node_y, node_x = (np.mgrid[0 : bottom - top, 0 : right - left].astype(np.float32) / step)
    source = cv2.remap(nodes, node_x, node_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    warped = cv2.remap(layer, source[..., 0], source[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return warped, (top, bottom, left, right)


def _composite(image: np.ndarray, warp: FaceWarp, layer: np.ndarray, scale: float) -> np.ndarray:
    """Warp the premultiplied mask canvas into the photo around the face and blend it in."""
    out = image.copy()
    placed = _warp_layer(image.shape, warp, layer, scale)
    if placed is None:
        return out
    warped, (top, bottom, left, right) = placed
    region = out[top:bottom, left:right].astype(np.float32)
    alpha = np.clip(warped[..., 3:4], 0.0, 1.0)
    blended = region * (1.0 - alpha) + warped[..., :3]
    out[top:bottom, left:right] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)  # clip, never wrap
    return out


def apply_mask(image_bgr: np.ndarray, landmarks: np.ndarray, mask_type: str, rng: np.random.Generator | int) -> np.ndarray:
    """A copy of a BGR photo with a synthetic mask drawn on the face whose five landmarks are given.

    landmarks: (5, 2) image pixel coordinates in the project order (eyes, nose tip, mouth corners).
    mask_type: one of MASK_TYPES. rng: a Generator (consumed) or an integer seed; same seed, same mask.
    """
    image = check_image(image_bgr)
    mask_type = check_mask_type(mask_type)
    generator = as_generator(rng)
    warp = FaceWarp(landmarks)
    layer, scale = _paint(mask_type, generator, image, warp)
    return _composite(image, warp, layer, scale)


def jittered_points(template: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """Template points moved as a real detector's would be: a small similarity plus per-point noise.

    `jitter` is relative: shift and per-point noise in inter-ocular distances, rotation in radians,
    log-scale as a fraction.
    """
    eye_distance = float(np.linalg.norm(template[1] - template[0]))
    angle, log_scale = rng.normal(0.0, jitter, 2)
    shift = rng.normal(0.0, jitter * eye_distance, 2)
    noise = rng.normal(0.0, 0.3 * jitter * eye_distance, template.shape)
    c, s = np.cos(angle) * np.exp(log_scale), np.sin(angle) * np.exp(log_scale)
    centre = template.mean(axis=0)
    return (template - centre) @ np.array([[c, -s], [s, c]]).T + centre + shift + noise


def apply_mask_aligned(
    crop_bgr: np.ndarray,
    mask_type: str,
    rng: np.random.Generator | int,
    template: np.ndarray | None = None,
    jitter: float = 0.0,
) -> np.ndarray:
    """A copy of an aligned face crop with a synthetic mask.

    template: where the crop's five landmarks are; default the ArcFace template scaled to the crop size.
    jitter: random misplacement of the mask (see `jittered_points`); 0.05 is a plausible detector error.
    """
    crop = check_image(crop_bgr)
    mask_type = check_mask_type(mask_type)
    generator = as_generator(rng)
    points = template_for_size(crop.shape[:2]) if template is None else one_face_landmarks(template)
    if not (isinstance(jitter, (int, float, np.floating)) and np.isfinite(jitter) and 0.0 <= jitter <= 0.5):
        raise InputError(f"jitter must be a number in [0, 0.5], got {jitter!r}")
    if jitter > 0:
        points = jittered_points(points, float(jitter), generator)
    return apply_mask(crop, points, mask_type, generator)


def render_mask_layer(mask_type: str, rng: np.random.Generator | int, size: tuple[int, int],
                      template: np.ndarray, jitter: float = 0.0) -> tuple[np.ndarray, bool]:
    """One mask painted under neutral light for aligned crops of `size` whose landmarks sit at `template`.

    Returns (layer (h, w, 4) float32: premultiplied BGR colour and coverage, lit). Training composites
    such precomputed layers per batch (crop * (1 - alpha) + gain * colour, gain from the crop's own
    lighting when `lit`), which is orders of magnitude cheaper than painting a mask per face.
    """
    mask_type = check_mask_type(mask_type)
    generator = as_generator(rng)
    points = one_face_landmarks(template)
    if jitter > 0:
        points = jittered_points(points, float(jitter), generator)
    warp = FaceWarp(points)
    painted, scale = _paint(mask_type, generator, None, warp)
    out = np.zeros((size[0], size[1], 4), np.float32)
    placed = _warp_layer(out.shape, warp, painted, scale)
    if placed is not None:
        warped, (top, bottom, left, right) = placed
        out[top:bottom, left:right] = warped
    return out, mask_type in FAMILIES["template"]  # NIST fills keep their exact colour (MaskLayer.lit=False)


def resolve_types(types: str | Iterable[str] | None) -> tuple[str, ...]:
    """Mask types named by None (all), a family name, one type, or a list of types."""
    if types is None:
        return MASK_TYPES
    if isinstance(types, str):
        return FAMILIES[types] if types in FAMILIES else (check_mask_type(types),)
    chosen = tuple(check_mask_type(t) for t in types)
    if not chosen:
        raise InputError("types must name at least one mask type")
    return chosen


class MaskAugment:
    """Training augmentation: with probability p, put a random mask on an aligned uint8 crop.

    types: None (all), 'template', 'nist', one type or a list. jitter: see `apply_mask_aligned`.
    seed: seeds the augmenter's own generator. For reproducible data loading with several worker
    processes, pass a per-sample generator instead, e.g. `aug(crop, rng=np.random.default_rng([seed,
    epoch, index]))`: forked workers would otherwise share one generator state.
    channel_order: 'BGR' (project convention) or 'RGB' if the pipeline feeds RGB crops.
    Returns a masked copy, or the input array itself when no mask is drawn.
    """

    def __init__(self, p: float = 0.5, types: str | Iterable[str] | None = None, jitter: float = 0.05,
                 seed: int | None = None, channel_order: str = "BGR"):
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise InputError(f"p must be a probability in [0, 1], got {p!r}")
        if channel_order not in ("BGR", "RGB"):
            raise InputError(f"channel_order must be 'BGR' or 'RGB', got {channel_order!r}")
        if not (isinstance(jitter, (int, float)) and np.isfinite(jitter) and 0.0 <= jitter <= 0.5):
            raise InputError(f"jitter must be a number in [0, 0.5], got {jitter!r}")
        self.p = float(p)
        self.types = resolve_types(types)
        self.jitter = float(jitter)
        self.channel_order = channel_order
        self._rng = np.random.default_rng(seed)

    def __call__(self, crop: np.ndarray, rng: np.random.Generator | int | None = None) -> np.ndarray:
        generator = self._rng if rng is None else as_generator(rng)
        check_image(crop)
        if generator.random() >= self.p:
            return crop
        mask_type = self.types[int(generator.integers(len(self.types)))]
        bgr = crop[..., ::-1] if self.channel_order == "RGB" else crop
        masked = apply_mask_aligned(bgr, mask_type, generator, jitter=self.jitter)
        return np.ascontiguousarray(masked[..., ::-1]) if self.channel_order == "RGB" else masked

    def __repr__(self) -> str:
        return f"MaskAugment(p={self.p}, types={self.types}, jitter={self.jitter}, channel_order={self.channel_order!r})"
