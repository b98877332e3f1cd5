"""Reading frames: image files (size-checked from their header before decoding), folders, video files and cameras."""

from __future__ import annotations

import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .detect.base import as_bgr_uint8
from .errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
# Decoding is bounded: an image's size is read from its header before any pixel is decoded, and an image
# whose header cannot be read (unknown format, malformed header) is refused, never decoded to find out.
# Above MAX_PIXELS a sequential JPEG is decoded at 1/2, 1/4 or 1/8 scale; anything else is refused.
MAX_PIXELS = 50_000_000
# Largest JPEG accepted at reduced scale (the largest phone sensors are 200 MP): the decoder still reads
# every coefficient, so time grows with the source size even when memory does not.
MAX_JPEG_SOURCE_PIXELS = 200_000_000
MAX_FILE_BYTES = 200 * 1024 * 1024
# TIFF samples wider than this, or more of them per pixel, would make the decoder's strip buffers larger
# than the decoded image; cameras write 8 or 16 bits and at most 4 samples.
MAX_TIFF_BITS_PER_SAMPLE = 16
MAX_TIFF_SAMPLES_PER_PIXEL = 4
# Every image is decoded to 8-bit BGR: memory is 3 bytes per pixel whatever the file's depth or alpha,
# and EXIF orientation is ignored at every size so that a large and a small copy of a photo agree.
_DECODE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
# SOF markers of sequential DCT JPEGs, the only kind libjpeg can decode at reduced scale without
# buffering the whole image (progressive and lossless JPEGs keep every coefficient or sample).
_SEQUENTIAL_JPEG_SOF = (0xC0, 0xC1, 0xC9)
SUPPORTED_FORMATS = "JPEG, PNG, WebP, TIFF, BMP, PNM (PGM/PPM/PBM)"


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, read without decoding any pixel."""

    format: str
    width: int
    height: int
    reducible: bool = False  # a sequential JPEG: can be decoded at 1/2, 1/4 or 1/8 scale

    @property
    def pixels(self) -> int:
        return self.width * self.height


class _HeaderError(Exception):
    """The header is malformed; the message says how."""


def _jpeg_header(data: bytes) -> ImageHeader:
    """Size from the first start-of-frame marker, walking markers the way libjpeg does.

    Like libjpeg's next_marker(), bytes other than 0xFF before a marker are skipped (libjpeg warns and goes
    on), any number of 0xFF fill bytes may precede a marker (ITU-T T.81, B.1.1.2) and 0xFF00 is not a
    marker. Segments are skipped by their length field, so a thumbnail inside APP1 is never mistaken for
    the image.
    """
    i, end = 2, len(data)
    while True:
        while i < end and data[i] != 0xFF:
            i += 1
        while i < end and data[i] == 0xFF:
            i += 1
        if i >= end:
            raise _HeaderError("JPEG ends before its start-of-frame marker")
        marker = data[i]
        i += 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # a stuffed zero, TEM or a restart marker: no length field
        if marker in (0xD8, 0xD9, 0xDA):
            raise _HeaderError(f"JPEG has marker 0x{marker:02X} before its start-of-frame marker")
        if i + 2 > end:
            raise _HeaderError("JPEG ends inside a marker segment")
        (length,) = struct.unpack_from(">H", data, i)
        if length < 2 or i + length > end:
            raise _HeaderError(f"JPEG marker 0x{marker:02X} has a bad length {length}")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if length < 8:
                raise _HeaderError("JPEG start-of-frame segment is too short")
            height, width = struct.unpack_from(">HH", data, i + 3)
            return ImageHeader("JPEG", width, height, reducible=marker in _SEQUENTIAL_JPEG_SOF)
        i += length


def _png_header(data: bytes) -> ImageHeader:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise _HeaderError("PNG does not start with an IHDR chunk")
    width, height = struct.unpack_from(">II", data, 16)
    return ImageHeader("PNG", width, height)


def _webp_header(data: bytes) -> ImageHeader:
    """Canvas size from the first chunk: VP8X (extended, also animations), VP8L (lossless) or VP8 (lossy)."""
    if len(data) < 30:
        raise _HeaderError("WebP is too short to hold a header")
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8L":
        if data[20] != 0x2F:
            raise _HeaderError("WebP lossless chunk has a bad signature")
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise _HeaderError("WebP lossy chunk has a bad start code")
        width, height = (value & 0x3FFF for value in struct.unpack_from("<HH", data, 26))
    else:
        raise _HeaderError(f"WebP starts with an unknown chunk {chunk!r}")
    return ImageHeader("WebP", width, height)


def _tiff_header(data: bytes) -> ImageHeader:
    """Size and sample layout of the first image file directory (the page OpenCV decodes)."""
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        raise _HeaderError("TIFF is too short to hold a header")
    (offset,) = struct.unpack_from(order + "I", data, 4)
    if offset + 2 > len(data):
        raise _HeaderError("TIFF directory offset points outside the file")
    (count,) = struct.unpack_from(order + "H", data, offset)
    if offset + 2 + 12 * count > len(data):
        raise _HeaderError("TIFF directory runs past the end of the file")
    fields = {}
    for entry in range(count):
        tag, kind, values = struct.unpack_from(order + "HHI", data, offset + 2 + 12 * entry)
        if tag in (256, 257, 258, 277) and kind in (3, 4) and values >= 1:  # SHORT or LONG
            code, size = ("H", 2) if kind == 3 else ("I", 4)
            at = offset + 2 + 12 * entry + 8
            if values * size > 4:  # the values do not fit in the entry: it holds their offset
                (at,) = struct.unpack_from(order + "I", data, at)
            if at + values * size > len(data):
                raise _HeaderError(f"TIFF tag {tag} points outside the file")
            # BitsPerSample holds one value per sample; the widest bounds the decoder's buffers.
            fields[tag] = max(struct.unpack_from(f"{order}{values}{code}", data, at))
    if 256 not in fields or 257 not in fields:
        raise _HeaderError("TIFF first directory has no ImageWidth/ImageLength")
    bits, samples = fields.get(258, 1), fields.get(277, 1)
    if bits > MAX_TIFF_BITS_PER_SAMPLE or samples > MAX_TIFF_SAMPLES_PER_PIXEL:
        raise _HeaderError(f"TIFF has {samples} samples of {bits} bits per pixel (at most "
                           f"{MAX_TIFF_SAMPLES_PER_PIXEL} of {MAX_TIFF_BITS_PER_SAMPLE} bits are read)")
    return ImageHeader("TIFF", fields[256], fields[257])


def _bmp_header(data: bytes) -> ImageHeader:
    if len(data) < 26:
        raise _HeaderError("BMP is too short to hold a header")
    (info_size,) = struct.unpack_from("<I", data, 14)
    if info_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack_from("<HH", data, 18)
    elif info_size >= 40:
        width, height = struct.unpack_from("<ii", data, 18)
    else:
        raise _HeaderError(f"BMP has an unknown info header of {info_size} bytes")
    return ImageHeader("BMP", abs(width), abs(height))  # negative height: rows stored top-down


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\r\n]*[\r\n])*(\d{1,10})")


def _pnm_header(data: bytes) -> ImageHeader:
    """Width and height: the two numbers after the magic, with whitespace and comments between."""
    position, numbers = 2, []
    for _ in range(2):
        match = _PNM_TOKEN.match(data, position, min(len(data), position + 4096))
        if not match:
            raise _HeaderError("PNM header has no width and height")
        numbers.append(int(match.group(1)))
        position = match.end()
    return ImageHeader("PNM", numbers[0], numbers[1])


def _format_of(data: bytes):
    """The header reader for `data`, chosen by the same signatures OpenCV's decoders match; None if none."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_header
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_header
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_header
    if data[:2] == b"BM":
        return _bmp_header
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return _pnm_header
    return None


