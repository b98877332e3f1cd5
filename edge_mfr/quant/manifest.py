"""The INT8 calibration manifest: which real face crops calibrate a quantized model, pinned by hash.

A manifest (written by `calibration/make_manifest.py`, format in `calibration/README.md`) lists images
by path relative to a data root, with each file's SHA-256, the five landmarks of the face in it, and
the synthetic mask (type and seed) drawn on it, if any. Quantizing from a manifest is therefore
reproducible: the same manifest over the same files gives the same calibration tensors, and a changed
or missing file is reported instead of silently calibrating on something else.

Photos with detected landmarks serve every package: each is aligned to the package's own template and
size. A pre-aligned crop (landmarks_from "arcface_template_112": a 112x112 ArcFace crop such as glint24's)
serves only a package that takes exactly that crop; any other input size or template would calibrate on
a resampled crop, unlike anything the deployed path produces, so `check_geometry` refuses it.

Only the training pool (glint24, celeba299, the `train` split of celeba_test) may appear in a manifest,
and no identity of the test sets: `check_identities` refuses an entry whose identity is an LFW name or a
celeba_test `calib` identity, at selection time (calibration/make_manifest.py) and again before every
quantization, against the identity lists found under the data root.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models.package import file_sha256

MANIFEST_FORMAT = "edge-mfr-calibration/1"
TRAINING_POOL = ("glint24", "celeba299", "celeba_test")
LANDMARK_SOURCES = ("arcface_template_112", "mtcnn")
# celeba_test images are training data only in this split; its other split, "calib", is held out.
CELEBA_TEST_TRAIN_SPLIT = "train"
CELEBA_TEST_HELD_OUT_SPLIT = "calib"
# Where the repository keeps the manifest it ships (absent in an installed wheel: pass a path instead).
REPO_MANIFEST = Path(__file__).resolve().parents[2] / "calibration" / "manifest.json"
PREALIGNED_SIZE = (112, 112)  # the crop size of entries whose landmarks are the ArcFace 112 template
TEMPLATE_TOLERANCE_PX = 0.5  # a package template this close to the crop's landmarks needs no resampling
MISSING_LISTED = 5  # how many offending files an error message names before summarising the rest


def default_data_root() -> Path:
    """EDGE_MFR_DATA, else ../shared/data beside the repository (the project's convention)."""
    return Path(os.environ.get("EDGE_MFR_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def celeba_test_splits(data_root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(file name -> split, identity label -> split) from celeba_test/identities.txt; empty when absent."""
    listing = Path(data_root) / "celeba_test" / "identities.txt"
    by_file, by_identity = {}, {}
    if listing.is_file():
        for line in listing.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == 3:
                by_file[parts[0]] = parts[2]
                by_identity[parts[1]] = parts[2]
    return by_file, by_identity


@dataclass(frozen=True)
class TestIdentities:
    """Identity labels no calibration face may carry, and where they were read."""

    lfw_names: frozenset[str]
    celeba_calib_ids: frozenset[str]
    sources: tuple[str, ...]


def test_identities(data_root: str | Path) -> TestIdentities:
    """LFW person names (lfw/images folders, lfw/pairs.txt and glint24/LFW_OVERLAP.txt) and the celeba_test
    `calib` identity ids, read from the data root.

    Raises InputError when neither LFW list nor the celeba_test list is there: an overlap that cannot be
    checked is not assumed absent.
    """
    root = Path(data_root)
    names: set[str] = set()
    sources = []
    lfw_images = root / "lfw" / "images"
    if lfw_images.is_dir():
        names.update(p.name for p in lfw_images.iterdir() if p.is_dir())
        sources.append(str(lfw_images))
    pairs = root / "lfw" / "pairs.txt"
    if pairs.is_file():
        for line in pairs.read_text(encoding="utf-8").splitlines():
            tokens = line.split()
            names.update(t for t in tokens if not t.isdigit())
        sources.append(str(pairs))
    overlap = root / "glint24" / "LFW_OVERLAP.txt"
    if overlap.is_file():
        names.update(line.strip() for line in overlap.read_text(encoding="utf-8").splitlines() if line.strip())
        sources.append(str(overlap))
    _, celeba_split = celeba_test_splits(root)
    calib_ids = {label for label, split in celeba_split.items() if split == CELEBA_TEST_HELD_OUT_SPLIT}
    if calib_ids:
        sources.append(str(root / "celeba_test" / "identities.txt"))
    if not names or not calib_ids:
        missing = [what for what, found in (("LFW names (lfw/images, lfw/pairs.txt or glint24/LFW_OVERLAP.txt)",
                                             names), ("celeba_test/identities.txt", calib_ids)) if not found]
        raise InputError(f"cannot check the calibration set against the test identities: {' and '.join(missing)} "
                         f"not found under {root}")
    return TestIdentities(frozenset(names), frozenset(calib_ids), tuple(sources))


@dataclass(frozen=True)
class CalibrationEntry:
    path: str  # relative to the data root, forward slashes
    sha256: str
    identity: str  # "<source>/<label>", unique across sources
    landmarks: np.ndarray  # (5, 2) float64, pixel coordinates in the file's image
    landmarks_from: str  # one of LANDMARK_SOURCES
    mask_type: str | None  # None: the crop is used unmasked
    mask_seed: int | None

    @property
    def source(self) -> str:
        return self.path.split("/", 1)[0]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "identity": self.identity,
            "landmarks": np.round(self.landmarks, 3).tolist(),
            "landmarks_from": self.landmarks_from,
            "mask_type": self.mask_type,
            "mask_seed": self.mask_seed,
        }

    @classmethod
    def from_dict(cls, item: dict, where: str) -> "CalibrationEntry":
        try:
            entry = cls(
                path=str(item["path"]),
                sha256=str(item["sha256"]),
                identity=str(item["identity"]),
                landmarks=np.asarray(item["landmarks"], np.float64),
                landmarks_from=str(item["landmarks_from"]),
                mask_type=item["mask_type"],
                mask_seed=None if item["mask_seed"] is None else int(item["mask_seed"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: malformed entry ({type(exc).__name__}: {exc})") from None
        if entry.source not in TRAINING_POOL or ".." in entry.path.split("/"):
            raise InputError(f"{where}: {entry.path!r} is not under the training pool ({', '.join(TRAINING_POOL)}); "
                             "calibration never uses evaluation data such as LFW")
        if entry.landmarks.shape != (5, 2) or not np.all(np.isfinite(entry.landmarks)):
            raise InputError(f"{where}: landmarks must be 5 finite (x, y) points")
        if entry.landmarks_from not in LANDMARK_SOURCES:
            raise InputError(f"{where}: landmarks_from must be one of {LANDMARK_SOURCES}, got {entry.landmarks_from!r}")
        if (entry.mask_type is None) != (entry.mask_seed is None):
            raise InputError(f"{where}: mask_type and mask_seed must both be set or both be null")
        return entry


@dataclass(frozen=True)
class CalibrationManifest:
    path: Path
    sha256: str  # of the manifest file's bytes: what a quantized package's recipe records
    selection: dict
    entries: tuple[CalibrationEntry, ...]

    def check_geometry(self, package) -> None:
        """Refuse a package that pre-aligned crops in the manifest do not fit without resampling."""
        prealigned = [e for e in self.entries if e.landmarks_from == "arcface_template_112"]
        if not prealigned:
            return
        h, w = package.input_size
        ph, pw = PREALIGNED_SIZE
        where = (f"calibration manifest {self.path} holds {len(prealigned)} pre-aligned {ph}x{pw} ArcFace crops "
                 f"(e.g. {prealigned[0].path})")
        remedy = ("calibrate it on a manifest of detected photos (calibration/make_manifest.py without "
                  "--sources glint24)")
        if (h, w) != PREALIGNED_SIZE:
            raise InputError(f"{where}, but model {package.name!r} takes {h}x{w} input: the crops would be "
                             f"resampled, unlike any face the deployed path feeds it; {remedy}")
        offset = float(np.abs(np.asarray(package.template, np.float64) - prealigned[0].landmarks).max())
        if offset > TEMPLATE_TOLERANCE_PX:
            raise InputError(f"{where}, but model {package.name!r} aligns faces to another template (up to "
                             f"{offset:.1f} px away): the crops would be re-warped; {remedy}")

    def check_identities(self, data_root: str | Path | None = None) -> TestIdentities:
        """Raise InputError naming every entry whose identity is a test identity (an LFW name, a celeba_test
        `calib` id) or whose celeba_test image is not in the training split."""
        root = Path(data_root) if data_root is not None else default_data_root()
        test = test_identities(root)
        file_split, _ = celeba_test_splits(root)
        problems = []
        for entry in self.entries:
            label = entry.identity.split("/", 1)[-1]
            if label in test.lfw_names:
                problems.append(f"{entry.path} ({entry.identity} is an LFW identity)")
            elif label in test.celeba_calib_ids:
                problems.append(f"{entry.path} ({entry.identity} is a celeba_test calib identity)")
            elif entry.source == "celeba_test" and file_split.get(Path(entry.path).name) != CELEBA_TEST_TRAIN_SPLIT:
                problems.append(f"{entry.path} (not in celeba_test's {CELEBA_TEST_TRAIN_SPLIT} split)")
        if problems:
            named = "; ".join(problems[:MISSING_LISTED])
            more = f" and {len(problems) - MISSING_LISTED} more" if len(problems) > MISSING_LISTED else ""
            raise InputError(f"calibration manifest {self.path} overlaps the test identities in {len(problems)} "
                             f"entries: {named}{more}; calibration must come from training identities only")
        return test

    @property
    def masked_count(self) -> int:
        return sum(entry.mask_type is not None for entry in self.entries)

    def check_files(self, data_root: str | Path | None = None) -> Path:
        """Raise InputError naming every missing or modified file; return the data root used."""
        root = Path(data_root) if data_root is not None else default_data_root()
        if not root.is_dir():
            raise InputError(f"calibration data root {root} does not exist (pass --data-root or set EDGE_MFR_DATA)")
        missing, modified = [], []
        for entry in self.entries:
            file = root / entry.path
            if not file.is_file():
                missing.append(entry.path)
            elif file_sha256(file) != entry.sha256:
                modified.append(entry.path)
        problems = []
        for label, paths in (("missing", missing), ("modified (sha256 differs from the manifest)", modified)):
            if paths:
                named = ", ".join(paths[:MISSING_LISTED])
                more = f" and {len(paths) - MISSING_LISTED} more" if len(paths) > MISSING_LISTED else ""
                problems.append(f"{len(paths)} {label}: {named}{more}")
        if problems:
            raise InputError(f"calibration manifest {self.path} does not match the files under {root}: "
                             + "; ".join(problems))
        return root


def load_manifest(path: str | Path | None = None) -> CalibrationManifest:
    """Read and validate a manifest (default: the repository's calibration/manifest.json)."""
    path = Path(path) if path is not None else REPO_MANIFEST
    if not path.is_file():
        raise InputError(f"calibration manifest {path} not found; make one with calibration/make_manifest.py")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: not a calibration manifest (format must be {MANIFEST_FORMAT!r}; "
                         "make one with calibration/make_manifest.py)")
    items = data.get("entries")
    if not isinstance(items, list) or not items:
        raise InputError(f"{path}: manifest has no entries")
    entries = tuple(CalibrationEntry.from_dict(item, f"{path} entry {i}") for i, item in enumerate(items))
    return CalibrationManifest(path=path, sha256=hashlib.sha256(raw).hexdigest(),
                               selection=dict(data.get("selection", {})), entries=entries)


def write_manifest(path: str | Path, entries: list[CalibrationEntry], selection: dict) -> CalibrationManifest:
    """Write a manifest (stable key order, so the same selection always hashes the same)."""
    path = Path(path)
    data = {"format": MANIFEST_FORMAT, "selection": selection, "entries": [e.to_dict() for e in entries]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return load_manifest(path)


def read_entry_image(entry: CalibrationEntry, data_root: Path) -> np.ndarray:
    """The entry's image as BGR uint8, with its synthetic mask drawn on when the entry has one."""
    import cv2

    image = cv2.imread(str(data_root / entry.path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"{data_root / entry.path}: not a readable image")
    if entry.mask_type is None:
        return image
    from ..masks import apply_mask

    return apply_mask(image, entry.landmarks, entry.mask_type, entry.mask_seed)


def calibration_faces(manifest: CalibrationManifest, package, data_root: str | Path | None = None,
                      limit: int | None = None) -> np.ndarray:
    """The manifest's faces as the package's network input: float32 (N, 3, h, w).

    Every image is checked against its hash, every identity against the test sets, and pre-aligned crops
    must fit the package's input exactly (check_geometry); each face is then masked as recorded and aligned
    with the package's own template, size, channel order and mean/std, as the unlock path feeds the model.
    limit: use only the first `limit` entries (the manifest's order is already a seeded shuffle).
    """
    from ..align import align_faces

    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of faces, got {limit}")
    root = manifest.check_files(data_root)
    manifest.check_identities(root)
    manifest.check_geometry(package)
    entries = manifest.entries[:limit]  # limit None: all of them
    faces = [
        align_faces(read_entry_image(entry, root), entry.landmarks, template=package.template,
                    size=package.input_size, channel_order=package.channel_order, mean=package.mean,
                    std=package.std)[0]
        for entry in entries
    ]
    return np.ascontiguousarray(np.stack(faces), dtype=np.float32)
