"""Patch pixels decoded on the GPU: loader processes only read compressed JPEG tiles, the main process decodes
them in batches with nvJPEG and cuts, pastes and resizes the patches on the device.

Beside a GPU encoder, CPU loader processes decoding JPEG tiles with libjpeg-turbo can be slower than the
encoder. Here a loader process reads, for a batch of patches, the compressed bytes of the tiles they cover
(:class:`TileSource`, giving :class:`EncodedTiles`: each distinct tile once, as a complete JPEG stream with its
page's tables spliced in, and where each tile lands in each patch); the main process decodes them all in one
``torchvision.io.decode_jpeg(list, device="cuda")`` call (nvJPEG), gathers the patches from the decoded tiles
and resizes them, all on the device (:class:`TileDecoder`), one batch ahead of the encoder in a thread
(:class:`DecodedBatches`).

Only slide levels that the direct tile path reads and that are JPEG-compressed with 3 samples (Aperio SVS,
most pyramidal TIFFs) go this way; other codecs (LZW, deflate, JPEG 2000, ...), other formats, and levels that
would have to be enlarged are decoded on the CPU by the loader processes as before, batch for batch.

Pixels: the same tile streams decoded by torchvision's libjpeg-turbo on the CPU equal imagecodecs' decode
exactly (every tile of the CMU Aperio slide and of demo TIFFs, ``tests/test_gpu_decode.py``); nvJPEG's IDCT
and chroma upsampling may differ from libjpeg-turbo's by a few levels (:data:`GPU_JPEG_TOLERANCE`, checked by
the CUDA test). Resizing applies OpenCV's weights as matrices (:func:`resize_matrix`), so resized patches equal
``cv2.resize``'s to rounding (at most 1 level).
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from ..errors import HistotransferError, one_line
from ..patches import PatchSpec
from ..slide import Slide, TiledTiff, open_tiled_tiff
from .batches import DECODED_IN_MAIN, DECODED_ON_GPU, EncodedTiles, PatchBatch

# torchvision 0.29 marks its JPEG codec deprecated in favour of TorchCodec, which has no batched nvJPEG decode of
# in-memory streams yet; the codec works, so its warning (raised on every call) is silenced here, by message.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

# Largest difference (grey levels) allowed between nvJPEG's and libjpeg-turbo's decode of the same tile.
GPU_JPEG_TOLERANCE = 3
# A mean difference above this between the GPU's and the CPU's decode of an RGB-coded tile means the GPU decoder
# took its components for YCbCr (IDCT differences average well under one level; a wrong colour transform, tens).
RGB_CHECK_MEAN = 2.0


class TileSource:
    """Loader side: the compressed tiles covering a slide's patches, read without decoding them.

    The geometry is :class:`~histotransfer.patches.PatchReader`'s: a patch's footprint is read from the spec's
    level at the level pixel nearest its level-0 corner, ``read_size`` pixels square, then resized to the patch
    size.
    """

    def __init__(self, tiles: TiledTiff, level: int, downsample: float, read_size: int, patch_size: int):
        self.tiles = tiles
        self.level = level
        self.downsample = downsample
        self.read_size = read_size
        self.patch_size = patch_size

    @classmethod
    def open(cls, slide: Slide, spec: PatchSpec) -> TileSource | None:
        """A tile source for the slide's patches, or None when their level is not read from JPEG tiles
        directly or would be enlarged (PatchReader's INTER_AREA zoom has no GPU counterpart here).

        ``spec`` is complete (as ``PatchReader(slide, spec).spec`` or ``tiling_spec`` give it)."""
        level = int(spec.patch_level)
        downsample = slide.level_downsamples[level]
        read_size = max(1, round(spec.patch_size_level0 / downsample))
        if read_size < spec.patch_size:
            return None
        tiles = open_tiled_tiff(slide.path, slide.backend, slide.vendor, slide.level_dimensions)
        if tiles is None:
            return None
        if not tiles.can_read(level) or tiles.jpeg_colorspace(level) is None:
            tiles.close()
            return None
        return cls(tiles, level, downsample, read_size, spec.patch_size)

    def batch(self, coords: np.ndarray, out_size: int | None = None) -> EncodedTiles:
        """The tiles of the patches whose footprints' top-left corners are level-0 ``coords`` (N, 2)."""
        lv = self.tiles.levels[self.level]
        n = self.read_size
        origins = np.zeros((len(coords), 4), np.int64)
        spans = []
        for b, (x, y) in enumerate(coords):
            lx, ly = round(int(x) / self.downsample), round(int(y) / self.downsample)
            rows, cols = self.tiles.covered(self.level, lx, ly, n, n)
            origins[b] = lx, ly, cols.start, rows.start
            spans.append((rows, cols))
        n_rows = max(len(rows) for rows, _ in spans)
        n_cols = max(len(cols) for _, cols in spans)
        grid = np.full((len(coords), n_rows + 1, n_cols + 1), -1, np.int64)
        slots: dict[int, int] = {}
        streams: list[bytes] = []
        for b, (rows, cols) in enumerate(spans):
            for r, ty in enumerate(rows):
                for c, tx in enumerate(cols):
                    index = ty * lv.tiles_across + tx
                    if index not in slots:
                        stream = self.tiles.jpeg_stream(self.level, index)
                        slots[index] = -1 if stream is None else len(streams)
                        if stream is not None:
                            streams.append(stream)
                    grid[b, r, c] = slots[index]
        grid[grid < 0] = len(streams)
        bounds = np.cumsum([0] + [len(s) for s in streams], dtype=np.int64)
        return EncodedTiles(
            np.frombuffer(bytearray(b"".join(streams)), np.uint8),
            bounds,
            origins,
            grid,
            (lv.tile_w, lv.tile_h),
            (lv.width, lv.height),
            n,
            self.patch_size,
            out_size or self.patch_size,
            self.tiles.jpeg_colorspace(self.level) == "RGB",
            str(self.tiles.path),
        )

    def close(self) -> None:
        self.tiles.close()


def resize_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64 weights of OpenCV's 1-D resize of ``src`` pixels to ``dst``: area averaging when
    shrinking (cv2.INTER_AREA: each output pixel the mean of the input span it covers, partly covered pixels
    weighted by the covered fraction), bilinear when growing (cv2.INTER_LINEAR: half-pixel centres, edge
    pixels repeated).

    Written out because torch has no such filter: ``interpolate(mode="area")`` is adaptive average pooling,
    which for a non-integer ratio averages whole pixels with equal weights, and ``antialias=True`` bilinear is
    a triangle filter twice as wide as the area's box (blurrier). Against cv2 on a blurred noise image: 171 ->
    128 px, these weights 0 levels apart, mode="area" up to 37 (mean 4.0), antialiased bilinear up to 9 (mean
    1.0); 448 -> 224 px, these 0, mode="area" 1 (rounding), antialiased bilinear up to 40 (mean 4.7); growing,
    these weights 1 (cv2 rounds its bilinear weights to 11 bits). A 2-D resize is ``W @ image @ W.T``, a
    matrix product the GPU does at full speed.
    """
    out = np.arange(dst)[:, None]
    pixels = np.arange(src)[None, :]
    scale = src / dst
    if dst <= src:
        lo, hi = out * scale, (out + 1) * scale
        covered = np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0, None)
        return covered / scale
    centre = np.maximum((out[:, 0] + 0.5) * scale - 0.5, 0)
    left = np.minimum(np.floor(centre).astype(np.int64), src - 1)
    frac = np.where(left >= src - 1, 0.0, centre - left)
    weights = np.zeros((dst, src))
    rows = np.arange(dst)
    np.add.at(weights, (rows, left), 1 - frac)
    np.add.at(weights, (rows, np.minimum(left + 1, src - 1)), frac)
    return weights


@lru_cache(maxsize=8)
def _nvjpeg_check(device: str) -> str:
    """Why torchvision cannot decode JPEG on ``device`` ("" when it can)."""
    if not device.startswith("cuda"):
        return "extraction runs on the CPU (--device cpu)"
    probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
    try:
        decode_jpeg(probe, device=device)
    except RuntimeError as exc:  # torchvision built without nvJPEG, or a driver that cannot run it
        return f"torchvision cannot decode JPEG on {device}: {one_line(exc)}"
    return ""


def resolve_decode(setting: str, device: torch.device) -> str:
    """Where extraction decodes JPEG tiles, "gpu" or "cpu", for the ``decode`` setting (auto, cpu, gpu).

    auto: on the GPU when the encoder runs on one and torchvision decodes JPEG there (nvJPEG); gpu: the same,
    but an error when it cannot. Either way, slides that are not JPEG-tiled are decoded on the CPU.
    """
    if setting == "cpu":
        return "cpu"
    why = _nvjpeg_check(str(device))
    if setting == "gpu" and why:
        raise HistotransferError(f"--decode gpu: {why}; use --decode auto or cpu.")
    return "cpu" if why else "gpu"


class TileDecoder:
    """Main-process side: :class:`EncodedTiles` to (B, S, S, 3) uint8 RGB patches on ``device``.

    On a CUDA device, the first RGB-coded batch is also decoded on the CPU: if the GPU's decode gives other
    colours (a decoder ignoring the Adobe marker), RGB-coded tiles are decoded on the CPU from then on, with a
    warning, and assembled on the GPU still.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.rgb_on_device: bool | None = None if device.type == "cuda" else True

    def __call__(self, tiles: EncodedTiles) -> tuple[torch.Tensor, str]:
        """The patches and where their tiles were decoded (``DECODED_ON_GPU`` or ``DECODED_IN_MAIN``)."""
        images, where = self._decode(tiles)
        pixels = self._assemble(tiles, images)
        if tiles.read_size != tiles.patch_size:
            pixels = resize_batch(pixels, tiles.patch_size)
        if tiles.out_size != tiles.patch_size:
            pixels = resize_batch(pixels, tiles.out_size)
        return pixels.contiguous(), where

    def _decode(self, tiles: EncodedTiles) -> tuple[list[torch.Tensor], str]:
        streams = tiles.streams()
        if tiles.rgb and streams and self.rgb_on_device is None:
            self.rgb_on_device = self._honours_rgb(streams[0])
        device = self.device if self.rgb_on_device or not tiles.rgb else torch.device("cpu")
        images = decode_jpeg(streams, mode=ImageReadMode.RGB, device=device) if streams else []
        return [im.to(self.device) for im in images], DECODED_ON_GPU if device.type == "cuda" else DECODED_IN_MAIN

    def _honours_rgb(self, stream: torch.Tensor) -> bool:
        on_device = decode_jpeg(stream, mode=ImageReadMode.RGB, device=self.device).cpu()
        on_cpu = decode_jpeg(stream, mode=ImageReadMode.RGB)
        mean = (on_device.int() - on_cpu.int()).abs().float().mean().item()
        if mean <= RGB_CHECK_MEAN:
            return True
        warnings.warn(
            f"the JPEG decoder on {self.device} takes RGB-coded tiles (Aperio) for YCbCr (mean "
            f"difference {mean:.1f} levels from libjpeg-turbo): they are decoded on the CPU; "
            "--decode cpu decodes them in the loader processes instead",
            stacklevel=2,
        )
        return False

    def _assemble(self, tiles: EncodedTiles, images: list[torch.Tensor]) -> torch.Tensor:
        """Gather each patch's pixels from the decoded tiles: (B, n, n, 3), white outside the level."""
        tw, th = tiles.tile_size
        # Stacked as (T + 1, h, w, 3): the CPU decoder's output is HWC in memory, and gathering whole pixels
        # reads 3 adjacent bytes.
        white = torch.full((th, tw, 3), 255, dtype=torch.uint8, device=self.device)
        stack = torch.stack([_fit(im, th, tw).permute(1, 2, 0) for im in images] + [white])
        origins = torch.from_numpy(tiles.origins).to(self.device)
        grid = torch.from_numpy(tiles.grid).to(self.device)
        n = tiles.read_size
        col, x = _axis(origins[:, 0], origins[:, 2], tiles.level_size[0], tw, grid.shape[2] - 1, n)
        row, y = _axis(origins[:, 1], origins[:, 3], tiles.level_size[1], th, grid.shape[1] - 1, n)
        batch = torch.arange(len(grid), device=self.device)[:, None, None]
        which = grid[batch, row[:, :, None], col[:, None, :]]
        return stack[which, y[:, :, None], x[:, None, :]]


@lru_cache(maxsize=16)
def _resize_weights(src: int, dst: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(resize_matrix(src, dst)).float().to(device)


def resize_batch(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, n, n, 3) uint8 patches resized to (B, size, size, 3) on their device as ``cv2.resize`` does:
    INTER_AREA when shrinking, INTER_LINEAR when growing (:func:`resize_matrix`)."""
    w = _resize_weights(pixels.shape[1], size, pixels.device)
    y = torch.matmul(torch.matmul(w, pixels.permute(0, 3, 1, 2).float()), w.T)
    # Halves round up, as OpenCV's integer-ratio area resize does.
    return y.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _fit(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A decoded (3, h', w') tile as (3, h, w): cut, or padded white where a tile was stored smaller."""
    image = image[:, :h, :w]
    if image.shape[1:] == (h, w):
        return image
    return torch.nn.functional.pad(image, (0, w - image.shape[2], 0, h - image.shape[1]), value=255)


def _axis(
    start: torch.Tensor, first: torch.Tensor, size: int, tile: int, outside: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis, for each patch (B,) and each of its n pixels: the tile's place from the patch's first
    covered tile (``outside`` beyond the level) and the offset in that tile, both (B, n).

    A patch wholly outside the level along the other axis covers no tile (its grid is white); its places here
    are clipped into the grid."""
    pos = start[:, None] + torch.arange(n, device=start.device)
    inside = (pos >= 0) & (pos < size)
    cell = torch.where(inside, pos.div(tile, rounding_mode="floor") - first[:, None], outside)
    return cell.clamp_(0, outside), torch.where(inside, pos.remainder(tile), 0)


_END = object()


def _offer(ready: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item`` in the queue, waiting for room unless the consumer has stopped; whether it was put."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class DecodedBatches:
    """A loader's batches with their :class:`EncodedTiles` decoded into pixels on the decoder's device.

    A thread decodes ``ahead`` batches ahead (on its own CUDA stream), so that decoding overlaps the encoder:
    ``decode_jpeg`` waits for nvJPEG and the encoder for its features, each releasing the GIL meanwhile.
    Batches that already hold pixels (slides decoded on the CPU) pass unchanged. A batch whose tiles cannot
    be decoded becomes an error for its slide, as a slide the loader cannot read.
    """

    def __init__(self, batches: Iterable[PatchBatch], decoder: TileDecoder, ahead: int = 2):
        self.batches = batches
        self.decoder = decoder
        self.ahead = ahead

    def __iter__(self) -> Iterator[PatchBatch]:
        source = iter(self.batches)  # made in the calling thread: DataLoader sets signal handlers there
        ready: queue.Queue[Any] = queue.Queue(self.ahead)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(source, ready, stop), daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield self._hand_over(*item)
        finally:
            stop.set()
            while not ready.empty():
                ready.get_nowait()
            thread.join(timeout=60)  # it ends at its next batch; a loader stuck in a worker must not hang us

    def _stream(self) -> AbstractContextManager[Any]:
        cuda = self.decoder.device.type == "cuda"
        return torch.cuda.stream(torch.cuda.Stream(self.decoder.device)) if cuda else nullcontext()

    def _produce(self, source: Iterator[PatchBatch], ready: queue.Queue[Any], stop: threading.Event) -> None:
        try:
            with self._stream(), torch.inference_mode():
                for batch in source:
                    if not _offer(ready, (self._decode(batch), self._event()), stop):
                        return
            _offer(ready, _END, stop)
        except BaseException as exc:  # handed to the consumer, which raises it
            _offer(ready, exc, stop)

    def _decode(self, batch: PatchBatch) -> PatchBatch:
        if batch.tiles is None:
            return batch
        try:
            pixels, where = self.decoder(batch.tiles)
        except RuntimeError as exc:  # a corrupt tile: an error for this slide, as on the CPU path
            return replace(batch, tiles=None, error=f"{batch.tiles.slide}: decoding JPEG tiles: {one_line(exc)}")
        return replace(batch, pixels=pixels, tiles=None, decode=where)

    def _event(self) -> torch.cuda.Event | None:
        if self.decoder.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _hand_over(self, batch: PatchBatch, event: torch.cuda.Event | None) -> PatchBatch:
        """The batch, usable on the consumer's stream once the decoder's stream has made its pixels."""
        if event is not None and batch.pixels is not None and batch.pixels.is_cuda:
            consumer = torch.cuda.current_stream(self.decoder.device)
            consumer.wait_event(event)
            batch.pixels.record_stream(consumer)
        return batch
