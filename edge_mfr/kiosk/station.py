"""The kiosk's logic, apart from HTTP: one page session, operator sign-in, guided enrollment, unlock attempts.

Everything goes through the SDK's FaceUnlock: `capture` for per-frame face box and quality feedback,
`enroll` with the frames the guide collected, `identify` for each unlock decision. Frames live in memory
only for as long as a request (or, for enrollment, until `enroll` has turned them into templates).

One session at a time: a kiosk has one screen and one camera, and two tabs sending frames would mix two
people's captures. A second tab is refused until the first one closes, goes quiet for SESSION_IDLE_S, or is
taken over explicitly. A lock serialises the pipeline, so requests never interleave within a capture.
"""

from __future__ import annotations

import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edge_mfr.errors import EdgeMfrError, GalleryError, InputError, QualityError
from edge_mfr.unlock import FaceUnlock

from .feedback import capture_advice
from .liveness import LivenessCheck, NoLivenessCheck
from .state import LOCKOUT_S, MAX_FAILURES, KioskState

SESSION_IDLE_S = 15.0  # the page pings every few seconds; a tab closed without saying so frees the kiosk after this
OPERATOR_IDLE_S = 300.0  # operator mode ends by itself after this long without an operator action
ENROLL_CAPTURES = 3
ENROLL_MASKED_CAPTURES = 2
CAPTURE_SPACING_S = 0.6  # between two enrollment captures, so they are not the same instant twice
ATTEMPT_FRAMES = 3  # scored frames in one unlock attempt before it counts as one failure
MAX_USER_NAME = 64


