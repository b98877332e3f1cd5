"""Two-network packages: a second graph, trained for masked faces, embeds the masked route.

A probe the quality gate judges unmasked meets only the unmasked templates (`match.route_rows`), so the masked
side of unlock (masked probes, and the masked copies enrollment synthesises) can come from another network
without touching clean-to-clean behaviour: one fine-tuned from the teacher to map masked faces onto the
teacher's clean templates (config `dlib_masked_route`). Its masked embeddings must live in the teacher's
space, since a masked probe also meets the user's clean templates, which the first network made.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edge_mfr.errors import InputError
from edge_mfr.models.package import ModelPackage, file_sha256, masked_network_path
from edge_mfr.models.route_map import derived_package

METHOD = "a second network embeds faces the quality gate judges masked (probes and synthetic enrollment masks)"


def with_masked_network(package: ModelPackage, network: ModelPackage, out_onnx: str | Path, name: str) -> ModelPackage:
    """A copy of `package` whose masked route is embedded by `network` (same input and embedding size).

    Masked-route scoring fitted for the first network (a metric, a cohort, a route map) is dropped: it describes
    the other network's masked embeddings. Thresholds must be recalibrated, and galleries re-enrolled (the
    fingerprint covers both graphs)."""
    if package.has_masked_network:
        raise InputError(f"{package.name!r} already has a masked-route network; start from a one-network package")
    if network.has_masked_network:
        raise InputError(f"{network.name!r} is itself a two-network package; give the masked-route graph alone")
    mismatched = [what for what, a, b in (
        ("input size", package.input_size, network.input_size),
        ("channel order", package.channel_order, network.channel_order),
        ("mean", tuple(package.mean), tuple(network.mean)),
        ("std", tuple(package.std), tuple(network.std)),
        ("embedding size", package.embedding_size, network.embedding_size),
    ) if a != b]
    if not np.allclose(package.template, network.template, atol=1e-6):
        mismatched.append("alignment template")
    if mismatched:
        raise InputError(f"the masked-route network {network.name!r} must take the same input and give the same "
                         f"embeddings as {package.name!r}; they differ in {', '.join(mismatched)}")
    out_onnx = Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(network.onnx_path, masked_network_path(out_onnx))
    recipe = network.meta.get("recipe") or {}
    entry = {"method": METHOD, "name": network.name, "architecture": network.architecture,
             "graph_sha256": file_sha256(network.onnx_path), "recipe": recipe,
             "licence": network.meta.get("licence", package.meta.get("licence"))}
    scoring = {k: v for k, v in (package.meta.get("scoring") or {}).items() if k == "unmasked"}
    licence = (f"unmasked route: {package.meta.get('licence', 'not stated')} | masked route, network "
               f"{network.name}: {entry['licence'] or 'not stated'}; whatever is fitted for the masked route (map, "
               "metric) carries the terms of the data it is fitted on; the package as a whole is under the most "
               "restrictive of these")
    # A masked probe meets the user's masked templates only: the second network made them, while the clean ones
    # come from the first (celeba_test calib, FNMR of the masked route at FMR 1e-4: 69.2% against 73.3% with
    # every template; the teacher alone does better with every template, 78.1% against 79.0%; docs/results.md).
    return derived_package(package, out_onnx, name, {"masked_network": f"{network.name} (sidecar masked_network)"},
                           {"train_data": list(recipe.get("train_data", []))}, masked_network=entry,
                           scoring=scoring, routes={}, licence=licence,
                           matching={"masked_probe_templates": "masked"})
