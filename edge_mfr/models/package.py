"""The one model package format every backend and the gallery read: NAME.onnx + NAME.json.

The sidecar holds what a runtime needs to feed the graph (input size, channel order, mean/std, the
alignment template) and what the SDK needs around it (embedding size, calibrated thresholds, recipe,
licence). Its `fingerprint` is the SHA-256 of the ONNX bytes: galleries bind to it, so templates from
one model are never compared with another model's.

A package may hold a second graph for the masked route, NAME.masked.onnx beside NAME.onnx (sidecar entry
`masked_network`): faces the quality gate judges masked (probes, and the masked copies enrollment synthesises)
are embedded by it, every other face by NAME.onnx. Both take the same input and give embeddings of the same
size in the same space; the fingerprint then covers both graphs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_atomically
from ..errors import ModelPackageError

FORMAT = "edge-mfr-model/1"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
# Preference order for the default model: the best bundled one first.
DEFAULT_PREFERENCE = ("dlib_resnet_v1_masked_route", "dlib_resnet_v1")
MASKED_NETWORK_SUFFIX = ".masked.onnx"  # the masked-route graph of a two-network package
REQUIRED_KEYS = ("format", "name", "architecture", "input", "alignment", "embedding_size", "fingerprint")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_fingerprint(onnx_path: Path, meta: dict) -> str:
    """SHA-256 of the graph; with probe-route maps (see `ModelPackage.route_map`) or a masked-route graph
    (`ModelPackage.masked_network`) or test-time flipping (`ModelPackage.test_time_flip`) or a masked-face alignment
    refiner (`ModelPackage.masked_alignment_refiner`), of the graph and those,
    since they shape the templates a gallery stores."""
    graph = file_sha256(onnx_path)
    refiner = meta.get("masked_alignment_refiner")
    if not meta.get("routes") and not meta.get("masked_network") and not meta.get("test_time_flip") and not refiner:
        return graph
    parts = [graph]
    if meta.get("test_time_flip"):
        parts.append("test_time_flip")
    if refiner:  # the templates of masked enrollment captures are embedded at the points it moved
        parts.append("masked_alignment_refiner:" + refiner["graph_sha256"])
    if meta.get("routes"):
        parts.append(json.dumps(meta["routes"], sort_keys=True, separators=(",", ":")))
    if meta.get("masked_network"):  # its graph's hash, checked against the file by _check_masked_network_file
        parts.append("masked_network:" + meta["masked_network"]["graph_sha256"])
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def masked_network_path(onnx_path: Path) -> Path:
    """Where the masked-route graph of the package NAME.onnx lives: NAME.masked.onnx beside it."""
    return onnx_path.with_name(onnx_path.stem + MASKED_NETWORK_SUFFIX)


def is_masked_network_graph(path: Path) -> bool:
    """A NAME.masked.onnx file is the second graph of the package NAME, not a package of its own."""
    return path.name.endswith(MASKED_NETWORK_SUFFIX)


def _write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomically(path, text.encode("utf-8"), mode=0o644)  # a package is meant to be readable


@dataclass(frozen=True)
class ModelPackage:
    onnx_path: Path
    meta: dict

    @property
    def sidecar_path(self) -> Path:
        return self.onnx_path.with_suffix(".json")

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def architecture(self) -> str:
        return self.meta["architecture"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.meta["input"]["size"]
        return int(h), int(w)

    @property
    def channel_order(self) -> str:
        return self.meta["input"]["channel_order"]

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.meta["input"]["mean"], np.float64)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(self.meta["input"]["std"], np.float64)

    @property
    def template(self) -> np.ndarray:
        return np.asarray(self.meta["alignment"]["template"], np.float64)

    @property
    def embedding_size(self) -> int:
        return int(self.meta["embedding_size"])

    @property
    def thresholds(self) -> dict[str, float]:
        """Calibrated cosine thresholds keyed by target FMR as a string, e.g. {"0.0001": 0.61}."""
        return {str(k): float(v) for k, v in self.meta.get("thresholds", {}).items()}

    def threshold_for(self, fmr: float, aggregation: str = "max", route: str = "all") -> float:
        """The calibrated threshold for a target FMR; never a guessed default.

        Thresholds calibrated on the unlock protocol are kept per template aggregation and per probe
        route ("masked"/"unmasked" as the quality gate judges the probe, or "all" for the stricter of
        the two); pair-level ones serve every aggregation and route.
        """
        by_aggregation = self.meta.get("thresholds_by_aggregation", {})
        table = by_aggregation.get(aggregation, {}).get(route, {}) if by_aggregation else self.thresholds
        for key, value in table.items():
            if np.isclose(float(key), fmr, rtol=1e-6, atol=0):
                return float(value)
        available = ", ".join(sorted(table, key=float)) or "none"
        raise ModelPackageError(
            f"model {self.name!r} has no calibrated threshold for FMR {fmr:g} ({aggregation} aggregation, "
            f"{route} probes)"
            f" (calibrated: {available}); run `edge-mfr calibrate` for it"
        )

    @property
    def aggregation(self) -> str:
        """How a user's template scores become one score unless the caller says otherwise: the aggregation its
        unlock calibration found best (sidecar `aggregation`), else max."""
        return str(self.meta.get("aggregation", "max"))

    def with_thresholds(self, thresholds: dict[float | str, float], calibration: dict,
                        by_aggregation: dict[str, dict[str, dict[str, float]]] | None = None,
                        aggregation: str | None = None) -> "ModelPackage":
        """Write calibrated thresholds (and, from an unlock calibration, the preferred `aggregation`) into the
        sidecar (the ONNX graph, and so the fingerprint, are unchanged)."""
        meta = dict(self.meta)
        meta.pop("aggregation", None)
        if aggregation is not None:
            meta["aggregation"] = aggregation
        meta["thresholds"] = {repr(float(k)) if not isinstance(k, str) else k: float(v) for k, v in thresholds.items()}
        meta["calibration"] = calibration
        meta.pop("thresholds_by_aggregation", None)
        if by_aggregation:
            meta["thresholds_by_aggregation"] = by_aggregation
        _write_json_atomic(self.sidecar_path, meta)
        return ModelPackage(self.onnx_path, meta)

    @property
    def test_time_flip(self) -> bool:
        """Whether every face is embedded together with its mirror image, the two embeddings averaged (sidecar
        `test_time_flip`; twice the network's work per face)."""
        return bool(self.meta.get("test_time_flip", False))

    def with_test_time_flip(self, enabled: bool) -> "ModelPackage":
        """Switch test-time flipping in the sidecar. The templates change, so the fingerprint does, and the
        thresholds and accuracy measured with the other setting are dropped: run `edge-mfr calibrate` again."""
        return self._with_embedding_setting("test_time_flip", True if enabled else None)

    def _with_embedding_setting(self, key: str, value) -> "ModelPackage":
        """The sidecar with `key` set to `value` (None: removed), rewritten. The setting changes how faces are
        embedded, so the fingerprint is recomputed and what was measured under the old one (thresholds, their
        calibration, recorded accuracy) is dropped."""
        stale = (key, "thresholds", "thresholds_by_aggregation", "calibration", "aggregation", "accuracy")
        meta = {k: v for k, v in self.meta.items() if k not in stale}
        if value is not None:
            meta[key] = value
        meta["fingerprint"] = package_fingerprint(self.onnx_path, meta)
        _write_json_atomic(self.sidecar_path, meta)
        return ModelPackage(self.onnx_path, meta)

    @property
    def masked_alignment_refiner(self) -> dict | None:
        """{"name", "graph_sha256"} of the bundled refiner that moves the points detected on a masked face to where
        its clean points would be before the masked route aligns it (edge_mfr.masked_alignment), or None."""
        return self.meta.get("masked_alignment_refiner") or None

    def with_masked_alignment_refiner(self, name: str | None) -> "ModelPackage":
        """Use the bundled refiner `name` for masked faces (None: none). Masked probes are aligned differently, so
        the fingerprint changes and the thresholds and accuracy measured before are dropped: calibrate again."""
        entry = None
        if name is not None:
            from edge_mfr.masked_alignment import bundled_refiner

            entry = {"name": name, "graph_sha256": file_sha256(bundled_refiner(name)[0])}
        return self._with_embedding_setting("masked_alignment_refiner", entry)

    def route_map(self, route: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(weight (D, D), bias (D,)) of the linear map applied to this route's L2-normalised embeddings, or None.

        A masked-route map moves the embedding of a masked face towards where the network puts the same face
        unmasked (fitted in closed form; edge_mfr.models.route_map); unmasked probes are never touched.
        """
        entry = (self.meta.get("routes") or {}).get(route)
        if entry is None:
            return None
        return np.asarray(entry["weight"], np.float32), np.asarray(entry["bias"], np.float32)

    def route_metric(self, route: str) -> np.ndarray | None:
        """Weight (D, D) with which a probe of this route and the templates it meets are compared
        (`match.scoring_space`; fitted by edge_mfr.models.route_metric), or None: plain cosine."""
        entry = (self.meta.get("scoring") or {}).get(route)
        return None if entry is None else np.asarray(entry["weight"], np.float32)

    def score_cohort(self, route: str) -> np.ndarray | None:
        """The score-normalisation cohort of a route (clean cohort faces; the masked route adds masked ones),
        or None (edge_mfr.models.route_metric.with_score_cohort)."""
        entry = (self.meta.get("scoring") or {}).get("cohort")
        if entry is None:
            return None
        parts = ["clean"] + (["masked"] if route == "masked" else [])
        return np.concatenate([decode_array(entry[part]) for part in parts]).astype(np.float32)

    def route_scoring(self, route: str):
        """How a probe of this route is compared with templates: its metric and, where the package has one, the
        score-normalisation cohort (`match.RouteScoring`)."""
        from ..match import RouteScoring

        entry = (self.meta.get("scoring") or {}).get("cohort") or {}
        return RouteScoring(self.route_metric(route), self.score_cohort(route), int(entry.get("top_k", 100)))

    @property
    def files(self) -> list[Path]:
        """Every file of the package (to copy or ship it): the graph, a masked-route graph, the sidecar."""
        return [self.onnx_path] + ([masked_network_path(self.onnx_path)] if self.has_masked_network else []) + \
            [self.sidecar_path]

    @property
    def masked_probe_templates(self) -> str:
        """Which of a user's templates a probe the quality gate judges masked meets (`match.route_rows`): "all", or
        "masked" (sidecar `matching.masked_probe_templates`), as measured best for this package."""
        return (self.meta.get("matching") or {}).get("masked_probe_templates", "all")

    @property
    def enrollment_mask_types(self) -> tuple[str, ...] | None:
        """The synthetic masks drawn at enrollment when its unlock thresholds were calibrated (more masked templates
        per user give impostors more chances), or None where the calibration does not say."""
        types = (self.meta.get("calibration") or {}).get("enrollment_mask_types")
        return None if types is None else tuple(types)

    @property
    def calibration_detector(self) -> str | None:
        """The detector whose points the unlock thresholds were calibrated with, or None where not recorded."""
        return (self.meta.get("calibration") or {}).get("detector")

    @property
    def has_masked_network(self) -> bool:
        return bool(self.meta.get("masked_network"))

    def masked_network(self) -> "ModelPackage | None":
        """The masked-route graph as a package of its own (same input, embedding size and alignment; named
        NAME.masked, fingerprinted by its graph), for a backend to run; None for a one-network package."""
        if not self.has_masked_network:
            return None
        meta = {k: v for k, v in self.meta.items() if k not in ("masked_network", "routes", "scoring")}
        return ModelPackage(masked_network_path(self.onnx_path), {
            **meta, "name": f"{self.name}.masked", "fingerprint": self.meta["masked_network"]["graph_sha256"]})

    def summary(self) -> dict:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "fingerprint": self.fingerprint[:12],
            "input_size": list(self.input_size),
            "embedding_size": self.embedding_size,
            "thresholds": self.thresholds,
            "path": str(self.onnx_path),
        }


def _validate_meta(meta: dict, where: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelPackageError(f"{where}: sidecar lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise ModelPackageError(f"{where}: unsupported package format {meta['format']!r} (expected {FORMAT!r})")
    inp = meta["input"]
    try:
        h, w = (int(v) for v in inp["size"])
        mean = np.asarray(inp["mean"], float)
        std = np.asarray(inp["std"], float)
        order = inp["channel_order"]
        template = np.asarray(meta["alignment"]["template"], float)
        embedding = int(meta["embedding_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelPackageError(f"{where}: malformed input/alignment metadata ({exc})") from None
    if not (h > 0 and w > 0) or mean.shape != (3,) or std.shape != (3,) or np.any(std == 0):
        raise ModelPackageError(f"{where}: input size must be positive and mean/std three non-zero numbers")
    if order not in ("RGB", "BGR"):
        raise ModelPackageError(f"{where}: channel_order must be RGB or BGR, got {order!r}")
    if template.shape != (5, 2) or not np.all(np.isfinite(template)):
        raise ModelPackageError(f"{where}: alignment template must be 5 finite (x, y) points")
    if embedding <= 0:
        raise ModelPackageError(f"{where}: embedding_size must be positive")
    masked = meta.get("masked_network")
    if masked is not None and not (isinstance(masked, dict) and isinstance(masked.get("graph_sha256"), str)):
        raise ModelPackageError(f"{where}: masked_network must be an object describing NAME{MASKED_NETWORK_SUFFIX} "
                                "with its graph_sha256")
    refiner = meta.get("masked_alignment_refiner")
    if refiner is not None and not (isinstance(refiner, dict) and isinstance(refiner.get("name"), str)
                                    and isinstance(refiner.get("graph_sha256"), str)):
        raise ModelPackageError(f"{where}: masked_alignment_refiner must be an object with the name and graph_sha256 "
                                "of a bundled refiner")
    matching = meta.get("matching", {})
    rule = matching.get("masked_probe_templates", "all") if isinstance(matching, dict) else None
    if rule not in ("all", "masked"):  # match.MASKED_PROBE_TEMPLATES (match imports nothing from here)
        raise ModelPackageError(f"{where}: matching must be an object whose masked_probe_templates is 'all' or "
                                f"'masked', got {matching!r}")
    for route, entry in (meta.get("scoring") or {}).items():
        if route == "cohort":
            _validate_cohort(entry, embedding, where)
            continue
        try:
            weight = np.asarray(entry["weight"], float)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelPackageError(f"{where}: malformed scoring metric for route {route!r} ({exc})") from None
        if weight.shape != (embedding, embedding) or not np.all(np.isfinite(weight)):
            raise ModelPackageError(f"{where}: the scoring metric of route {route!r} must be a finite "
                                    f"{embedding}x{embedding} matrix, got shape {weight.shape}")


def encode_array(values: np.ndarray) -> dict:
    """A float16 matrix as JSON: base64 of its little-endian bytes and its shape."""
    values = np.ascontiguousarray(values, dtype="<f2")
    return {"float16_base64": base64.b64encode(values.tobytes()).decode("ascii"), "shape": list(values.shape)}


def decode_array(entry: dict) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(entry["float16_base64"], validate=True), dtype="<f2")
    return values.reshape([int(n) for n in entry["shape"]])


def _validate_cohort(entry: dict, embedding: int, where: Path) -> None:
    try:
        parts = {part: decode_array(entry[part]) for part in ("clean", "masked")}
        top_k = int(entry["top_k"])
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ModelPackageError(f"{where}: malformed score-normalisation cohort ({exc})") from None
    for part, values in parts.items():
        if values.ndim != 2 or values.shape[1] != embedding or len(values) <= top_k \
                or not np.all(np.isfinite(values)):
            raise ModelPackageError(f"{where}: the {part} score-normalisation cohort must be finite (N, "
                                    f"{embedding}) embeddings with N > top_k = {top_k}, got shape {values.shape}")


def _check_graph(onnx_path: Path, meta: dict) -> None:
    """The graph must take (N, 3, h, w) float input and give (N, D) with the sidecar's h, w, D."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a corrupt graph
        raise ModelPackageError(f"{onnx_path}: not a loadable ONNX graph ({exc})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelPackageError(f"{onnx_path}: expected one input, graph has {len(inputs)}")
    shape = inputs[0].shape
    h, w = meta["input"]["size"]
    if len(shape) != 4 or shape[1] != 3 or shape[2] != h or shape[3] != w:
        raise ModelPackageError(f"{onnx_path}: graph input shape {shape} does not match the sidecar's (N, 3, {h}, {w})")
    out_shape = outputs[0].shape
    if len(out_shape) != 2 or out_shape[1] != meta["embedding_size"]:
        raise ModelPackageError(
            f"{onnx_path}: graph output shape {out_shape} does not match embedding_size {meta['embedding_size']}"
        )


def _check_masked_network_file(onnx_path: Path, meta: dict) -> None:
    """The masked-route graph the sidecar names is beside the package and hashes to its `graph_sha256` (which
    the fingerprint covers), so it is hashed once per load."""
    if not meta.get("masked_network"):
        return
    path = masked_network_path(onnx_path)
    if not path.is_file():
        raise ModelPackageError(f"{onnx_path}: the sidecar names a masked-route graph, but {path.name} is not beside it")
    expected, actual = meta["masked_network"]["graph_sha256"], file_sha256(path)
    if actual != expected:
        raise ModelPackageError(f"{onnx_path.with_suffix('.json')}: sidecar does not match its graphs ({path.name} "
                                f"hashes to {actual[:12]}, the sidecar says {expected[:12]}); re-export the package")


def _check_graphs(onnx_path: Path, meta: dict) -> None:
    _check_graph(onnx_path, meta)
    if meta.get("masked_network"):
        _check_graph(masked_network_path(onnx_path), meta)


def save_package(onnx_path: str | Path, meta: dict) -> ModelPackage:
    """Write the sidecar for an ONNX graph (and its masked-route graph, where `meta` names one), filling `format`
    and `fingerprint`, after checking they agree."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ModelPackageError(f"{onnx_path}: ONNX file not found")
    if is_masked_network_graph(onnx_path):
        raise ModelPackageError(f"{onnx_path}: names ending in {MASKED_NETWORK_SUFFIX} are kept for the masked-route "
                                "graph of a two-network package")
    meta = {"thresholds": {}, "calibration": {}, "recipe": {}, **meta, "format": FORMAT}
    meta["fingerprint"] = ""  # filled below, once the sidecar is known to be well formed
    _validate_meta(meta, onnx_path)
    _check_masked_network_file(onnx_path, meta)
    meta["fingerprint"] = package_fingerprint(onnx_path, meta)
    _check_graphs(onnx_path, meta)
    _write_json_atomic(onnx_path.with_suffix(".json"), meta)
    return ModelPackage(onnx_path, meta)


def package_graphs(folder: Path) -> list[Path]:
    """The packages' main graphs in a folder (a two-network package's NAME.masked.onnx is part of NAME)."""
    return [p for p in sorted(folder.glob("*.onnx")) if not is_masked_network_graph(p)]


def _resolve(path: Path) -> Path:
    if path.is_dir():
        graphs = package_graphs(path)
        if len(graphs) != 1:
            raise ModelPackageError(f"{path}: a package directory must hold exactly one .onnx, found {len(graphs)}")
        return graphs[0]
    if path.suffix == ".json":
        return path.with_suffix(".onnx")
    return path


def load_package(path: str | Path, check_graph: bool = True) -> ModelPackage:
    """Load and validate a package from its .onnx, its .json, a directory holding one pair, or a bundled name."""
    path = Path(path)
    if not path.exists() and not path.suffix and (BUNDLED_DIR / f"{path.name}.onnx").is_file():
        path = BUNDLED_DIR / f"{path.name}.onnx"
    onnx_path = _resolve(path)
    sidecar = onnx_path.with_suffix(".json")
    if not onnx_path.is_file():
        raise ModelPackageError(f"{onnx_path}: ONNX file not found")
    if not sidecar.is_file():
        raise ModelPackageError(f"{sidecar}: metadata sidecar not found next to {onnx_path.name}")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelPackageError(f"{sidecar}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelPackageError(f"{sidecar}: expected a JSON object")
    _validate_meta(meta, sidecar)
    _check_masked_network_file(onnx_path, meta)
    actual = package_fingerprint(onnx_path, meta)
    if actual != meta["fingerprint"]:
        raise ModelPackageError(
            f"{sidecar}: sidecar does not match its graph{'s' if meta.get('masked_network') else ''} (fingerprint "
            f"{meta['fingerprint'][:12]}, {onnx_path.name} hashes to {actual[:12]}); re-export the package"
        )
    if check_graph:
        _check_graphs(onnx_path, meta)
    return ModelPackage(onnx_path, meta)


def bundled_models() -> list[ModelPackage]:
    """Packages shipped inside the wheel, skipping none silently: a broken bundled package is an error."""
    return [load_package(p, check_graph=False) for p in package_graphs(BUNDLED_DIR)]


def default_model() -> ModelPackage:
    """The best bundled model (first of DEFAULT_PREFERENCE present)."""
    packages = {p.name: p for p in bundled_models()}
    for name in DEFAULT_PREFERENCE:
        if name in packages:
            return load_package(packages[name].onnx_path)
    if packages:
        return load_package(next(iter(packages.values())).onnx_path)
    raise ModelPackageError(
        f"no bundled model in {BUNDLED_DIR}; build the teacher with `edge-mfr models import-dlib` or pass --model"
    )
