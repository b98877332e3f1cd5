"""Capture quality gate: is this detected face good enough to enroll or to verify against?

`assess(image, detection, policy)` measures, from the frame and the five MTCNN landmarks:

- size: pixels between the eye centres and the shorter side of the detection box;
- pose: yaw, pitch, roll in degrees, approximated from the landmarks with a generic 3D face (below);
- sharpness (`blur`): high-frequency energy of the eye region of the aligned crop;
- exposure: mean brightness and clipped fraction of the upper face of the aligned crop;
- mask: probability that nose and mouth are covered, from colour and texture of the aligned crop.

The aligned crop is the 112x112 ArcFace-template crop (`edge_mfr.align.warp_crops`), so every
measurement is taken at the same face scale whatever the camera resolution. Exposure and sharpness
are read above the nose, which a mask does not cover, so a masked face is not refused for its mask.

Pose approximation. A generic head is modelled in units of half the inter-ocular distance: eye centres
at x = +-1, depth 1 behind the nose tip; mouth corners 0.9 behind it (anthropometric averages); the
eye-to-mouth drop is the ArcFace template's, the nose's place between them on a level face is MTCNN's
measured one (FRONTAL_NOSE_FRACTION). After undoing roll (the angle of the eye line),
- yaw: a turned head moves the nose tip, which sits in front of the eye/mouth plane, sideways off the
  eye-mouth midline by depth * sin(yaw) while the half eye distance shrinks to cos(yaw), so
  yaw = atan(offset / (depth * half_eye_distance));
- pitch: a nodding head moves the nose tip up or down between the eye line and the mouth line; the
  observed fraction r = (nose - eyes) / (mouth - eyes) is solved for the angle in the same model.
  Smiling raises the mouth corners and reads as a few degrees of downward pitch.
Signs: yaw > 0 when the face turns towards image-right, pitch > 0 when it looks down, roll > 0 when the
image-right eye is lower. Expect errors of several degrees, more beyond ~40 degrees of yaw, where
MTCNN's landmarks themselves degrade, and for pitch under a mask, where the mouth corners are guessed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import cv2
import numpy as np

from edge_mfr.align import ARCFACE_TEMPLATE_112, warp_crops
from edge_mfr.detect.base import Detection, as_bgr_uint8
from edge_mfr.errors import InputError

CROP_SIZE = 112  # the ArcFace template's crop; the regions below are in its pixels as (y1, y2, x1, x2)
EYE_BAND = (40, 60, 20, 92)  # brows, eyes, nose bridge: visible with or without a mask
UPPER_FACE = (16, 68, 16, 96)  # forehead to just under the eyes, for exposure
SKIN_REFERENCE = ((22, 40, 38, 74), (44, 58, 50, 62))  # forehead centre and between the eyes
LOWER_FACE = ((80, 104, 36, 76), (74, 96, 18, 34), (74, 96, 78, 94))  # mouth/chin and lower cheeks
MOUTH_BAND = (84, 100, 42, 70)  # the lips' horizontal edges, flattened by a mask
CLIP_LOW, CLIP_HIGH = 5, 250  # grey levels counted as crushed / blown out
_SRGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
_D65_WHITE = np.array([0.950456, 1.0, 1.088754])

# Generic head (see module docstring), lengths in half inter-ocular distances.
EYE_DEPTH = 1.0
MOUTH_DEPTH = 0.9
_TEMPLATE_HALF_EYE = (ARCFACE_TEMPLATE_112[1, 0] - ARCFACE_TEMPLATE_112[0, 0]) / 2
MOUTH_DROP = (ARCFACE_TEMPLATE_112[3:, 1].mean() - ARCFACE_TEMPLATE_112[:2, 1].mean()) / _TEMPLATE_HALF_EYE
# Where MTCNN puts the nose tip between eye line (0) and mouth line (1) on a level face: the median over
# rmfd_sample is 0.55 (celeba299, with more smiles, 0.58). The ArcFace template's 0.495 comes from a
# different landmarker and would read as a constant upward pitch of about 8 degrees.
FRONTAL_NOSE_FRACTION = 0.55
NOSE_DROP = FRONTAL_NOSE_FRACTION * MOUTH_DROP

# Masked-face estimator: logistic regression on MASK_FEATURES, standardised with these means / scales.
# Fitted by `python benchmarks/mask_estimator.py --fit` on the fit half of rmfd_sample (real masks) and of
# celeba299 (no masks); that script reports accuracy on the other halves and on LFW.
MASK_FEATURES = (
    "lower_skin_fraction",  # share of lower-face pixels inside a generic skin chroma range
    "skin_fraction_drop",  # upper minus lower skin share
    "redness_change",  # lower minus upper Lab a*: lips and skin are red, masks are mostly not
    "yellowness_change",  # lower minus upper Lab b*
    "chroma_distance",  # Lab (a*, b*) distance between the lower and upper face means
    "lightness_change",  # lower minus upper Lab L*
    "mouth_edges",  # horizontal-edge energy at the mouth relative to the eye band
    "lower_texture",  # gradient energy of the lower face relative to the eye band
)
MASK_MEAN = np.array([0.81253, 0.13225, 0.38522, -2.69426, 7.50356, -24.9108, 0.67706, 0.74452])
MASK_SCALE = np.array([0.27045, 0.27426, 6.52993, 7.16666, 6.71603, 39.37511, 0.27054, 0.20818])
MASK_WEIGHTS = np.array([-1.25715, 0.63676, -0.8574, -0.55369, 0.25447, 1.02316, -0.57969, 0.69796])
MASK_BIAS = -3.13991


@dataclass(frozen=True)
class QualityPolicy:
    """Limits a capture must meet; `enroll()` is stricter than `verify()`.

    Sizes are in pixels of the caller's frame, angles in degrees, brightness a 0-255 grey level,
    sharpness the `QualityReport.blur` index. `allow_masked=False` refuses faces judged masked.
    """

    min_eye_distance: float
    min_face_size: float
    max_yaw: float
    max_pitch: float
    max_roll: float
    min_sharpness: float
    min_brightness: float
    max_brightness: float
    max_clipped_fraction: float
    mask_threshold: float = 0.5
    allow_masked: bool = True

    @classmethod
    def enroll(cls) -> "QualityPolicy":
        """For captures that become templates: a poor template hurts every later unlock."""
        return cls(min_eye_distance=32, min_face_size=64, max_yaw=30, max_pitch=25, max_roll=20,
                   min_sharpness=4.0, min_brightness=50, max_brightness=210, max_clipped_fraction=0.15)

    @classmethod
    def verify(cls) -> "QualityPolicy":
        """For unlock attempts: lenient enough for a hand-held phone, strict where matching breaks down."""
        return cls(min_eye_distance=24, min_face_size=48, max_yaw=40, max_pitch=30, max_roll=30,
                   min_sharpness=3.0, min_brightness=40, max_brightness=225, max_clipped_fraction=0.25)


@dataclass
class QualityReport:
    """What `assess` measured; `reasons` says in words why `passed` is False (empty when it passed)."""

    face_size: float  # shorter side of the detection box, px
    eye_distance: float  # between the eye centres, px
    yaw: float
    pitch: float
    roll: float
    blur: float  # sharpness index: 100 * var(Laplacian) / var(grey) of the eye band; low = blurred
    brightness: float  # mean grey level of the upper face
    clipped_fraction: float  # share of upper-face pixels at <= 5 or >= 250
    masked_probability: float
    masked: bool
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-friendly copy with plain Python numbers (read field by field: asdict's deep copy cost more
        than the rest of the gate in the unlock profile)."""
        out = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, list):
                out[item.name] = list(value)
            elif isinstance(value, (bool, np.bool_)):
                out[item.name] = bool(value)
            else:
                out[item.name] = float(value)
        return out


