"""Transformer encoders cut after an exact number of blocks (``blocks``): the encoder, its records and folder
names, extraction from the command line, and the stages that read such features back (MIL, CKA, fine-tuning,
the study file).

The networks are the registry's UNI and Virchow2 scaled down (depth 8, width 96, 4 heads; the same keyword
arguments otherwise) with checkpoints whose tensors are all moved by noise, so that LayerScale (1e-5 at init)
does not hide the blocks. References are the model-card networks built with timm directly and run with timm's
``forward_intermediates`` (or by hand), never the registry's stages.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.layers import SwiGLUPacked
from torch import nn

from histotransfer.analysis import compare_encoders, linear_cka
from histotransfer.cli import main
from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder, describe_encoder, encoder_id, encoder_info, registry
from histotransfer.encoders.vit import VIT_ENCODERS
from histotransfer.errors import HistotransferError
from histotransfer.features import EncoderChoice, read_feature_file
from histotransfer.finetune import encoder_from_attrs, finetune
from histotransfer.mil import evaluate_run, train_mil
from histotransfer.patches import PatchReader, read_patch_file
from histotransfer.patches.tiling import tile_slides
from histotransfer.provenance import json_fingerprint
from histotransfer.slide import open_slide
from histotransfer.study import load_study, plan

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"depth": 8, "embed_dim": 96, "num_heads": 4}
# Model cards (as tests/test_vit_encoders.py): timm architecture, keyword arguments, prefix tokens, pooling.
CARDS = {
    "uni": (
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        1,
        "cls",
    ),
    "virchow2": (
        "vit_huge_patch14_224",
        {
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": SwiGLUPacked,
            "act_layer": nn.SiLU,
        },
        5,
        "cls+mean",
    ),
}
UNI_MEAN, UNI_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def shrink(patcher: pytest.MonkeyPatch, name: str) -> None:
    """Registry entry ``name`` built scaled down (everything else as registered)."""
    spec = registry.encoder_spec(name)
    patcher.setitem(
        registry._REGISTRY, name, dataclasses.replace(spec, build=partial(VIT_ENCODERS[name].build, **SMALL))
    )


@pytest.fixture
def small(monkeypatch):
    return partial(shrink, monkeypatch)


def card_model(name: str) -> nn.Module:
    arch, kwargs, _, _ = CARDS[name]
    return timm.create_model(arch, pretrained=False, **{**kwargs, **SMALL}).eval()


def noisy_checkpoint(name: str, path: Path, seed: int) -> nn.Module:
    """The scaled-down card network with every tensor moved by noise, saved to ``path``; returns the network."""
    model = card_model(name)
    g = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()})
    torch.save(model.state_dict(), path)
    return model


def card_pooling(name: str, tokens: torch.Tensor) -> torch.Tensor:
    """The model card's embedding from final-norm tokens (B, N, C), prefix (class, register) tokens first."""
    _, _, prefix, pooling = CARDS[name]
    if pooling == "cls+mean":
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1)
    return tokens[:, 0]


