"""Tests for reprokit.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reprokit.digests import model_digest
from reprokit.errors import ModelError
from reprokit.models import (
    MODELS,
    OPTIMIZERS,
    build_model,
    build_optimizer,
    count_parameters,
)

DIGITS_SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True)
def _restore_torch_rng():
    """Put back torch's global RNG, which model building draws from."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_maps_digits_batch_to_logits(name):
    """Every registered model maps a (4, 1, 8, 8) batch to (4, 10) finite outputs."""
    torch.manual_seed(0)
    model = build_model(name, DIGITS_SHAPE, 10)
    out = model(torch.rand(4, *DIGITS_SHAPE))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()


def test_registry_holds_the_documented_models():
    """The registry offers mlp, cnn and resnet18."""
    assert set(MODELS) == {"mlp", "cnn", "resnet18"}


def test_mlp_on_vector_input():
    """mlp maps (4, 10) vectors to (4, 1) outputs for regression."""
    model = build_model("mlp", (10,), 1)
    assert model(torch.rand(4, 10)).shape == (4, 1)


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_image_models_refuse_vector_input(name):
    """cnn and resnet18 on vector input raise ModelError pointing to mlp."""
    with pytest.raises(ModelError, match=rf"model '{name}' needs image input.*shape \(10,\).*'mlp'"):
        build_model(name, (10,), 1)


def test_unknown_model_lists_choices():
    """An unknown model name raises ModelError naming it and listing the choices."""
    with pytest.raises(ModelError, match=r"unknown model 'vgg'.*\['cnn', 'mlp', 'resnet18'\]"):
        build_model("vgg", DIGITS_SHAPE, 10)


def test_zero_outputs_refused():
    """A model needs at least one output."""
    with pytest.raises(ModelError, match=r"at least 1 output, got 0"):
        build_model("mlp", (10,), 0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_same_digest_different_seed_different(name):
    """Initialisation follows torch's seed: same seed same digest, another seed another."""
    digests = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        digests.append(model_digest(build_model(name, DIGITS_SHAPE, 10)))
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


def test_resnet18_stem_suits_8x8_digits():
    """resnet18's stem is a 3x3 stride-1 conv on 1 channel with no max-pool."""
    model = build_model("resnet18", DIGITS_SHAPE, 10)
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 10


def test_count_parameters_trainable_only():
    """Freezing a layer removes exactly its parameters from the trainable count."""
    model = build_model("mlp", DIGITS_SHAPE, 10)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    assert count_parameters(model, trainable_only=True) == total
    first = model[1]
    for p in first.parameters():
        p.requires_grad_(False)
    frozen = first.weight.numel() + first.bias.numel()
    assert count_parameters(model) == total
    assert count_parameters(model, trainable_only=True) == total - frozen


def test_count_parameters_matches_layer_sizes():
    """The mlp's parameter count is that of its two linear layers."""
    model = build_model("mlp", (10,), 1)
    hidden = model[1].out_features
    assert count_parameters(model) == (10 * hidden + hidden) + (hidden * 1 + 1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_build_optimizer_known(name):
    """Each named optimizer is built with the requested learning rate and takes a step."""
    model = build_model("mlp", (10,), 1)
    opt = build_optimizer(name, list(model.parameters()), lr=0.1, momentum=0.9, weight_decay=0.0)
    assert opt.param_groups[0]["lr"] == 0.1
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.rand(4, 10)).pow(2).mean().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_build_optimizer_sgd_uses_momentum():
    """sgd is built with the requested momentum."""
    model = build_model("mlp", (10,), 1)
    opt = build_optimizer("sgd", list(model.parameters()), lr=0.1, momentum=0.7, weight_decay=0.01)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.7
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_build_optimizer_unknown():
    """An unknown optimizer raises ModelError naming it and listing the choices."""
    model = build_model("mlp", (10,), 1)
    with pytest.raises(ModelError, match=r"unknown optimizer 'lbfgs'.*'sgd', 'adam', 'adamw'"):
        build_optimizer("lbfgs", list(model.parameters()), lr=0.1, momentum=0.0, weight_decay=0.0)
