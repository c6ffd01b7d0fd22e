"""benchmarks/gpu_loader.py: batched device-side augmentation that matches the albumentations pipeline."""

import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import helpers as H

sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_loader import GPULoader  # noqa: E402


def test_gpu_loader_augments_like_the_albumentations_pipeline(fake_cifar):
    x, y = H.load_cifar10(fake_cifar)
    loader = GPULoader(x, y, {"cutout": 16}, batch_size=64, train=True, device="cpu", cutout_p=1.0)
    assert len(loader) == 4
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    hole = (xb.abs() < 1e-6).all(1)  # the mean pixel normalises to exactly 0
    assert (hole.sum((1, 2)) >= 16 * 16).all()
    test = GPULoader(x, y, batch_size=64, train=False, device="cpu")
    xs = torch.cat([b for b, _ in test])
    expected = torch.stack([H.make_transforms(train=False)(image=im)["image"] for im in x])
    assert torch.allclose(xs, expected, atol=1e-5)  # no augmentation on the test path
    with pytest.raises(ValueError, match="rotate"):
        GPULoader(x, y, {"rotate": 5}, device="cpu", train=True)


def test_gpu_loader_crop_shifts_the_image():
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 10, 10] = 255
    loader = GPULoader(image, [0], {"flip": False}, batch_size=1, train=True, device="cpu", seed=0)
    seen = set()
    for epoch in range(30):
        H.set_epoch(loader, epoch)
        xb, _ = next(iter(loader))
        bright = torch.nonzero(xb[0, 0] > 2)
        seen.add(tuple(bright[0].tolist()))
    assert len(seen) > 5 and all(6 <= r <= 14 and 6 <= c <= 14 for r, c in seen)


def test_fit_trains_from_the_gpu_loader(fake_cifar):
    x, y = H.load_cifar10(fake_cifar)
    xt, yt = H.load_cifar10(fake_cifar, train=False)
    data = H.CifarLoaders(GPULoader(x, y, batch_size=20, train=True, device="cpu"), None,
                       GPULoader(xt, yt, batch_size=25, device="cpu"), xt, yt)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10))
    rec = H.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.01), epochs=2, device="cpu",
                progress=False)
    assert rec["epochs_run"] == 2 and len(rec["history"]["lr"]) == 2 * len(data.train)
