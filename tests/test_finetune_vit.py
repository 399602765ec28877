"""Fine-tuning the transformer encoders: which weights train, per-block checkpointing, low-rank adaptation.

The networks are the registry's timm VisionTransformers scaled down (depth 8, width 96, 4 heads; the same
keyword arguments otherwise) with every weight moved by noise, so that LayerScale (1e-5 at init) does not
hide the blocks. LoRA parameter counts are written out by hand from the layer shapes: width C = 96, MLP
hidden 384 (UNI: fc1 96 -> 384, fc2 384 -> 96) or the packed SwiGLU of Virchow2 (fc1 96 -> 512, fc2 256 -> 96),
qkv 96 -> 288, proj 96 -> 96.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from functools import partial

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import histotransfer.finetune.model as ft_model
from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder, registry
from histotransfer.encoders.vit import VIT_ENCODERS
from histotransfer.errors import HistotransferError
from histotransfer.features import extract_features
from histotransfer.finetune import finetune, save_encoder
from histotransfer.finetune.model import EndToEndMIL, Lora, check_lora, merge_lora
from histotransfer.finetune.settings import FinetuneSettings
from histotransfer.mil import AttentionMIL, train_mil
from histotransfer.patches.tiling import tile_slides
from histotransfer.runtime import precision_context

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"depth": 8, "embed_dim": 96, "num_heads": 4}
# The 8 demo slides of seed 0: patients 00 and 01, 02 positive (2, 1, 1 slides), 03, 04, 05 negative (2, 1, 1).
PATIENT_SPLIT = {
    "patient_00": "train",
    "patient_03": "train",
    "patient_01": "val",
    "patient_04": "val",
    "patient_02": "test",
    "patient_05": "test",
}


def shrink(patcher: pytest.MonkeyPatch, name: str) -> None:
    """Registry entry ``name`` built scaled down (everything else as registered)."""
    spec = registry.encoder_spec(name)
    patcher.setitem(
        registry._REGISTRY, name, dataclasses.replace(spec, build=partial(VIT_ENCODERS[name].build, **SMALL))
    )


def noisy(name: str, truncate: int = 0, seed: int = 0):
    """The scaled-down encoder with every tensor moved by noise (seeded)."""
    encoder = create_encoder(name, "random", truncate)
    g = torch.Generator().manual_seed(seed)
    encoder.load_state_dict({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in encoder.state_dict().items()})
    return encoder


@pytest.fixture
def small(monkeypatch):
    return partial(shrink, monkeypatch)


def batch(seed: int = 1, size: int = 64) -> torch.Tensor:
    """Five patches (64 px: 4 x 4 tokens of 16 px; the ViTs take any multiple of their patch), as two bags of
    3 and 2."""
    return torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(seed))


def backward(model: EndToEndMIL, x: torch.Tensor) -> None:
    model.train()
    logits, _ = model(x, [3, 2])
    F.cross_entropy(logits, torch.tensor([1, 0])).backward()


def steps(model: EndToEndMIL, x: torch.Tensor, n: int = 2, lr: float = 1e-3) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        optimizer.zero_grad()
        backward(model, x)
        optimizer.step()


def test_full_finetuning_moves_the_trained_stages_and_not_the_frozen_ones(small):
    small("uni")
    torch.manual_seed(0)
    encoder = noisy("uni")
    model = EndToEndMIL(encoder, AttentionMIL(96), freeze_stages=2)
    before = copy.deepcopy(model.state_dict())
    steps(model, batch())
    after = model.state_dict()
    frozen = ("encoder.body.stem.", "encoder.body.blocks1-2.", "encoder.body.blocks3-4.")
    assert sum(k.startswith(frozen) for k in before) == 4 + 4 * 14  # stem: 4 tensors; 4 blocks of 14
    for key, value in before.items():
        if key.startswith(frozen):
            assert torch.equal(after[key], value), key
        else:  # blocks5-8, the final norm (pool) and the MIL head's weights
            assert key.startswith(
                ("encoder.body.blocks5-6.", "encoder.body.blocks7-8.", "encoder.pool.norm.", "head.")
            ), key
            assert torch.equal(after[key], value) == key.startswith("head.feature_"), key  # head's buffers


@pytest.mark.parametrize("freeze_stages, lora", [(0, None), (2, None), (1, Lora(4))])
def test_per_block_checkpointing_gives_the_same_gradients(small, monkeypatch, freeze_stages, lora):
    small("uni")
    torch.manual_seed(0)
    plain = EndToEndMIL(noisy("uni"), AttentionMIL(96), freeze_stages, lora=lora)
    if lora is not None:  # B starts at zero, which would leave A without gradient
        with torch.no_grad():
            for name, p in plain.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = True
    units = []

    def recording(fn, *args, **kwargs):
        units.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(ft_model, "checkpoint", recording)
    x = batch()
    backward(plain, x)
    backward(ckpt, x)
    trained_blocks = [b for stage in list(ckpt.encoder.body)[max(ckpt.n_frozen, 1) :] for b in stage]
    assert all(isinstance(b, Block) for b in trained_blocks)
    assert len(trained_blocks) == {0: 8, 2: 4, 1: 6}[freeze_stages]
    assert units[-len(trained_blocks) :] == trained_blocks  # one unit per block
    assert len(units) == len(trained_blocks) + (freeze_stages == 0)  # + the stem, its own unit
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert (a.grad is None) == (b.grad is None) == (not a.requires_grad), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "name, lora, freeze_stages, expected",
    [
        # 8 blocks x rank 4 x (qkv 96+288, proj 96+96, fc1 96+384, fc2 384+96)
        ("uni", Lora(4), 0, 8 * 4 * (384 + 192 + 480 + 480)),
        # 8 blocks x rank 2 x (qkv 96+288, fc2 384+96)
        ("uni", Lora(2, alpha=8, targets=("qkv", "fc2")), 0, 8 * 2 * (384 + 480)),
        # stem and blocks1-2 frozen: 6 blocks x rank 3 x (proj 96+96, packed SwiGLU fc1 96+512)
        ("virchow2", Lora(3, targets=("fc1", "proj")), 1, 6 * 3 * (192 + 608)),
    ],
)
def test_lora_trains_only_its_matrices_and_the_head(small, name, lora, freeze_stages, expected):
    small(name)
    torch.manual_seed(0)
    encoder = noisy(name)
    head = AttentionMIL(encoder.feature_dim)
    base = copy.deepcopy(encoder.state_dict())
    model = EndToEndMIL(encoder, head, freeze_stages, lora=lora)
    n_head = sum(p.numel() for p in head.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected + n_head
    assert len(model.lora_layers) == (8 - 2 * (freeze_stages > 0)) * len(lora.targets)
    scale = {4: 1.0, 2: 4.0, 3: 1.0}[lora.rank]  # alpha / rank; alpha defaults to the rank
    assert all(encoder.get_submodule(n).scaling["default"] == scale for n in model.lora_layers)
    x = batch(size=56 if name == "virchow2" else 64)  # patches of 14 px
    backward(model, x)
    for key, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in key or key.startswith("head.")), key
    model.zero_grad()
    steps(model, x)
    state = encoder.state_dict()
    for key, value in base.items():  # every weight of the network stays what it was
        key = key if key in state else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], value), key
    assert len(state) == len(base) + 2 * len(model.lora_layers)


def test_lora_encoder_file_loads_strictly_and_gives_the_finetuned_features(small, tmp_path):
    """A truncated encoder fine-tuned with LoRA, merged and saved with its untruncated base: encoder.pt has
    exactly the network's key layout, and create_encoder from it gives the LoRA model's features."""
    small("uni")
    torch.manual_seed(0)
    full = noisy("uni")
    encoder = create_encoder("uni", "random", truncate=1)
    encoder.load_state_dict({k: v for k, v in full.state_dict().items() if k in encoder.state_dict()})
    model = EndToEndMIL(encoder, AttentionMIL(96), lora=Lora(4, alpha=16))
    x = batch(seed=3)
    with torch.no_grad():
        untrained = encoder(x)
    steps(model, batch(), n=3, lr=1e-2)
    model.eval()
    with torch.no_grad():
        tuned = model.features(x)
    assert (tuned - untrained).abs().max() > 1e-2  # the adaptation changed the features
    with pytest.raises(HistotransferError, match="merge low-rank adaptation layers"):
        save_encoder(encoder, tmp_path / "unmerged.pt", full)

    assert merge_lora(encoder) == 6 * 4
    path = save_encoder(encoder, tmp_path / "encoder.pt", full)
    saved = torch.load(path, weights_only=True)
    with torch.device("meta"):
        layout = registry.encoder_spec("uni").build().state_dict()
    assert saved.keys() == layout.keys()
    back = create_encoder("uni", str(path), truncate=1)
    with torch.no_grad():
        torch.testing.assert_close(back(x), tuned, rtol=0, atol=1e-5)
    dropped = [k for k in saved if k.startswith(("blocks.6.", "blocks.7."))]
    assert len(dropped) == 2 * 14 and all(
        torch.equal(saved[k], full.state_dict()[f"body.blocks7-8.{k[7:]}"]) for k in dropped
    )


@pytest.mark.parametrize("rank", [0, -1])
def test_lora_rank_below_one_is_refused(rank):
    with pytest.raises(HistotransferError, match=r"lora_rank: Input should be greater than or equal to 1"):
        FinetuneSettings.build(lora_rank=rank)
    with pytest.raises(HistotransferError, match=rf"lora rank {rank}: pass a positive integer"):
        Lora(rank)


def test_other_bad_lora_requests_are_refused(small):
    with pytest.raises(HistotransferError, match="set lora_rank too"):
        FinetuneSettings.build(lora_alpha=16)
    with pytest.raises(HistotransferError, match="names a layer twice"):
        FinetuneSettings.build(lora_rank=8, lora_targets=["qkv", "qkv"])
    with pytest.raises(HistotransferError, match=r"lora_targets\[0\]: 'fc3' is not one of qkv, proj, fc1, fc2"):
        FinetuneSettings.build(lora_rank=8, lora_targets=["fc3"])
    assert FinetuneSettings.build(lora_rank=8, lora_targets=["qkv"]).lora_targets == ("qkv",)
    with pytest.raises(HistotransferError, match="lora targets"):
        Lora(8, targets=("conv1",))
    cnn = create_encoder("resnet18", "random", 2)
    with pytest.raises(HistotransferError, match=r"resnet18 has no transformer block layers.*drop --lora-rank"):
        EndToEndMIL(cnn, AttentionMIL(128), lora=Lora(8))
    with pytest.raises(HistotransferError, match="resnet18 has no transformer block layers"):
        check_lora("resnet18", 0, 0, Lora(8))
    small("uni")
    with pytest.raises(HistotransferError, match=r"every stage of uni .* is frozen"):
        check_lora("uni", 1, 3, Lora(8))
    check_lora("uni", 1, 2, Lora(8))


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """8 demo slides tiled at 10x into 64 px patches, features of the scaled-down UNI (noisy weights, saved as a
    weights file) at 32 px, a 2-epoch MIL run, and its fine-tuning with LoRA (rank 2, stem and first quarter
    frozen, per-block checkpointing)."""
    root = tmp_path_factory.mktemp("ft_vit")
    with pytest.MonkeyPatch.context() as patcher:
        shrink(patcher, "uni")
        demo = make_demo_slides(root, n_slides=8, seed=0, size=1024, mpp=0.5)
        labels = pd.read_csv(demo.labels_csv, dtype={"slide_id": str})
        labels["split"] = labels["patient_id"].map(PATIENT_SPLIT)  # each split: both labels
        split_file = root / "split.csv"
        labels[["slide_id", "split"]].to_csv(split_file, index=False)
        tiling = tile_slides(demo.slides, root / "tiles", magnification=10, patch_size=64)
        full = noisy("uni", seed=5)
        weights = save_encoder(full, root / "uni_small.pt")
        features = extract_features(
            tiling.folder, root, "uni", str(weights), truncate=0, input_size=32, batch_size=64, workers=0, device="cpu"
        )
        run = train_mil(features, demo.labels_csv, root / "run", epochs=2, seed=0, split_file=split_file)
        out = finetune(
            run,
            root / "ft",
            top_k=4,
            epochs=1,
            lr=1e-2,
            device="cpu",
            freeze_stages=1,
            frozen_candidate=False,
            lora_rank=2,
            grad_checkpointing=True,
        )
        yield {"out": out, "weights": weights}


def test_finetune_with_lora_writes_a_merged_encoder_of_rank_r_updates(vit_run):
    """Only the targeted layers of the trained stages change in encoder.pt, each by a matrix of rank <= 2;
    the settings are recorded; the slides were re-extracted with it."""
    out = vit_run["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["lora_rank"] == 2 and config["finetune"]["lora_rank"] == 2
    assert config["settings"]["lora_targets"] is None and config["finetune"]["lora_alpha"] is None
    before = torch.load(vit_run["weights"], weights_only=True)
    after = torch.load(out / "encoder.pt", weights_only=True)
    assert after.keys() == before.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    expected = sorted(
        f"blocks.{b}.{layer}.weight" for b in range(2, 8) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert changed == expected
    for key in changed:
        assert torch.linalg.matrix_rank(after[key] - before[key], atol=1e-6) <= 2, key
    assert (out / "comparison.json").is_file()
    assert config["encoder"]["weights_sha256"] != ""


def bf16_gradients(model: EndToEndMIL, x: torch.Tensor) -> torch.Tensor:
    """The trainable parameters' gradients of one step in bf16 autocast on the GPU, as fine-tuning runs it."""
    device = torch.device("cuda")
    model.train()
    with precision_context(device, "bf16"):
        logits, _ = model(x.to(device), [3, 2])
    F.cross_entropy(logits.float(), torch.tensor([1, 0], device=device)).backward()
    return torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.requires_grad])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_in_bf16_on_a_gpu_checkpoints_per_block_and_follows_the_fp32_gradients(small):
    """The recipe for a ViT too large to fine-tune otherwise: on a GPU in bf16, per-block checkpointing gives
    the gradients of the same step without it, and both point where the fp32 CPU gradients do (bf16 rounding
    through the blocks moves them by a few per cent; on a CPU in bf16 the cosine is 0.990)."""
    small("uni")
    torch.manual_seed(0)
    reference = EndToEndMIL(noisy("uni"), AttentionMIL(96), 0, lora=Lora(4))
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plain, ckpt = copy.deepcopy(reference).cuda(), copy.deepcopy(reference).cuda()
    ckpt.checkpointing = True
    backward(reference, batch())
    fp32 = torch.cat([p.grad.flatten() for p in reference.parameters() if p.requires_grad])
    without, with_ckpt = bf16_gradients(plain, batch()), bf16_gradients(ckpt, batch())
    assert with_ckpt.isfinite().all()
    torch.testing.assert_close(with_ckpt, without, rtol=0, atol=1e-3 * float(without.abs().max()))
    assert F.cosine_similarity(with_ckpt, fp32, dim=0) > 0.95
