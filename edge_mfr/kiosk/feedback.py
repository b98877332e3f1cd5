"""Plain words for the person in front of the camera, from the SDK's capture and quality report.

The quality gate explains refusals in engineering terms ("yaw +34 deg (limit +-30)"); a kiosk user needs
"Face the camera". The words come from comparing the QualityReport's numbers with the policy in use, so
they always agree with the gate's decision.
"""

from __future__ import annotations

from edge_mfr.quality import QualityPolicy, QualityReport
from edge_mfr.unlock import Capture

NO_FACE = "No face found: look at the camera"
ONE_PERSON = "One person at a time, please"


def quality_advice(report: QualityReport, policy: QualityPolicy) -> list[str]:
    """What to change, most useful first; empty when the face passes `policy`."""
    advice = []
    if report.eye_distance < policy.min_eye_distance or report.face_size < policy.min_face_size:
        advice.append("Move closer")
    if (abs(report.yaw) > policy.max_yaw or abs(report.pitch) > policy.max_pitch
            or abs(report.roll) > policy.max_roll):
        advice.append("Face the camera")
    if report.brightness < policy.min_brightness:
        advice.append("Too dark: add light in front of you")
    elif report.brightness > policy.max_brightness or report.clipped_fraction > policy.max_clipped_fraction:
        advice.append("Too bright: move away from the light")
    if report.blur < policy.min_sharpness:
        advice.append("Hold still")
    if report.masked and not policy.allow_masked:
        advice.append("Mask detected: please take it off")
    if not report.passed and not advice:
        advice.extend(report.reasons)  # a limit this module does not know yet: show the gate's own words
    return advice


def capture_advice(capture: Capture, policy: QualityPolicy, one_person: bool = False) -> list[str]:
    """Advice for one captured frame; `one_person` also asks other similar-sized faces to step away."""
    if capture.faces_found == 0:
        return [NO_FACE]
    advice = quality_advice(capture.quality, policy)
    if one_person and capture.competing_faces > 1:
        advice.insert(0, ONE_PERSON)
    return advice
