"""The kiosk page end to end in headless Chromium (Debian's `chromium`, driven by Playwright for Python).

The camera is Chromium's fake capture device playing a .y4m clip made here from the bundled public-domain
photos: person A's first two photos to enroll, their third (held out) to unlock, three other people as
impostors. The server is the real `edge-mfr kiosk` command in a subprocess.

Set EDGE_MFR_KIOSK_SCREENSHOT=docs/kiosk.png to save the screenshot of the accepted unlock used in the docs.
"""

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_mfr.io import load_image

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (the [dev] extra)")
pytest.importorskip("uvicorn", reason="the kiosk needs the [kiosk] extra (starlette, uvicorn)")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium); the kiosk browser test needs it",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "edge_mfr" / "demo_data"
PASSPHRASE = "kiosk browser test passphrase"
PIN = "97531864"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
FRAME_W, FRAME_H, FPS = 640, 480, 5
expect = sync_api.expect
expect.set_options(timeout=10_000)  # generous: CI machines are small and shared


def write_y4m(path: Path, photos: list[str], frames_each: int) -> Path:
    """A 640x480 4:2:0 clip showing each photo, letterboxed, for `frames_each` frames (Chromium loops it)."""
    with path.open("wb") as clip:
        clip.write(f"YUV4MPEG2 W{FRAME_W} H{FRAME_H} F{FPS}:1 Ip A1:1 C420jpeg\n".encode())
        for name in photos:
            photo = load_image(DEMO / name)
            scale = min(FRAME_W / photo.shape[1], FRAME_H / photo.shape[0])
            size = (round(photo.shape[1] * scale), round(photo.shape[0] * scale))
            canvas = np.zeros((FRAME_H, FRAME_W, 3), np.uint8)
            x, y = (FRAME_W - size[0]) // 2, (FRAME_H - size[1]) // 2
            canvas[y:y + size[1], x:x + size[0]] = cv2.resize(photo, size, interpolation=cv2.INTER_AREA)
            planes = cv2.cvtColor(canvas, cv2.COLOR_BGR2YUV_I420).tobytes()  # Y, then U, then V: y4m's 4:2:0 layout
            clip.write((b"FRAME\n" + planes) * frames_each)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {
        "enroll": write_y4m(folder / "enroll.y4m", ["person_a_1.jpg", "person_a_2.jpg"], FPS),
        "genuine": write_y4m(folder / "genuine.y4m", ["person_a_3.jpg"], 2),
        "impostor": write_y4m(folder / "impostor.y4m", ["person_b_1.jpg", "person_c_1.jpg", "person_d_1.jpg"], FPS),
    }


class KioskServer:
    """`edge-mfr kiosk` on a free loopback port, in a subprocess."""

    def __init__(self, gallery: Path):
        env = dict(os.environ, EDGE_MFR_PASSPHRASE=PASSPHRASE, EDGE_MFR_KIOSK_PIN=PIN, OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([sys.executable, "-m", "edge_mfr", "kiosk", "--gallery", str(gallery),
                                         "--port", "0", "--threads", "1"],
                                        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.output = []
        self._reader = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.output.append(line)
            found = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
            if found:
                self.url = found.group(1)
                self._reader = threading.Thread(target=self._drain, daemon=True)
                self._reader.start()
                return
        self.stop()
        raise AssertionError("kiosk server did not start:\n" + "".join(self.output))

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)

    def log(self) -> str:
        """What the server printed so far."""
        return "".join(self.output)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        else:
            self.output.append(self.process.stdout.read())
        self.process.stdout.close()


@pytest.fixture
def start_server():
    servers = []

    def start(gallery: Path) -> KioskServer:
        servers.append(KioskServer(gallery))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
        assert "Traceback" not in "".join(server.output), "".join(server.output)


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as driver:
        yield driver


def chromium(playwright, profile: Path, clip: Path | None = None, camera_allowed: bool = True):
    """A fresh Chromium profile; `clip` plays as the camera, None means no camera at all."""
    args = list(FLAGS)
    if clip is not None:
        args += ["--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={clip}"]
    if not camera_allowed:
        args.append("--deny-permission-prompts")
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=args, viewport={"width": 1200, "height": 800},
        permissions=["camera"] if camera_allowed else [])


