"""GPU decoding of JPEG tiles (``features.gpu_decode``): spliced tile streams, patch assembly, resizing, the
loader hand-off and extraction's ``decode`` option.

Everything but nvJPEG itself runs on the CPU here: ``torchvision.io.decode_jpeg(..., device="cpu")`` decodes the
same spliced streams with libjpeg-turbo and gives exactly imagecodecs' pixels (measured on every tile of the CMU
Aperio slide and of demo TIFFs: max difference 0), so assembled patches equal PatchReader's exactly when read
natively and within 1 level (rounding) when resized. The CUDA tests allow nvJPEG ``GPU_JPEG_TOLERANCE`` levels.
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from conftest import write_synthetic_slide
from histotransfer.errors import HistotransferError
from histotransfer.features import extract as extract_module
from histotransfer.features import extract_features, read_feature_file
from histotransfer.features.batches import DECODED_IN_MAIN, DECODED_ON_CPU, DECODED_ON_GPU
from histotransfer.features.gpu_decode import (
    GPU_JPEG_TOLERANCE,
    DecodedBatches,
    TileDecoder,
    TileSource,
    resize_batch,
    resize_matrix,
    resolve_decode,
)
from histotransfer.features.loader import PatchBatches, SlideJob, patch_loader, resize_patch
from histotransfer.patches import PatchReader, write_patch_file
from histotransfer.patches.geometry import tiling_spec
from histotransfer.slide import TiledTiff, open_slide, open_tiled_tiff
from histotransfer.slide.tiff_tiles import ADOBE_RGB_MARKER

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
RESIZE_TOLERANCE = 1  # OpenCV rounds its bilinear weights to 11 bits; area weights agree exactly
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
# Level-0 corners: inside, straddling tiles, over the left/top and right/bottom borders, wholly outside.
# Odd ones fall between the pixels of level 1: rounded to the nearest, as PatchReader does.
CORNERS = [(0, 0), (700, 900), (701, 903), (1000, 250), (-100, 40), (1900, 1400), (1800, -300), (5000, 5000)]


@pytest.fixture(scope="module")
def demo_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048 x 1536 demo pyramid (0.25 um/px; levels 1/2, 1/4, ...): JFIF YCbCr JPEG tiles of 256 px."""
    return write_synthetic_slide(tmp_path_factory.mktemp("gpu_decode") / "demo.tif", size=(2048, 1536))


def aperio_like_tile(rgb: np.ndarray) -> tuple[bytes, bytes]:
    """(tables, abbreviated stream) of an RGB-coded JPEG as Aperio writes them: no JFIF or Adobe marker,
    component ids 0, 1, 2 (in the frame and scan headers), quantisation and Huffman tables kept apart for the
    JPEGTables tag."""
    full = imagecodecs.jpeg8_encode(rgb, level=85, colorspace="RGB", outcolorspace="RGB")
    tables, kept, i = [], [], 2
    while full[i + 1] != 0xDA:  # segments up to the start of scan
        length = struct.unpack(">H", full[i + 2 : i + 4])[0]
        segment = bytearray(full[i : i + 2 + length])
        if segment[1] in (0xDB, 0xC4):  # DQT, DHT
            tables.append(bytes(segment))
        elif segment[1] == 0xC0:  # SOF0: component ids R, G, B -> 0, 1, 2
            segment[10:19:3] = bytes([0, 1, 2])
            kept.append(bytes(segment))
        elif segment[1] not in (0xE0, 0xEE):  # APP0 (JFIF) and APP14 (Adobe) dropped
            kept.append(bytes(segment))
        i += 2 + length
    scan = bytearray(full[i:])
    scan[5:11:2] = bytes([0, 1, 2])  # SOS: marker, length, count, then (id, tables) per component
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(kept) + bytes(scan)


