"""AttentionMIL: shapes, folded standardisation against the explicit formula, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histotransfer.mil import AttentionMIL, attention_scores, load_run_model
from histotransfer.mil.bags import feature_stats
from histotransfer.mil.models import STD_FLOOR_FRACTION
from histotransfer.mil.rundir import save_model


def reference_forward(model: AttentionMIL, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network written out from its definition, standardising the input explicitly."""
    z = (bag - model.feature_mean) / model.feature_std
    h = F.relu(F.linear(z, model.fc1.weight, model.fc1.bias))
    if model.variant == "histotransfer":
        h = F.relu(model.fc2(h))
        a = model.attention_w(torch.tanh(model.attention_v(h)))
    else:
        a = model.attention_w(torch.tanh(model.attention_v(h)) * torch.sigmoid(model.attention_u(h)))
    weights = torch.softmax(a[:, 0], 0)
    return model.classifier((weights[:, None] * h).sum(0, keepdim=True)), a[:, 0]


@pytest.mark.parametrize("variant", ["histotransfer", "gated"])
def test_forward_shapes_and_folded_standardisation_match_the_definition(variant):
    torch.manual_seed(0)
    model = AttentionMIL(12, n_classes=2, variant=variant, hidden=24).eval()
    bags = [torch.randn(n, 12) * torch.logspace(-3, 3, 12) + 5 for n in (1, 7, 40)]
    model.set_standardization(*feature_stats(bags))
    for bag in bags:
        logits, scores = model(bag)
        assert logits.shape == (1, 2) and scores.shape == (len(bag),)
        ref_logits, ref_scores = reference_forward(model, bag)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(attention_scores(model, bag), scores.detach().numpy())


def test_histotransfer_layer_sizes_are_the_papers():
    model = AttentionMIL(512)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("weight")}
    assert shapes == {
        "fc1.weight": (256, 512),
        "fc2.weight": (64, 256),
        "attention_v.weight": (32, 64),
        "attention_w.weight": (1, 32),
        "classifier.weight": (2, 64),
    }


def test_without_standardisation_the_network_is_the_plain_one():
    torch.manual_seed(1)
    model = AttentionMIL(8).eval()
    bag = torch.randn(10, 8) * 100
    h = F.relu(model.fc2(F.relu(model.fc1(bag))))
    scores = model.attention_w(torch.tanh(model.attention_v(h)))[:, 0]
    expected = model.classifier(torch.softmax(scores, 0)[None] @ h)
    logits, got = model(bag)
    torch.testing.assert_close(got, scores, rtol=0, atol=0)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_std_floor_keeps_near_constant_dimensions_from_blowing_up():
    model = AttentionMIL(5)
    std = np.array([1.0, 2.0, 4.0, 1e-9, 0.0])
    floor = model.set_standardization(np.zeros(5), std)
    assert floor == pytest.approx(STD_FLOOR_FRACTION * 1.5)  # median of the positive stds (1e-9, 1, 2, 4)
    assert model.feature_std.tolist() == pytest.approx([1.0, 2.0, 4.0, floor, floor])


def test_feature_stats_match_numpy_over_all_patches():
    rng = np.random.default_rng(0)
    bags = [torch.from_numpy((rng.standard_normal((n, 6)) * 3 + 1e4).astype(np.float32)) for n in (3, 50, 17)]
    mean, std = feature_stats(bags)
    allx = np.concatenate([b.numpy() for b in bags]).astype(np.float64)
    np.testing.assert_allclose(mean, allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, allx.std(0), rtol=1e-9)


def test_pooling_is_invariant_to_duplicating_every_patch():
    torch.manual_seed(2)
    model = AttentionMIL(8, variant="gated").eval()
    bag = torch.randn(9, 8)
    torch.testing.assert_close(model(bag.repeat(100, 1))[0], model(bag)[0], rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_input_bag_for_end_to_end_training():
    model = AttentionMIL(8)
    model.set_standardization(np.ones(8), np.full(8, 2.0))
    bag = torch.randn(5, 8, requires_grad=True)
    F.cross_entropy(model(bag)[0], torch.tensor([1])).backward()
    assert bag.grad is not None and bag.grad.abs().sum() > 0
    assert model.feature_mean.grad is None and not model.feature_std.requires_grad


def test_dropout_only_in_training_mode():
    torch.manual_seed(3)
    model = AttentionMIL(8, variant="gated", hidden=16, dropout=0.5)
    bag = torch.randn(20, 8)
    assert not torch.equal(model.train()(bag)[0], model(bag)[0])
    assert torch.equal(model.eval()(bag)[0], model(bag)[0])


def test_bad_shapes_and_variants_are_refused():
    with pytest.raises(ValueError, match="unknown MIL model"):
        AttentionMIL(8, variant="transformer")
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        AttentionMIL(8)(torch.randn(3, 9))


def test_model_pt_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(4)
    model = AttentionMIL(8, variant="gated", hidden=12, dropout=0.1)
    model.set_standardization(np.arange(8.0), np.linspace(1, 2, 8))
    save_model(model, tmp_path / "model.pt", ["normal", "tumor"], selected_epoch=3)
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["config"] == {"in_dim": 8, "n_classes": 2, "variant": "gated", "hidden": 12, "dropout": 0.1}
    assert payload["classes"] == ["normal", "tumor"] and payload["selected_epoch"] == 3
    loaded = load_run_model(tmp_path)
    assert not loaded.training
    bag = torch.randn(6, 8)
    model.eval()
    for a, b in zip(model(bag), loaded(bag)):
        assert torch.equal(a, b)
    assert torch.equal(loaded.feature_std, model.feature_std)
