"""Transforms shared by every reader (in-memory, LMDB, Ray Data): decode, crop, augment, and
the uint8 CHW layout of a step batch. Normalisation happens on the device, in one function:
:func:`ffc_ray.data.batch.normalize`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import simplejpeg

# ------------------------------------------------------------------------------------------
# Decoding, cropping and augmentation (shared by the importers, the LMDB reader and the Ray
# Data stream: one implementation, so the single-process and the Ray paths agree bit for bit).

#: LFW deep-funneled 250x250 images: this centre box is a 112x112 face (LFW README).
LFW_CROP_BOX: tuple[int, int, int, int] = (69, 69, 181, 181)


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; the message names the file or record key."""


def _pil():
    from PIL import Image

    return Image


#: Largest image any import path decodes, in pixels (64 Mpx: an 8000 x 8000 photo). Read from
#: the header before decoding; Pillow's own limit (178 Mpx) would let a 300 KB PNG take 0.5 GB.
MAX_IMAGE_PIXELS = 64_000_000


def open_image(data: bytes, source: str = "<bytes>", max_pixels: int | None = None):
    """Decode encoded image bytes fully into an RGB ``PIL.Image`` (truncation is an error).

    ``source`` (a path or a record key) goes into the error message. An image whose header
    announces more than ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`) pixels is refused
    before it is decoded.
    """
    import io

    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    Image = _pil()
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageDecodeError(
                f"{source}: {w} x {h} = {w * h} pixels exceed the budget of {max_pixels} "
                "pixels per image"
            )
        img.load()  # decode now: a truncated file raises here, not later
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        raise ImageDecodeError(f"{source}: cannot decode image ({exc})") from exc


def crop_resize(img, box: tuple[int, int, int, int] | None, size: int | None):
    """Crop ``box`` = (left, top, right, bottom) from a PIL image, then resize to a square ``size``.

    Done once at import so that records are stored at the network input size and training
    never resizes. The box must lie inside the image (PIL would pad with black otherwise).
    """
    Image = _pil()
    if box is not None:
        left, top, right, bottom = box
        w, h = img.size
        if not (0 <= left < right <= w and 0 <= top < bottom <= h):
            raise ValueError(f"crop box {box} does not fit inside a {w}x{h} image")
        img = img.crop(box)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)  # antialiased when shrinking
    return img


def load_face(
    path: str, box: tuple[int, int, int, int] | None = None, size: int | None = None
) -> np.ndarray:
    """Read an image file, decode, crop and resize: uint8 [size, size, 3] RGB.

    The image-folder path of the importers, of the LFW pairs loader and of benchmark (a).
    """
    with open(path, "rb") as f:
        data = f.read()
    img = open_image(data, source=str(path))
    try:
        img = crop_resize(img, box, size)
    except ValueError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from exc
    return np.asarray(img, dtype=np.uint8)


def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> JPEG (lossy, ``quality``) or PNG (lossless) bytes."""
    import io

    Image = _pil()
    buf = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image), "RGB")
    if fmt == "jpeg":
        pil.save(buf, "JPEG", quality=int(quality))
    elif fmt == "png":
        pil.save(buf, "PNG", compress_level=1)
    else:
        raise ValueError(f"unknown image format {fmt!r} (jpeg or png)")
    return buf.getvalue()


#: a record's name for error messages: a string, or a callable that builds it (only on error)
Source = str | Callable[[], str]


def _decode_view(
    data: bytes, size: int, source: Source, out: np.ndarray | None = None
) -> np.ndarray:
    """Decode to uint8 [size, size, 3]: into ``out`` (a writable C-contiguous [size, size, 3])
    when given and the record is a YCbCr or grayscale JPEG of that size, else a fresh array."""
    if data[:3] == b"\xff\xd8\xff":
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)  # about 3 us
            if (h, w) == (size, size) and colorspace in ("YCbCr", "Gray"):
                return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out, strict=True)
        except ValueError:
            pass  # fall through: the full decoder gives the precise error
    if callable(source):
        source = source()
    img = open_image(data, source)
    if img.size != (size, size):
        raise ImageDecodeError(f"{source}: image is {img.size[0]}x{img.size[1]}, store says {size}")
    return np.asarray(img, dtype=np.uint8)


def decode_record(data: bytes, size: int, source: str = "<record>") -> np.ndarray:
    """Decode one stored record (JPEG or PNG at the network size) to uint8 [size, size, 3].

    JPEG records (YCbCr or grayscale, as the importers write them) take simplejpeg:
    libjpeg-turbo straight into a numpy array, or into a given buffer; measured 1.7x faster
    than Pillow's direct decoder at 112 px (LFW), with bit-identical pixels (tested). Anything
    else (PNG, CMYK or RGB-coded JPEGs, whose colour conversion Pillow does its own way), a
    JPEG of another size, or any decoder error (truncation included) goes through Pillow
    (:func:`open_image`), which gives the precise error. A record that does not decode to
    ``size`` x ``size`` is an error naming ``source``.
    """
    return np.array(_decode_view(data, size, source))


def _source(sources: Sequence[str] | Callable[[int], str] | None, i: int) -> Source:
    if sources is None:
        return f"record {i}"
    if callable(sources):
        return lambda: sources(i)
    return sources[i]


def decode_records(
    blobs: list[bytes], size: int, sources: Sequence[str] | Callable[[int], str] | None = None
) -> np.ndarray:
    """Decode stored records into one uint8 [B, size, size, 3] array.

    ``sources``: the records' names for error messages, or a function ``i -> name`` called only
    when record i fails (no per-record string on the hot path).
    """
    out = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        img = _decode_view(blob, size, _source(sources, i), out[i])  # decoded in place ...
        if not np.may_share_memory(img, out):  # ... unless it took the Pillow path
            out[i] = img
    return out


def _chw_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``out`` checked to be a writable uint8 array of ``shape``, or a fresh one."""
    if out is None:
        return np.empty(shape, dtype=np.uint8)
    if out.shape != shape or out.dtype != np.uint8 or not out.flags.writeable:
        state = "writable" if out.flags.writeable else "read-only"
        raise ValueError(
            f"out: expected a writable uint8 array of shape {shape}, got a {state} "
            f"{out.dtype} array of shape {out.shape}"
        )
    return out


