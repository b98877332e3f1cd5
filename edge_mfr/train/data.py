"""The training pool: every face aligned once, compressed, with the teacher's clean templates and a bank of
precomputed mask layers, in one archive small enough to move to a GPU machine.

`prepare_pool` walks the allowed sources, detects the face (MTCNN, whose landmarks the dlib-chip template was
fitted to), warps it to the dlib chip framing at `crop_size` (the teacher's own framing; students use the same
crops, resized), stores it as WebP, and caches the teacher's raw descriptors of the decoded clean crop and of its
mirror image, computed from exactly the pixels training will see. Images that are missing, unreadable or without
a detected face are skipped and counted. A mirrored view is the mirrored crop as it is (no re-alignment): its
target is the teacher's descriptor of exactly that mirrored crop. Masks are not drawn per face: `mask_layers`
paints a few hundred masks (all types, colours, textures, placement jitter) once, and training composites them
per batch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge_mfr.errors import InputError
from edge_mfr.models.teacher import DLIB_CHIP_TEMPLATE_150

POOL_FORMAT = "edge-mfr-train-pool/2"
# Folder -> split of identities.txt allowed for training (None: the whole folder). LFW is evaluation data, and
# celeba_test's `calib` split is for thresholds and model selection: neither is ever here.
TRAINING_SOURCES: dict[str, str | None] = {"celeba299": None, "glint24": None, "celeba_test": "train"}
WEBP_QUALITY = 85  # 112 px chips: ~1.8 kB each, teacher cosine to the uncompressed chip 0.998 (mean)


def chip_template(size: int) -> np.ndarray:
    return DLIB_CHIP_TEMPLATE_150 * (size / 150.0)


def train_data_terms(sources) -> list[dict]:
    """The `recipe["train_data"]` entries of a package trained on `sources` (read by `edge-mfr calibrate`)."""
    return [{"name": source, "split": TRAINING_SOURCES[source]} for source in sources]


@dataclass
class SkipCounts:
    missing: int = 0
    unreadable: int = 0
    no_face: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, file: Path) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {file}")

    def as_dict(self) -> dict:
        return {"missing": self.missing, "unreadable": self.unreadable, "no_face": self.no_face,
                "examples": self.examples}


def _celeba_items(root: Path, split: str | None, max_per_identity: int | None, max_identities: int | None):
    listing = root / "identities.txt"
    if not listing.is_file():
        raise InputError(f"{listing} not found: a CelebA source needs its identities.txt")
    per_identity: dict[str, list[Path]] = {}
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or (split is not None and len(parts) < 3):
            raise InputError(f"{listing}:{number}: expected 'file identity{' split' if split else ''}', got {line!r}")
        if split is not None and parts[2] != split:
            continue
        per_identity.setdefault(parts[1], []).append(root / "images" / parts[0])
    for identity in sorted(per_identity, key=lambda i: (len(i), i))[:max_identities]:
        for file in per_identity[identity][:max_per_identity]:
            yield identity, file


def _folder_items(root: Path, max_per_identity: int | None, max_identities: int | None):
    for folder in sorted(p for p in root.iterdir() if p.is_dir())[:max_identities]:
        files = sorted(folder.glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))[:max_per_identity]
        for file in files:
            yield folder.name, file


def source_items(data_dir: Path, source: str, max_per_identity: int | None = None,
                 max_identities: int | None = None):
    """(identity, file) of one allowed training source, in a fixed order."""
    if source not in TRAINING_SOURCES:
        raise InputError(f"{source!r} is not training data; allowed: {', '.join(TRAINING_SOURCES)} "
                         "(LFW and celeba_test calib are evaluation data)")
    root = Path(data_dir) / source
    if not root.is_dir():
        raise InputError(f"training source {root} not found")
    if source == "glint24":
        return list(_folder_items(root, max_per_identity, max_identities))
    return list(_celeba_items(root, TRAINING_SOURCES[source], max_per_identity, max_identities))


def mirror_crops(crops: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(crops[..., ::-1, :])


def mask_layers(count: int, size: int, seed: int, jitter: float = 0.05):
    """`count` mask layers over all mask types in turn: (colour (n, s, s, 3) uint8 premultiplied BGR,
    alpha (n, s, s) uint8, lit (n,) bool, types (n,) str)."""
    from edge_mfr.masks import MASK_TYPES
    from edge_mfr.masks.apply import render_mask_layer

    rng = np.random.default_rng(seed)
    colours, alphas, lit, types = [], [], [], []
    for index in range(count):
        mask_type = MASK_TYPES[index % len(MASK_TYPES)]
        layer, is_lit = render_mask_layer(mask_type, rng, (size, size), chip_template(size), jitter=jitter)
        colours.append(np.clip(np.rint(layer[..., :3]), 0, 255).astype(np.uint8))
        alphas.append(np.clip(np.rint(layer[..., 3] * 255), 0, 255).astype(np.uint8))
        lit.append(is_lit)
        types.append(mask_type)
    return np.stack(colours), np.stack(alphas), np.array(lit), np.array(types)


@dataclass
class TrainingPool:
    blobs: np.ndarray  # (total,) uint8: the WebP files back to back
    offsets: np.ndarray  # (N + 1,) int64
    teacher: np.ndarray  # (N, D) float32 raw teacher descriptors of the clean crop
    teacher_flipped: np.ndarray  # (N, D) the same for the mirrored crop
    labels: np.ndarray  # (N,) int64 index into identities
    identities: list[str]  # "<source>/<identity>"
    files: list[str]  # "<source>/<relative path>"
    mask_colour: np.ndarray
    mask_alpha: np.ndarray
    mask_lit: np.ndarray
    mask_types: np.ndarray
    meta: dict  # crop_size, sources, teacher fingerprint and layout, skip counts

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def crop_size(self) -> int:
        return int(self.meta["crop_size"])

    def sources(self) -> np.ndarray:
        return np.array([self.identities[label].split("/", 1)[0] for label in self.labels])

    def decode(self, rows=None) -> np.ndarray:
        """uint8 BGR crops (n, s, s, 3)."""
        from concurrent.futures import ThreadPoolExecutor

        rows = range(len(self)) if rows is None else rows

        def one(row: int):
            return cv2.imdecode(self.blobs[self.offsets[row]:self.offsets[row + 1]], cv2.IMREAD_COLOR)

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as workers:  # imdecode releases the GIL
            out = list(workers.map(one, rows, chunksize=256))
        if any(crop is None for crop in out):
            raise InputError("training pool holds a crop that does not decode: rebuild it")
        return np.stack(out)

    @property
    def has_templates(self) -> bool:
        return self.teacher.shape[0] == len(self) and len(self) > 0

    @property
    def has_mirrored_templates(self) -> bool:
        return self.teacher_flipped.shape[0] == len(self) and len(self) > 0

    def subset(self, rows) -> "TrainingPool":
        """The pool restricted to `rows` (same identities list, masks and meta; templates kept where present)."""
        rows = np.asarray(rows)
        blobs = [self.blobs[self.offsets[r]:self.offsets[r + 1]] for r in rows]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)

        def pick(array):
            return array[rows] if array.shape[0] == len(self) else array

        meta = dict(self.meta, subset_of_faces=len(self))
        return TrainingPool(np.concatenate(blobs), offsets, pick(self.teacher), pick(self.teacher_flipped),
                            self.labels[rows], self.identities, [self.files[r] for r in rows], self.mask_colour,
                            self.mask_alpha, self.mask_lit, self.mask_types, meta)

    def add_teacher_templates(self, device: str = "cpu", batch_size: int = 256, mirrored: bool = True) -> None:
        """Cache the teacher's raw descriptors of every clean crop and (`mirrored`) of its mirror image (the
        bundled teacher, checked against the fingerprint the pool was made for)."""
        import torch

        from edge_mfr.train.teacher import TeacherNet, bundled_teacher_network

        layout = self.meta["teacher_layout"]
        teacher = TeacherNet(bundled_teacher_network(layout, self.meta["teacher_fingerprint"]), layout, device)
        clean, flipped = [], []
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False  # templates in full float32 on any device
        try:
            for start in range(0, len(self), batch_size):
                crops = self.decode(range(start, min(len(self), start + batch_size)))
                clean.append(teacher.embed_crops(crops, batch_size))
                if mirrored:
                    flipped.append(teacher.embed_crops(mirror_crops(crops), batch_size))
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        self.teacher = np.concatenate(clean)
        self.teacher_flipped = np.concatenate(flipped) if mirrored else np.empty((0, self.teacher.shape[1]), np.float32)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        # compressed: the mask layers are mostly empty (the WebP crops stay as they are)
        np.savez_compressed(tmp, format=POOL_FORMAT, blobs=self.blobs, offsets=self.offsets, teacher=self.teacher,
                 teacher_flipped=self.teacher_flipped, labels=self.labels, identities=np.array(self.identities),
                 files=np.array(self.files), mask_colour=self.mask_colour, mask_alpha=self.mask_alpha,
                 mask_lit=self.mask_lit, mask_types=self.mask_types, meta=json.dumps(self.meta))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainingPool":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"training pool {path} not found; build it with `python -m edge_mfr.train prepare`")
        try:
            with np.load(path) as data:
                if "format" not in data or str(data["format"]) != POOL_FORMAT:
                    raise InputError(f"{path} is not a {POOL_FORMAT} file")
                pool = cls(blobs=data["blobs"], offsets=data["offsets"], teacher=data["teacher"],
                           teacher_flipped=data["teacher_flipped"], labels=data["labels"].astype(np.int64),
                           identities=[str(i) for i in data["identities"]], files=[str(f) for f in data["files"]],
                           mask_colour=data["mask_colour"], mask_alpha=data["mask_alpha"],
                           mask_lit=data["mask_lit"], mask_types=data["mask_types"],
                           meta=json.loads(str(data["meta"])))
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"training pool {path} is unreadable: {exc}") from None
        forbidden = sorted({s for s in pool.sources() if s not in TRAINING_SOURCES})
        if forbidden:
            raise InputError(f"{path} holds images from {forbidden}; training uses {list(TRAINING_SOURCES)} only")
        return pool


def prepare_pool(data_dir: str | Path, sources=("celeba299", "celeba_test"), crop_size: int = 112,
                 max_per_identity: int | None = None, max_identities: int | None = None, mask_count: int = 600,
                 seed: int = 0, threads: int = 1,
                 with_templates: bool = True, progress: bool = True) -> TrainingPool:
    """Detect, align, compress and embed every training image of `sources`; see the module docstring."""
    from tqdm import tqdm

    from edge_mfr import align
    from edge_mfr.detect import MTCNNDetector
    data_dir = Path(data_dir)
    template = chip_template(crop_size)
    detector = MTCNNDetector(threads=threads)
    skipped = SkipCounts()
    blobs, labels, files, identities = [], [], [], []
    identity_index: dict[str, int] = {}
    for source in sources:
        items = source_items(data_dir, source, max_per_identity, max_identities)
        for identity, file in tqdm(items, desc=f"aligning {source}", disable=not progress, mininterval=5):
            if not file.is_file():
                skipped.add("missing", file)
                continue
            image = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if image is None:
                skipped.add("unreadable", file)
                continue
            if source == "glint24":  # already aligned to the ArcFace 112 template: its landmarks are known
                landmarks = align.template_for_size(image.shape[:2])
            else:
                detection = detector.detect_largest(image)
                if detection is None:
                    skipped.add("no_face", file)
                    continue
                landmarks = detection.landmarks
            crop = align.warp_crops(image, landmarks[None], template=template, size=(crop_size, crop_size))[0]
            ok, encoded = cv2.imencode(".webp", crop, [cv2.IMWRITE_WEBP_QUALITY, WEBP_QUALITY])
            if not ok:
                raise InputError(f"WebP encoding failed for {file}")
            key = f"{source}/{identity}"
            if key not in identity_index:
                identity_index[key] = len(identities)
                identities.append(key)
            blobs.append(encoded.ravel())
            labels.append(identity_index[key])
            files.append(f"{source}/{file.relative_to(data_dir / source)}")
    if not blobs:
        raise InputError(f"no training faces found under {data_dir} for {list(sources)}")
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    mask_colour, mask_alpha, mask_lit, types = mask_layers(mask_count, crop_size, seed)
    from edge_mfr.models.dlib_format import load_dlib_face_resnet
    from edge_mfr.models.package import load_package
    from edge_mfr.models.teacher import TEACHER_NAME, default_dat_path
    from edge_mfr.train.teacher import layout_of

    teacher = load_package(TEACHER_NAME)
    meta = {"crop_size": crop_size, "template": template.tolist(), "sources": list(sources),
            "train_data": train_data_terms(sources), "max_per_identity": max_per_identity,
            "detector": "mtcnn", "webp_quality": WEBP_QUALITY, "skipped": skipped.as_dict(),
            "teacher_fingerprint": teacher.fingerprint,
            "teacher_layout": layout_of(load_dlib_face_resnet(default_dat_path())), "seed": seed}
    pool = TrainingPool(blobs=np.concatenate(blobs), offsets=offsets, teacher=np.empty((0, 0), np.float32),
                        teacher_flipped=np.empty((0, 0), np.float32), labels=np.asarray(labels, np.int64),
                        identities=identities, files=files, mask_colour=mask_colour, mask_alpha=mask_alpha,
                        mask_lit=mask_lit, mask_types=types, meta=meta)
    if with_templates:
        pool.add_teacher_templates()
    return pool
