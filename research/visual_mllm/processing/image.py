"""Pixel preprocessing shared by every BLIP-2-style model (VisualGLM, MiniGPT-4, MiniGPT4Qwen).

The steps are those of the BLIP-2 evaluation transform the reference code uses:
RGB -> bicubic resize to (H, W) -> scale to [0, 1] -> normalise per channel with the CLIP
mean/std. The result is a float32 numpy array [B, 3, H, W].

Every step is done in float32 in the same order as the reference (first /255, then
``(x - mean) / std``), so images read from the same file give bit-identical pixel values.
"""
import os
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # mindformers is optional for this module: without it the class is a plain object.
    from mindformers.models.image_processing_utils import BaseImageProcessor as _Base
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    _register = MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
except ImportError:  # pragma: no cover - exercised only without mindformers
    class _Base:  # pylint: disable=too-few-public-methods
        def __init__(self, **kwargs):
            for key, value in kwargs.items():
                setattr(self, key, value)

        def __call__(self, images, **kwargs):
            return self.preprocess(images, **kwargs)

    def _register(cls):
        return cls

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

_RESAMPLE = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
}


class ImageLoadError(ValueError):
    """An image could not be read or converted; the message names the input and the reason."""


def _describe(obj) -> str:
    if isinstance(obj, np.ndarray):
        return f"numpy array of shape {obj.shape} and dtype {obj.dtype}"
    return type(obj).__name__


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open an image file fully (not lazily) and return it as an RGB PIL image.

    Raises ImageLoadError naming the file when it is missing, not a file, unreadable,
    not an image format Pillow knows, or damaged.
    """
    path = Path(path)
    name = str(path)
    if name.startswith(("http:/", "https:/")):  # Path() collapses "//"
        raise ImageLoadError(f"cannot load image {name!r}: URLs are not supported, download the file first")
    if not path.exists():
        raise ImageLoadError(f"cannot load image {name!r}: file not found")
    if path.is_dir():
        raise ImageLoadError(f"cannot load image {name!r}: it is a directory, not an image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except PermissionError as err:
        raise ImageLoadError(f"cannot load image {name!r}: permission denied ({err.strerror})") from err
    except UnidentifiedImageError as err:
        ext = path.suffix.lower()
        if ext and ext in Image.registered_extensions():
            why = f"the file is corrupt or is not really a {ext} image (Pillow cannot identify its contents)"
        else:
            kind = f"'{ext}' files are" if ext else "files without an extension are"
            why = (f"unsupported file type ({kind} not an image format Pillow can read, "
                   "and the contents are not a recognised image either)")
        raise ImageLoadError(f"cannot load image {name!r}: {why}") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # truncated or damaged data found while decoding (Pillow raises OSError / SyntaxError)
        raise ImageLoadError(f"cannot load image {name!r}: the file is damaged or truncated ({err})") from err


def _array_to_image(array: np.ndarray) -> Image.Image:
    """HWC (or HW) uint8 array, or a float array with values in [0, 1], to an RGB PIL image.

    Float arrays are rounded to 8 bits first, so a float image made by dividing a uint8 image by
    255 gives exactly the pixel values of the uint8 image (the reference always resizes 8-bit images).
    """
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        raise ImageLoadError(
            f"cannot use {_describe(array)} as an image: it looks channel-first (CHW); "
            "pass an HWC array (e.g. array.transpose(1, 2, 0))")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(
            f"cannot use {_describe(array)} as an image: expected HxW, HxWx1, HxWx3 or HxWx4")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"cannot use {_describe(array)} as an image: it is empty")
    if array.dtype == np.uint8:
        data = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageLoadError(f"cannot use {_describe(array)} as an image: it contains NaN or inf")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageLoadError(
                f"cannot use {_describe(array)} as an image: float images must lie in [0, 1], "
                f"this one spans [{lo:g}, {hi:g}] (pass uint8 for 0..255 data)")
        data = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageLoadError(
            f"cannot use {_describe(array)} as an image: dtype must be uint8 (0..255) or float (0..1)")
    # uint8 HxW -> "L", HxWx3 -> "RGB", HxWx4 -> "RGBA" (Pillow infers the mode from shape and dtype)
    return Image.fromarray(np.ascontiguousarray(data)).convert("RGB")


def to_rgb_image(image: ImageInput) -> Image.Image:
    """Any accepted single input (path, PIL image, numpy array) as an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        try:
            return image.convert("RGB")
        except (OSError, ValueError) as err:
            raise ImageLoadError(f"cannot convert PIL image ({image.mode}, {image.size}) to RGB: {err}") from err
    if isinstance(image, np.ndarray):
        return _array_to_image(image)
    raise ImageLoadError(
        f"unsupported image input {_describe(image)}: expected a file path, a PIL image or a numpy array")


def _as_size(image_size) -> Tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or an (H, W) pair, got {image_size!r}")
    return size


@_register
class BlipImageProcessor(_Base):
    """BLIP-2 evaluation preprocessing.

    Args:
        image_size: output size, an int (square) or (H, W). 224 for the real models.
        mean, std: per-channel normalisation (defaults: the CLIP values).
        resample: resize filter name ("bicubic" as the reference; "bilinear", "nearest", "lanczos").

    Call it (or ``preprocess``) with a path, a PIL image, an HWC numpy array (uint8, or float in
    [0, 1]) or a list of these; it returns float32 numpy [B, 3, H, W].
    """

    def __init__(self, image_size: Union[int, Sequence[int]] = 224,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 resample: str = "bicubic", **kwargs):
        size = _as_size(image_size)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={mean!r} std={std!r}")
        if any(float(s) == 0.0 for s in std):
            raise ValueError(f"std must not contain zeros, got {std!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        super().__init__(**kwargs)
        self.image_size = list(size)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.resample = resample

    @property
    def size_hw(self) -> Tuple[int, int]:
        return tuple(self.image_size)

    def __call__(self, images, **kwargs) -> np.ndarray:
        return self.preprocess(images, **kwargs)

    def process_one(self, image: ImageInput) -> np.ndarray:
        """One image as float32 [3, H, W]."""
        rgb = to_rgb_image(image)
        height, width = self.size_hw
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), _RESAMPLE[self.resample])  # PIL takes (W, H)
        pixels = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)          # [H, W, 3] in [0, 1]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)

    def preprocess(self, images, **kwargs) -> np.ndarray:  # pylint: disable=arguments-differ
        """A single input or a list/tuple of inputs -> float32 [B, 3, H, W]."""
        if kwargs:
            raise TypeError(f"{type(self).__name__}.preprocess got unexpected arguments {sorted(kwargs)}")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ImageLoadError("no images given (empty list)")
        return np.stack([self.process_one(item) for item in items], axis=0)