@pytest.fixture(scope="module")
def aperio_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A one-level 700 x 500 TIFF of 256 px tiles stored as Aperio stores them (RGB photometric, shared
    JPEGTables, abbreviated RGB-coded tiles), and the image it was written from."""
    rng = np.random.default_rng(1)
    image = cv2.resize(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8), (700, 500), interpolation=cv2.INTER_CUBIC)
    padded = np.full((512, 768, 3), 255, np.uint8)
    padded[:500, :700] = image
    pieces = [
        aperio_like_tile(np.ascontiguousarray(padded[y : y + 256, x : x + 256]))
        for y in range(0, 512, 256)
        for x in range(0, 768, 256)
    ]
    path = tmp_path_factory.mktemp("aperio_like") / "aperio_like.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            iter(tile for _, tile in pieces),
            shape=(500, 700, 3),
            dtype=np.uint8,
            tile=(256, 256),
            compression="jpeg",
            compressionargs={"outcolorspace": "RGB"},
            photometric="rgb",
            jpegtables=pieces[0][0],
            metadata=None,
            resolution=(1e4 / 0.25, 1e4 / 0.25),
            resolutionunit="CENTIMETER",
        )
    return path, image


def tiled_tiff(path: Path) -> TiledTiff:
    with open_slide(path) as slide:
        tiles = open_tiled_tiff(slide.path, slide.backend, slide.vendor, slide.level_dimensions)
    assert tiles is not None
    return tiles


def decode_cpu(stream: bytes) -> np.ndarray:
    return (
        decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8), mode=ImageReadMode.RGB)
        .permute(1, 2, 0)
        .numpy()
    )


def every_tile(tiles: TiledTiff, decode=decode_cpu):
    """(level, colour space, decoded spliced stream, imagecodecs' pixels) for every stored tile of every JPEG
    level, both cut to the part inside the level."""
    for level, lv in tiles.levels.items():
        if tiles.jpeg_colorspace(level) is None:
            continue
        for index in range(len(lv.offsets)):
            stream = tiles.jpeg_stream(level, index)
            if stream is None:
                continue
            ty, tx = divmod(index, lv.tiles_across)
            x, y = tx * lv.tile_w, ty * lv.tile_h
            w, h = min(lv.tile_w, lv.width - x), min(lv.tile_h, lv.height - y)
            yield level, tiles.jpeg_colorspace(level), stream, decode(stream)[:h, :w], tiles.read(level, x, y, w, h)


def diff(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    a = a.cpu().numpy() if isinstance(a, torch.Tensor) else a
    b = b.cpu().numpy() if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


# ------------------------------------------------------------------------------------------- spliced streams


def test_spliced_demo_tiles_decode_exactly_as_imagecodecs(demo_tiff: Path) -> None:
    tiles = tiled_tiff(demo_tiff)
    decoded = list(every_tile(tiles))
    assert len(decoded) == 48 + 12 + 4 and {level for level, *_ in decoded} == {0, 1, 2}
    for _, space, stream, ours, ref in decoded:
        assert space == "YCBCR" and ADOBE_RGB_MARKER not in stream
        np.testing.assert_array_equal(ours, ref)
    tiles.close()


def test_aperio_like_tiles_get_their_tables_and_the_rgb_marker(aperio_like: tuple[Path, np.ndarray]) -> None:
    path, image = aperio_like
    tiles = tiled_tiff(path)
    assert tiles.jpeg_colorspace(0) == "RGB" and tiles.levels[0].jpegtables is not None
    decoded = list(every_tile(tiles))
    assert len(decoded) == 6
    for _, _, stream, ours, ref in decoded:
        assert stream.startswith(b"\xff\xd8" + ADOBE_RGB_MARKER) and stream.count(b"\xff\xd8") == 1
        np.testing.assert_array_equal(ours, ref)
        unmarked = decode_cpu(stream.replace(ADOBE_RGB_MARKER, b""))[: ref.shape[0], : ref.shape[1]]
        assert diff(unmarked, ref).mean() > 10  # taken for YCbCr: wrong colours
    # Right colours, not just agreement of two decoders: the whole level is the image up to JPEG loss.
    assert diff(tiles.read(0, 0, 0, 700, 500), image).mean() < 2
    tiles.close()


def test_cmu_tiles_decode_exactly_as_imagecodecs_and_need_the_marker(cmu_svs: Path) -> None:
    tiles = tiled_tiff(cmu_svs)
    decoded = list(every_tile(tiles))
    assert len(decoded) == 130 and {space for _, space, *_ in decoded} == {"RGB"}
    for *_, ours, ref in decoded:
        np.testing.assert_array_equal(ours, ref)
    _, _, stream, _, ref = decoded[60]
    assert diff(decode_cpu(stream.replace(ADOBE_RGB_MARKER, b""))[: ref.shape[0], : ref.shape[1]], ref).mean() > 20
    tiles.close()


# --------------------------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize(("src", "dst"), [(171, 128), (300, 97), (448, 224), (97, 300), (128, 200)])
def test_resize_matrix_is_opencvs_resize(src: int, dst: int) -> None:
    rng = np.random.default_rng(src)
    image = cv2.GaussianBlur(rng.integers(0, 256, (src, src, 3), dtype=np.uint8), (3, 3), 0)
    image[src // 3 : src // 2] = 255  # a sharp edge
    ref = cv2.resize(image, (dst, dst), interpolation=cv2.INTER_AREA if dst < src else cv2.INTER_LINEAR)
    w = resize_matrix(src, dst)
    np.testing.assert_allclose(w.sum(1), 1.0)
    pixels = torch.from_numpy(image)[None]
    ours = resize_batch(pixels, dst)[0]
    assert diff(ours, ref).max() <= (0 if dst < src else RESIZE_TOLERANCE)
    if dst < src and src % dst:  # why torch's own "area" mode is not used: it is not OpenCV's at odd ratios
        area = torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2).float(), size=(dst, dst), mode="area")
        assert diff(area.round().byte()[0].permute(1, 2, 0), ref).max() > 10


# ---------------------------------------------------------------------------------------- assembled patches


def reader_patches(
    path: Path, magnification: float, patch_size: int, corners: list[tuple[int, int]], input_size: int | None = None
) -> np.ndarray:
    with open_slide(path) as slide:
        reader = PatchReader(slide, tiling_spec(slide, magnification, patch_size))
        patches = [reader.read(x, y) for x, y in corners]
        reader.close()
    if input_size is not None:
        patches = [resize_patch(p, input_size) for p in patches]
    return np.stack(patches)


def tile_patches(
    path: Path,
    magnification: float,
    patch_size: int,
    corners: list[tuple[int, int]],
    input_size: int | None = None,
    device: torch.device = CPU,
) -> tuple[torch.Tensor, str]:
    with open_slide(path) as slide:
        source = TileSource.open(slide, tiling_spec(slide, magnification, patch_size))
        assert source is not None
        tiles = source.batch(np.array(corners), input_size)
        source.close()
    return TileDecoder(device)(tiles)


@pytest.mark.parametrize(
    ("magnification", "patch_size", "input_size", "tolerance"),
    [
        (20.0, 256, None, 0),  # level 1 read natively
        (30.0, 128, None, RESIZE_TOLERANCE),  # level 0, 171 px resized to 128
        (30.0, 128, 64, RESIZE_TOLERANCE),  # and then shrunk for the encoder
        (30.0, 128, 200, RESIZE_TOLERANCE),  # or grown
        (5.0, 100, None, RESIZE_TOLERANCE),  # level 2 (512 x 384), 200 px halved: most patches over a border
    ],
)
def test_assembled_patches_equal_patch_readers(
    demo_tiff: Path, magnification: float, patch_size: int, input_size: int | None, tolerance: int
) -> None:
    ours, where = tile_patches(demo_tiff, magnification, patch_size, CORNERS, input_size)
    ref = reader_patches(demo_tiff, magnification, patch_size, CORNERS, input_size)
    assert where == DECODED_IN_MAIN and ours.is_contiguous()
    assert diff(ours, ref).max() <= tolerance
    assert (ref[-1] == 255).all()  # wholly outside the slide: white, as PatchReader gives


def test_assembled_cmu_patches_equal_patch_readers(cmu_svs: Path) -> None:
    corners = [(0, 0), (500, 700), (2100, 2800), (-50, -50), (1000, 2900)]
    for magnification, tolerance in [(20.0, 0), (10.0, RESIZE_TOLERANCE)]:  # native; 449 px resized to 224
        ours, _ = tile_patches(cmu_svs, magnification, 224, corners)
        assert diff(ours, reader_patches(cmu_svs, magnification, 224, corners)).max() <= tolerance


def test_levels_that_are_not_jpeg_or_would_grow_have_no_tile_source(tmp_path: Path, demo_tiff: Path) -> None:
    lzw = tmp_path / "lzw.tif"
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(
        lzw,
        image,
        tile=(256, 256),
        compression="lzw",
        photometric="rgb",
        metadata=None,
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    with open_slide(lzw) as slide:
        assert TileSource.open(slide, tiling_spec(slide, 20.0, 128)) is None
    with open_slide(demo_tiff) as slide:
        spec = tiling_spec(slide, 20.0, 256)
        grown = type(spec)(patch_size=256, patch_size_level0=500, patch_level=1)  # 250 px of level 1 -> 256
        assert TileSource.open(slide, grown) is None
        assert TileSource.open(slide, spec) is not None


# ------------------------------------------------------------------------------------------- loader hand-off


def slide_jobs(demo_tiff: Path, tmp_path: Path) -> list[SlideJob]:
    """The demo TIFF (JPEG tiles) and a PNG of part of it (no tiles), 10 patches each."""
    png = tmp_path / "part.png"
    with open_slide(demo_tiff) as slide:
        spec = tiling_spec(slide, 20.0, 128)
        cv2.imwrite(str(png), cv2.cvtColor(slide.read_region((0, 0), 0, (600, 500)), cv2.COLOR_RGB2BGR))
    corners = np.array([(x, y) for y in (-64, 200, 900) for x in (0, 300, 1700)] + [(1850, 1400)])
    png_corners = np.array([(x, y) for y in (0, 150) for x in (0, 100, 250, 400, 500)])
    with open_slide(png, mpp=0.25) as slide:
        png_spec = tiling_spec(slide, 20.0, 64)
    return [
        SlideJob("demo", str(demo_tiff), tmp_path / "demo.h5", corners, spec),
        SlideJob("part", str(png), tmp_path / "part.h5", png_corners, png_spec),
    ]


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_hands_tiles_over_for_jpeg_slides_and_pixels_for_others(
    demo_tiff: Path, tmp_path: Path, workers: int
) -> None:
    jobs = slide_jobs(demo_tiff, tmp_path)
    raw = list(PatchBatches(jobs, 4, decode="gpu"))
    assert [b.tiles is not None for b in raw] == [True] * 3 + [False] * 3
    assert all(b.pixels is None for b in raw[:3]) and all(b.pixels is not None for b in raw[3:])
    cpu = list(PatchBatches(jobs, 4))
    loader = patch_loader(PatchBatches(jobs, 4, input_size=96, decode="gpu"), workers, pin_memory=False)
    ref = list(PatchBatches(jobs, 4, input_size=96))
    for decoded, expected in zip(DecodedBatches(loader, TileDecoder(CPU)), ref, strict=True):
        assert (decoded.job, decoded.start, decoded.error, decoded.tiles) == (expected.job, expected.start, "", None)
        assert decoded.decode == (DECODED_IN_MAIN if decoded.job == 0 else DECODED_ON_CPU)
        assert diff(decoded.pixels, expected.pixels).max() <= RESIZE_TOLERANCE
    assert all(b.decode == DECODED_ON_CPU for b in cpu)


def test_decoded_batches_report_undecodable_tiles_stop_early_and_raise(demo_tiff: Path, tmp_path: Path) -> None:
    jobs = slide_jobs(demo_tiff, tmp_path)[:1]
    batches = list(PatchBatches(jobs, 4, decode="gpu"))
    batches[1].tiles.data[:] = 0  # not JPEG any more
    out = list(DecodedBatches(batches, TileDecoder(CPU)))
    assert [bool(b.error) for b in out] == [False, True, False]
    assert out[1].error.startswith(f"{demo_tiff}: decoding JPEG tiles") and out[1].pixels is None

    for first in DecodedBatches(batches, TileDecoder(CPU), ahead=1):  # the consumer leaves after one batch
        assert first.start == 0
        break

    def broken():
        yield batches[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(DecodedBatches(broken(), TileDecoder(CPU)))


# ------------------------------------------------------------------------------------------------ extraction


def test_decode_setting_resolves_and_refuses_gpu_without_cuda(demo_tiff: Path, tmp_path: Path) -> None:
    assert resolve_decode("cpu", CPU) == resolve_decode("auto", CPU) == "cpu"
    with pytest.raises(HistotransferError, match="--decode gpu: extraction runs on the CPU"):
        resolve_decode("gpu", CPU)
    with pytest.raises(HistotransferError, match="decode"):
        extract_features(tmp_path, tmp_path / "out", "resnet18", "random", decode="gpup")


def write_patches(demo_tiff: Path, folder: Path) -> Path:
    with open_slide(demo_tiff) as slide:
        spec = tiling_spec(slide, 10.0, 64)
    corners = np.array([(x, y) for y in range(0, 1536, 300) for x in range(0, 2048, 300)])
    write_patch_file(folder / "demo.h5", corners, np.ones(len(corners), np.float32), spec)
    return folder


def test_extraction_records_where_tiles_were_decoded(demo_tiff: Path, tmp_path: Path, monkeypatch) -> None:
    patches = write_patches(demo_tiff, tmp_path / "patches")
    cpu = extract_features(
        patches, tmp_path / "out", "resnet18", "random", 3, batch_size=16, workers=0, device="cpu", decode="cpu"
    )
    monkeypatch.setattr(extract_module, "resolve_decode", lambda setting, device: "gpu")  # the GPU path, on CPU
    again = extract_module.run_extraction(
        patches, tmp_path / "out", "resnet18", "random", 3, batch_size=16, workers=0, device="cpu", decode="gpu"
    )
    assert again.folder == cpu and [r.status for r in again.results] == ["skipped"]  # decode is a runtime option
    main = extract_features(
        patches, tmp_path / "main", "resnet18", "random", 3, batch_size=16, workers=0, device="cpu", decode="gpu"
    )
    a, b = read_feature_file(cpu / "demo.h5"), read_feature_file(main / "demo.h5")
    assert (a.attrs["decode"], b.attrs["decode"]) == (DECODED_ON_CPU, DECODED_IN_MAIN)
    np.testing.assert_array_equal(a.features, b.features)  # native reads: the very same pixels
    report = pd.read_csv(main / "extract.csv", keep_default_na=False)
    assert list(zip(report.status, report.message)) == [("ok", f"decode {DECODED_IN_MAIN}")]


# ------------------------------------------------------------------------------------------------------ CUDA


def decode_cuda(stream: bytes) -> np.ndarray:
    return (
        decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8), mode=ImageReadMode.RGB, device="cuda")
        .permute(1, 2, 0)
        .cpu()
        .numpy()
    )


@needs_cuda
def test_nvjpeg_decodes_demo_tiles_within_tolerance(demo_tiff: Path) -> None:
    tiles = tiled_tiff(demo_tiff)
    diffs = [diff(ours, ref) for *_, ours, ref in every_tile(tiles, decode_cuda)]
    assert max(d.max() for d in diffs) <= GPU_JPEG_TOLERANCE and np.mean([d.mean() for d in diffs]) < 0.5
    tiles.close()


@needs_cuda
def test_nvjpeg_honours_the_adobe_rgb_marker(cmu_svs: Path) -> None:
    """When this fails, RGB-coded tiles are decoded on the CPU by TileDecoder (correct, slower)."""
    tiles = tiled_tiff(cmu_svs)
    diffs = [diff(ours, ref) for *_, ours, ref in every_tile(tiles, decode_cuda)]
    assert max(d.max() for d in diffs) <= GPU_JPEG_TOLERANCE and np.mean([d.mean() for d in diffs]) < 0.5
    tiles.close()


@needs_cuda
def test_gpu_patches_equal_patch_readers_within_tolerance(demo_tiff: Path) -> None:
    for magnification, patch_size, input_size in [(20.0, 256, None), (30.0, 128, None), (30.0, 128, 224)]:
        ours, where = tile_patches(demo_tiff, magnification, patch_size, CORNERS, input_size, torch.device("cuda"))
        ref = reader_patches(demo_tiff, magnification, patch_size, CORNERS, input_size)
        d = diff(ours, ref)
        assert where == DECODED_ON_GPU and ours.is_cuda
        assert d.max() <= GPU_JPEG_TOLERANCE + RESIZE_TOLERANCE and d.mean() < 0.5


@needs_cuda
def test_gpu_decoded_cmu_patches_through_the_threaded_loader(cmu_svs: Path, tmp_path: Path) -> None:
    with open_slide(cmu_svs) as slide:
        spec = tiling_spec(slide, 20.0, 224)
    corners = np.array([(x, y) for y in range(-100, 2967, 400) for x in range(-100, 2220, 400)])
    jobs = [SlideJob("cmu", str(cmu_svs), tmp_path / "cmu.h5", corners, spec)]
    decoder = TileDecoder(torch.device("cuda"))
    ours = list(DecodedBatches(patch_loader(PatchBatches(jobs, 16, decode="gpu"), 1, pin_memory=True), decoder))
    ref = torch.cat([b.pixels for b in PatchBatches(jobs, 16)])
    d = diff(torch.cat([b.pixels for b in ours]), ref)
    assert d.max() <= GPU_JPEG_TOLERANCE and d.mean() < 0.5
    assert {b.decode for b in ours} == {DECODED_ON_GPU if decoder.rgb_on_device else DECODED_IN_MAIN}


@needs_cuda
def test_gpu_extraction_gives_the_cpu_features_to_decoder_tolerance(demo_tiff: Path, tmp_path: Path) -> None:
    patches = write_patches(demo_tiff, tmp_path / "patches")
    cpu = extract_features(patches, tmp_path / "cpu", "resnet18", "random", 2, workers=1, device="cuda", decode="cpu")
    gpu = extract_features(patches, tmp_path / "gpu", "resnet18", "random", 2, workers=1, device="cuda", decode="auto")
    a, b = read_feature_file(cpu / "demo.h5"), read_feature_file(gpu / "demo.h5")
    assert (a.attrs["decode"], b.attrs["decode"]) == (DECODED_ON_CPU, DECODED_ON_GPU)
    assert np.corrcoef(a.features.ravel(), b.features.ravel())[0, 1] > 0.999
