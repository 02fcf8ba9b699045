"""Decode the files of a dataset: images, masks, XYZ TIFFs, Eyecandies depth + metadata.

Every loader names the file in its error: a missing file raises ``FileNotFoundError``, an
empty, truncated or undecodable one ``ValueError(f"{path}: <problem>")``. Nothing here
resizes or normalizes (that is ``musc_core``'s job).

Decoders: TIFF files (``.tif``/``.tiff``) are read with tifffile (first image series),
everything else with Pillow.

Decompression bombs: a file's pixel count is read from its header before anything is decoded,
and a file with more than :func:`max_image_pixels` pixels (default
:data:`DEFAULT_MAX_IMAGE_PIXELS`, about 33.5 million: 8192 x 4096; override with the
``MUSC_MAX_IMAGE_PIXELS`` environment variable) is refused with a ``ValueError`` naming the
file, its size and the limit. Decoding and preprocessing take about 30 bytes per pixel (27
measured on a 16 Mpx RGB PNG), so a worker needs at most about 1 GB for one sample at the
default limit, whatever the file claims. Pillow's own guard still refuses images above twice
its ``Image.MAX_IMAGE_PIXELS`` (about 179 million pixels) whatever the limit.

A path may also be an object's URL (``s3://bucket/key``, see :mod:`tasks.formats.sources`): its
bytes
are fetched once and decoded from memory, with the same checks and messages (the URL named).
An object larger than :data:`MAX_BYTES_PER_PIXEL` times the pixel limit (512 MiB by default)
is refused before it is fetched.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile
import yaml
from PIL import Image, UnidentifiedImageError

from musc_core.preprocess_image import to_rgb_uint8
from tasks.formats.sources import is_url, local_path, object_size, read_bytes

TIFF_SUFFIXES = (".tif", ".tiff")
#: Largest image (width x height) decoded by default: 32 Mi pixels, e.g. 8192 x 4096.
DEFAULT_MAX_IMAGE_PIXELS = 32 * 1024 * 1024
#: Environment variable that overrides :data:`DEFAULT_MAX_IMAGE_PIXELS`.
MAX_PIXELS_ENV = "MUSC_MAX_IMAGE_PIXELS"
#: Bytes per pixel an uncompressed file can need (4 float32 channels): an object larger than
#: this times the pixel limit is refused before it is fetched.
MAX_BYTES_PER_PIXEL = 16
_PIL_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

PathLike = str | os.PathLike


def max_image_pixels() -> int:
    """The pixel limit of decoded files: ``$MUSC_MAX_IMAGE_PIXELS`` or the default.

    Raises:
        ValueError: the variable is set but is not a positive integer.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels")
    return limit


def _check_pixels(path: Source, width: int, height: int) -> None:
    """Refuse a file whose header announces more pixels than the limit (before decoding)."""
    limit = max_image_pixels()
    if width * height > limit:
        raise ValueError(
            f"{path}: image is {width}x{height} = {width * height:,} pixels, above the limit "
            f"of {limit:,} pixels ({MAX_PIXELS_ENV}); refusing to decode it"
        )


def _tiff_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """(width, height) of a TIFF series: (H, W), (H, W, C), planar (C, H, W) or a stack.

    Extra leading dimensions (pages of a stack) count as more rows, so the product is the
    number of pixels the decoder would produce.
    """
    dims = list(shape)
    if len(dims) == 3 and dims[2] <= 4:
        dims = dims[:2]
    elif len(dims) == 3 and dims[0] <= 4:
        dims = dims[1:]
    if not dims:
        return 0, 0
    if len(dims) == 1:
        return dims[0], 1
    return dims[-1], math.prod(dims[:-1])


@dataclass(frozen=True)
class _Fetched:
    """An object's bytes, fetched from its URL; ``str()`` is the URL (for messages)."""

    url: str
    data: bytes

    def __str__(self) -> str:
        return self.url

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.url).suffix

    def read_text(self, encoding: str) -> str:
        return self.data.decode(encoding)


#: A checked input file: a local path, or an object's fetched bytes.
Source = Path | _Fetched


def _handle(source: Source) -> Path | io.BytesIO:
    """What a decoder opens: the local path, or the bytes in memory."""
    return io.BytesIO(source.data) if isinstance(source, _Fetched) else source


def _existing_file(path: PathLike | None, what: str) -> Source:
    """The path after checking it names a non-empty regular file (a URL: its bytes fetched)."""
    if path is None:
        raise ValueError(f"no {what} file given")
    if is_url(str(path)):
        url = str(path)
        size = object_size(url)
        if size is None:
            raise ValueError(f"{url}: not a regular file")
        if size == 0:
            raise ValueError(f"{url}: empty file")
        limit = MAX_BYTES_PER_PIXEL * max_image_pixels()
        if size > limit:
            raise ValueError(
                f"{url}: {size:,} bytes, more than any file within the pixel limit can hold "
                f"({limit:,} bytes: {MAX_BYTES_PER_PIXEL} bytes per pixel, {MAX_PIXELS_ENV}); "
                "refusing to fetch it"
            )
        return _Fetched(url, read_bytes(url))
    p = Path(local_path(os.fspath(path)))
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise ValueError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise ValueError(f"{p}: empty file")
    return p