def read_image_header(data: bytes, name: str = "image") -> ImageHeader:
    """Format and size of an encoded image, or InputError when it is not one this SDK decodes."""
    reader = _format_of(data)
    if reader is None:
        raise InputError(f"{name}: not a readable image (not {SUPPORTED_FORMATS})")
    try:
        header = reader(data)
    except (_HeaderError, struct.error, IndexError) as exc:
        raise InputError(f"{name}: not a readable image ({exc})") from None
    if header.width == 0 or header.height == 0:
        raise InputError(f"{name}: {header.format} header gives an empty {header.width}x{header.height} image")
    return header


def decode_image(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> uint8 BGR; the size is checked from the header before decoding, so memory is bounded."""
    if not data:
        raise InputError(f"{name}: file is empty")
    header = read_image_header(data, name)
    flags = _DECODE_FLAGS
    if header.pixels > max_pixels:
        size = f"{header.width}x{header.height} {header.format}"
        if not header.reducible:
            raise InputError(f"{name}: {size} image is above the {max_pixels / 1e6:g} MP limit")
        if header.pixels > max(MAX_JPEG_SOURCE_PIXELS, max_pixels) or header.pixels / 64 > max_pixels:
            limit = min(max(MAX_JPEG_SOURCE_PIXELS, max_pixels), 64 * max_pixels)
            raise InputError(f"{name}: {size} image is above the {limit / 1e6:g} MP limit "
                             "for JPEGs decoded at reduced scale")
        # A sequential JPEG decodes natively at 1/2, 1/4 or 1/8 scale, so memory stays bounded.
        factor = next(f for f in (2, 4, 8) if header.pixels / f**2 <= max_pixels)
        flags = _REDUCED_FLAGS[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:
        raise InputError(f"{name}: cannot decode the {header.format} image ({_first_line(exc)})") from None
    if image is None:
        raise InputError(f"{name}: not a readable image (corrupt {header.format} data)")
    if image.shape[0] * image.shape[1] > max_pixels:  # the decoder disagreed with the header
        raise InputError(f"{name}: {image.shape[1]}x{image.shape[0]} image is above the {max_pixels / 1e6:g} MP limit")
    return as_bgr_uint8(image)


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def read_file_bounded(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes`, or InputError.

    Opened non-blocking and checked with fstat on the open descriptor, so a FIFO, a device such as
    /dev/zero or a file swapped in after a check is refused instead of hanging or filling memory; a file
    growing while it is read is cut at `max_bytes` + 1 and refused.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open {what} ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: not a regular file (a {_file_kind(info.st_mode)}); refusing to read it")
        if info.st_size > max_bytes:
            raise InputError(f"{path}: {what} is {info.st_size} bytes, larger than the {max_bytes >> 20} MiB limit")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"{path}: {what} grew past the {max_bytes >> 20} MiB limit while being read")
    return data


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    data = read_file_bounded(path, MAX_FILE_BYTES, "image file")
    return decode_image(data, str(path), max_pixels)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def iter_video(source: str | int, every: int = 1, max_frames: int = 300) -> Iterator[np.ndarray]:
    """Frames from a video file or a camera index, every `every`-th frame, at most `max_frames`."""
    capture = cv2.VideoCapture(source)
    what = f"camera {source}" if isinstance(source, int) else f"{source}"
    if not capture.isOpened():
        raise InputError(f"{what}: cannot open video source")
    try:
        # Every frame is allocated at the stream's size, so a crafted stream is refused before the first.
        width, height = (int(capture.get(prop)) for prop in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > MAX_PIXELS:
            raise InputError(f"{what}: {width}x{height} video frames are above the {MAX_PIXELS / 1e6:g} MP limit")
        index, produced = 0, 0
        while produced < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if index % every == 0:
                produced += 1
                yield as_bgr_uint8(frame)
            index += 1
    finally:
        capture.release()


def expand_sources(sources: list[str]) -> list[str | int | Path]:
    """CLI inputs -> image paths, video paths and camera indices (a folder expands to its images)."""
    expanded: list[str | int | Path] = []
    for source in sources:
        if source.isdigit() and not Path(source).exists():
            expanded.append(int(source))
            continue
        path = Path(source)
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise InputError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            expanded.extend(images)
        elif path.is_file():
            expanded.append(path)
        elif path.exists():
            raise InputError(f"{path}: not a regular file, folder or camera index")
        else:
            raise InputError(f"{path}: no such file, folder or camera index")
    return expanded


def iter_frames(source: str | int | Path, video_every: int = 5, video_max_frames: int = 60) -> Iterator[tuple[str, np.ndarray]]:
    """(label, frame) pairs for one expanded source: an image gives one frame, a video or camera several."""
    if isinstance(source, int):
        for k, frame in enumerate(iter_video(source, video_every, video_max_frames)):
            yield f"camera{source}#{k}", frame
    elif Path(source).suffix.lower() in VIDEO_SUFFIXES:
        for k, frame in enumerate(iter_video(str(source), video_every, video_max_frames)):
            yield f"{source}#{k}", frame
    else:
        yield str(source), load_image(source)
