"""Data: loading, subsets, splits, statistics, albumentations pipelines and loaders."""

import subprocess
import sys
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from conftest import SHARED_DATA

import helpers as H


def test_load_shapes_and_dtypes(fake_cifar):
    x, y = H.load_cifar10(fake_cifar, train=True)
    xt, yt = H.load_cifar10(fake_cifar, train=False)
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (200,) and y.dtype == np.int64
    assert xt.shape == (50, 32, 32, 3) and set(yt) <= set(range(10))
    assert len(H.CLASSES) == 10 and H.CLASSES[0] == "airplane"


def test_load_reads_planes_in_cifar_order(tmp_path):
    """CIFAR stores 1024 red, then green, then blue values: channel c of pixel (0, 1) is plane c, entry 1."""
    import pickle
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    row = np.zeros(3072, np.uint8)
    row[1], row[1024 + 1], row[2048 + 1] = 10, 20, 30
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": row[None], b"labels": [3]}, f)
    x, y = H.load_cifar10(tmp_path, train=False)
    assert x[0, 0, 1].tolist() == [10, 20, 30] and y.tolist() == [3]


def test_subset_is_class_balanced(fake_cifar):
    x, y = H.load_cifar10(fake_cifar, subset=50, seed=1)
    assert len(y) == 50 and np.bincount(y, minlength=10).tolist() == [5] * 10
    x2, y2 = H.load_cifar10(fake_cifar, subset=50, seed=1)
    assert np.array_equal(x, x2)  # same seed, same subset
    idx = H.balanced_subset(np.repeat(np.arange(10), 20), 23)
    assert sorted(np.bincount(np.repeat(np.arange(10), 20)[idx]).tolist()) == [2] * 7 + [3] * 3


def test_missing_data_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*data_batch_1"):
        H.load_cifar10(tmp_path)


def test_offline_download_gives_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError) as err:
        H.load_cifar10(tmp_path, download=True)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "download failed" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no URLError traceback chain


def test_truncated_batch_names_the_file(tmp_path, fake_cifar):
    import shutil
    shutil.copytree(fake_cifar, tmp_path / "d")
    path = tmp_path / "d" / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="data_batch_3 is truncated or corrupt"):
        H.load_cifar10(tmp_path / "d")


def test_mean_std_matches_direct_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    mean, std = H.dataset_mean_std(images)
    flat = images.reshape(-1, 3) / 255.0
    assert np.allclose(mean, flat.mean(0), atol=1e-6) and np.allclose(std, flat.std(0), atol=1e-6)


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg-pack.npz").exists(), reason="needs ../shared/data")
def test_mean_std_on_the_full_jpeg_copy(tmp_path):
    tool = SHARED_DATA.parent / "tools" / "cifar10_unpack.py"
    subprocess.run([sys.executable, str(tool), str(tmp_path)], check=True, capture_output=True)
    x, _ = H.load_cifar10(tmp_path)
    assert x.shape == (50000, 32, 32, 3)
    mean, std = H.dataset_mean_std(x)
    assert np.allclose(mean, (0.4913, 0.4821, 0.4465), atol=1e-3)
    assert np.allclose(std, (0.2452, 0.2428, 0.2606), atol=1e-3)
    assert H.data_source(tmp_path).startswith("CIFAR-10, non-official")


def test_transforms_use_current_albumentations_arguments():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated or ignored argument would warn
        pipe = H.build_transforms(train=True, crop=True, flip=True, cutout=True, rotate=5)
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["PadIfNeeded", "RandomCrop", "HorizontalFlip", "Rotate", "CoarseDropout", "Normalize",
                     "ToTensorV2"]
    import cv2
    pad, rot = pipe.transforms[0], pipe.transforms[3]
    assert pad.border_mode == cv2.BORDER_CONSTANT and rot.border_mode == cv2.BORDER_CONSTANT


def test_test_pipeline_only_normalises():
    pipe = H.build_transforms(train=False, cutout=True, rotate=5)
    assert [type(t).__name__ for t in pipe.transforms] == ["Normalize", "ToTensorV2"]


def test_cutout_fills_with_the_mean_before_normalize():
    """A Cutout hole holds the mean pixel, which Normalize maps to about 0 in every channel."""
    image = np.full((32, 32, 3), 255, np.uint8)  # white: normalised > 2 everywhere
    pipe = H.build_transforms(train=True, crop=False, flip=False, cutout=True, cutout_p=1.0)
    out = pipe(image=image)["image"]  # (3, 32, 32)
    hole = (out.abs() < 0.02).all(0)
    assert hole.sum().item() == 16 * 16
    rows, cols = torch.nonzero(hole, as_tuple=True)
    assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15
    assert (out[:, ~hole] > 2).all()


