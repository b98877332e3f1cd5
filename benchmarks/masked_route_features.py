"""Can the masked route do better than the whitening metric with the teacher's intermediate features?

A mask covers the lower face, so the teacher's feature maps above the mask might still say who it is. This
makes deployed-path (clean, masked) pairs from celeba_test `train` (a synthetic mask of either family, the
face detected afresh on the masked photo), keeps the teacher's embedding and two feature maps of each side
(`relu_20`: 128 x 8 x 8 before the last stage; `relu_26`: 256 x 4 x 4 before the last unit), and compares on
5 identity-disjoint folds, by clean-vs-masked TPR at FMR 1e-3 across different faces:

- plain cosine, and the bundled masked-route metric (whitening of the mask-induced change, strengths 0.3, 1.0);
- ridge regressions from masked features (upper rows, pooled or not, alone or with the masked embedding) to
  the clean template, as a masked-route head would be applied;
- the metric fitted on more pairs, and the metric with the within-identity covariance added (LDA-like).

    OMP_NUM_THREADS=1 python benchmarks/masked_route_features.py --pairs /tmp/feature_pairs.npz --faces 11052
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.match import scoring_space  # noqa: E402
from edge_mfr.models.route_map import clean_vs_masked_tpr, identity_folds  # noqa: E402
from edge_mfr.models.route_metric import fit_mask_whitening  # noqa: E402

FEATURES = ("relu_20", "relu_26")


def make_pairs(data_dir: Path, faces: int, out: Path) -> None:
    import cv2
    import onnx
    import onnxruntime as ort
    from tqdm import tqdm

    from edge_mfr.detect import DEFAULT_DETECTOR, get_detector
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.masks import apply_mask, random_mask_type
    from edge_mfr.models.package import default_model
    from edge_mfr.train.data import source_items

    package = default_model()
    graph = onnx.load(package.onnx_path)
    for name in FEATURES:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    embedder = FaceEmbedder(package, threads=1)
    find = get_detector(DEFAULT_DETECTOR, threads=1)
    items = source_items(data_dir, "celeba_test")  # its train split only
    rng = np.random.default_rng(0)
    chosen = sorted(rng.permutation(len(items))[:faces])
    kept = {f"{side}_{name}": [] for side in ("clean", "masked") for name in ("embedding", *FEATURES)}
    identities = []
    for index in tqdm(chosen, desc="pairs", mininterval=10):
        identity, file = items[index]
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        face = None if image is None else find.detect_largest(image)
        if face is None:
            continue
        covered = apply_mask(image, face.landmarks, random_mask_type(rng), rng)
        again = find.detect_largest(covered)
        if again is None:
            continue
        batch = np.concatenate([embedder.preprocess(image, face.landmarks[None]),
                                embedder.preprocess(covered, again.landmarks[None])])
        outputs = session.run(["embedding", *FEATURES], {session.get_inputs()[0].name: batch})
        outputs[0] = outputs[0] / np.linalg.norm(outputs[0], axis=1, keepdims=True)
        for name, value in zip(("embedding", *FEATURES), outputs):
            kept[f"clean_{name}"].append(value[0].astype(np.float16 if name != "embedding" else np.float32))
            kept[f"masked_{name}"].append(value[1].astype(np.float16 if name != "embedding" else np.float32))
        identities.append(identity)
    np.savez(out, identities=np.array(identities), **{k: np.stack(v) for k, v in kept.items()})


def masked_inputs(pairs, kind: str) -> np.ndarray:
    maps = {"relu_20": pairs["masked_relu_20"], "relu_26": pairs["masked_relu_26"]}
    name, rows, pooled = {"relu_26 upper, pooled": ("relu_26", 2, True), "relu_26 upper": ("relu_26", 2, False),
                          "relu_26 all": ("relu_26", 4, False), "relu_20 upper, pooled": ("relu_20", 4, True),
                          "relu_20 upper": ("relu_20", 4, False)}[kind]
    upper = maps[name][:, :, :rows, :].astype(np.float64)
    return upper.mean((2, 3)) if pooled else upper.reshape(len(upper), -1)


def ridge(x: np.ndarray, y: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    if x.shape[1] > x.shape[0]:  # dual form: fewer pairs than features
        weight = xc.T @ np.linalg.solve(xc @ xc.T + strength * np.eye(len(x)), y - y_mean)
    else:
        weight = np.linalg.solve(xc.T @ xc + strength * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return weight, y_mean - x_mean @ weight


def inverse_sqrt(covariance: np.ndarray, strength: float) -> np.ndarray:
    d = covariance.shape[0]
    values, vectors = np.linalg.eigh(covariance + strength * np.trace(covariance) / d * np.eye(d))
    return ((vectors * values ** -0.5) @ vectors.T).astype(np.float32)


def within_identity_covariance(x: np.ndarray, identities: np.ndarray) -> np.ndarray:
    centred = x.astype(np.float64).copy()
    for identity in np.unique(identities):
        rows = identities == identity
        centred[rows] -= centred[rows].mean(0)
    return np.cov(centred.T, bias=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--pairs", required=True, help="cache of the pairs (.npz); made when missing")
    parser.add_argument("--faces", type=int, default=11052)
    args = parser.parse_args()
    if not Path(args.pairs).is_file():
        make_pairs(Path(args.data), args.faces, Path(args.pairs))
    pairs = np.load(args.pairs)
    identities = pairs["identities"]
    clean, masked = pairs["clean_embedding"], pairs["masked_embedding"]
    folds = identity_folds(identities)
    print(f"{len(identities)} pairs, {len(np.unique(identities))} identities, 5 identity-disjoint folds")

    def tpr_of(project) -> float:
        """project(train rows, test rows) -> (clean side, masked side) of the test rows."""
        scores = [clean_vs_masked_tpr(*project(np.where(~test)[0], test), identities[test], 1e-3) for test in folds]
        return float(np.mean(scores))

    def metric(weight_of):
        def project(train, test):
            weight = weight_of(train)
            return scoring_space(clean[test], weight), scoring_space(masked[test], weight)
        return project

    print(f"plain cosine: {tpr_of(lambda train, test: (clean[test], masked[test])):.4f}")
    for strength in (0.3, 1.0):
        full = tpr_of(metric(lambda train: fit_mask_whitening(clean[train], masked[train], strength)))
        fewer = tpr_of(metric(lambda train: fit_mask_whitening(
            clean[np.random.default_rng(0).choice(train, 3200, replace=False)],
            masked[np.random.default_rng(0).choice(train, 3200, replace=False)], strength)))
        print(f"metric s={strength}: {full:.4f} (fitted on 3,200 pairs per fold: {fewer:.4f})")
    for share in (0.1, 0.3, 1.0):
        def lda_like(train, share=share):
            change = np.cov((masked[train] - clean[train]).T, bias=True)
            both = np.concatenate([clean[train], masked[train]])
            within = within_identity_covariance(both, np.concatenate([identities[train], identities[train]]))
            return inverse_sqrt(change / np.trace(change) + share * within / np.trace(within), 0.3)
        print(f"metric s=0.3 + {share} x within-identity covariance: {tpr_of(metric(lda_like)):.4f}")
    for kind in ("relu_26 upper, pooled", "relu_20 upper, pooled", "relu_26 upper", "relu_26 all", "relu_20 upper"):
        features = masked_inputs(pairs, kind)
        for with_embedding in (False, True):
            x = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-6)
            x = np.concatenate([x, masked], 1) if with_embedding else x
            x = x / np.sqrt((x ** 2).sum(1).mean())
            results = []
            for strength in (0.01, 0.1, 1.0):
                def head(train, test, strength=strength):
                    weight, bias = ridge(x[train], clean[train].astype(np.float64), strength)
                    mapped = x[test] @ weight + bias
                    return clean[test], (mapped / np.linalg.norm(mapped, axis=1, keepdims=True)).astype(np.float32)
                results.append(f"{strength}: {tpr_of(head):.4f}")
            label = f"{kind} + masked embedding" if with_embedding else kind
            print(f"ridge head on {label} (strength {', '.join(results)})", flush=True)


if __name__ == "__main__":
    main()
