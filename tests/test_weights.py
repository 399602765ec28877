"""Checkpoint loading: published layouts, strict key checks, refusal of truncated files and code-running pickles."""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from histotransfer.encoders import create_encoder, load_state_dict_file
from histotransfer.encoders import weights as weights_module
from histotransfer.errors import HistotransferError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DENSENET = SHARED / "weights" / "densenet121_imagenet_from_keras.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def r18_state():
    torch.manual_seed(7)
    return tvm.resnet18().state_dict()


def _assert_encoder_has(enc, state):
    """Every parameter and buffer of a ResNet encoder equals the torchvision tensor it was loaded from."""
    own = enc.body.state_dict()
    for key, value in own.items():
        assert torch.equal(value, state[key.removeprefix("stem.")]), key
    assert len(own) > 50


def test_safetensors_and_pth_round_trip(tmp_path, r18_state):
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in r18_state.items()}, st)
    pth = tmp_path / "r18.pth"
    torch.save(r18_state, pth)
    for path in (st, pth):
        loaded = load_state_dict_file(path)
        assert not any(k.startswith("fc.") for k in loaded)  # the head is dropped
        assert set(loaded) == {k for k in r18_state if not k.startswith("fc.")}
        enc = create_encoder("resnet18", weights=str(path))
        _assert_encoder_has(enc, r18_state)
        assert enc.weights_source == str(path.resolve())
        assert enc.weights_sha256 == weights_module.file_sha256(path)


def test_ciga_lightning_layout(tmp_path, r18_state):
    """Ciga et al.'s checkpoint: ``state_dict`` of ``model.resnet.*`` keys with a 2-layer projection head."""
    sd = {f"model.resnet.{k}": v for k, v in r18_state.items() if not k.startswith("fc.")}
    sd |= {
        "model.resnet.fc.1.weight": torch.zeros(512, 512),
        "model.resnet.fc.1.bias": torch.zeros(512),
        "model.resnet.fc.3.weight": torch.zeros(128, 512),
        "model.resnet.fc.3.bias": torch.zeros(128),
    }
    ckpt = {"epoch": 1000, "global_step": 5, "state_dict": sd, "optimizer_states": [{"lr": 0.1}]}
    path = tmp_path / "tenpercent_resnet18.ckpt"
    torch.save(ckpt, path)
    enc = create_encoder("ciga-simclr-resnet18", weights=str(path), truncate=1)
    _assert_encoder_has(enc, r18_state)
    assert enc.stage_names[-1] == "layer3"


def test_mormont_multitask_layouts(tmp_path):
    """Mormont et al.'s files: the shared network under ``features.``, per-task ``heads.*``."""
    torch.manual_seed(3)
    r50 = tvm.resnet50().state_dict()
    sd = {f"features.{k}": v for k, v in r50.items() if not k.startswith("fc.")}
    sd |= {"heads.task_a.linear.weight": torch.zeros(2, 2048), "heads.task_b.linear.bias": torch.zeros(3)}
    path = tmp_path / "resnet50-mh-best-191205-141200.pth"
    torch.save(sd, path)
    enc = create_encoder("mormont-mtl-resnet50", weights=str(path))
    _assert_encoder_has(enc, r50)

    dn = tvm.densenet121().state_dict()
    sd = {f"features.{k}": v for k, v in dn.items() if not k.startswith("classifier.")}
    sd["heads.t.linear.weight"] = torch.zeros(2, 1024)
    path = tmp_path / "densenet121-mh-best-191205-141200.pth"
    torch.save(sd, path)
    loaded = load_state_dict_file(path)
    assert set(loaded) == {k for k in dn if not k.startswith("classifier.")}
    enc = create_encoder("mormont-mtl-densenet121", weights=str(path), truncate=3)
    assert torch.equal(enc.body.stem.conv0.weight, dn["features.conv0.weight"])
    assert torch.equal(
        enc.body.denseblock1.denseblock1.denselayer6.conv2.weight, dn["features.denseblock1.denselayer6.conv2.weight"]
    )