def test_crop_pads_with_black_by_default():
    image = np.full((32, 32, 3), 200, np.uint8)
    pipe = H.build_transforms(train=True, flip=False, normalize=False)
    pipe.set_random_seed(3)
    outs = [pipe(image=image)["image"] for _ in range(20)]
    assert all(o.shape == (32, 32, 3) for o in outs)
    assert any((o == 0).all(-1).any() for o in outs) and all(set(np.unique(o)) <= {0, 200} for o in outs)


def test_albumentations_normalize_equals_torchvision_normalize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = H.build_transforms(train=False)(image=image)["image"]
    tv = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(H.CIFAR10_MEAN, H.CIFAR10_STD)])
    theirs = tv(image)
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_loaders_split_shuffle_and_fixed_test_order(fake_cifar):
    data = H.make_loaders(fake_cifar, batch_size=32, val_fraction=0.1, device="cpu", num_workers=0)
    assert len(data.train.dataset) == 180 and len(data.val.dataset) == 20 and len(data.test.dataset) == 50
    assert np.bincount(data.val.dataset.labels, minlength=10).tolist() == [2] * 10  # stratified
    first = [y for _, y in data.test]
    again = [y for _, y in data.test]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(torch.cat(first), torch.as_tensor(data.test_labels))  # test order = file order
    data.train.set_epoch(0)
    e0 = torch.cat([y for _, y in data.train])
    data.train.set_epoch(1)
    e1 = torch.cat([y for _, y in data.train])
    data.train.set_epoch(0)
    e0_again = torch.cat([y for _, y in data.train])
    assert torch.equal(e0, e0_again) and not torch.equal(e0, e1)


def test_epoch_seeding_repeats_augmentations_across_workers(fake_cifar):
    """With 2 workers, an epoch's batches (order and augmentation) depend only on (seed, epoch)."""
    x, y = H.load_cifar10(fake_cifar)

    def epoch_batches(epoch, workers):
        loader = H.make_loader(x[:64], y[:64], H.build_transforms(train=True, cutout=True), batch_size=16,
                               train=True, num_workers=workers, seed=5)
        loader.set_epoch(epoch)
        return torch.cat([b for b, _ in loader])

    a = epoch_batches(2, workers=2)
    assert torch.equal(a, epoch_batches(2, workers=2))
    assert not torch.equal(a, epoch_batches(3, workers=2))


def test_gpu_loader_augments_like_the_albumentations_pipeline(fake_cifar):
    x, y = H.load_cifar10(fake_cifar)
    loader = H.GPULoader(x, y, batch_size=64, train=True, device="cpu", cutout=True, cutout_p=1.0)
    assert len(loader) == 4
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    hole = (xb.abs() < 1e-6).all(1)  # the mean pixel normalises to exactly 0
    assert (hole.sum((1, 2)) >= 16 * 16).all()
    test = H.GPULoader(x, y, batch_size=64, train=False, device="cpu")
    xs = torch.cat([b for b, _ in test])
    expected = torch.stack([H.build_transforms(train=False)(image=im)["image"] for im in x])
    assert torch.allclose(xs, expected, atol=1e-5)  # no augmentation on the test path
    with pytest.raises(ValueError, match="rotate"):
        H.GPULoader(x, y, device="cpu", train=True, rotate=5)


def test_gpu_loader_crop_shifts_the_image():
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 10, 10] = 255
    loader = H.GPULoader(image, [0], batch_size=1, train=True, device="cpu", flip=False, seed=0)
    seen = set()
    for epoch in range(30):
        loader.set_epoch(epoch)
        xb, _ = next(iter(loader))
        bright = torch.nonzero(xb[0, 0] > 2)
        seen.add(tuple(bright[0].tolist()))
    assert len(seen) > 5 and all(6 <= r <= 14 and 6 <= c <= 14 for r, c in seen)


def test_denormalize_inverts_normalize():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    t = H.build_transforms(train=False)(image=image)["image"]
    back = H.denormalize(t).permute(1, 2, 0).numpy()
    assert np.allclose(back, image / 255.0, atol=1e-5)
    assert np.allclose(H.to_display(t), image / 255.0, atol=1e-5)
