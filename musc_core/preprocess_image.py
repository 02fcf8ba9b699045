"""Image and mask preprocessing (docs/method.md, *Inputs*): arrays in, tensors out, no file IO."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Bring a decoded image to 8-bit RGB.

    Args:
        image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of uint8, uint16 or float in
            [0, 1]. 16-bit values are scaled by 1/257; alpha is dropped; gray is repeated.

    Returns:
        (H, W, 3) uint8 array.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W[, 1|3|4]) image, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image holds NaN or infinite values")
        return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {array.dtype}")


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize an 8-bit RGB image with bicubic interpolation.

    Args:
        image: (H, W, 3) uint8.
        size: output side S in pixels.

    Returns:
        (3, S, S) float32 tensor in [0, 1] (backbone normalization happens in the extractor).
    """
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    resized = F.interpolate(
        tensor[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True
    )[0]
    return resized.clamp_(0.0, 1.0)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Resize a ground-truth mask bilinearly and binarize it at 0.5.

    Args:
        mask: (H, W) bool or numeric array, non-zero = defect.
        size: output side S in pixels.

    Returns:
        (S, S) bool tensor.
    """
    tensor = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))
    resized = F.interpolate(tensor[None, None], size=(size, size), mode="bilinear")
    return resized[0, 0] >= 0.5