def test_features_only_and_legacy_densenet_keys(tmp_path):
    """A ``features.*``-only DenseNet file (no classifier) keeps its prefix; ``norm.1`` legacy keys are renamed."""
    torch.manual_seed(4)
    dn = tvm.densenet121().state_dict()
    legacy = {}
    for k, v in dn.items():
        if k.startswith("classifier.") or k.endswith("num_batches_tracked"):
            continue
        legacy[k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.") if "denselayer" in k else k] = v
    assert any("norm.1." in k for k in legacy)
    path = tmp_path / "dn.pth"
    torch.save({"model": legacy}, path)
    loaded = load_state_dict_file(path)
    assert set(loaded) == {k for k in dn if not k.startswith("classifier.") and "num_batches" not in k}
    enc = create_encoder("densenet121", weights=str(path))
    assert torch.equal(enc.body.denseblock4.norm5.running_var, dn["features.norm5.running_var"])


def test_wrong_keys_are_an_error_not_a_partial_load(tmp_path, r18_state):
    sd = dict(r18_state)
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    del sd["layer4.1.bn2.weight"]
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(HistotransferError) as err:
        create_encoder("resnet18", weights=str(path))
    msg = str(err.value)
    assert str(path) in msg and "layer4.1.bn2.weight" in msg and "layer5.0.conv1.weight" in msg

    torch.save({**r18_state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(HistotransferError, match=r"1 shape mismatch.*conv1.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)"):
        create_encoder("resnet18", weights=str(path))
    torch.save(r18_state, path)
    with pytest.raises(HistotransferError, match="does not fit a torchvision resnet34: 80 missing key"):
        create_encoder("resnet34", weights=str(path))


def test_truncated_files_are_refused(tmp_path, r18_state):
    pth = tmp_path / "full.pth"
    torch.save(r18_state, pth)
    st = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in r18_state.items()}, st)
    for path in (pth, st):
        cut = tmp_path / f"cut{path.suffix}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(HistotransferError, match=f"{cut}.*(truncated|corrupt)"):
            load_state_dict_file(cut)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path, r18_state):
    marker = tmp_path / "code-ran"
    zipped = tmp_path / "evil.pth"
    torch.save({"state_dict": r18_state, "payload": _RunsCode(marker)}, zipped)
    legacy = tmp_path / "evil.ckpt"
    legacy.write_bytes(pickle.dumps({"state_dict": {"a": _RunsCode(marker)}}, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(HistotransferError, match=f"{path}: refused.*safetensors"):
            create_encoder("resnet18", weights=str(path))
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    with pytest.raises(HistotransferError, match="no state dict found"):
        load_state_dict_file(path)
    with pytest.raises(HistotransferError, match="not found"):
        load_state_dict_file(tmp_path / "absent.pth")
    other = tmp_path / "w.npz"
    other.write_bytes(b"0")
    with pytest.raises(HistotransferError, match="unknown weights file type"):
        load_state_dict_file(other)


def test_histopathology_encoder_names_its_published_file(tmp_path, monkeypatch, r18_state):
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path))
    with pytest.raises(HistotransferError) as err:
        create_encoder("mormont-mtl-densenet121")
    msg = str(err.value)
    assert "densenet121-mh-best-191205-141200.pth" in msg and "github.com/waliens/multitask-dipath" in msg
    with pytest.raises(HistotransferError, match=r"tenpercent_resnet18\.ckpt.*ozanciga/self-supervised-histopathology"):
        create_encoder("ciga-simclr-resnet18")
    # Found by name in the weights folder.
    torch.save(
        {"state_dict": {f"model.resnet.{k}": v for k, v in r18_state.items()}}, tmp_path / "tenpercent_resnet18.ckpt"
    )
    enc = create_encoder("ciga-simclr-resnet18")
    assert enc.weights_source == str(tmp_path / "tenpercent_resnet18.ckpt")
    _assert_encoder_has(enc, r18_state)


def test_imagenet_weights_offline_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(HistotransferError, match=r"could not download ImageNet weights for resnet18.*--weights"):
        create_encoder("resnet18")


def test_imagenet_weights_from_the_cache(tmp_path, monkeypatch, r18_state):
    """A cached torchvision file is used without a download, and its sha256 recorded."""
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path))
    cached = tmp_path / Path(tvm.ResNet18_Weights.DEFAULT.url).name
    torch.save(r18_state, cached)
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)  # any download attempt would fail
    enc = create_encoder("resnet18", truncate=2)
    _assert_encoder_has(enc, r18_state)
    assert enc.weights_source == "imagenet (ResNet18_Weights.IMAGENET1K_V1)"
    assert enc.weights_sha256 == weights_module.file_sha256(cached)


@pytest.mark.skipif(not SHARED_DENSENET.exists(), reason=f"real weights not present at {SHARED_DENSENET}")
def test_real_densenet121_weights_load_exactly():
    enc = create_encoder("densenet121", weights=str(SHARED_DENSENET), truncate=1)
    ref = tvm.densenet121()
    ref.load_state_dict(load_state_dict_file(SHARED_DENSENET), strict=False)
    assert torch.equal(
        enc.body.denseblock3.denseblock3.denselayer24.conv2.weight, ref.features.denseblock3.denselayer24.conv2.weight
    )
    assert enc.weights_sha256 == "ca75f26225affa081e005d8100cebdce175fb4cb12d37c0104b91ee64f29b622"
