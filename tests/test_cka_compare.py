"""compare_encoders on real tiled TIFF patches: exact against an independent per-patch computation."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from histotransfer.analysis import compare_encoders, linear_cka
from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder
from histotransfer.errors import HistotransferError
from histotransfer.features.loader import resize_patch
from histotransfer.patches import PatchReader, read_patch_file
from histotransfer.patches.tiling import tile_slides
from histotransfer.slide import open_slide
from histotransfer.stain import source_sample

INPUT = 32


@pytest.fixture(scope="module")
def patches_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cka_demo")
    demo = make_demo_slides(root, n_slides=4, seed=1, size=1024, mpp=0.5)
    return tile_slides(demo.slides, root / "tiles", magnification=10, patch_size=64).patches


@pytest.fixture(scope="module")
def encoders():
    """A random resnet18 cut after layer2 and a copy whose layer2 moved, as fine-tuning with the stem and
    layer1 frozen does."""
    torch.manual_seed(0)
    a = create_encoder("resnet18", "random", 2)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for name, p in b.named_parameters():
            if not name.startswith(("body.stem", "body.layer1")):
                p.add_(0.05 * torch.randn_like(p))
    return a, b


def reference_maps(encoder, patches_dir, used: pd.DataFrame) -> list[np.ndarray]:
    """Each stage's output for the patches in ``used``, read one by one with PatchReader."""
    pixels = []
    for slide_id, x, y in used.itertuples(index=False):
        spec = read_patch_file(patches_dir / f"{slide_id}.h5").spec
        with open_slide(spec.slide_path) as slide:
            pixels.append(resize_patch(PatchReader(slide, spec).read(x, y), INPUT))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.no_grad():
        return [m.double().numpy() for m in encoder.eval().forward_stages(x)]