def after_block(model: nn.Module, x: torch.Tensor, blocks: int, norm: bool = True) -> torch.Tensor:
    """Tokens (B, N, C) after the first ``blocks`` blocks (with the final norm), by timm's forward_intermediates."""
    ((patches, prefix),) = model.forward_intermediates(
        x, indices=[blocks - 1], norm=norm, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    return torch.cat([prefix, patches], dim=1)


# --- the encoder -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CARDS))
def test_every_depth_equals_the_full_models_block_output_after_the_final_norm(name, small, tmp_path):
    small(name)
    path = tmp_path / "model.bin"
    ref = noisy_checkpoint(name, path, seed=1)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for blocks in range(1, SMALL["depth"] + 1):
            enc = create_encoder(name, str(path), blocks=blocks)
            expected = card_pooling(name, after_block(ref, x, blocks))
            assert torch.allclose(enc(x), expected, atol=1e-5), (blocks, (enc(x) - expected).abs().max())
            # Quarters of 2 blocks: the last kept stage ends at the block asked for.
            start = 2 * ((blocks - 1) // 2) + 1
            assert enc.stage_names[-1] == f"blocks{start}-{blocks}"
            assert (enc.blocks, enc.truncate) == (blocks, 4 - (blocks + 1) // 2)


def test_blocks_by_hand_and_three_quarters_is_truncate_1(small, tmp_path):
    """Running the card network's blocks by hand gives the same features; 6 of 8 blocks is truncate 1 exactly."""
    small("uni")
    path = tmp_path / "uni.bin"
    ref = noisy_checkpoint("uni", path, seed=3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tokens = ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(x))))
        for block in ref.blocks[:3]:
            tokens = block(tokens)
        assert torch.allclose(create_encoder("uni", str(path), blocks=3)(x), ref.norm(tokens)[:, 0], atol=1e-5)
        six, t1 = create_encoder("uni", str(path), blocks=6), create_encoder("uni", str(path), truncate=1)
        assert six.stage_names == t1.stage_names and torch.equal(six(x), t1(x))
    assert describe_encoder(six) == {**describe_encoder(t1), "blocks": 6}
    assert "blocks" not in describe_encoder(t1)


def test_a_record_rebuilds_the_same_encoder(small, tmp_path):
    """An encoder's own truncate and blocks rebuild it, as does the run path (rebuilt by its truncation, then cut
    to its blocks); a cut cannot keep blocks the encoder does not hold."""
    small("uni")
    path = tmp_path / "uni.bin"
    noisy_checkpoint("uni", path, seed=5)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for blocks in (3, 5):
            enc = create_encoder("uni", str(path), blocks=blocks)
            again = create_encoder("uni", str(path), enc.truncate, blocks=enc.blocks)
            run = encoder_from_attrs(describe_encoder(enc), "test").with_blocks(describe_encoder(enc)["blocks"])
            for other in (again, run):
                assert other.state_dict().keys() == enc.state_dict().keys()
                assert torch.equal(other(x), enc(x)) and other.stage_names == enc.stage_names
    with pytest.raises(
        HistotransferError,
        match=r"holds only its first 4 blocks; build it with "
        r"create_encoder\('uni', weights, blocks=5\)",
    ):
        create_encoder("uni", str(path), truncate=2).with_blocks(5)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: EncoderChoice.build(encoder="uni", blocks=4, truncate=1),
            "blocks 4 sets the depth by itself: drop truncate 1",
        ),
        (lambda: EncoderChoice.build(encoder="uni", blocks=4, truncate=[0, 1]), r"drop truncate \[0, 1\]"),
        (lambda: EncoderChoice.build(encoder="uni", blocks=True), "pass a number of blocks"),
        (
            lambda: create_encoder("uni", "random", truncate=2, blocks=5),
            "truncate=2 with blocks=5: blocks sets the depth of uni by itself; pass blocks alone",
        ),
        (lambda: create_encoder("uni", "random", blocks=9), r"blocks=9 is out of range for uni: pass 1\.\.8"),
        (
            lambda: create_encoder("resnet18", "random", blocks=2),
            "blocks=2 applies to transformer encoders .*not resnet18; use truncate for it",
        ),
        (lambda: encoder_id("densenet121", "random", 0, None, "fp32", blocks=3), "not densenet121; use truncate"),
    ],
)
def test_blocks_with_a_truncation_or_on_a_cnn_is_refused(make, message, small):
    small("uni")
    with pytest.raises(HistotransferError, match=message):
        make()


def test_encoder_ids_and_fingerprints(small, tmp_path):
    """``b<blocks>`` replaces ``t<truncate>``; choices without blocks fingerprint as before blocks existed."""
    small("uni")
    assert encoder_id("uni", "random", 0, 32, "fp32", blocks=5) == "uni-random-b5-s32-fp32"
    assert encoder_id("uni", "random", 1, 32, "fp32", blocks=5) == "uni-random-b5-s32-fp32"  # its own truncate
    assert encoder_id("uni", "random", 1, 32, "fp32") == "uni-random-t1-s32-fp32"
    assert encoder_info("uni")["transformer_blocks"] == 8 and encoder_info("resnet18")["transformer_blocks"] is None
    before = {"encoder": "uni", "weights": None, "truncate": 1}
    assert EncoderChoice.build(encoder="uni", truncate=1).fingerprint() == json_fingerprint(
        {"stage": "encoder", "settings": before}
    )
    assert EncoderChoice.build(encoder="uni", blocks=5).result_settings() == {**before, "truncate": 0, "blocks": 5}