def _channels_last(array: np.ndarray, path: Source) -> np.ndarray:
    """(H, W) or (H, W, C) array; planar (C, H, W) TIFF data is transposed."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(f"{path}: unsupported image shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{path}: image has no pixels")
    return array


def _read_tiff(path: Source) -> np.ndarray:
    """First image series of a TIFF (all its pages: planar data may span several).

    The series' shape is read from the header first: an image above the pixel limit is
    refused before any pixel is decoded.
    """
    try:
        with tifffile.TiffFile(_handle(path)) as tif:
            if not tif.series:
                raise ValueError("no image in the file")
            series = tif.series[0]
            _check_pixels(path, *_tiff_size(tuple(series.shape)))
            return np.asarray(series.asarray())
    except ValueError as error:
        if str(error).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: cannot read TIFF ({error})") from error
    except Exception as error:  # tifffile raises many types for damaged files
        raise ValueError(f"{path}: cannot read TIFF ({error})") from error


def _read_pil(path: Source) -> np.ndarray:
    """Decode with Pillow, keeping 16-bit gray as uint16 and dropping palettes.

    Returns:
        (H, W) uint8/uint16/int32/float32 or (H, W, 2|3|4) uint8.
    """
    try:
        with Image.open(_handle(path)) as image:
            _check_pixels(path, *image.size)  # from the header, before decoding
            image.load()
            mode = image.mode
            if mode in _PIL_16BIT_MODES:
                return np.asarray(image).astype(np.uint16)
            if mode in ("I", "F", "L", "LA", "RGB", "RGBA"):
                return np.asarray(image)
            if mode == "1":
                return np.asarray(image.convert("L"))
            if mode in ("P", "PA"):
                has_alpha = mode == "PA" or "transparency" in image.info
                return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as error:  # Pillow's own guard, at open()
        raise ValueError(
            f"{path}: image is above the limit of Pillow's decompression-bomb guard ({error}); "
            "refusing to decode it"
        ) from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{path}: not an image (unrecognised file content)") from error
    except ValueError as error:
        if str(error).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: cannot decode image ({error})") from error
    except Exception as error:  # Pillow raises OSError, SyntaxError, zlib.error...
        raise ValueError(f"{path}: cannot decode image, truncated or damaged ({error})") from error


def _decode(path: PathLike, what: str) -> tuple[Source, np.ndarray]:
    """Checked path and its decoded pixel array (channels last)."""
    p = _existing_file(path, what)
    raw = _read_tiff(p) if p.suffix.lower() in TIFF_SUFFIXES else _read_pil(p)
    return p, _channels_last(raw, p)


def load_image(path: PathLike) -> np.ndarray:
    """Read an image as 8-bit RGB.

    Grayscale is repeated to three channels, alpha dropped, palettes expanded. 16-bit data
    (16-bit gray PNGs, 16-bit TIFFs; 32-bit integer PNG modes are taken as 16-bit) is scaled
    by 1/257; float data is taken as [0, 1]. 16-bit *colour* PNGs are reduced to 8 bits by
    Pillow's decoder (high byte), which is also what the reference release's PIL loading
    gets; this differs from 1/257 scaling by at most one level.

    Args:
        path: image file (PNG, JPEG, BMP, TIFF, ... anything Pillow or tifffile reads).

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``"{path}: <problem>"`` for empty, truncated, non-image files or
            unsupported pixel formats.
    """
    p, array = _decode(path, "image")
    if array.ndim == 3 and array.shape[2] == 2:  # gray + alpha
        array = array[:, :, 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind in "iu" and array.dtype not in (np.uint8, np.uint16):
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"{p}: integer pixel values outside the 16-bit range")
        array = array.astype(np.uint16)
    elif array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    try:
        return np.ascontiguousarray(to_rgb_uint8(array))
    except ValueError as error:
        raise ValueError(f"{p}: {error}") from error


def load_mask(path: PathLike) -> np.ndarray:
    """Read a ground-truth mask: any non-zero pixel is anomalous.

    Colour masks count a pixel when any colour channel is non-zero (an alpha channel is
    ignored); palette masks are judged by their colours. A colour mask must be binary: at
    most two colours, one of them black (a photo or an overlay saved as the mask is refused
    rather than read as "everything anomalous").

    Args:
        path: mask image file.

    Returns:
        (H, W) bool array.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``"{path}: <problem>"`` for empty, truncated or non-image files, and
            colour masks that are not binary.
    """
    p, array = _decode(path, "mask")
    if array.ndim == 3:
        colour = array[:, :, : 1 if array.shape[2] == 2 else 3]
        colours = np.unique(colour.reshape(-1, colour.shape[2]), axis=0)
        foreground = colours[np.any(colours != 0, axis=1)]
        if foreground.shape[0] > 1:
            raise ValueError(
                f"{p}: not a binary mask ({colours.shape[0]} colours); save it with black for "
                "normal pixels and one colour (e.g. white) for defect pixels"
            )
        return np.any(colour != 0, axis=2)
    return array != 0


def load_xyz(path: PathLike) -> np.ndarray:
    """Read an organized point cloud (XYZ map) from a TIFF.

    Args:
        path: TIFF holding an (H, W, 3) (or planar (3, H, W)) floating-point map; zeros mark
            pixels without a point.

    Returns:
        (H, W, 3) float32 array (NaN/inf are passed through; callers decide).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``"{path}: <problem>"`` for empty, damaged or non-TIFF files, a shape
            other than three channels, or non-float data.
    """
    p = _existing_file(path, "XYZ")
    array = _read_tiff(p)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{p}: expected an (H, W, 3) XYZ map, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{p}: XYZ map has no pixels")
    if array.dtype.kind != "f":
        raise ValueError(f"{p}: expected floating-point coordinates, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _depth_range(info: object, path: Source) -> tuple[float, float]:
    """(min, max) from an info_depth.yaml mapping: under ``normalization`` or at top level."""
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a YAML mapping with the depth min/max")
    source = info.get("normalization", info)
    if not isinstance(source, dict) or "min" not in source or "max" not in source:
        raise ValueError(
            f"{path}: no depth range (expected 'normalization: {{min, max}}' or top-level "
            f"'min' and 'max'; found keys {sorted(map(str, info))})"
        )
    try:
        low, high = float(source["min"]), float(source["max"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: depth min/max are not numbers ({error})") from error
    if not (math.isfinite(low) and math.isfinite(high)) or not high > low:
        raise ValueError(f"{path}: invalid depth range min={low}, max={high}")
    return low, high


def _read_pose(path: Source) -> np.ndarray:
    """4x4 camera pose from a whitespace-separated text matrix (3x4 gets [0 0 0 1])."""
    try:
        text = io.StringIO(path.data.decode("utf-8")) if isinstance(path, _Fetched) else path
        pose = np.loadtxt(text, dtype=np.float64, ndmin=2)
    except Exception as error:
        raise ValueError(f"{path}: cannot read the pose matrix ({error})") from error
    if pose.shape == (3, 4):
        pose = np.vstack([pose, [0.0, 0.0, 0.0, 1.0]])
    if pose.shape != (4, 4):
        raise ValueError(f"{path}: expected a 4x4 pose matrix, got shape {pose.shape}")
    if not np.isfinite(pose).all():
        raise ValueError(f"{path}: pose matrix holds NaN or infinite values")
    return pose


def load_eyecandies_depth(
    depth_path: PathLike | None, info_path: PathLike | None, pose_path: PathLike | None
) -> tuple[np.ndarray, float, float, np.ndarray]:
    """Read an Eyecandies depth sample: the 16-bit depth PNG, its range and the camera pose.

    ``*_info_depth.yaml`` holds the range under ``normalization: {min: .., max: ..}`` in the
    public release; top-level ``min``/``max`` keys are accepted as well.

    Args:
        depth_path: ``*_depth.png`` (16-bit gray; depth = min + value / 65535 * (max - min)
            is applied by ``musc_core``).
        info_path: ``*_info_depth.yaml``.
        pose_path: ``*_pose.txt``, a 4x4 (or 3x4) pose matrix (applied inverted by
            ``musc_core.preprocess_points.backproject_depth``, as in the reference).

    Returns:
        ``(depth, depth_min, depth_max, pose)``: (H, W) uint16, the range in scene units,
        and the (4, 4) float64 pose.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: ``"{path}: <problem>"`` for a missing argument, an empty or damaged file,
            a depth PNG that is not single-channel 16-bit, or a bad range/pose.
    """
    depth_file, depth = _decode(depth_path, "depth")
    info_file = _existing_file(info_path, f"info_depth.yaml (for {depth_file})")
    pose_file = _existing_file(pose_path, f"pose.txt (for {depth_file})")
    if depth.ndim != 2:
        raise ValueError(f"{depth_file}: expected a single-channel depth map, got {depth.shape}")
    if depth.dtype != np.uint16:
        if depth.dtype.kind not in "iu" or depth.dtype == np.uint8:
            raise ValueError(f"{depth_file}: expected 16-bit depth values, got {depth.dtype}")
        if depth.min() < 0 or depth.max() > 65535:
            raise ValueError(f"{depth_file}: depth values outside the 16-bit range")
        depth = depth.astype(np.uint16)
    try:
        info = yaml.safe_load(info_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{info_file}: cannot parse YAML ({error})") from error
    low, high = _depth_range(info, info_file)
    return np.ascontiguousarray(depth), low, high, _read_pose(pose_file)
