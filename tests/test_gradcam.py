"""Grad-CAM and Grad-CAM++: an independent oracle, hooks, in-place ReLU, localisation, sanity checks."""

import copy
import gc

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers as H

METHODS = [(H.GradCAM, "GradCAM"), (H.GradCAMPlusPlus, "GradCAMPlusPlus")]


@pytest.fixture(scope="module")
def scaled_resnet18():
    """ResNet18 with the classifier scaled up, so raw maps sit far above the reference's epsilons."""
    torch.manual_seed(0)
    model = H.make_model("resnet18").eval()
    with torch.no_grad():
        model.linear.weight.mul_(1e3)
    return model


@pytest.mark.parametrize("layer", ["layer2", "layer3", "layer4"])
@pytest.mark.parametrize("ours, ref_name", METHODS)
@pytest.mark.parametrize("given_targets", [False, True])
def test_maps_equal_pytorch_grad_cam(scaled_resnet18, layer, ours, ref_name, given_targets):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = scaled_resnet18
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = [3, 1, 4, 1, 5] if given_targets else None
    with ours(model, getattr(model, layer)) as cam:
        maps = cam(x, targets)
    assert maps.shape == (5, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    with getattr(pytorch_grad_cam, ref_name)(model, [getattr(model, layer)]) as ref:
        expected = ref(x, None if targets is None else [ClassifierOutputTarget(t) for t in targets])
    assert np.abs(maps.numpy() - expected).max() < 1e-4


def test_given_targets_change_the_map(scaled_resnet18):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with H.GradCAM(scaled_resnet18, scaled_resnet18.layer3) as cam:
        predicted = scaled_resnet18(x).argmax(1)
        a = cam(x, predicted)
        b = cam(x, None)
        c = cam(x, (predicted + 1) % 10)
    assert torch.allclose(a, b) and not torch.allclose(a, c)


class InplaceNet(nn.Module):
    """A conv whose output a later in-place ReLU overwrites: the case module backward hooks get wrong."""

    def __init__(self, inplace=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        out = self.relu(self.conv(x))
        out = F.relu(self.conv2(out), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def test_in_place_relu_after_the_target_layer():
    """Maps equal a hand computation on the conv's own (pre-ReLU) output and its gradient."""
    torch.manual_seed(0)
    net = InplaceNet(inplace=True).eval()
    x = torch.randn(3, 3, 16, 16)
    with H.GradCAM(net, net.conv) as cam:
        maps = cam(x, [0, 1, 2])
    clean = InplaceNet(inplace=False).eval()
    clean.load_state_dict(net.state_dict())
    acts = clean.conv(x)
    logits = clean.fc(F.adaptive_avg_pool2d(F.relu(clean.conv2(F.relu(acts))), 1).flatten(1))
    grads, = torch.autograd.grad(logits[torch.arange(3), torch.tensor([0, 1, 2])].sum(), acts)
    raw = F.relu((grads.mean((2, 3))[:, :, None, None] * acts).sum(1))
    expected = H._minmax(raw.detach())
    assert torch.allclose(maps, expected, atol=1e-5)


def test_one_forward_per_batch_and_parameter_grads_untouched(scaled_resnet18):
    scaled_resnet18.zero_grad(set_to_none=True)  # the reference implementation leaves .grad behind
    calls = []
    handle = scaled_resnet18.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    try:
        with H.GradCAM(scaled_resnet18, scaled_resnet18.layer3) as cam:
            cam(torch.randn(7, 3, 32, 32))
    finally:
        handle.remove()
    assert calls == [7]
    assert all(p.grad is None for p in scaled_resnet18.parameters())



def test_backward_stops_at_the_target_layer(scaled_resnet18):
    """Only the layers above the target are back-propagated: no gradient ever reaches layer2's output."""
    reached = []

    def watch(module, inputs, out):
        out.register_hook(lambda grad: reached.append(module))

    hook = scaled_resnet18.layer2.register_forward_hook(watch)
    try:
        for method in (H.GradCAM, H.GradCAMPlusPlus):
            with method(scaled_resnet18, scaled_resnet18.layer3) as cam:
                cam(torch.randn(2, 3, 32, 32))
    finally:
        hook.remove()
    assert reached == []


def test_frozen_weights_give_the_same_maps():
    torch.manual_seed(0)
    net = InplaceNet().eval()
    x = torch.randn(3, 3, 16, 16)
    with H.GradCAMPlusPlus(net, net.conv) as cam:
        expected = cam(x, [0, 1, 2])
    net.requires_grad_(False)
    with H.GradCAMPlusPlus(net, net.conv) as cam:
        assert torch.equal(cam(x, [0, 1, 2]), expected)
    assert not any(p.requires_grad for p in net.parameters()) and not x.requires_grad
    with H.GradCAMPlusPlus(net, net.conv) as cam, torch.no_grad():
        assert torch.equal(cam(x, [0, 1, 2]), expected)  # a caller's no_grad block does not stop it


def test_the_models_own_passes_inside_the_block_are_untouched():
    """Training or predicting inside the with block still gets every layer's gradient and the same outputs."""
    torch.manual_seed(0)
    net = InplaceNet().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = net(x)
    with H.GradCAM(net, net.conv) as cam:
        cam(x)
        out = net(x)
        out.sum().backward()
    assert torch.equal(out, expected) and net.conv.weight.grad is not None

def test_hooks_are_removed_also_on_error_and_nothing_grows(scaled_resnet18):
    layer = scaled_resnet18.layer3
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="targets must be"):
        with H.GradCAM(scaled_resnet18, layer) as cam:
            cam(x, [1, 2, 3])  # three targets for two images
    assert len(layer._forward_hooks) == 0

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    for _ in range(3):  # warm up lazily created state
        with H.GradCAMPlusPlus(scaled_resnet18, layer) as cam:
            cam(x)
    before = live_tensors()
    for _ in range(30):  # a tensor kept per call would leave 30 more
        with H.GradCAMPlusPlus(scaled_resnet18, layer) as cam:
            cam(x)
    assert live_tensors() <= before
    assert len(layer._forward_hooks) == 0 and len(layer._backward_hooks) == 0
    with pytest.raises(RuntimeError, match="with block"):
        H.GradCAM(scaled_resnet18, layer)(x)


def test_train_eval_mode_is_restored():
    model = H.make_model("resnet18")
    model.train()
    with H.GradCAM(model, model.layer3) as cam:
        cam(torch.randn(2, 3, 32, 32))
    assert model.training
    model.eval()
    with H.GradCAM(model, model.layer3) as cam:
        cam(torch.randn(2, 3, 32, 32))
    assert not model.training


def test_all_zero_map_stays_zero():
    model = H.make_model("resnet18").eval()
    with torch.no_grad():
        model.linear.weight.zero_()  # no class depends on any feature: every gradient is 0
    with H.GradCAMPlusPlus(model, model.layer3) as cam:
        maps = cam(torch.randn(3, 3, 32, 32))
    assert torch.isfinite(maps).all() and (maps == 0).all()
    with H.GradCAM(model, model.layer3) as cam:
        assert (cam(torch.randn(3, 3, 32, 32)) == 0).all()


# ---- a known answer: the evidence for the class is where a bright patch sits -------------------

COLOURS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])  # class = patch colour


class PatchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())  # (B, 32, 16, 16)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(F.adaptive_max_pool2d(self.features(x), 1).flatten(1))


def patch_images(n, seed):
    """Grey noise images with one bright 6x6 patch at a random place; its colour is the class."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    boxes = []
    for i in range(n):
        r0, c0 = torch.randint(0, 27, (2,), generator=g).tolist()
        x[i, :, r0:r0 + 6, c0:c0 + 6] = COLOURS[y[i]][:, None, None]
        boxes.append((r0, c0))
    return x, y, boxes


@pytest.fixture(scope="module")
def patch_model():
    torch.manual_seed(0)
    model = PatchNet()
    x, y, _ = patch_images(512, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for i in range(0, 512, 64):
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def peaks_in_patch(model, x, boxes, margin=1):
    with H.GradCAM(model, model.features) as cam:
        maps = cam(x)
    hits = 0
    for m, (r0, c0) in zip(maps, boxes):
        r, c = divmod(int(m.argmax()), 32)
        hits += (r0 - margin <= r < r0 + 6 + margin) and (c0 - margin <= c < c0 + 6 + margin)
    return hits / len(boxes), maps


def test_grad_cam_peak_falls_inside_the_patch(patch_model):
    x, y, boxes = patch_images(100, seed=1)
    with torch.no_grad():
        assert (patch_model(x).argmax(1) == y).float().mean() > 0.95
    rate, _ = peaks_in_patch(patch_model, x, boxes)
    assert rate >= 0.8


def test_model_randomisation_changes_the_maps(patch_model):
    """Adebayo et al. (2018): maps of the same architecture with random weights must differ clearly."""
    x, _, boxes = patch_images(100, seed=2)
    _, trained = peaks_in_patch(patch_model, x, boxes)
    for seed in range(3):
        torch.manual_seed(seed)
        _, random_maps = peaks_in_patch(PatchNet().eval(), x, boxes)
        corr = [np.corrcoef(a.flatten(), b.flatten())[0, 1] for a, b in zip(trained.numpy(), random_maps.numpy())]
        assert np.nanmean(corr) < 0.5
        assert (trained - random_maps).abs().mean() > 0.1


# ---- overlay ---------------------------------------------------------------------------------


def test_overlay_is_rgb_and_refuses_out_of_range_images():
    image = np.zeros((8, 8, 3), np.float32)
    cam = np.zeros((8, 8), np.float32)
    cam[:4] = 1.0
    out = H.overlay_cam(image, cam, alpha=1.0, cmap="jet")
    assert out.shape == (8, 8, 3)
    assert (out[:4, :, 0] > 0.4).all() and (out[:4, :, 2] < 0.1).all()  # jet's top is red, in RGB order
    assert (out[4:, :, 2] > 0.4).all() and (out[4:, :, 0] < 0.1).all()  # jet's bottom is blue
    half = H.overlay_cam(np.ones((8, 8, 3), np.float32), cam, alpha=0.0)
    assert np.allclose(half, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        H.overlay_cam(image + 2.0, cam)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        H.overlay_cam(image * 255 - 1, cam)
    with pytest.raises(ValueError, match="does not match"):
        H.overlay_cam(image, np.zeros((4, 4)))


def test_layer_by_name_equals_layer_by_module():
    torch.manual_seed(0)
    model = H.make_model("resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with H.GradCAM(model, "layer3") as by_name, H.GradCAM(model, model.layer3) as by_module:
        assert torch.equal(by_name(x, [1, 2]), by_module(x, [1, 2]))
    with H.GradCAM(model, "layer2.1.conv2") as nested:
        assert nested(x).shape == (2, 32, 32) and nested.map_size == (16, 16)
    with pytest.raises(ValueError, match="no layer 'layer5'; top-level layers: conv1, norm1, layer1, .*linear"):
        H.GradCAM(model, "layer5")


def test_non_spatial_layers_and_inference_mode_are_refused_clearly():
    model = H.make_model("resnet18").eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="needs a layer with feature maps.*'layer3'"):
        H.GradCAM(model, model.linear)
    with pytest.raises(ValueError, match="needs a layer with feature maps"):
        H.GradCAM(model, "linear")
    flat = torch.nn.Sequential(model, torch.nn.Identity())  # an Identity on logits: (N, 10), no H and W
    with H.GradCAM(flat, flat[1]) as cam, pytest.raises(ValueError, match=r"gives \(1, 10\).*'layer3'"):
        cam(x)
    with H.GradCAM(model, "layer3") as cam:
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inside torch.inference_mode"):
            cam(x)
        assert cam(x).shape == (1, 32, 32)  # outside the block it works


def test_mean_activation_is_the_layers_channel_mean_upsampled(scaled_resnet18):
    """07's 'where the layer is active at all': layer3's channel mean, by the model's own stages, at image size."""
    model, x = copy.deepcopy(scaled_resnet18).eval(), torch.randn(3, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = H.mean_activation(model, x, "layer3")
    with torch.no_grad():
        a = model.layer3(model.layer2(model.layer1(F.relu(model.norm1(model.conv1(x))))))  # (3, 256, 8, 8)
    expected = F.interpolate(a.mean(1, keepdim=True), size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert got.shape == (3, 32, 32) and torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, H.mean_activation(model, x, "layer2"), atol=1e-3)  # the layer asked for
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and not model.layer3._forward_hooks