class KioskError(EdgeMfrError):
    """A request the kiosk refuses; `status` is the HTTP status the page gets with the message."""

    def __init__(self, message: str, status: int = 400, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass
class _Step:
    masked: bool
    prompt: str


@dataclass
class _Enrollment:
    user: str
    replace: bool
    steps: list[_Step]
    frames: list[tuple[str, np.ndarray]] = field(default_factory=list)
    last_capture: float = 0.0

    @property
    def step(self) -> _Step | None:
        return self.steps[len(self.frames)] if len(self.frames) < len(self.steps) else None

    def progress(self) -> dict:
        step = self.step
        return {"user": self.user, "done": len(self.frames), "total": len(self.steps),
                "prompt": step.prompt if step else "Saving", "masked": bool(step and step.masked)}


@dataclass
class _Attempt:
    scored: int = 0
    # The frame that came closest: its score and its route's threshold (routes score on different scales).
    best: tuple[float, float] | None = None

    def observe(self, score: float, threshold: float) -> None:
        if self.best is None or score - threshold > self.best[0] - self.best[1]:
            self.best = (score, threshold)


@dataclass
class _Session:
    token: str
    last_seen: float
    mode: str = "preview"  # preview | enroll | unlock
    operator_until: float = 0.0
    enrollment: _Enrollment | None = None
    attempt: _Attempt | None = None


def _enrollment_steps(unmasked: int, masked: int) -> list[_Step]:
    prompts = ["Look straight at the camera", "Tilt your head slightly", "Turn a little to one side",
               "Look straight at the camera again"]
    steps = [_Step(False, prompts[i % len(prompts)]) for i in range(unmasked)]
    steps += [_Step(True, "Put your mask on and look at the camera") for _ in range(masked)]
    return steps


def check_user_name(name) -> str:
    """A name the operator typed: trimmed, NFC, printable, at most MAX_USER_NAME characters."""
    if not isinstance(name, str):
        raise KioskError("the name must be text")
    name = unicodedata.normalize("NFC", name.strip())
    if not name:
        raise KioskError("type the person's name first")
    if len(name) > MAX_USER_NAME:
        raise KioskError(f"the name is {len(name)} characters long; at most {MAX_USER_NAME}")
    if not name.isprintable():
        raise KioskError("the name contains characters that cannot be shown")
    return name


class Station:
    """The kiosk behind the page; the web app turns each method into one endpoint."""

    def __init__(self, unlock: FaceUnlock, state: KioskState, liveness: LivenessCheck | None = None,
                 enroll_captures: int = ENROLL_CAPTURES, masked_captures: int = ENROLL_MASKED_CAPTURES,
                 attempt_frames: int = ATTEMPT_FRAMES, clock: Callable[[], float] = time.monotonic):
        if not state.pin_is_set:
            raise KioskError("no operator PIN is set: set one before starting the kiosk")
        if enroll_captures < 1 or masked_captures < 0 or attempt_frames < 1:
            raise InputError("enroll_captures and attempt_frames must be >= 1, masked_captures >= 0")
        self.unlock = unlock
        self.state = state
        self.liveness = liveness or NoLivenessCheck()
        self.enroll_captures = enroll_captures
        self.masked_captures = masked_captures
        self.attempt_frames = attempt_frames
        self._clock = clock
        self._lock = threading.Lock()
        self._session: _Session | None = None

    # ------------------------------------------------------------------------------------ session
    def open_session(self, takeover: bool = False) -> dict:
        """Claim the kiosk for a page; refused while another page is active, unless `takeover`."""
        with self._lock:
            now = self._clock()
            current = self._session
            if current is not None and now - current.last_seen < SESSION_IDLE_S and not takeover:
                raise KioskError("The kiosk is already open in another tab or window. Close it there, "
                                 "or take over here (the other one stops).", status=409)
            self._session = _Session(secrets.token_urlsafe(24), now)
            return dict(self._describe(self._session), token=self._session.token)

    def close_session(self, token: str) -> None:
        with self._lock:
            if self._session is not None and secrets.compare_digest(self._session.token, token or ""):
                self._session = None

    def ping(self, token: str) -> dict:
        with self._lock:
            return self._describe(self._get(token))

    def _get(self, token: str | None) -> _Session:
        session = self._session
        if session is None or not token or not secrets.compare_digest(session.token, token):
            raise KioskError("This page is no longer the active kiosk page (another tab took over, or it "
                             "was idle too long). Reload the page to use the kiosk here.", status=409)
        now = self._clock()
        session.last_seen = now
        if session.operator_until and now >= session.operator_until:
            self._end_operator(session)
        return session

    def _describe(self, session: _Session) -> dict:
        lock = self.state.lockout("unlock")
        return {
            "mode": session.mode,
            "operator": session.operator_until > 0,
            "enrollment": session.enrollment.progress() if session.enrollment else None,
            "unlock_locked_for_s": round(lock.locked_for_s, 1),
            "threshold": {route: round(float(t), 4) for route, t in self.unlock.thresholds.items()},
            "fmr": self.unlock.fmr,
            "model": self.unlock.package.name,
            "liveness": {"name": self.liveness.name, "description": self.liveness.description},
        }

    # ----------------------------------------------------------------------------------- operator
    def sign_in(self, token: str, pin) -> dict:
        with self._lock:
            session = self._get(token)
            lock = self.state.lockout("pin")
            if lock.locked:
                raise _locked("PIN entry", lock.locked_for_s)
            if not isinstance(pin, str) or not pin:
                raise KioskError("type the operator PIN")
            if not self.state.pin_matches(pin):
                lock = self.state.record_failure("pin")
                if lock.locked:
                    raise _locked("Wrong PIN. PIN entry", lock.locked_for_s)
                raise KioskError(f"Wrong PIN ({lock.tries_left} {'try' if lock.tries_left == 1 else 'tries'} "
                                 f"left before a {LOCKOUT_S:g} s lockout)", status=403)
            self.state.record_success("pin")
            session.operator_until = self._clock() + OPERATOR_IDLE_S
            return self._describe(session)

    def sign_out(self, token: str) -> dict:
        with self._lock:
            session = self._get(token)
            self._end_operator(session)
            return self._describe(session)

    def _operator(self, token: str) -> _Session:
        session = self._get(token)
        if not session.operator_until:
            raise KioskError("Operator sign-in needed: enter the operator PIN first", status=401)
        session.operator_until = self._clock() + OPERATOR_IDLE_S
        return session

    def _end_operator(self, session: _Session) -> None:
        session.operator_until = 0.0
        if session.enrollment is not None:
            session.enrollment = None  # drops the collected frames
            session.mode = "preview"

    def list_users(self, token: str) -> list[dict]:
        with self._lock:
            self._operator(token)
            gallery = self._gallery_or_none()
            if gallery is None:
                return []
            return [{key: info[key] for key in ("name", "enrolled_at", "num_templates", "num_masked",
                                                 "num_synthetic")}
                    for info in map(gallery.user_info, gallery.users())]

    def remove_user(self, token: str, name) -> list[str]:
        with self._lock:
            self._operator(token)
            gallery = self._gallery_or_none()
            if gallery is None or not isinstance(name, str) or name not in gallery.users():
                raise KioskError(f"nobody called {name!r} is enrolled", status=404)
            gallery.remove_user(name)
            return gallery.users()

    def _gallery_or_none(self):
        if self.unlock.gallery_path is None or not self.unlock.gallery_path.exists():
            return None
        gallery = self.unlock.gallery()
        gallery.reload()  # pick up changes made with the command line while the kiosk runs
        return gallery

    # --------------------------------------------------------------------------------- enrollment
    def start_enrollment(self, token: str, user, masked: bool = False, replace: bool = False) -> dict:
        with self._lock:
            session = self._operator(token)
            user = check_user_name(user)
            gallery = self._gallery_or_none()
            if gallery is not None and user in gallery.users() and not replace:
                raise KioskError(f"{user} is already enrolled: tick 'replace' to enroll them again", status=409)
            session.attempt = None
            session.mode = "enroll"
            session.enrollment = _Enrollment(user, bool(replace),
                                             _enrollment_steps(self.enroll_captures,
                                                               self.masked_captures if masked else 0))
            return self._describe(session)

    def cancel(self, token: str) -> dict:
        """Leave enrollment or unlock and go back to the plain preview; collected frames are dropped."""
        with self._lock:
            session = self._get(token)
            session.enrollment, session.attempt, session.mode = None, None, "preview"
            return self._describe(session)

    # ------------------------------------------------------------------------------------- unlock
    def start_unlock(self, token: str) -> dict:
        with self._lock:
            session = self._get(token)
            lock = self.state.lockout("unlock")
            if lock.locked:
                raise _locked("Unlock", lock.locked_for_s)
            gallery = self._gallery_or_none()
            if gallery is None or not gallery.users():
                raise KioskError("Nobody is enrolled yet: an operator has to enroll someone first", status=409)
            session.enrollment = None
            session.mode = "unlock"
            session.attempt = _Attempt()
            self.liveness.reset()
            return self._describe(session)

    # ------------------------------------------------------------------------------------- frames
    def frame(self, token: str, frame: np.ndarray) -> dict:
        """One camera frame: face box and advice, plus what the session's mode does with it."""
        with self._lock:
            session = self._get(token)
            if session.mode == "enroll":  # an enrollment in progress is operator activity
                session.operator_until = self._clock() + OPERATOR_IDLE_S
            height, width = frame.shape[:2]
            policy = self.unlock.enroll_policy if session.mode == "enroll" else self.unlock.verify_policy
            capture = self.unlock.capture(frame, policy, "camera")
            reply = {
                "mode": session.mode,
                "frame": [width, height],
                "faces": capture.faces_found,
                "box": [round(float(v), 1) for v in capture.detection.box] if capture.detection else None,
                "advice": capture_advice(capture, policy, one_person=session.mode == "enroll"),
                "masked": bool(capture.quality.masked) if capture.quality else None,
                "latency_ms": round(sum(capture.latency_ms.values()), 1),
            }
            reply["ok"] = capture.usable and not reply["advice"]
            if session.mode == "enroll":
                reply.update(self._enroll_frame(session, frame, capture, reply))
            elif session.mode == "unlock":
                reply.update(self._unlock_frame(session, frame, capture, reply))
            return reply

    def _enroll_frame(self, session: _Session, frame: np.ndarray, capture, reply: dict) -> dict:
        enrollment = session.enrollment
        step = enrollment.step
        if reply["ok"] and capture.quality.masked != step.masked:
            reply["ok"] = False
            reply["advice"].append("Put your mask on for this capture" if step.masked else
                                   "Mask detected: please take it off for this capture")
        now = self._clock()
        if not reply["ok"] or now - enrollment.last_capture < CAPTURE_SPACING_S:
            return {"enrollment": enrollment.progress()}
        enrollment.frames.append((f"kiosk capture {len(enrollment.frames) + 1}", frame))
        enrollment.last_capture = now
        event = {"captured": True, "enrollment": enrollment.progress()}
        if enrollment.step is not None:
            return event
        session.enrollment, session.mode = None, "preview"
        try:
            report = self.unlock.enroll(enrollment.user, enrollment.frames, replace=enrollment.replace)
        except (QualityError, GalleryError, InputError) as exc:
            return dict(event, enrolled=None, error=f"Enrollment of {enrollment.user} failed: {exc}")
        finally:
            enrollment.frames.clear()  # the frames are templates now (or discarded): let them go
        return dict(event, enrolled={"user": report.user, "captures": len(report.accepted),
                                     "templates": report.templates, "masked_templates": report.masked_templates,
                                     "synthetic_templates": report.synthetic_templates})

    def _unlock_frame(self, session: _Session, frame: np.ndarray, capture, reply: dict) -> dict:
        lock = self.state.lockout("unlock")
        if lock.locked:
            session.mode, session.attempt = "preview", None
            return {"decision": None, "error": str(_locked("Unlock", lock.locked_for_s)),
                    "unlock_locked_for_s": round(lock.locked_for_s, 1)}
        if not reply["ok"]:
            return {}
        liveness = self.liveness.observe(frame, capture.detection)
        reply["liveness"] = liveness.message
        if not liveness.passed:
            reply["ok"] = False
            reply["advice"].append(liveness.message)
            return {}
        decision = self.unlock.identify(frame, "camera")
        if decision.score is None:
            if decision.reason == "gallery is empty":  # everyone was removed meanwhile
                session.mode, session.attempt = "preview", None
                return {"decision": None, "error": "Nobody is enrolled any more: an operator has to enroll someone"}
            reply["ok"] = False
            reply["advice"].append(decision.reason)
            return {}
        attempt = session.attempt
        attempt.scored += 1
        attempt.observe(decision.score, decision.threshold)
        result = {"accepted": decision.accepted, "user": decision.user, "score": round(decision.score, 4),
                  "threshold": round(decision.threshold, 4), "fmr": decision.fmr,
                  "route": "masked" if decision.quality and decision.quality.get("masked") else "unmasked",
                  "liveness": liveness.message}
        if decision.accepted:
            self.state.record_success("unlock")
        elif attempt.scored < self.attempt_frames:
            return {"attempt": {"scored": attempt.scored, "of": self.attempt_frames}}
        else:
            result["score"], result["threshold"] = (round(v, 4) for v in attempt.best)
            lock = self.state.record_failure("unlock")
            result["tries_left"] = lock.tries_left
            if lock.locked:
                result["error"] = str(_locked(f"{MAX_FAILURES} failed unlocks in a row. Unlock", lock.locked_for_s))
        session.mode, session.attempt = "preview", None
        return {"decision": result, "unlock_locked_for_s": round(self.state.lockout("unlock").locked_for_s, 1)}


def _locked(what: str, seconds: float) -> KioskError:
    wait = max(int(seconds + 0.999), 1)
    return KioskError(f"{what} is locked for {wait} more second{'s' if wait != 1 else ''}", status=429,
                      retry_after_s=wait)