def decode_records_chw(
    blobs: list[bytes],
    size: int,
    flip: np.ndarray | None = None,
    sources: Sequence[str] | Callable[[int], str] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode straight into uint8 [B, 3, size, size], mirroring the rows where ``flip``.

    Equal to ``to_chw(decode_records(blobs, size, sources), flip)`` with one copy per image
    instead of two (the decoder's buffer is transposed once, into the output). For the flip-only
    augmentation, which is the official FFC one. ``out``: a writable uint8 [B, 3, size, size]
    to decode into (returned) instead of a fresh array.
    """
    out = _chw_out(out, (len(blobs), 3, size, size))
    scratch = np.empty((size, size, 3), dtype=np.uint8)  # the decoder's output, reused
    for i, blob in enumerate(blobs):
        src = _decode_view(blob, size, _source(sources, i), scratch).transpose(2, 0, 1)
        out[i] = src[:, :, ::-1] if flip is not None and flip[i] else src
    return out


# ---- counter-based randomness: augmentation depends only on a per-row seed ------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mix_seed(*parts: int) -> int:
    """Hash integers (seed, epoch, rank, ...) into one uint64 seed, order-sensitive."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = splitmix64(h ^ np.asarray([int(p) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(h[0])


def row_uniforms(seeds: np.ndarray, n: int) -> np.ndarray:
    """``n`` independent U[0, 1) draws per row seed: float64 [B, n].

    Counter-based (no RNG state), so a row's augmentation is the same whichever process,
    batch or order decodes it: the Ray stream and the single-process reader agree exactly.
    """
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1, 1)
    counters = np.arange(1, n + 1, dtype=np.uint64).reshape(1, -1) * np.uint64(0xD1B54A32D192ED03)
    bits = splitmix64(splitmix64(seeds) ^ counters)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation: horizontal flip (p = 0.5, as the official FFC loaders);
    optional random resized crop (area ``rrc_scale``, aspect ``rrc_ratio``, resized back to the
    stored size) and colour jitter (brightness, contrast, saturation factors in
    [1 - ``color_jitter``, 1 + ``color_jitter``]). All draws come from per-row seeds."""

    flip: bool = True
    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.8, 1.0)
    rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    color_jitter: float = 0.0

    @classmethod
    def from_data_config(cls, data_cfg) -> Augment:
        """Read ``flip`` (and, when the config has them, ``random_resized_crop`` and
        ``color_jitter``) from a :class:`ffc_ray.config.DataConfig`."""
        return cls(
            flip=bool(getattr(data_cfg, "flip", True)),
            random_resized_crop=bool(getattr(data_cfg, "random_resized_crop", False)),
            color_jitter=float(getattr(data_cfg, "color_jitter", 0.0)),
        )

    @property
    def active(self) -> bool:
        return self.flip or self.random_resized_crop or self.color_jitter > 0


def _rrc_boxes(u: np.ndarray, h: int, w: int, scale, ratio) -> np.ndarray:
    """Crop boxes (x0, y0, x1, y1) int [B, 4] from uniforms u [B, 4] (torchvision-like, 1 draw)."""
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_r = np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u[:, 1]
    r = np.exp(log_r)
    cw = np.clip(np.round(np.sqrt(area * r)), 1, w).astype(np.int64)
    ch = np.clip(np.round(np.sqrt(area / r)), 1, h).astype(np.int64)
    x0 = np.floor(u[:, 2] * (w - cw + 1)).astype(np.int64)
    y0 = np.floor(u[:, 3] * (h - ch + 1)).astype(np.int64)
    return np.stack([x0, y0, x0 + cw, y0 + ch], axis=1)


def augment_batch(images: np.ndarray, seeds: np.ndarray, aug: Augment) -> np.ndarray:
    """Apply ``aug`` to uint8 [B, H, W, 3] in place where possible; returns the batch.

    Row i's random choices depend on ``seeds[i]`` only (see :func:`row_uniforms`).
    """
    if not aug.active or len(images) == 0:
        return images
    u = row_uniforms(seeds, 8)
    b, h, w, _ = images.shape
    if aug.random_resized_crop:
        Image = _pil()
        boxes = _rrc_boxes(u[:, 1:5], h, w, aug.rrc_scale, aug.rrc_ratio)
        for i in range(b):
            x0, y0, x1, y1 = (int(v) for v in boxes[i])
            if (x0, y0, x1, y1) != (0, 0, w, h):
                crop = Image.fromarray(np.ascontiguousarray(images[i, y0:y1, x0:x1]), "RGB")
                images[i] = np.asarray(crop.resize((w, h), Image.BILINEAR))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        f = 1.0 + j * (2.0 * u[:, 5:8] - 1.0)  # brightness, contrast, saturation factors
        x = images.astype(np.float32)
        x *= f[:, 0, None, None, None].astype(np.float32)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * f[:, 1, None, None, None].astype(np.float32) + mean
        gray = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
        x = (x - gray) * f[:, 2, None, None, None].astype(np.float32) + gray
        np.clip(np.rint(x), 0, 255, out=x)
        images[...] = x.astype(np.uint8)
    if aug.flip:
        flip_rows(images, u[:, 0] < 0.5)
    return images


def flip_mask(seeds: np.ndarray, aug: Augment) -> np.ndarray:
    """The rows :func:`augment_batch` mirrors (bool [B])."""
    if not aug.flip:
        return np.zeros(len(seeds), dtype=bool)
    return row_uniforms(seeds, 8)[:, 0] < 0.5


def flip_rows(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mirror uint8 [B, H, W, 3] rows where ``mask``, in place.

    Pixels are moved as 3-byte items (a ``V3`` view): twice as fast as reversing bytes.
    """
    if not images.flags.c_contiguous:
        images[mask] = images[mask][:, :, ::-1]
        return images
    pix = images.view(np.dtype((np.void, images.shape[-1] * images.itemsize)))[..., 0]
    for i in np.flatnonzero(mask):
        pix[i] = pix[i, :, ::-1].copy()
    return images


def to_chw(
    images: np.ndarray, flip: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 [B, H, W, 3] -> uint8 [B, 3, H, W], mirroring the rows where ``flip``, into
    ``out`` when given.

    The layout change is a strided copy anyway, so mirroring during it costs nothing.
    """
    b, h, w, c = images.shape
    out = _chw_out(out, (b, c, h, w))
    if flip is None or not flip.any():
        out[...] = images.transpose(0, 3, 1, 2)
        return out
    for i in range(b):
        src = images[i].transpose(2, 0, 1)
        out[i] = src[:, :, ::-1] if flip[i] else src
    return out


def decode_augment_chw(
    blobs: list[bytes],
    seeds: np.ndarray,
    size: int,
    aug: Augment,
    sources: Sequence[str] | Callable[[int], str] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Stored records -> augmented uint8 [B, 3, size, size] (the Ray stream's block layout),
    into ``out`` when given (see :func:`decode_records_chw`).

    With the flip as the only augmentation (the official one) each record is decoded straight
    into the output (:func:`decode_records_chw`); otherwise :func:`augment_batch` runs on the
    HWC batch first. The flip comes last either way, as in :func:`augment_batch`.
    """
    flip = flip_mask(seeds, aug)
    if not aug.random_resized_crop and not aug.color_jitter > 0:
        return decode_records_chw(blobs, size, flip, sources, out)
    images = augment_batch(decode_records(blobs, size, sources), seeds, replace(aug, flip=False))
    return to_chw(images, flip, out)
