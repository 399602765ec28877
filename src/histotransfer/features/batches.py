"""What the patch loader hands the encoder side: a batch of one slide's patches (:class:`PatchBatch`), holding
pixels or, for the GPU decoder (``gpu_decode``), the compressed tiles they are cut from (:class:`EncodedTiles`).

The loader makes these and the GPU decoder turns tiles into pixels; both import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..stain import SlideStain

# What the ``decode`` attr of a feature file says: tiles decoded by the loader processes (or the slide's
# backend), by nvJPEG on the GPU, or by libjpeg-turbo in the main process (the GPU path run on a CPU device).
DECODED_ON_CPU, DECODED_ON_GPU, DECODED_IN_MAIN = "cpu", "gpu", "cpu-main"


@dataclass
class EncodedTiles:
    """The compressed JPEG tiles a batch of B patches needs, each distinct tile once, and where they land.

    ``origins[b]`` is patch b's top-left level pixel (x, y) and its first covered tile column and row;
    ``grid[b, r, c]`` the stream of the tile at that many rows and columns from it, or T (the number of
    streams: a white tile) for a sparse tile and in the last row and column, where pixels outside the level go.
    """

    data: np.ndarray  # uint8: the streams back to back
    bounds: np.ndarray  # int64 (T + 1,): stream i is data[bounds[i]:bounds[i + 1]]
    origins: np.ndarray  # int64 (B, 4): x, y, first tile column, first tile row
    grid: np.ndarray  # int64 (B, R + 1, C + 1)
    tile_size: tuple[int, int]  # (w, h)
    level_size: tuple[int, int]  # (w, h)
    read_size: int  # patch side read from the level
    patch_size: int  # patch side after the level is resized to the target resolution
    out_size: int  # patch side handed to the encoder
    rgb: bool  # the streams are RGB-coded (with the Adobe marker that says so)
    slide: str  # the slide file, for messages

    def streams(self) -> list[torch.Tensor]:
        """The JPEG streams as 1-D uint8 tensors (views of ``data``), as decode_jpeg takes them."""
        data = torch.from_numpy(self.data)
        return [data[a:b] for a, b in zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist())]


@dataclass
class PatchBatch:
    """Pixels (B, S, S, 3) uint8 of rows ``start:start+B`` of slide ``job``, or their compressed tiles (to be
    decoded on the GPU), or the error reading them; ``decode`` says where the tiles were decoded. The item
    that opens a slide's batches under per-slide normalisation holds instead the slide's source estimates
    (``sources``, by normaliser tag; ``start`` -1)."""

    job: int
    start: int
    pixels: torch.Tensor | None
    error: str = ""
    tiles: EncodedTiles | None = None
    decode: str = DECODED_ON_CPU
    sources: dict[str, SlideStain] | None = None

    def pin_memory(self) -> PatchBatch:
        """Called by DataLoader(pin_memory=True): page-locked pixels copy to the GPU asynchronously."""
        return replace(self, pixels=self.pixels.pin_memory() if self.pixels is not None else None)
