"""Kiosk server without a browser: PIN hash and lockouts, the HTTP API over the real pipeline and bundled
photos, bad input (malformed, oversized, cross-origin, stale tab, wrong PIN), liveness hook, CLI start-up.

The page itself, in headless Chromium with a fake camera, is tests/test_kiosk_browser.py.
"""

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("starlette", reason="the kiosk needs the [kiosk] extra (starlette, uvicorn)")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx (in the [dev] extra)")

from starlette.testclient import TestClient  # noqa: E402

from edge_mfr.cli import main  # noqa: E402
from edge_mfr.cli.kiosk import LIVENESS_NAMES, _allowed_hosts, _is_loopback  # noqa: E402
from edge_mfr.io import load_image  # noqa: E402
from edge_mfr.kiosk.app import MAX_FRAME_BYTES, create_app  # noqa: E402
from edge_mfr.kiosk.feedback import NO_FACE, quality_advice  # noqa: E402
from edge_mfr.kiosk.liveness import LIVENESS_CHECKS, HeadTurnChallenge, NoLivenessCheck  # noqa: E402
from edge_mfr.kiosk.state import LOCKOUT_S, MAX_FAILURES, KioskState, KioskStateError, state_path_for  # noqa: E402
from edge_mfr.kiosk.station import ATTEMPT_FRAMES, Station  # noqa: E402
from edge_mfr.quality import QualityPolicy, QualityReport  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "edge_mfr" / "demo_data"
PASSPHRASE = "kiosk test passphrase"
PIN = "246810"
BASE = "http://127.0.0.1:8750"