# --- extraction, MIL, CKA, fine-tuning on generated slides -----------------------------------------------------


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Four 1024 px demo slides tiled at 20x into 64 px patches; the scaled-down UNI (noisy checkpoint) extracted
    from the command line with --blocks 6, --truncate 1 and --blocks 5 at 32 px; a one-epoch MIL run on the
    blocks-5 features."""
    root = tmp_path_factory.mktemp("vit_blocks")
    with pytest.MonkeyPatch.context() as patcher:
        shrink(patcher, "uni")
        demo = make_demo_slides(root / "demo", n_slides=4, seed=0, size=1024)
        tiling = tile_slides(
            demo.slides, root / "tiles", magnification=20, patch_size=64, min_tissue=0.25, min_region_um2=0
        )
        weights = root / "uni_small.bin"
        model = noisy_checkpoint("uni", weights, seed=7)
        base = [
            "extract",
            "--patches",
            str(tiling.folder),
            "--out",
            str(root / "out"),
            "--encoder",
            "uni",
            "--weights",
            str(weights),
            "--input-size",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
        codes = {depth: main([*base, *depth.split()]) for depth in ("--blocks 6", "--truncate 1", "--blocks 5")}
        split = root / "split.csv"
        split.write_text("slide_id,split\ndemo_01,train\ndemo_02,train\ndemo_03,val\ndemo_04,test\n")
        folders = {p.name.split("-")[2]: p for p in (root / "out" / "features").iterdir()}
        with warnings.catch_warnings():  # val and test hold one class each
            warnings.simplefilter("ignore")
            run = train_mil(folders["b5"], demo.labels_csv, root / "run", epochs=1, seed=0, split_file=split)
        yield {
            "root": root,
            "tiling": tiling.folder,
            "weights": weights,
            "model": model,
            "codes": codes,
            "folders": folders,
            "labels": demo.labels_csv,
            "run": run,
            "base": base,
        }


def _pixels(patch_file: Path, coords: np.ndarray | None = None) -> torch.Tensor:
    """Patches read with PatchReader, resized from 64 to 32 px and normalised as UNI's card says (torchvision's
    Resize on the PIL image: PIL's bilinear): (N, 3, 32, 32)."""
    ps = read_patch_file(patch_file)
    with open_slide(ps.spec.slide_path) as slide:
        reader = PatchReader(slide, ps.spec)
        pixels = np.stack(
            [
                np.asarray(Image.fromarray(reader.read(int(x), int(y))).resize((32, 32), Image.Resampling.BILINEAR))
                for x, y in (ps.coords if coords is None else coords)
            ]
        )
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(UNI_MEAN).view(1, 3, 1, 1)) / torch.tensor(UNI_STD).view(1, 3, 1, 1)


def test_cli_blocks_extracts_each_depth_into_its_own_folder(extracted):
    """--blocks 6 (3/4 of 8) gives the very bytes of --truncate 1 in another folder with other attrs; --blocks 5
    gives the card network's block-5 class token after the final norm."""
    assert extracted["codes"] == {"--blocks 6": 0, "--truncate 1": 0, "--blocks 5": 0}
    folders = extracted["folders"]
    label = json.loads((folders["b5"] / "features.json").read_text())["encoder"]["weights_label"]
    assert sorted(p.name for p in folders.values()) == [f"uni-{label}-{d}-s32-fp32" for d in ("b5", "b6", "t1")]
    patch_files = sorted((extracted["tiling"] / "patches").glob("*.h5"))
    assert len(patch_files) == 4
    for patch_file in patch_files:
        six, one, five = (read_feature_file(folders[d] / patch_file.name) for d in ("b6", "t1", "b5"))
        assert six.features.tobytes() == one.features.tobytes() and six.fingerprint == one.fingerprint
        assert (six.attrs["blocks"], six.attrs["truncate"], six.attrs["stage"]) == (6, 1, "blocks5-6")
        assert "blocks" not in one.attrs and one.attrs["encoder_id"] != six.attrs["encoder_id"]
        assert six.attrs["settings_fingerprint"] != one.attrs["settings_fingerprint"]
        assert (five.attrs["blocks"], five.attrs["truncate"], five.attrs["stage"]) == (5, 1, "blocks5-5")
        with torch.no_grad():
            expected = extracted["model"].norm(after_block(extracted["model"], _pixels(patch_file), 5, norm=False))
        np.testing.assert_allclose(five.features, expected[:, 0].numpy(), atol=1e-5)
    record = json.loads((folders["b5"] / "features.json").read_text())["encoder"]
    assert (record["blocks"], record["stage"]) == (5, "blocks5-5")
    assert set(pd.read_csv(folders["b5"] / "extract.csv")["status"]) == {"ok"}


