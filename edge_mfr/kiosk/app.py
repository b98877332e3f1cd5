"""HTTP face of the kiosk (Starlette, served by uvicorn): one page, its two static files, a small JSON API.

Every API call must come from the kiosk's own page:
- the Host header must name this machine's loopback (or the address the kiosk was told to bind), which
  stops DNS-rebinding pages;
- a browser's Origin header, when sent, must be this server's own origin, and Sec-Fetch-Site, when sent,
  "same-origin" (other ports of localhost are the same site but another origin);
- the session token travels in the X-Kiosk-Session header, which another origin cannot set without a
  CORS preflight that this server never grants.
Frames arrive as JPEG or PNG request bodies, are decoded in memory with a byte and pixel limit, and are
never written anywhere.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_mfr.errors import EdgeMfrError, GalleryError, InputError
from edge_mfr.io import decode_image

from .station import KioskError, Station

MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_FRAME_PIXELS = 3840 * 2160  # a 4K camera; larger JPEGs decode at a reduced scale, other formats are refused
MAX_JSON_BYTES = 4096
FRAME_TYPES = ("image/jpeg", "image/png")
SESSION_HEADER = "x-kiosk-session"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
STATIC_FILES = {"kiosk.js": "text/javascript", "kiosk.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Permissions-Policy": "camera=(self), microphone=()",
}

log = logging.getLogger("edge_mfr.kiosk")


class RequestRefused(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _static(name: str) -> bytes:
    return resources.files("edge_mfr.kiosk").joinpath("static", name).read_bytes()


def _host_name(host_header: str) -> str:
    """'127.0.0.1:8750' -> '127.0.0.1', '[::1]:8750' -> '[::1]'."""
    if host_header.startswith("["):
        return host_header.split("]")[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def create_app(station: Station, allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS) -> Starlette:
    """The kiosk web app over `station`. `allowed_hosts`: Host names accepted (None: any, for a wildcard bind)."""

    def check_origin(request: Request) -> None:
        host = request.headers.get("host", "")
        if allowed_hosts is not None and _host_name(host).lower() not in allowed_hosts:
            raise RequestRefused(f"requests for host {host!r} are refused: open the kiosk at "
                                 f"http://{allowed_hosts[0]}:PORT", 403)
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{host}":
            raise RequestRefused(f"request from another origin ({origin}) refused: only the kiosk page itself "
                                 "may use this API", 403)
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site not in (None, "same-origin", "none"):
            raise RequestRefused(f"{fetch_site} request refused: only the kiosk page itself may use this API", 403)

    async def json_body(request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise RequestRefused("send a JSON body (Content-Type: application/json)", 415)
        body = await _read_limited(request, MAX_JSON_BYTES, "request body")
        if not body:
            return {}
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise RequestRefused("the request body is not valid JSON", 400) from None
        if not isinstance(data, dict):
            raise RequestRefused("the request body must be a JSON object", 400)
        return data

    def api(handler, needs_json: bool = False):
        async def endpoint(request: Request) -> Response:
            try:
                check_origin(request)
                token = request.headers.get(SESSION_HEADER, "")
                body = await json_body(request) if needs_json else None
                result = await handler(request, token, body)
            except ClientDisconnect:
                # The page went away mid-upload (tab closed, reload): nobody reads an answer, nothing to undo.
                return Response(status_code=400)
            except RequestRefused as exc:
                if exc.status == 403:
                    log.warning("refused %s %s: %s", request.method, request.url.path, exc)
                return _error(str(exc), exc.status)
            except KioskError as exc:
                return _error(str(exc), exc.status, exc.retry_after_s)
            except InputError as exc:
                return _error(str(exc), 400)
            except GalleryError as exc:
                log.error("gallery error: %s", exc)
                return _error(f"Gallery problem: {exc}", 503)
            except EdgeMfrError as exc:
                return _error(str(exc), 400)
            return JSONResponse(result, headers=SECURITY_HEADERS)

        return endpoint

    async def open_session(request, token, body):
        return await run_in_threadpool(station.open_session, bool(body.get("takeover", False)))

    async def close_session(request, token, body):
        await run_in_threadpool(station.close_session, token)
        return {"closed": True}

    async def ping(request, token, body):
        return await run_in_threadpool(station.ping, token)

    async def sign_in(request, token, body):
        return await run_in_threadpool(station.sign_in, token, body.get("pin"))

    async def sign_out(request, token, body):
        return await run_in_threadpool(station.sign_out, token)

    async def users(request, token, body):
        return {"users": await run_in_threadpool(station.list_users, token)}

    async def remove_user(request, token, body):
        return {"users": await run_in_threadpool(station.remove_user, token, body.get("user"))}

    async def start_enrollment(request, token, body):
        return await run_in_threadpool(station.start_enrollment, token, body.get("user"),
                                       bool(body.get("masked", False)), bool(body.get("replace", False)))

    async def cancel(request, token, body):
        return await run_in_threadpool(station.cancel, token)

    async def start_unlock(request, token, body):
        return await run_in_threadpool(station.start_unlock, token)

    async def frame(request, token, body):
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type not in FRAME_TYPES:
            raise RequestRefused(f"a frame must be sent as {' or '.join(FRAME_TYPES)}, got {content_type or 'no type'}",
                                 415)
        await run_in_threadpool(station.ping, token)  # refuse a stale page before reading megabytes from it
        data = await _read_limited(request, MAX_FRAME_BYTES, "frame")
        image = await run_in_threadpool(decode_image, data, "frame", MAX_FRAME_PIXELS)
        return await run_in_threadpool(station.frame, token, image)

    async def page(request: Request) -> Response:
        return Response(_static("index.html"), media_type="text/html", headers=SECURITY_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return _error(f"no file {name!r} here", 404)
        return Response(_static(name), media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.detail if isinstance(exc.detail, str) else "request refused", exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("kiosk bug while serving %s", request.url.path)
        return _error("internal error in the kiosk (logged on the server); the gallery is unchanged", 500)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/api/session", api(open_session, needs_json=True), methods=["POST"]),
        Route("/api/session/close", api(close_session), methods=["POST"]),
        Route("/api/ping", api(ping), methods=["POST"]),
        Route("/api/operator/sign-in", api(sign_in, needs_json=True), methods=["POST"]),
        Route("/api/operator/sign-out", api(sign_out), methods=["POST"]),
        Route("/api/users", api(users), methods=["GET"]),
        Route("/api/users/remove", api(remove_user, needs_json=True), methods=["POST"]),
        Route("/api/enroll/start", api(start_enrollment, needs_json=True), methods=["POST"]),
        Route("/api/cancel", api(cancel), methods=["POST"]),
        Route("/api/unlock/start", api(start_unlock), methods=["POST"]),
        Route("/api/frame", api(frame), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})


async def _read_limited(request: Request, limit: int, what: str) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes (header or stream)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestRefused(f"{what} is {int(declared)} bytes; the limit is {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRefused(f"{what} is larger than the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _error(message: str, status: int, retry_after_s: float | None = None) -> JSONResponse:
    headers = dict(SECURITY_HEADERS)
    if retry_after_s is not None:
        headers["Retry-After"] = str(int(retry_after_s))
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)