class FakeClock:
    """Wall and monotonic time the test moves by hand."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


class SteppingClock(FakeClock):
    """Advances one second per reading, so enrollment captures are always far enough apart."""

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return data.tobytes()


def _photo(name: str) -> bytes:
    return _jpeg(load_image(DEMO / name))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- state
def test_pin_is_stored_only_as_a_salted_slow_hash(tmp_path):
    first, second = KioskState(tmp_path / "a.kiosk.json"), KioskState(tmp_path / "b.kiosk.json")
    assert not first.pin_is_set
    first.set_pin(PIN)
    second.set_pin(PIN)
    for state in (first, second):
        text = state.path.read_text()
        assert PIN not in text
        record = json.loads(text)["pin"]
        assert record["kdf"] == "scrypt" and record["n"] >= 2**14
    # Salted: the same PIN hashes differently in two files.
    assert json.loads(first.path.read_text())["pin"]["hash"] != json.loads(second.path.read_text())["pin"]["hash"]
    assert oct(first.path.stat().st_mode & 0o777) == "0o600"
    reopened = KioskState(first.path)
    assert reopened.pin_is_set and reopened.pin_matches(PIN)
    assert not reopened.pin_matches("246811") and not reopened.pin_matches("") and not reopened.pin_matches("x" * 9)


@pytest.mark.parametrize("pin", ["1234", "12345a", "", "1" * 33, "１２３４５６"])
def test_pin_format_is_checked(tmp_path, pin):
    from edge_mfr.errors import InputError

    with pytest.raises(InputError, match="PIN"):
        KioskState(tmp_path / "s.json").set_pin(pin)


def test_lockout_after_five_failures_lasts_30_s_and_survives_a_restart(tmp_path):
    clock = FakeClock()
    path = tmp_path / "g.emfr.kiosk.json"
    state = KioskState(path, clock=clock)
    for _ in range(MAX_FAILURES - 1):
        assert not state.record_failure("unlock").locked
    restarted = KioskState(path, clock=clock)  # four failures are remembered across a restart
    lock = restarted.record_failure("unlock")
    assert lock.locked and lock.locked_for_s == LOCKOUT_S
    assert not restarted.lockout("pin").locked  # counters are separate
    clock.now += LOCKOUT_S - 1
    assert KioskState(path, clock=clock).lockout("unlock").locked
    clock.now += 1
    after = KioskState(path, clock=clock)
    assert not after.lockout("unlock").locked
    assert not after.record_failure("unlock").locked  # a new series starts after the lockout
    after.record_success("unlock")
    assert after.lockout("unlock").failures == 0


def test_lockout_is_capped_when_the_clock_goes_back(tmp_path):
    clock = FakeClock()
    state = KioskState(tmp_path / "s.json", clock=clock)
    for _ in range(MAX_FAILURES):
        state.record_failure("pin")
    clock.now -= 3600
    assert state.lockout("pin").locked_for_s == LOCKOUT_S


@pytest.mark.parametrize("content", ["{", '{"schema": 1, "pin": {"kdf": "md5"}}', '{"schema": 9}', "[]"])
def test_damaged_state_file_is_an_error_not_a_fresh_pin(tmp_path, content):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(KioskStateError, match="damaged"):
        KioskState(path)
    assert path.read_text() == content


# ------------------------------------------------------------------------------------------ feedback
def _report(**changes) -> QualityReport:
    values = dict(face_size=120.0, eye_distance=50.0, yaw=0.0, pitch=0.0, roll=0.0, blur=20.0, brightness=120.0,
                  clipped_fraction=0.0, masked_probability=0.05, masked=False, passed=True, reasons=[])
    values.update(changes)
    return QualityReport(**values)


@pytest.mark.parametrize("changes, words", [
    ({}, []),
    ({"eye_distance": 10.0, "passed": False}, ["Move closer"]),
    ({"yaw": 45.0, "passed": False}, ["Face the camera"]),
    ({"brightness": 20.0, "passed": False}, ["Too dark: add light in front of you"]),
    ({"brightness": 240.0, "passed": False}, ["Too bright: move away from the light"]),
    ({"blur": 0.5, "passed": False}, ["Hold still"]),
])
def test_quality_advice_in_plain_words(changes, words):
    assert quality_advice(_report(**changes), QualityPolicy.verify()) == words


def test_mask_advice_only_where_masks_are_not_allowed():
    masked = _report(masked=True, masked_probability=0.9)
    assert quality_advice(masked, QualityPolicy.verify()) == []
    strict = QualityPolicy(**{**QualityPolicy.verify().__dict__, "allow_masked": False})
    assert quality_advice(_report(masked=True, masked_probability=0.9, passed=False), strict) == [
        "Mask detected: please take it off"]


# ------------------------------------------------------------------------------------------ liveness
def test_default_liveness_is_a_no_op_that_says_so():
    check = NoLivenessCheck()
    result = check.observe(np.zeros((4, 4, 3), np.uint8), None)
    assert result.passed and "not checked" in result.message
    assert "no liveness check" in check.description and "photo" in check.description
    assert set(LIVENESS_NAMES) == set(LIVENESS_CHECKS)


def test_head_turn_challenge_refuses_a_still_photo_and_passes_a_turn(detector):
    from edge_mfr.detect import Detection

    frame = load_image(DEMO / "person_a_3.jpg")
    face = detector.detect_largest(frame)
    check = HeadTurnChallenge()
    check.reset()
    for _ in range(10):  # a photo held still: the same landmarks every frame
        assert not check.observe(frame, face).passed
    check.reset()
    eye_half = (face.landmarks[1, 0] - face.landmarks[0, 0]) / 2
    results = []
    for shift in (0.0, 0.2, 0.4, 0.2, 0.0, -0.2):  # the nose swinging sideways as the head turns
        landmarks = face.landmarks.copy()
        landmarks[2, 0] += shift * eye_half
        results.append(check.observe(frame, Detection(face.box, face.score, landmarks)).passed)
    assert not results[0] and results[-1]


# ------------------------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def detector():
    """The detector FaceUnlock deploys by default, built once for the module."""
    from edge_mfr.unlock import unlock_detector

    return unlock_detector()


@pytest.fixture
def kiosk(tmp_path, model_package, detector):
    """(client, station, gallery path): a fresh kiosk over an empty gallery, PIN set, fake clocks."""
    from edge_mfr.unlock import FaceUnlock

    gallery = tmp_path / "g.emfr"
    unlock = FaceUnlock(model=model_package, gallery=gallery, passphrase=PASSPHRASE, detector=detector)
    state = KioskState(state_path_for(gallery), clock=FakeClock())
    state.set_pin(PIN)
    station = Station(unlock, state, clock=SteppingClock())
    with TestClient(create_app(station), base_url=BASE) as client:
        yield client, station, gallery


def _session(client, takeover=False) -> dict:
    reply = client.post("/api/session", json={"takeover": takeover})
    assert reply.status_code == 200, reply.text
    return {"X-Kiosk-Session": reply.json()["token"]}


def _frame(client, headers, data: bytes, content_type="image/jpeg"):
    return client.post("/api/frame", content=data, headers={**headers, "Content-Type": content_type})


def _sign_in(client, headers, pin=PIN):
    return client.post("/api/operator/sign-in", json={"pin": pin}, headers=headers)


def _enroll(client, headers, user="alice", photos=("person_a_1.jpg", "person_a_2.jpg")) -> dict:
    assert _sign_in(client, headers).status_code == 200
    reply = client.post("/api/enroll/start", json={"user": user}, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["enrollment"]["total"] == 3
    for step in range(12):
        body = _frame(client, headers, _photo(photos[step % len(photos)])).json()
        if "enrolled" in body:
            return body
    raise AssertionError(f"enrollment did not finish: {body}")


def test_page_and_static_files_are_served_with_a_strict_policy(kiosk):
    client, _, _ = kiosk
    page = client.get("/")
    assert page.status_code == 200 and "kiosk.js" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert client.get("/static/kiosk.js").headers["content-type"].startswith("text/javascript")
    missing = client.get("/static/../state.py")
    assert missing.status_code == 404


def test_enroll_through_the_api_then_unlock_and_refuse_an_impostor(kiosk):
    client, station, gallery = kiosk
    headers = _session(client)
    preview = _frame(client, headers, _photo("person_a_3.jpg")).json()
    assert preview["faces"] == 1 and preview["ok"] and len(preview["box"]) == 4 and preview["advice"] == []
    enrolled = _enroll(client, headers)
    assert enrolled["enrolled"]["user"] == "alice" and enrolled["enrolled"]["captures"] == 3
    assert enrolled["enrolled"]["synthetic_templates"] > 0
    assert station.unlock.gallery().users() == ["alice"]
    users = client.get("/api/users", headers=headers).json()["users"]
    assert [u["name"] for u in users] == ["alice"]

    assert client.post("/api/unlock/start", headers=headers).status_code == 200
    decision = _frame(client, headers, _photo("person_a_3.jpg")).json()["decision"]
    assert decision["accepted"] and decision["user"] == "alice" and decision["score"] >= decision["threshold"]

    assert client.post("/api/unlock/start", headers=headers).status_code == 200
    for attempt in range(ATTEMPT_FRAMES):
        body = _frame(client, headers, _photo("person_c_1.jpg")).json()
        assert ("decision" in body) == (attempt == ATTEMPT_FRAMES - 1)
    assert not body["decision"]["accepted"] and body["decision"]["score"] < body["decision"]["threshold"]
    assert body["decision"]["tries_left"] == MAX_FAILURES - 1
    # Nothing but the gallery, its lock file and the kiosk state is on disk: no frame was written.
    assert sorted(p.name for p in gallery.parent.iterdir()) == ["g.emfr", "g.emfr.kiosk.json", "g.emfr.lock"]


def test_five_failed_unlocks_lock_the_kiosk_and_a_restart_keeps_the_lock(kiosk):
    client, station, gallery = kiosk
    headers = _session(client)
    _enroll(client, headers)
    station.attempt_frames = 1  # one scored frame per attempt keeps the test short; the count is the same
    for _ in range(MAX_FAILURES):
        assert client.post("/api/unlock/start", headers=headers).status_code == 200
        body = _frame(client, headers, _photo("person_b_1.jpg")).json()
    assert "locked for 30 more seconds" in body["decision"]["error"]
    refused = client.post("/api/unlock/start", headers=headers)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
    assert "Unlock is locked for 30 more seconds" in refused.json()["error"]

    restarted = Station(station.unlock, KioskState(station.state.path, clock=station.state._clock))
    with TestClient(create_app(restarted), base_url=BASE) as again:
        new_headers = _session(again)
        assert again.post("/api/unlock/start", headers=new_headers).status_code == 429


def test_wrong_pin_tells_tries_left_then_locks_and_guards_operator_actions(kiosk):
    client, _, _ = kiosk
    headers = _session(client)
    assert client.get("/api/users", headers=headers).status_code == 401
    assert client.post("/api/enroll/start", json={"user": "x"}, headers=headers).status_code == 401
    assert client.post("/api/users/remove", json={"user": "x"}, headers=headers).status_code == 401
    first = _sign_in(client, headers, "135790")
    assert first.status_code == 403 and "Wrong PIN (4 tries left" in first.json()["error"]
    for _ in range(MAX_FAILURES - 1):
        last = _sign_in(client, headers, "135790")
    assert last.status_code == 429 and "locked for 30" in last.json()["error"]
    assert _sign_in(client, headers, PIN).status_code == 429  # even the right PIN waits out the lockout
    assert _sign_in(client, headers, {"pin": 1}).status_code == 429


def test_second_tab_is_refused_until_it_takes_over(kiosk):
    client, _, _ = kiosk
    first = _session(client)
    second = client.post("/api/session", json={})
    assert second.status_code == 409 and "already open in another tab" in second.json()["error"]
    taken = _session(client, takeover=True)
    stale = _frame(client, first, _photo("person_a_1.jpg"))
    assert stale.status_code == 409 and "no longer the active kiosk page" in stale.json()["error"]
    assert _frame(client, taken, _photo("person_a_1.jpg")).status_code == 200
    assert _frame(client, {}, _photo("person_a_1.jpg")).status_code == 409


def test_requests_from_other_origins_are_refused(kiosk):
    client, _, gallery = kiosk
    session = _session(client)
    _enroll(client, session)
    before = _digest(gallery)
    for headers, words in (({"Origin": "http://evil.example"}, "another origin"),
                           ({"Origin": "http://127.0.0.1:9999"}, "another origin"),
                           ({"Host": "evil.example:8750"}, "refused"),
                           ({"Sec-Fetch-Site": "cross-site"}, "cross-site request refused"),
                           ({"Sec-Fetch-Site": "same-site"}, "same-site request refused")):
        for method, path, body in (("post", "/api/users/remove", {"user": "alice"}), ("get", "/api/users", None),
                                   ("post", "/api/session", {"takeover": True})):
            reply = getattr(client, method)(path, headers={**session, **headers}, **({"json": body} if body else {}))
            assert reply.status_code == 403 and words in reply.json()["error"], (headers, path)
    assert _digest(gallery) == before
    assert client.get("/api/users", headers=session).json()["users"][0]["name"] == "alice"
    assert client.get("/api/users", headers={**session, "Origin": BASE, "Sec-Fetch-Site": "same-origin"}).status_code == 200


def test_malformed_oversized_and_mistyped_frames_are_refused_and_the_gallery_is_intact(kiosk):
    client, station, gallery = kiosk
    headers = _session(client)
    _enroll(client, headers)
    before = _digest(gallery)
    garbage = _frame(client, headers, b"\xff\xd8\xff not really a jpeg" * 10)
    assert garbage.status_code == 400 and "not a readable image" in garbage.json()["error"]
    empty = _frame(client, headers, b"")
    assert empty.status_code == 400 and "empty" in empty.json()["error"]
    huge = _frame(client, headers, b"\0" * (MAX_FRAME_BYTES + 1))
    assert huge.status_code == 413 and "limit" in huge.json()["error"]
    typed = _frame(client, headers, b"GIF89a", content_type="image/gif")
    assert typed.status_code == 415 and "image/jpeg" in typed.json()["error"]
    wide = np.zeros((16, 20_000, 3), np.uint8)  # passes the byte limit, small enough in pixels: just no face
    assert _frame(client, headers, _jpeg(wide)).json()["advice"] == [NO_FACE]
    not_json = client.post("/api/enroll/start", content=b"{", headers={**headers, "Content-Type": "application/json"})
    assert not_json.status_code in (400, 401)
    assert client.post("/api/session", content=b"x" * 10_000,
                       headers={"Content-Type": "application/json"}).status_code == 413
    # Still serving, and the gallery is byte-for-byte what the enrollment left.
    assert _frame(client, headers, _photo("person_a_3.jpg")).json()["faces"] == 1
    assert _digest(gallery) == before and station.unlock.gallery().users() == ["alice"]


def test_preview_advice_for_a_dark_distant_or_masked_face(kiosk):
    client, station, _ = kiosk
    headers = _session(client)
    photo = load_image(DEMO / "person_a_3.jpg")
    dark = _frame(client, headers, _jpeg((photo * 0.15).astype(np.uint8))).json()
    assert dark["faces"] == 1 and "Too dark: add light in front of you" in dark["advice"] and not dark["ok"]
    from edge_mfr.masks import apply_mask

    face = station.unlock.detector.detect_largest(photo)
    masked = _frame(client, headers, _jpeg(apply_mask(photo, face.landmarks, "surgical", 0))).json()
    assert masked["masked"] and masked["ok"]
    assert not _frame(client, headers, _jpeg(photo)).json()["masked"]
    # Far away: eyes ~28 px apart, enough to unlock (24) but not to enroll (32).
    small = np.zeros((1200, 1600, 3), np.uint8)
    small[:269, :215] = cv2.resize(photo, (215, 269))
    assert _frame(client, headers, _jpeg(small)).json()["ok"]
    assert _sign_in(client, headers).status_code == 200
    assert client.post("/api/enroll/start", json={"user": "far"}, headers=headers).status_code == 200
    far = _frame(client, headers, _jpeg(small)).json()
    assert far["faces"] == 1 and far["advice"] == ["Move closer"] and far["enrollment"]["done"] == 0
    assert _frame(client, headers, _jpeg(np.full((480, 640, 3), 90, np.uint8))).json()["advice"] == [NO_FACE]


def test_enrollment_bad_names_existing_user_and_unlock_with_nobody_enrolled(kiosk):
    client, _, gallery = kiosk
    headers = _session(client)
    nobody = client.post("/api/unlock/start", headers=headers)
    assert nobody.status_code == 409 and "Nobody is enrolled" in nobody.json()["error"]
    assert _sign_in(client, headers).status_code == 200
    for name, words in (("   ", "type the person's name"), ("a\nb", "cannot be shown"), ("x" * 65, "at most 64")):
        reply = client.post("/api/enroll/start", json={"user": name}, headers=headers)
        assert reply.status_code == 400 and words in reply.json()["error"]
    _enroll(client, headers)
    again = client.post("/api/enroll/start", json={"user": "alice"}, headers=headers)
    assert again.status_code == 409 and "already enrolled" in again.json()["error"]
    assert client.post("/api/enroll/start", json={"user": "alice", "replace": True}, headers=headers).status_code == 200
    assert client.post("/api/cancel", headers=headers).json()["mode"] == "preview"
    removed = client.post("/api/users/remove", json={"user": "alice"}, headers=headers)
    assert removed.status_code == 200 and removed.json()["users"] == []
    assert client.post("/api/users/remove", json={"user": "alice"}, headers=headers).status_code == 404


def test_masked_enrollment_step_asks_for_the_mask(kiosk):
    client, _, _ = kiosk
    headers = _session(client)
    assert _sign_in(client, headers).status_code == 200
    start = client.post("/api/enroll/start", json={"user": "bob", "masked": True}, headers=headers).json()
    assert start["enrollment"]["total"] == 5
    for _ in range(3):
        body = _frame(client, headers, _photo("person_b_1.jpg")).json()
    assert body["enrollment"]["done"] == 3 and body["enrollment"]["masked"]
    unmasked_again = _frame(client, headers, _photo("person_b_1.jpg")).json()
    assert "Put your mask on for this capture" in unmasked_again["advice"]
    assert unmasked_again["enrollment"]["done"] == 3


def test_head_turn_liveness_runs_before_matching_and_stops_a_still_photo(kiosk):
    client, station, _ = kiosk
    headers = _session(client)
    _enroll(client, headers)
    station.liveness = HeadTurnChallenge()
    assert client.post("/api/unlock/start", headers=headers).status_code == 200
    for _ in range(2 * ATTEMPT_FRAMES):  # the enrolled person's photo, held still: never matched
        body = _frame(client, headers, _photo("person_a_3.jpg")).json()
        assert "decision" not in body and body["advice"] == ["Turn your head slowly to one side and back"]
    assert station.state.lockout("unlock").failures == 0


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_refuses_to_start_without_a_pin_or_with_a_wrong_gallery_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGE_MFR_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("EDGE_MFR_KIOSK_PIN", raising=False)
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    gallery = tmp_path / "g.emfr"
    assert main(["kiosk", "--gallery", str(gallery)]) == 2
    assert "no operator PIN is set yet" in capsys.readouterr().err
    monkeypatch.setenv("EDGE_MFR_KIOSK_PIN", "12")
    assert main(["kiosk", "--gallery", str(gallery)]) == 2
    assert "6 to 32 digits" in capsys.readouterr().err
    assert not state_path_for(gallery).exists()

    monkeypatch.setenv("EDGE_MFR_KIOSK_PIN", PIN)
    monkeypatch.setenv("EDGE_MFR_PASSPHRASE", "short")
    assert main(["kiosk", "--gallery", str(gallery)]) == 2
    assert "needs at least 8 characters" in capsys.readouterr().err
    assert not gallery.exists()

    from edge_mfr.gallery import Gallery
    from edge_mfr.models.package import default_model

    monkeypatch.setenv("EDGE_MFR_PASSPHRASE", PASSPHRASE)
    Gallery.create(gallery, default_model().fingerprint, passphrase="another passphrase")
    before = _digest(gallery)
    monkeypatch.setenv("EDGE_MFR_KIOSK_PIN", PIN)
    assert main(["kiosk", "--gallery", str(gallery)]) == 2
    assert "wrong passphrase" in capsys.readouterr().err
    assert _digest(gallery) == before and not state_path_for(gallery).exists()


def test_bind_address_rules():
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.20")
    assert _allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "[::1]")
    assert _allowed_hosts("192.168.1.20")[0] == "192.168.1.20"
    assert _allowed_hosts("0.0.0.0") is None


def test_a_failed_attempt_reports_the_frame_that_came_closest_with_its_own_threshold():
    """Frames of one attempt may take different routes, whose scores live on different scales (the masked
    route's metric): the reported best frame is the one nearest its own threshold, never a mix of two."""
    from edge_mfr.kiosk.station import _Attempt

    attempt = _Attempt()
    for score, threshold in ((0.950, 0.9559), (0.985, 0.9894), (0.940, 0.9559)):
        attempt.observe(score, threshold)
    assert attempt.best == (0.985, 0.9894)  # 0.0044 short of its threshold; 0.985 >= 0.9559 would mislead