def test_cli_blocks_refusals_and_a_rerun_skips(extracted, capsys):
    base = extracted["base"]
    assert main([*base, "--blocks", "5"]) == 0
    assert set(pd.read_csv(extracted["folders"]["b5"] / "extract.csv")["status"]) == {"skipped"}
    capsys.readouterr()
    assert main([*base, "--blocks", "5", "--truncate", "2"]) == 2
    assert "blocks 5 sets the depth by itself: drop truncate 2" in capsys.readouterr().err
    assert main([*base, "--blocks", "5", "--truncate", "0", "1"]) == 2
    assert "drop truncate [0, 1]" in capsys.readouterr().err
    out = extracted["root"] / "cnn"
    assert (
        main(
            [
                "extract",
                "--patches",
                str(extracted["tiling"]),
                "--out",
                str(out),
                "--encoder",
                "resnet18",
                "--weights",
                "random",
                "--blocks",
                "2",
                "--workers",
                "0",
            ]
        )
        == 2
    )
    assert "applies to transformer encoders" in capsys.readouterr().err and not (out / "features").exists()


def test_a_mil_run_refuses_features_of_another_depth(extracted):
    """The run records blocks in its encoder; the same network at 6 blocks, or at truncate 1 (the same bytes
    as 6 blocks), is another encoder."""
    run, folders, labels = extracted["run"], extracted["folders"], extracted["labels"]
    config = json.loads((run / "config.json").read_text())
    assert (config["encoder"]["blocks"], config["encoder"]["truncate"]) == (5, 1)
    evaluate_run(run, folders["b5"], labels, out_dir=extracted["root"] / "eval_b5")  # its own depth is read
    for other in ("b6", "t1"):
        with pytest.raises(HistotransferError, match=r"made by encoder .* expected .*'blocks': 5"):
            evaluate_run(run, folders[other], labels, out_dir=extracted["root"] / f"eval_{other}")


@pytest.mark.filterwarnings("ignore:CKA on 24 patches")
def test_cka_per_block_compares_every_block(extracted):
    """The run's 5-block encoder against UNI cut after 3 blocks with other weights, block by block with the full
    matrix: each value is linear CKA of the card networks' token means after those blocks (no final norm)."""
    root = extracted["root"]
    other = root / "other.bin"
    ref_b = noisy_checkpoint("uni", other, seed=8)
    df = compare_encoders(
        extracted["run"],
        {"name": "uni", "weights": str(other), "blocks": 3},
        extracted["tiling"],
        root / "cka",
        n_patches=24,
        per_block=True,
        full_matrix=True,
        baseline=False,
        input_size=32,
        workers=0,
        device="cpu",
        pooling="mean",
    )
    assert list(df["stage"]) == ["stem", "block1", "block2", "block3"]
    matrix = pd.read_csv(root / "cka" / "cka_matrix.csv", index_col="stage")
    assert list(matrix.index) == ["stem", *(f"block{i}" for i in range(1, 6))]
    assert list(matrix.columns) == ["stem", "block1", "block2", "block3"]
    used = pd.read_csv(root / "cka" / "patches.csv", dtype={"slide_id": str})
    x = torch.cat(
        [
            _pixels(extracted["tiling"] / "patches" / f"{sid}.h5", group[["x", "y"]].to_numpy())
            for sid, group in used.groupby("slide_id", sort=False)
        ]
    )
    with torch.no_grad():
        means_a = [after_block(extracted["model"], x, b, norm=False).mean(1) for b in range(1, 6)]
        means_b = [after_block(ref_b, x, b, norm=False).mean(1) for b in range(1, 4)]
    for i in range(3):
        assert df.loc[i + 1, "cka"] == pytest.approx(linear_cka(means_a[i], means_b[i]), abs=1e-5)
    assert matrix.loc["block5", "block2"] == pytest.approx(linear_cka(means_a[4], means_b[1]), abs=1e-5)
    with pytest.raises(HistotransferError, match=r"applies to transformer encoders .*not resnet18; drop per_block"):
        cnn = {"name": "resnet18", "weights": "random"}
        compare_encoders(cnn, cnn, extracted["tiling"], root / "cka_cnn", per_block=True, workers=0, device="cpu")
    assert not (root / "cka_cnn").exists()