def estimate_pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from five landmarks, with the generic-head model of the module doc."""
    points = np.asarray(landmarks, dtype=np.float64)
    left_eye, right_eye = points[0], points[1]
    eye_line = right_eye - left_eye
    roll = math.atan2(eye_line[1], eye_line[0])
    # Undo roll about the eye midpoint so x runs along the eye line and y down the face.
    cos_r, sin_r = math.cos(roll), math.sin(roll)
    upright = (points - (left_eye + right_eye) / 2) @ np.array([[cos_r, -sin_r], [sin_r, cos_r]])
    half_eye = max(upright[1, 0] - upright[0, 0], 1e-6) / 2
    nose, mouth = upright[2], (upright[3] + upright[4]) / 2
    mouth_drop = mouth[1] if abs(mouth[1]) > 1e-6 else 1e-6
    nose_fraction = nose[1] / mouth_drop  # 0 at the eye line, 1 at the mouth line

    midline_x = nose_fraction * mouth[0]  # eye-mouth midline at the nose's height
    depth = EYE_DEPTH - nose_fraction * (EYE_DEPTH - MOUTH_DEPTH)
    yaw = math.atan2(nose[0] - midline_x, depth * half_eye)

    # r(pitch) = (NOSE_DROP cos + EYE_DEPTH sin) / (MOUTH_DROP cos + (EYE_DEPTH - MOUTH_DEPTH) sin), solved.
    pitch = math.atan2(nose_fraction * MOUTH_DROP - NOSE_DROP, EYE_DEPTH - nose_fraction * (EYE_DEPTH - MOUTH_DEPTH))
    return math.degrees(yaw), math.degrees(pitch), math.degrees(roll)


def _pixels(image: np.ndarray, regions) -> np.ndarray:
    """Pixels of several (y1, y2, x1, x2) regions stacked as (N, channels)."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    return np.concatenate([image[y1:y2, x1:x2].reshape(-1, channels) for y1, y2, x1, x2 in regions])


