"""Synthetic face masks for masked-face training and testing.

Template masks drawn procedurally in the canonical face frame (surgical, N95, KN95, cloth), with
textures, prints and the photo's lighting, and NIST-style solid masks A to F. They go on aligned
crops (`apply_mask_aligned`, `MaskAugment`) or on full photos from five landmarks (`apply_mask`).
"""

from .apply import (
    FAMILIES,
    MASK_TYPES,
    MaskAugment,
    apply_mask,
    apply_mask_aligned,
    jittered_points,
    random_mask_type,
)

__all__ = ["FAMILIES", "MASK_TYPES", "MaskAugment", "apply_mask", "apply_mask_aligned", "jittered_points",
           "random_mask_type"]