@contextmanager
def other_origin():
    """A blank page from a second HTTP server on this machine: another origin than the kiosk's."""

    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>another origin</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def leave(page) -> None:
    """Navigate away so the page's pagehide handler hands the kiosk back, as closing a tab does."""
    page.goto("about:blank")


def open_kiosk(context, server: KioskServer):
    """The kiosk page, connected. The previous page's hand-back is a request nobody awaits, so a page opened
    right after may still find the kiosk busy: retry for up to 5 s, well inside the 15 s after which an idle
    page would lose the kiosk anyway, so passing still shows that leaving handed it back."""
    page = context.new_page()
    connection = page.locator("#connection")
    deadline = time.monotonic() + 5
    while True:
        page.goto(server.url)
        expect(connection).to_have_text(re.compile("^(connected|in use elsewhere)$"))
        if connection.text_content() == "connected" or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    expect(connection).to_have_text("connected")
    return page


def unlock_once(page) -> str:
    page.click("#unlock-button")
    result = page.locator("#result")
    expect(result).to_be_visible(timeout=20_000)
    return result.get_attribute("data-decision")


def test_enroll_unlock_refuse_impostor_lockout_in_chromium(tmp_path, clips, playwright, start_server):
    from edge_mfr.gallery import Gallery

    gallery = tmp_path / "kiosk.emfr"
    server = start_server(gallery)

    # Operator: wrong PIN, right PIN, guided enrollment from the enrollment clip.
    with chromium(playwright, tmp_path / "profile-enroll", clips["enroll"]) as context:
        page = open_kiosk(context, server)
        expect(page.locator("#advice")).to_have_text("Face found: ready", timeout=20_000)
        page.fill("#pin", "11111111")
        page.click("#pin-submit")
        expect(page.locator("#operator-message")).to_contain_text("Wrong PIN (4 tries left")
        page.fill("#pin", PIN)
        page.click("#pin-submit")
        expect(page.locator("#operator-message")).to_have_text("Signed in as operator")
        page.fill("#enroll-name", "alice")
        page.click("#enroll-start")
        expect(page.locator("#enroll-prompt")).to_be_visible()
        expect(page.locator("#enroll-message")).to_contain_text("Enrolled alice: 3 captures", timeout=30_000)
        expect(page.locator("#users")).to_contain_text("alice")
        enrolled = gallery.read_bytes()

        # A second tab is refused with a message, can take over, and the first one then says so.
        second = context.new_page()
        second.goto(server.url)
        expect(second.locator("#session-text")).to_contain_text("already open in another tab")
        second.click("#takeover")
        expect(second.locator("#connection")).to_have_text("connected")
        expect(page.locator("#session-text")).to_contain_text("no longer the active kiosk page", timeout=10_000)
        expect(page.locator("#takeover")).to_be_visible()

        # Another origin's page (a page served by another local server: same site, another origin) cannot use
        # the API: its CORS request is blocked, and its simple no-cors request is refused by the server.
        with other_origin() as elsewhere:
            other = context.new_page()
            other.goto(elsewhere)
            outcome = other.evaluate("""async (url) => {
                const result = {};
                try { await fetch(url + "api/users/remove", {method: "POST", mode: "no-cors",
                    headers: {"Content-Type": "text/plain"}, body: JSON.stringify({user: "alice"})});
                    result.simple = "sent"; } catch (err) { result.simple = "blocked"; }
                try { await fetch(url + "api/session", {method: "POST", headers: {"Content-Type": "application/json"},
                    body: JSON.stringify({takeover: true})}); result.cors = "answered"; }
                catch (err) { result.cors = "blocked"; }
                return result;
            }""", server.url)
            assert outcome == {"simple": "sent", "cors": "blocked"}
            other.close()
        leave(second)
    assert gallery.read_bytes() == enrolled
    assert Gallery.open(gallery, passphrase=PASSPHRASE).users() == ["alice"]
    assert f"refused POST /api/users/remove: request from another origin ({elsewhere[:-1]})" in server.log()

    # The held-out photo of the same person unlocks.
    with chromium(playwright, tmp_path / "profile-genuine", clips["genuine"]) as context:
        page = open_kiosk(context, server)
        assert unlock_once(page) == "accepted"
        expect(page.locator("#result")).to_contain_text("Welcome, alice")
        expect(page.locator("#result small")).to_contain_text("≥ threshold")
        if os.environ.get("EDGE_MFR_KIOSK_SCREENSHOT"):
            page.wait_for_timeout(500)
            page.screenshot(path=os.environ["EDGE_MFR_KIOSK_SCREENSHOT"])
        leave(page)

    # Impostors are refused; the fifth refusal locks unlocking for 30 s, and a restart keeps the lock.
    with chromium(playwright, tmp_path / "profile-impostor", clips["impostor"]) as context:
        page = open_kiosk(context, server)
        for attempt in range(5):
            assert unlock_once(page) == "rejected"
            expect(page.locator("#result")).to_contain_text("Not recognised")
            if attempt < 4:
                expect(page.locator("#unlock-button")).to_be_enabled()
        expect(page.locator("#unlock-message")).to_contain_text("locked for")
        expect(page.locator("#unlock-button")).to_be_disabled()
        leave(page)
        server.stop()
        server = start_server(gallery)
        page = open_kiosk(context, server)
        expect(page.locator("#unlock-message")).to_contain_text("Too many failed unlocks: locked for")
        expect(page.locator("#unlock-button")).to_be_disabled()
        leave(page)
    assert Gallery.open(gallery, passphrase=PASSPHRASE).users() == ["alice"]


