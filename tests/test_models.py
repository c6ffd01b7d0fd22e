"""Models: the seeds' CIFAR ResNets, parameter counts, torchsummary figures, norms, errors."""

import contextlib
import io

import pytest
import torch

import helpers as H


@pytest.mark.parametrize("name, params", [("resnet18", 11_173_962), ("resnet34", 21_282_122),
                                          ("resnet50", 23_520_842)])
def test_parameter_counts_match_the_seeds(name, params):
    assert H.count_params(H.make_model(name)) == params


def test_torchsummary_figures_match_seed_004():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        H.model_summary(H.make_model("resnet18"))
    text = out.getvalue()
    assert "Total params: 11,173,962" in text
    assert "Forward/backward pass size (MB): 11.25" in text
    assert "Params size (MB): 42.63" in text
    assert "Estimated Total Size (MB): 53.89" in text


def _stage_shapes(model):
    shapes, hooks = {}, []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        hooks.append(getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:]))))
    out = model(torch.zeros(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    return shapes, out


def test_stages_and_stride1_last_stage():
    shapes, out = _stage_shapes(H.make_model("resnet18").eval())
    assert shapes == {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8), "layer4": (512, 4, 4)}
    assert out.shape == (2, 10)
    model = H.make_model("resnet18", last_stride=1).eval()
    shapes, out = _stage_shapes(model)
    assert shapes["layer4"] == (512, 8, 8) and out.shape == (2, 10)
    assert H.count_params(model) == 11_173_962


@pytest.mark.parametrize("norm, kind, groups", [("bn", torch.nn.BatchNorm2d, None), ("ln", torch.nn.GroupNorm, 1),
                                                ("gn", torch.nn.GroupNorm, 32)])
def test_norms(norm, kind, groups):
    model = H.make_model("resnet18", norm=norm)
    assert isinstance(model.norm1, kind) and isinstance(model.layer2[0].norm1, kind)
    if groups:
        assert model.layer3[0].norm2.num_groups == groups
    assert H.count_params(model) == 11_173_962
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_layer_norm_normalises_over_c_h_w():
    """"ln" is GroupNorm(1, C): each sample normalised over all of C, H, W, as nn.LayerNorm([C, H, W]) does."""
    x = torch.randn(4, 64, 8, 8)
    ours = H.make_norm("ln", 64)
    ref = torch.nn.LayerNorm([64, 8, 8], elementwise_affine=False)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50"):
        H.make_model("resnet101")
    with pytest.raises(ValueError, match="bn, ln, gn"):
        H.make_model("resnet18", norm="in")


def test_notebook_03s_block_check_runs_in_training_mode_because_eval_mode_would_miss_a_wrong_order():
    """03 checks BasicBlock against its formula in training mode; its text says why: in eval mode a fresh BatchNorm
    only divides by sqrt(1 + eps), so a block with its ReLU before a BatchNorm passes there and fails here."""
    x = torch.randn(2, 64, 32, 32)
    by_hand = lambda b: torch.relu(b.norm2(b.conv2(torch.relu(b.norm1(b.conv1(x))))) + b.shortcut(x))  # noqa: E731
    relu_first = lambda b: torch.relu(b.norm2(b.conv2(b.norm1(torch.relu(b.conv1(x))))) + b.shortcut(x))  # noqa: E731
    for train, wrong_order_passes in ((True, False), (False, True)):
        block = H.BasicBlock(64, 128, stride=2).train(train)  # fresh: running mean 0, variance 1
        assert torch.allclose(by_hand(block), block(x))
        assert torch.allclose(relu_first(block), block(x)) is wrong_order_passes