def test_finetuning_a_blocks_run_keeps_its_depth(extracted):
    """Fine-tuning trains the first 5 blocks only: encoder.pt keeps block 6 (same quarter stage) and the rest as
    loaded; the slides are re-extracted at 5 blocks, into a b5 folder, with the fine-tuned weights."""
    root = extracted["root"]
    out = finetune(extracted["run"], root / "ft", top_k=4, epochs=1, lr=1e-2, device="cpu", frozen_candidate=False)
    before = torch.load(extracted["weights"], weights_only=True)
    after = torch.load(out / "encoder.pt", weights_only=True)
    assert after.keys() == before.keys()
    changed = {int(k.split(".")[1]) for k in before if k.startswith("blocks.") and not torch.equal(before[k], after[k])}
    assert changed == {0, 1, 2, 3, 4}
    config = json.loads((out / "config.json").read_text())
    folder = Path(config["features_dir"])
    assert (config["encoder"]["blocks"], config["encoder"]["encoder_id"]) == (5, folder.name)
    assert folder.name.split("-")[2:] == ["b5", "s32", "fp32"]
    patch_file = sorted((extracted["tiling"] / "patches").glob("*.h5"))[0]
    tuned = create_encoder("uni", str(out / "encoder.pt"), blocks=5)
    with torch.no_grad():
        expected = tuned(_pixels(patch_file)).numpy()
    np.testing.assert_allclose(read_feature_file(folder / patch_file.name).features, expected, atol=1e-5)


# --- the study file ---------------------------------------------------------------------------------------------


def _study(root: Path, encoders: list[dict]) -> Path:
    slides = root / "slides"
    slides.mkdir(exist_ok=True)
    for i in range(4):
        (slides / f"s{i}.svs").write_bytes(b"")
    (root / "labels.csv").write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(4)))
    study = {
        "name": "t",
        "datasets": [{"name": "ds", "slides": "slides", "labels": "labels.csv"}],
        "encoders": encoders,
        "mil": {"epochs": 1},
        "finetune": {"encoders": [{"name": "uni", "weights": "random", "blocks": 5}], "epochs": 1},
        "cka": {
            "pairs": [
                {
                    "a": {"name": "uni", "weights": "random", "blocks": 5},
                    "b": {"name": "uni", "weights": "random", "truncation": 1},
                }
            ],
            "finetuned": False,
            "per_block": True,
        },
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_study_entry_with_blocks_is_its_own_configuration_and_extraction(small, tmp_path):
    small("uni")
    study = load_study(
        _study(
            tmp_path,
            [
                {"name": "uni", "weights": "random", "blocks": 5},
                {"name": "uni", "weights": "random", "truncations": [0, 1]},
            ],
        )
    )
    assert [c.key for c in study.encoders] == ["uni-random-b5", "uni-random-t0", "uni-random-t1"]
    assert study.finetune_encoders[0].key == "uni-random-b5" and study.cka is not None and study.cka.per_block
    assert study.encoders[1].spec() == {"name": "uni", "weights": "random", "truncate": 0}  # as before blocks
    cells = {c.key: c for c in plan(study)}
    assert cells["extract/ds/uni-random-b5"].settings["encoder"] == {
        "name": "uni",
        "weights": "random",
        "truncate": 0,
        "blocks": 5,
    }
    assert cells["extract/ds/uni-random"].settings["encoder"]["truncate"] == [0, 1]
    assert cells["mil/ds/uni-random-b5/histotransfer/seed0"].deps[0].key == "extract/ds/uni-random-b5"
    assert "finetune/ds/uni-random-b5/histotransfer/seed0" in cells
    assert cells["cka/ds/pair-uni-random-b5--uni-random-t1"].settings["a"]["blocks"] == 5


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"name": "resnet18", "weights": "random", "blocks": 2},
            r"encoders\[0\]\.blocks: blocks applies to transformer "
            "encoders, not resnet18; use truncations for it",
        ),
        (
            {"name": "uni", "weights": "random", "blocks": 9},
            r"encoders\[0\]\.blocks: uni has 8 blocks: pass blocks "
            r"1\.\.8",
        ),
        (
            {"name": "uni", "weights": "random", "blocks": 5, "truncations": [1]},
            r"encoders\[0\]\.truncations: blocks sets the depth of uni by itself: drop truncations",
        ),
    ],
)
def test_study_entry_with_bad_blocks_is_named(entry, message, small, tmp_path):
    small("uni")
    with pytest.raises(HistotransferError, match=message):
        load_study(_study(tmp_path, [entry, {"name": "uni", "weights": "random", "blocks": 5}]))


def test_feature_attrs_name_the_depth(extracted):
    """The attrs a run compares (encoder_attrs) hold blocks only where it was given."""
    folders = extracted["folders"]
    with h5py.File(next(folders["b5"].glob("*.h5")), "r") as f:
        assert int(f.attrs["blocks"]) == 5
    with h5py.File(next(folders["t1"].glob("*.h5")), "r") as f:
        assert "blocks" not in f.attrs
