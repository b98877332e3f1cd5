"""Pick the INT8 calibration set and write calibration/manifest.json (see calibration/README.md).

    python calibration/make_manifest.py [--data-root DIR] [--sources celeba299 celeba_test] [--count 256]
                                        [--per-identity 2] [--masked-fraction 0.5] [--seed 0]
                                        [--out calibration/manifest.json]

Identities are drawn uniformly (seeded) from the training pool only -- celeba299 and the `train` split of
celeba_test by default, glint24 on request -- after removing every test identity (LFW names, celeba_test
`calib` ids: edge_mfr.quant.manifest.test_identities); LFW images are never read. Each chosen identity
contributes `--per-identity` images, so no identity dominates the activation statistics. Photos get their
landmarks from the SDK's MTCNN detector (largest face of at least MIN_FACE_PX), the detector the unlock
path uses, so each quantized package sees them aligned to its own template and size; a photo where MTCNN
finds no such face is skipped for the identity's next one. glint24 files are pre-aligned 112x112 ArcFace
crops (landmarks = the template): they fit only 112x112 ArcFace packages, and 18 of its 24 identities are
LFW identities, hence not a default source. A seeded share of the entries gets a synthetic mask (types
spread evenly), because masked faces are half of what the model will see. The written manifest is checked
again (files, identities) before the script reports success.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from edge_mfr.align import ARCFACE_TEMPLATE_112  # noqa: E402
from edge_mfr.quant.manifest import (  # noqa: E402
    CELEBA_TEST_TRAIN_SPLIT,
    TRAINING_POOL,
    CalibrationEntry,
    default_data_root,
    file_sha256,
    test_identities,
    write_manifest,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "manifest.json"
# Smallest celeba299 face (MTCNN box side, pixels) worth calibrating on: the unlock path's quality gate
# rejects far smaller-looking faces than a phone camera produces, and upscaled tiny faces are mostly blur.
MIN_FACE_PX = 40
DEFAULT_SOURCES = ("celeba299", "celeba_test")


def training_identities(root: Path, sources=DEFAULT_SOURCES) -> tuple[dict[str, list[str]], list[str]]:
    """(identity ("<source>/<label>") -> sorted image paths relative to the data root, test identities left out).

    Only training-pool images: celeba_test contributes its train split only; any identity that is also a
    test identity (LFW name, celeba_test calib id) is left out and returned in the second list.
    """
    unknown = [s for s in sources if s not in TRAINING_POOL]
    if unknown:
        raise SystemExit(f"--sources {unknown} are not in the training pool {TRAINING_POOL}")
    test = test_identities(root)
    found: dict[str, list[str]] = {}
    if "glint24" in sources:
        for folder in sorted(p for p in (root / "glint24").iterdir() if p.is_dir()):
            found[f"glint24/{folder.name}"] = [f"glint24/{folder.name}/{f.name}" for f in folder.glob("*.jpg")]
    if "celeba299" in sources:
        for line in (root / "celeba299" / "identities.txt").read_text().splitlines():
            if line.strip():
                name, label = line.split()
                found.setdefault(f"celeba299/{label}", []).append(f"celeba299/images/{name}")
    if "celeba_test" in sources:
        for line in (root / "celeba_test" / "identities.txt").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == CELEBA_TEST_TRAIN_SPLIT:
                found.setdefault(f"celeba_test/{parts[1]}", []).append(f"celeba_test/images/{parts[0]}")
    excluded = sorted(identity for identity in found
                      if identity.split("/", 1)[1] in test.lfw_names | test.celeba_calib_ids)
    identities = {k: sorted(v) for k, v in sorted(found.items()) if k not in excluded}
    return identities, excluded


def face_landmarks(root: Path, rel_path: str, detector) -> tuple[np.ndarray, str] | None:
    if rel_path.startswith("glint24/"):
        return ARCFACE_TEMPLATE_112.copy(), "arcface_template_112"
    image = cv2.imread(str(root / rel_path), cv2.IMREAD_COLOR)
    face = detector.detect_largest(image) if image is not None else None
    return (face.landmarks, "mtcnn") if face is not None else None


def select(root: Path, count: int, per_identity: int, masked_fraction: float, seed: int,
           sources=DEFAULT_SOURCES) -> list[CalibrationEntry]:
    from edge_mfr.detect import MTCNNDetector
    from edge_mfr.masks import MASK_TYPES

    if count % per_identity:
        raise SystemExit(f"--count {count} must be a multiple of --per-identity {per_identity}")
    rng = np.random.default_rng(seed)
    identities, _ = training_identities(root, sources)
    names = list(identities)
    detector = MTCNNDetector(min_face_size=MIN_FACE_PX)
    chosen: list[tuple[str, str, np.ndarray, str]] = []
    for index in rng.permutation(len(names)):
        if len(chosen) == count:
            break
        identity = names[index]
        files = identities[identity]
        picked = []
        for file_index in rng.permutation(len(files)):
            found = face_landmarks(root, files[file_index], detector)
            if found is not None:
                picked.append((identity, files[file_index], *found))
            if len(picked) == per_identity:
                break
        if len(picked) == per_identity:  # an identity with too few detectable faces would unbalance the set
            chosen.extend(picked)
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} faces found for --count {count}")

    masked = set(rng.choice(count, size=round(count * masked_fraction), replace=False).tolist())
    # Even spread of mask types: cycle a shuffled list of all types over the masked entries.
    type_cycle = [MASK_TYPES[i] for i in rng.permutation(len(MASK_TYPES))]
    entries = []
    masked_so_far = 0
    for i, (identity, rel_path, landmarks, landmarks_from) in enumerate(chosen):
        mask_type = mask_seed = None
        if i in masked:
            mask_type = type_cycle[masked_so_far % len(type_cycle)]
            mask_seed = int(rng.integers(0, 2**31 - 1))
            masked_so_far += 1
        entries.append(CalibrationEntry(path=rel_path, sha256=file_sha256(root / rel_path), identity=identity,
                                        landmarks=np.asarray(landmarks, np.float64), landmarks_from=landmarks_from,
                                        mask_type=mask_type, mask_seed=mask_seed))
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES),
                        help=f"training-pool folders to draw from (of {', '.join(TRAINING_POOL)})")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--per-identity", type=int, default=2)
    parser.add_argument("--masked-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not 0.0 <= args.masked_fraction <= 1.0:
        parser.error("--masked-fraction must be in [0, 1]")

    entries = select(args.data_root, args.count, args.per_identity, args.masked_fraction, args.seed, args.sources)
    _, excluded = training_identities(args.data_root, args.sources)
    selection = {
        "tool": "calibration/make_manifest.py",
        "pool": list(args.sources),
        "celeba_test_split": CELEBA_TEST_TRAIN_SPLIT,
        "test_identities_excluded": excluded,
        "count": args.count,
        "per_identity": args.per_identity,
        "masked_fraction": args.masked_fraction,
        "seed": args.seed,
        "landmarks": "glint24: ArcFace 112 template (pre-aligned crops); "
                     f"photos: MTCNNDetector(min_face_size={MIN_FACE_PX}).detect_largest",
    }
    manifest = write_manifest(args.out, entries, selection)
    manifest.check_files(args.data_root)
    manifest.check_identities(args.data_root)
    sources = {s: sum(e.source == s for e in entries) for s in args.sources}
    print(f"wrote {manifest.path}: {len(entries)} faces of {len({e.identity for e in entries})} identities "
          f"({', '.join(f'{n} {s}' for s, n in sources.items())}), {manifest.masked_count} masked; "
          f"sha256 {manifest.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