def test_no_camera_and_denied_camera_get_clear_messages(tmp_path, clips, playwright, start_server):
    server = start_server(tmp_path / "empty.emfr")
    with chromium(playwright, tmp_path / "profile-none") as context:
        page = open_kiosk(context, server)
        expect(page.locator("#camera-error")).to_have_text(
            "No camera found. Connect a camera to the kiosk and reload the page.")
        expect(page.locator("#unlock-button")).to_be_disabled()
        # Without a camera the operator can still sign in: the page and server carry on.
        page.fill("#pin", PIN)
        page.click("#pin-submit")
        expect(page.locator("#users")).to_contain_text("nobody yet")
        leave(page)
    with chromium(playwright, tmp_path / "profile-denied", clips["genuine"], camera_allowed=False) as context:
        page = open_kiosk(context, server)
        expect(page.locator("#camera-error")).to_contain_text("Camera permission was denied")
        leave(page)


def test_upload_cut_off_midway_is_dropped_quietly(tmp_path, start_server):
    """A tab closed while a frame is uploading: the server drops the request without a traceback (the
    start_server fixture fails the test on any traceback in the server's output) and keeps serving."""
    import json
    import socket
    import urllib.request

    server = start_server(tmp_path / "g.emfr")
    request = urllib.request.Request(server.url + "api/session", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    token = json.loads(urllib.request.urlopen(request, timeout=10).read())["token"]
    host, port = server.url[len("http://"):].strip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(f"POST /api/frame HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
                    f"X-Kiosk-Session: {token}\r\nContent-Length: 500000\r\n\r\n".encode() + b"\xff\xd8" * 1000)
    time.sleep(0.5)
    ping = urllib.request.Request(server.url + "api/ping", data=b"", method="POST", headers={"X-Kiosk-Session": token})
    assert json.loads(urllib.request.urlopen(ping, timeout=10).read())["mode"] == "preview"
