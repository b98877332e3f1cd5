"""Liveness hook: a check the kiosk runs on each unlock frame before it matches the face.

A check sees the frames of one unlock attempt in order (`reset` starts an attempt) and says, per frame,
whether the attempt has shown a live person yet. Matching starts only once it has. Plug in another
check by passing any object with this interface to `Station(liveness=...)`.

Shipped checks:

- `NoLivenessCheck` (the default) checks nothing and says so: a printed photo, a phone screen or a
  video of an enrolled person unlocks the kiosk like the person would.
- `HeadTurnChallenge` asks the person to turn their head and passes once the yaw estimated from the
  five detector landmarks (`edge_mfr.quality.estimate_pose`) has swept at least `min_sweep_deg`
  within the attempt. It stops a still photo held up to the camera. Its limits: a video of the person
  turning their head passes, so does a photo that is tilted or bent in front of the camera convincingly
  enough to move the landmarks; yaw from five landmarks is off by several degrees, so the sweep
  cannot be made much smaller than the default without passing on detector jitter. It is not a
  presentation-attack detector in the ISO/IEC 30107 sense. Eye blinks cannot be checked: five
  landmarks do not include the eyelids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge_mfr.detect import Detection
from edge_mfr.quality import estimate_pose


@dataclass(frozen=True)
class LivenessResult:
    passed: bool
    message: str  # shown to the person: what to do next, or why it passed


class LivenessCheck(Protocol):
    name: str
    description: str  # one line for the operator: what it checks and what it does not

    def reset(self) -> None:
        """Start a new unlock attempt."""

    def observe(self, frame: np.ndarray, detection: Detection) -> LivenessResult:
        """One frame of the attempt whose largest face is `detection`."""


class NoLivenessCheck:
    """The default: no liveness check at all, stated as such to the operator and in every result."""

    name = "none"
    description = ("no liveness check (documented no-op): a photo, screen or video of an enrolled person "
                   "unlocks like the person")

    def reset(self) -> None:
        pass

    def observe(self, frame: np.ndarray, detection: Detection) -> LivenessResult:
        return LivenessResult(True, "liveness not checked (no-op)")


class HeadTurnChallenge:
    """Pass once the head's yaw has swept `min_sweep_deg` within one attempt (see the module doc)."""

    name = "head-turn"
    description = ("head-turn challenge: stops a still photo; a video of the person turning, or a photo "
                   "moved convincingly, still passes")

    def __init__(self, min_sweep_deg: float = 20.0):
        self.min_sweep_deg = min_sweep_deg
        self._yaws: list[float] = []

    def reset(self) -> None:
        self._yaws = []

    def observe(self, frame: np.ndarray, detection: Detection) -> LivenessResult:
        yaw, _, _ = estimate_pose(detection.landmarks)
        self._yaws.append(yaw)
        sweep = max(self._yaws) - min(self._yaws)
        if sweep >= self.min_sweep_deg:
            return LivenessResult(True, f"head turn seen ({sweep:.0f} deg)")
        return LivenessResult(False, "Turn your head slowly to one side and back")


LIVENESS_CHECKS = {NoLivenessCheck.name: NoLivenessCheck, HeadTurnChallenge.name: HeadTurnChallenge}