def _skin_fraction(ycrcb_pixels: np.ndarray) -> float:
    """Share of pixels whose chroma lies in the classic skin box Cr 133-173, Cb 77-127 (Chai & Ngan 1999)."""
    cr, cb = ycrcb_pixels[:, 1], ycrcb_pixels[:, 2]
    return float(np.mean((cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127)))


def _lab(bgr_pixels: np.ndarray) -> np.ndarray:
    """CIE Lab (D65, sRGB) of (N, 3) uint8 BGR pixels on OpenCV's 8-bit scale (L * 2.55, a + 128, b + 128).

    Computed here because cv2.cvtColor builds Lab lookup tables on first use (~0.2 s), which a one-shot
    unlock would pay on every run.
    """
    srgb = bgr_pixels[:, ::-1].astype(np.float64) / 255.0
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lightness = 116 * f[:, 1] - 16
    return np.stack([lightness * 2.55, 500 * (f[:, 0] - f[:, 1]) + 128, 200 * (f[:, 1] - f[:, 2]) + 128], axis=1)


def mask_features(crop_bgr: np.ndarray) -> np.ndarray:
    """MASK_FEATURES of one 112x112 aligned crop, as a float64 vector."""
    ycrcb = cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2YCrCb)
    grey = cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    upper_lab = _lab(_pixels(crop_bgr, SKIN_REFERENCE)).mean(0)
    lower_lab = _lab(_pixels(crop_bgr, LOWER_FACE)).mean(0)
    lower_skin = _skin_fraction(_pixels(ycrcb, LOWER_FACE))
    upper_skin = _skin_fraction(_pixels(ycrcb, SKIN_REFERENCE))
    grad_x = np.abs(cv2.Sobel(grey, cv2.CV_32F, 1, 0))
    grad_y = np.abs(cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    eye_energy = float(_pixels(grad_x + grad_y, [EYE_BAND]).mean()) + 1.0
    return np.array([
        lower_skin,
        upper_skin - lower_skin,
        lower_lab[1] - upper_lab[1],
        lower_lab[2] - upper_lab[2],
        float(np.hypot(*(lower_lab[1:] - upper_lab[1:]))),
        lower_lab[0] - upper_lab[0],
        float(_pixels(grad_y, [MOUTH_BAND]).mean()) / eye_energy,
        float(_pixels(grad_x + grad_y, LOWER_FACE).mean()) / eye_energy,
    ])


def masked_probability(crop_bgr: np.ndarray) -> float:
    """Probability that the aligned face wears a mask (logistic model over mask_features)."""
    z = float(((mask_features(crop_bgr) - MASK_MEAN) / MASK_SCALE) @ MASK_WEIGHTS + MASK_BIAS)
    return 1.0 / (1.0 + math.exp(-z)) if z > -500 else 0.0


def sharpness(crop_bgr: np.ndarray) -> float:
    """100 * var(Laplacian) / var(grey) over the eye band of an aligned crop.

    The crop fixes the face scale; dividing by the grey variance removes contrast and exposure, so a
    dark but sharp face is reported as dark, not as blurred.
    """
    y1, y2, x1, x2 = EYE_BAND
    band = cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2GRAY)[y1:y2, x1:x2].astype(np.float32)
    return float(100.0 * cv2.Laplacian(band, cv2.CV_32F).var() / (band.var() + 1.0))