def test_untouched_stages_have_cka_one_and_match_reference(patches_dir, encoders, tmp_path):
    a, b = encoders
    df = compare_encoders(a, b, patches_dir, tmp_path, n_patches=40, batch_size=16, input_size=INPUT, device="cpu")
    assert list(df["stage"]) == ["stem", "layer1", "layer2"]
    assert df["cka"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    assert df["cka"].iloc[1] == pytest.approx(1.0, abs=1e-6)
    assert df["cka"].iloc[2] < 0.9999
    for name in ("cka.csv", "cka.png", "patches.csv", "cka.json"):
        assert (tmp_path / name).is_file()
    used = pd.read_csv(tmp_path / "patches.csv", dtype={"slide_id": str})
    assert len(used) == 40 and not used.duplicated().any()
    maps_a = reference_maps(a, patches_dir, used)
    maps_b = reference_maps(b, patches_dir, used)
    for value, ma, mb in zip(df["cka"], maps_a, maps_b):
        assert value == pytest.approx(linear_cka(ma.mean(axis=(2, 3)), mb.mean(axis=(2, 3))), abs=1e-6)


def test_flatten_pooling_and_full_matrix(patches_dir, encoders, tmp_path):
    a, b = encoders
    df = compare_encoders(
        a,
        b,
        patches_dir,
        tmp_path,
        n_patches=24,
        pooling="flatten",
        full_matrix=True,
        batch_size=10,
        input_size=INPUT,
        seed=3,
        device="cpu",
    )
    used = pd.read_csv(tmp_path / "patches.csv", dtype={"slide_id": str})
    maps_a = reference_maps(a, patches_dir, used)
    maps_b = reference_maps(b, patches_dir, used)
    flat = [(ma.reshape(len(ma), -1), mb.reshape(len(mb), -1)) for ma, mb in zip(maps_a, maps_b)]
    for value, (fa, fb) in zip(df["cka"], flat):
        assert value == pytest.approx(linear_cka(fa, fb), abs=1e-6)
    matrix = pd.read_csv(tmp_path / "cka_matrix.csv", index_col="stage")
    assert list(matrix.index) == list(matrix.columns) == list(df["stage"])
    np.testing.assert_allclose(np.diag(matrix.to_numpy()), df["cka"], atol=1e-9)
    assert matrix.loc["layer1", "layer2"] == pytest.approx(linear_cka(flat[1][0], flat[2][1]), abs=1e-6)
    assert matrix.loc["layer2", "stem"] == pytest.approx(linear_cka(flat[2][0], flat[0][1]), abs=1e-6)
    assert (tmp_path / "cka_matrix.png").is_file()
    assert not list(tmp_path.glob(".cka-maps-*"))  # temporary maps removed


def test_sampling_is_seeded_and_bad_settings_are_refused(patches_dir, encoders, tmp_path):
    a, b = encoders
    runs = {}
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        compare_encoders(a, a, patches_dir, tmp_path / name, n_patches=8, input_size=INPUT, seed=seed, device="cpu")
        runs[name] = pd.read_csv(tmp_path / name / "patches.csv")
    pd.testing.assert_frame_equal(runs["s0"], runs["s0_again"])
    assert not runs["s0"].equals(runs["s1"])
    assert pd.read_csv(tmp_path / "s0" / "cka.csv")["cka"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(HistotransferError, match="pooling"):
        compare_encoders(a, b, patches_dir, tmp_path / "bad", pooling="max")
    with pytest.raises(HistotransferError, match="no such folder"):
        compare_encoders(a, b, tmp_path / "nowhere", tmp_path / "bad")


def test_debiased_estimator_baseline_and_few_patches_warning(patches_dir, encoders, tmp_path):
    """The debiased estimator equals linear_cka(debiased=True) on the same maps; the baseline columns are the
    mean and sd of CKA between A and the seeded random initialisations of its architecture (seeds 1-3); too few
    patches for the dimensions warns on the console and in cka.json."""
    a, b = encoders
    with pytest.warns(UserWarning, match="fewer than the dimensions of"):
        df = compare_encoders(
            a,
            b,
            patches_dir,
            tmp_path,
            n_patches=60,
            batch_size=16,
            input_size=INPUT,
            estimator="debiased",
            device="cpu",
        )
    used = pd.read_csv(tmp_path / "patches.csv", dtype={"slide_id": str})
    means = [
        [m.mean(axis=(2, 3)) for m in reference_maps(e, patches_dir, used)]
        for e in (a, b, *(create_encoder("resnet18", "random", 2, random_seed=seed) for seed in (1, 2, 3)))
    ]
    for i, row in df.iterrows():
        assert row["cka"] == pytest.approx(linear_cka(means[0][i], means[1][i], debiased=True), abs=1e-6)
        draws = [linear_cka(means[0][i], means[k][i], debiased=True) for k in (2, 3, 4)]
        assert row["baseline"] == pytest.approx(np.mean(draws), abs=1e-6)
        assert row["baseline_sd"] == pytest.approx(np.std(draws, ddof=1), abs=1e-6)
        assert row["baseline_sd"] > 0
    record = json.loads((tmp_path / "cka.json").read_text())
    assert record["estimator"] == "debiased" and record["n_patches"] == 60
    assert len(record["warnings"]) == 1 and "layer2 (128)" in record["warnings"][0]  # 60 patches < 128 channels
    assert "not inflated" in record["warnings"][0]  # the debiased estimator's own warning
    assert df.loc[0, "cka"] > 0.99 > df.loc[0, "baseline"]  # the untouched stem vs a random one


def cka_cmd(patches_dir, out, *extra: str) -> list[str]:
    return [
        "-m",
        "histotransfer",
        "cka",
        "--encoder-a",
        "resnet18",
        "--weights-a",
        "random",
        "--truncate-a",
        "2",
        "--encoder-b",
        "resnet18",
        "--weights-b",
        "random",
        "--truncate-b",
        "3",
        "--patches",
        str(patches_dir),
        "--out",
        str(out),
        "--n-patches",
        "40",
        "--input-size",
        str(INPUT),
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.slow
def test_cka_under_torchrun_shares_the_slides_and_gives_one_processs_numbers(patches_dir, tmp_path):
    """torchrun --nproc-per-node 2 (gloo, CPU): the ranks encode their share of the slides and rank 0 sums the
    rows in one process's order, so cka.csv and patches.csv are byte for byte those of one process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same threads in both: float sums in the same order
    alone = subprocess.run(
        [sys.executable, *cka_cmd(patches_dir, tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *cka_cmd(patches_dir, tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("cka.csv", "patches.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert len(pd.read_csv(tmp_path / "two" / "patches.csv")) == 40
    assert two.stdout.count("linear CKA per stage") == 1  # rank 0 reports for the job
    assert json.loads((tmp_path / "two" / "cka.json").read_text())["n_patches"] == 40


def test_cka_command_passes_the_stain_scope_on(patches_dir, tmp_path):
    """--stain-scope reaches the encoders given by name: per-patch and per-slide normalisation are recorded
    with their own tags."""
    from histotransfer.cli import main
    from histotransfer.stain import stain_normalizer

    first = read_patch_file(sorted(patches_dir.glob("*.h5"))[0])
    x, y = (int(v) for v in first.coords[0])
    region = f"{first.spec.slide_path}@{x},{y},128,128"
    tags = {}
    for scope in ("patch", "slide"):
        args = cka_cmd(
            patches_dir,
            tmp_path / scope,
            "--stain-norm",
            "reinhard",
            "--stain-ref",
            region,
            "--stain-scope",
            scope,
            "--no-baseline",
            "--n-patches",
            "8",
        )[2:]
        assert main(args) == 0
        tags[scope] = json.loads((tmp_path / scope / "cka.json").read_text())["stain_a"]
        assert tags[scope] == stain_normalizer("reinhard", region, scope).tag()
    assert tags["patch"] != tags["slide"]


def test_asking_for_more_patches_than_the_tiling_holds_warns_and_says_so_in_cka_json(patches_dir, encoders, tmp_path):
    a, _ = encoders
    total = sum(len(read_patch_file(p).coords) for p in sorted(patches_dir.glob("*.h5")))
    with pytest.warns(UserWarning, match=f"asked for 100000 patches, the tiling holds only {total}"):
        compare_encoders(a, a, patches_dir, tmp_path, n_patches=100000, input_size=INPUT, baseline=False, device="cpu")
    record = json.loads((tmp_path / "cka.json").read_text())
    assert (record["n_patches_requested"], record["n_patches"]) == (100000, total)
    assert any(f"the tiling holds only {total}" in w for w in record["warnings"])


FAILING_RANK = """
import datetime, sys
import torch.distributed as dist
from histotransfer.analysis import compare
from histotransfer.encoders import create_encoder

where, patches, out = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()

def fail(*args, **kwargs):
    raise OSError(f"simulated failure on rank {rank}")

if where == "encode" and rank == 1:
    compare.encode_patches = fail
if where == "write" and rank == 0:
    compare.plot_bars = fail
encoder = create_encoder("resnet18", "random", 2)
try:
    compare.compare_encoders(encoder, encoder, patches, out, n_patches=40, input_size=32, baseline=False,
                             device="cpu", workers=0)
    print(f"rank {rank} finished", flush=True)
except Exception as exc:
    print(f"rank {rank} raised: {exc}", flush=True)
dist.barrier()  # as the study does after each cell: every rank must get here
print(f"rank {rank} passed the barrier", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize(("where", "failing"), [("encode", 1), ("write", 0)])
def test_a_rank_that_fails_under_torchrun_fails_every_rank_and_leaves_none_waiting(
    patches_dir, tmp_path, where, failing
):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            where,
            str(patches_dir),
            str(tmp_path / "out"),
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} raised:" in done.stdout and f"simulated failure on rank {failing}" in done.stdout
        assert f"rank {rank} passed the barrier" in done.stdout
    assert not (tmp_path / "out" / "cka.json").exists()


def test_a_slide_whose_stain_estimate_fails_in_one_loader_process_is_skipped(patches_dir, tmp_path, monkeypatch):
    """With loader processes, the item fitting a slide's stain estimate and the slide's batches are read by
    different processes: when the estimate fails, the batches read elsewhere are left out with the slide."""
    from histotransfer.features import loader

    first = read_patch_file(sorted(patches_dir.glob("*.h5"))[0])
    x, y = (int(v) for v in first.coords[0])
    sample = source_sample(first.coords)
    read = loader.read_patches

    def failing(reader, coords, size=None):
        if (
            len(coords) == len(sample)
            and np.array_equal(coords, sample)
            and reader.spec.slide_path == first.spec.slide_path
        ):
            raise OSError("a corrupt tile in the stain sample")
        return read(reader, coords, size)

    monkeypatch.setattr(loader, "read_patches", failing)
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", "random", 2)
    for workers in (0, 2):
        with pytest.warns(UserWarning, match="a corrupt tile in the stain sample"):
            compare_encoders(
                encoder,
                encoder,
                patches_dir,
                tmp_path / f"w{workers}",
                n_patches=40,
                input_size=INPUT,
                baseline=False,
                device="cpu",
                stain_norm="reinhard",
                stain_scope="slide",
                stain_ref=f"{first.spec.slide_path}@{x},{y},128,128",
                workers=workers,
            )
        used = pd.read_csv(tmp_path / f"w{workers}" / "patches.csv")
        assert first.slide_id not in set(used.slide_id) and len(used) > 2
    assert (tmp_path / "w0" / "cka.csv").read_text() == (tmp_path / "w2" / "cka.csv").read_text()
