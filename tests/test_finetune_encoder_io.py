"""encoder.pt: a fine-tuned (truncated) encoder saved as torchvision weights loads back exactly."""

from __future__ import annotations

import pytest
import torch

from histotransfer.encoders import create_encoder
from histotransfer.errors import HistotransferError
from histotransfer.finetune import save_encoder
from histotransfer.finetune.encoder_io import encoder_from_attrs


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0"])
def test_truncated_encoder_round_trips_and_keeps_the_dropped_stages_of_base(name, tmp_path):
    torch.manual_seed(0)
    base = create_encoder(name, "random", 0)
    tuned = create_encoder(name, "random", 2)
    tuned.load_state_dict({k: v for k, v in base.state_dict().items() if k in tuned.state_dict()})
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01)
    path = save_encoder(tuned, tmp_path / "encoder.pt", base)
    back = create_encoder(name, str(path), 2).state_dict()
    assert back.keys() == tuned.state_dict().keys()
    assert all(torch.equal(v, back[k]) for k, v in tuned.state_dict().items())
    full = create_encoder(name, str(path), 0).state_dict()
    dropped = [k for k in full if k not in back]
    assert dropped and all(torch.equal(full[k], base.state_dict()[k]) for k in dropped)
    with pytest.raises(HistotransferError, match="pass the untruncated"):
        save_encoder(tuned, tmp_path / "x.pt")


def test_recorded_weights_are_checked(tmp_path):
    torch.manual_seed(1)
    path = save_encoder(create_encoder("resnet18", "random", 0), tmp_path / "w.pt")
    attrs = {"encoder": "resnet18", "truncate": 3, "weights": str(path)}
    sha = encoder_from_attrs(attrs, "features.h5").weights_sha256
    assert encoder_from_attrs({**attrs, "weights_sha256": sha}, "features.h5").feature_dim == 64
    with pytest.raises(HistotransferError, match="restore the original weights"):
        encoder_from_attrs({**attrs, "weights_sha256": "0" * 64}, "features.h5")
    rebuilt = encoder_from_attrs({**attrs, "weights": "random"}, "features.h5")
    fresh = create_encoder("resnet18", "random", 3)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(HistotransferError, match="cannot be rebuilt"):
        encoder_from_attrs({**attrs, "weights": ""}, "features.h5")
    with pytest.raises(HistotransferError, match="does not record which encoder"):
        encoder_from_attrs({"weights": str(path)}, "features.h5")