def assess(image_bgr: np.ndarray, detection: Detection, policy: QualityPolicy | None = None) -> QualityReport:
    """Measure the detected face and check it against `policy` (default `QualityPolicy.verify()`)."""
    policy = policy or QualityPolicy.verify()
    image = as_bgr_uint8(image_bgr)
    landmarks = np.asarray(detection.landmarks, dtype=np.float64)
    box = np.asarray(detection.box, dtype=np.float64)
    if landmarks.shape != (5, 2) or box.shape != (4,):
        raise InputError(f"detection needs landmarks (5, 2) and box (4,), got {landmarks.shape} and {box.shape}")
    if not (np.all(np.isfinite(landmarks)) and np.all(np.isfinite(box))):
        raise InputError("detection has NaN or infinite coordinates")

    crop = warp_crops(image, landmarks[None], size=CROP_SIZE)[0]
    face_size = float(min(box[2] - box[0], box[3] - box[1]))
    eye_distance = float(np.linalg.norm(landmarks[1] - landmarks[0]))
    yaw, pitch, roll = estimate_pose(landmarks)
    blur = sharpness(crop)
    y1, y2, x1, x2 = UPPER_FACE
    upper = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)[y1:y2, x1:x2]
    brightness = float(upper.mean())
    clipped = float(np.mean((upper <= CLIP_LOW) | (upper >= CLIP_HIGH)))
    mask_p = masked_probability(crop)
    masked = mask_p >= policy.mask_threshold

    reasons = []
    if eye_distance < policy.min_eye_distance:
        reasons.append(f"face too small: {eye_distance:.0f} px between eyes (need >= {policy.min_eye_distance:g})")
    if face_size < policy.min_face_size:
        reasons.append(f"face too small: {face_size:.0f} px box (need >= {policy.min_face_size:g})")
    for name, angle, limit, turn in (("yaw", yaw, policy.max_yaw, "turned sideways"),
                                     ("pitch", pitch, policy.max_pitch, "tilted up or down"),
                                     ("roll", roll, policy.max_roll, "head tilted")):
        if abs(angle) > limit:
            reasons.append(f"{turn}: {name} {angle:+.0f} deg (limit +-{limit:g})")
    if blur < policy.min_sharpness:
        reasons.append(f"too blurry: sharpness {blur:.1f} (need >= {policy.min_sharpness:g})")
    if brightness < policy.min_brightness:
        reasons.append(f"too dark: brightness {brightness:.0f} (need >= {policy.min_brightness:g})")
    if brightness > policy.max_brightness:
        reasons.append(f"too bright: brightness {brightness:.0f} (need <= {policy.max_brightness:g})")
    if clipped > policy.max_clipped_fraction:
        reasons.append(f"badly exposed: {clipped:.0%} of the face clipped (limit {policy.max_clipped_fraction:.0%})")
    if masked and not policy.allow_masked:
        reasons.append(f"face covered: mask probability {mask_p:.2f} (masks not allowed here)")
    return QualityReport(face_size=face_size, eye_distance=eye_distance, yaw=yaw, pitch=pitch, roll=roll,
                         blur=blur, brightness=brightness, clipped_fraction=clipped, masked_probability=mask_p,
                         masked=masked, passed=not reasons, reasons=reasons)
