"""Data: loading, subsets, splits, statistics, albumentations pipelines and loaders."""

import pickle
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
        H.load_cifar10(tmp_path, download=False)


def test_missing_data_is_fetched_by_default(tmp_path, fake_cifar, monkeypatch):
    """Notebooks 01 and 07 call load_cifar10 / load_test_split with their defaults: on a fresh runtime they fetch."""
    import shutil

    import torchvision.datasets.utils as tvu

    fetched = []
    monkeypatch.setattr(tvu, "download_and_extract_archive", lambda url, download_root, md5: fetched.append(url) or
                        shutil.copytree(fake_cifar / "cifar-10-batches-py", f"{download_root}/cifar-10-batches-py"))
    x, y = H.load_cifar10(tmp_path / "a", subset=100)
    xt, yt = H.load_test_split(tmp_path / "b")
    assert fetched == [H.CIFAR10_URL] * 2 and x.shape == (100, 32, 32, 3) and len(yt) == 50


def test_a_subset_too_small_for_a_validation_split_is_refused(fake_cifar):
    with pytest.raises(ValueError, match="SUBSET=50 too small for VAL_FRACTION=0.1: a class gets no validation image"):
        H.make_data(fake_cifar, subset=50, device="cpu", num_workers=0)
    assert H.make_data(fake_cifar, subset=60, device="cpu", num_workers=0).val is not None  # 6 a class: 1 held out


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


@pytest.mark.slow  # unpacks and reads all 60,000 images (about 12 s)
@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg-pack.npz").exists(), reason="needs ../shared/data")
def test_mean_std_on_the_full_jpeg_copy(tmp_path):
    tool = SHARED_DATA.parent / "tools" / "cifar10_unpack.py"
    subprocess.run([sys.executable, str(tool), str(tmp_path)], check=True, capture_output=True)
    x, _ = H.load_cifar10(tmp_path)
    assert x.shape == (50000, 32, 32, 3)
    mean, std = H.dataset_mean_std(x)
    assert np.allclose(mean, (0.4913, 0.4821, 0.4465), atol=1e-3)
    assert np.allclose(std, (0.2452, 0.2428, 0.2606), atol=1e-3)


def test_transforms_use_current_albumentations_arguments():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated or ignored argument would warn
        pipe = H.make_transforms({"crop": True, "flip": True, "cutout": 16, "rotate": 5}, train=True)
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["PadIfNeeded", "RandomCrop", "HorizontalFlip", "Rotate", "CoarseDropout", "Normalize",
                     "ToTensorV2"]
    import cv2
    pad, rot = pipe.transforms[0], pipe.transforms[3]
    assert pad.border_mode == cv2.BORDER_CONSTANT and rot.border_mode == cv2.BORDER_CONSTANT


def test_test_pipeline_only_normalises():
    pipe = H.make_transforms({"cutout": 16, "rotate": 5}, train=False)
    assert [type(t).__name__ for t in pipe.transforms] == ["Normalize", "ToTensorV2"]


def test_cutout_fills_with_the_mean_before_normalize():
    """A Cutout hole holds the mean pixel, which Normalize maps to about 0 in every channel."""
    image = np.full((32, 32, 3), 255, np.uint8)  # white: normalised > 2 everywhere
    pipe = H.make_transforms({"crop": False, "flip": False, "cutout": 16}, preview=True)  # preview: p = 1
    out = pipe(image=image)["image"]  # (3, 32, 32)
    hole = (out.abs() < 0.02).all(0)
    assert hole.sum().item() == 16 * 16
    rows, cols = torch.nonzero(hole, as_tuple=True)
    assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15
    assert (out[:, ~hole] > 2).all()


def test_crop_pads_with_black_by_default():
    image = np.full((32, 32, 3), 200, np.uint8)
    pipe = H.make_transforms({"flip": False}, normalize=False)
    pipe.set_random_seed(3)
    outs = [pipe(image=image)["image"] for _ in range(20)]
    assert all(o.shape == (32, 32, 3) for o in outs)
    assert any((o == 0).all(-1).any() for o in outs) and all(set(np.unique(o)) <= {0, 200} for o in outs)


def test_albumentations_normalize_equals_torchvision_normalize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = H.make_transforms(train=False)(image=image)["image"]
    tv = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(H.CIFAR10_MEAN, H.CIFAR10_STD)])
    theirs = tv(image)
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_loaders_split_shuffle_and_fixed_test_order(fake_cifar):
    data = H.make_data(fake_cifar, batch_size=32, val_fraction=0.1, device="cpu", num_workers=0)
    assert len(data.train.dataset) == 180 and len(data.val.dataset) == 20 and len(data.test.dataset) == 50
    assert np.bincount(data.val.dataset.labels, minlength=10).tolist() == [2] * 10  # stratified
    first = [y for _, y in data.test]
    again = [y for _, y in data.test]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(torch.cat(first), torch.as_tensor(data.test_labels))  # test order = file order
    H.set_epoch(data.train, 0)
    e0 = torch.cat([y for _, y in data.train])
    H.set_epoch(data.train, 1)
    e1 = torch.cat([y for _, y in data.train])
    H.set_epoch(data.train, 0)
    e0_again = torch.cat([y for _, y in data.train])
    assert torch.equal(e0, e0_again) and not torch.equal(e0, e1)


def test_epoch_seeding_repeats_augmentations_across_workers(fake_cifar):
    """With 2 workers, an epoch's batches (order and augmentation) depend only on (seed, epoch)."""
    x, y = H.load_cifar10(fake_cifar)

    def epoch_batches(epoch, workers):
        loader = H.make_loader(x[:64], y[:64], H.make_transforms({"cutout": 16}), batch_size=16,
                               shuffle=True, num_workers=workers, seed=5)
        H.set_epoch(loader, epoch)
        return torch.cat([b for b, _ in loader])

    for workers in (0, 2):
        a = epoch_batches(2, workers=workers)
        assert torch.equal(a, epoch_batches(2, workers=workers))  # a fresh loader (a resumed run) repeats it
        assert not torch.equal(a, epoch_batches(3, workers=workers))



def test_zero_and_two_workers_give_identical_batches(fake_cifar):
    """Order and augmentation come from (seed, epoch, image) alone: workers and a fresh loader change nothing."""
    x, y = H.load_cifar10(fake_cifar)
    runs = {}
    for workers in (0, 2, 0):
        loader = H.make_loader(x[:96], y[:96], H.make_transforms({"cutout": 16}), batch_size=32, shuffle=True,
                               num_workers=workers, seed=7)
        H.set_epoch(loader, 4)
        images, labels = (torch.cat(parts) for parts in zip(*loader))
        if workers in runs:  # a fresh loader, as a resumed run makes, repeats it
            assert torch.equal(images, runs[workers][0]) and torch.equal(labels, runs[workers][1])
        runs[workers] = images, labels
    assert torch.equal(runs[0][0], runs[2][0]) and torch.equal(runs[0][1], runs[2][1])


def test_augmentations_vary_between_images_and_epochs():
    """One image repeated: every copy gets its own crop, flip and hole, and a new one next epoch."""
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = H.ArrayDataset(np.repeat(image[None], 64, 0), np.zeros(64), H.make_transforms({"cutout": 16}), seed=3)
    epoch0 = torch.stack([data[i][0] for i in range(64)])
    data.epoch = 1
    epoch1 = torch.stack([data[i][0] for i in range(64)])
    assert len({tuple(a.flatten().tolist()) for a in epoch0}) > 50  # distinct augmentations
    assert sum(not torch.equal(a, b) for a, b in zip(epoch0, epoch1)) > 55


def test_an_images_augmentation_depends_only_on_seed_epoch_and_index():
    x = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    pipe = H.make_transforms({"cutout": 16, "rotate": 5})
    full = H.ArrayDataset(x, np.zeros(40), pipe, seed=2)
    part = H.ArrayDataset(x[:10], np.zeros(10), pipe, seed=2)  # shares the pipeline: each re-seeds it
    other = H.ArrayDataset(x, np.zeros(40), pipe, seed=9)
    forwards = [full[i][0] for i in range(10)]
    np.random.seed(0)  # noqa: NPY002 (the global generators must not matter)
    backwards = [full[i][0] for i in reversed(range(10))][::-1]
    assert all(torch.equal(a, b) and torch.equal(a, part[i][0]) for i, (a, b) in enumerate(zip(forwards, backwards)))
    assert not torch.equal(torch.stack(forwards), torch.stack([other[i][0] for i in range(10)]))
    again = pickle.loads(pickle.dumps(full))  # what a worker started with "spawn" gets
    assert all(torch.equal(again[i][0], forwards[i]) for i in range(10))


def test_set_epoch_reads_the_seed_from_the_dataset(fake_cifar):
    x, y = H.load_cifar10(fake_cifar)
    loader = H.make_loader(x[:64], y[:64], H.make_transforms(), batch_size=16, shuffle=True, num_workers=0, seed=1)
    assert not hasattr(loader, "seed")
    H.set_epoch(loader, 2)
    before = torch.cat([t for _, t in loader])
    loader.dataset.seed = 5
    H.set_epoch(loader, 2)
    assert not torch.equal(before, torch.cat([t for _, t in loader]))
    fixed = H.make_loader(x[:64], y[:64], H.make_transforms(train=False), batch_size=16, num_workers=0)
    H.set_epoch(fixed, 3)  # an unshuffled loader has no seed: its order never changes
    assert torch.equal(torch.cat([t for _, t in fixed]), torch.as_tensor(y[:64]))

def test_denormalize_inverts_normalize():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    t = H.make_transforms(train=False)(image=image)["image"]
    back = H.denormalize(t).permute(1, 2, 0).numpy()
    assert np.allclose(back, image / 255.0, atol=1e-5)
    assert np.allclose(H.to_display(t), image / 255.0, atol=1e-5)


def write_batch(folder, batch, name="test_batch"):
    import pickle
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "wb") as f:
        pickle.dump(batch, f)


class Marker:
    """A pickle that would create a file when loaded with plain pickle.load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_batch_file_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    write_batch(tmp_path / "cifar-10-batches-py", {b"data": Marker(str(marker)), b"labels": [0]})
    with pytest.raises(ValueError, match="test_batch is not a plain CIFAR-10 batch.*refused.*io.open|refused"):
        H.load_cifar10(tmp_path, train=False)
    assert not marker.exists()


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((2, 3072), np.float32), [0, 1], "pixels must be uint8"),
    (np.zeros((2, 3072), np.int16), [0, 1], "pixels must be uint8"),
    (np.zeros((2, 3072), np.uint8), [0, 10], "labels must be whole numbers 0-9"),
    (np.zeros((2, 3072), np.uint8), [-1, 3], "labels must be whole numbers 0-9"),
    (np.zeros((2, 3000), np.uint8), [0, 1], "expected \\[N, 3072\\]"),
])
def test_bad_values_in_a_batch_file_are_refused(tmp_path, data, labels, message):
    write_batch(tmp_path / "cifar-10-batches-py", {b"data": data, b"labels": labels})
    with pytest.raises(ValueError, match=message):
        H.load_cifar10(tmp_path, train=False)


def test_subset_must_fit_the_dataset(fake_cifar):
    with pytest.raises(ValueError, match="SUBSET must be from 1 to 200"):
        H.load_cifar10(fake_cifar, subset=201)
    with pytest.raises(ValueError, match="SUBSET"):
        H.load_cifar10(fake_cifar, subset=0)


def test_augment_is_one_small_dict_with_clear_errors():
    assert H.check_augment(None) == H.AUGMENT
    assert H.check_augment({"cutout": True})["cutout"] == 16
    with pytest.raises(ValueError, match="unknown augmentation \\['cutuot'\\]; valid keys: crop: True/False, flip"):
        H.make_transforms({"cutuot": 16})
    for bad in ({"rotate": "x"}, {"cutout": -4}, {"cutout": 40}, {"crop": "no"}, {"cutout": 8.7}, {"rotate": 200}):
        with pytest.raises(ValueError, match="bad augmentation values .*allowed: crop: True/False"):
            H.check_augment(bad)
    assert H.check_augment({"cutout": 32, "rotate": 7.5, "flip": False}) == {"crop": True, "flip": False, "cutout": 32,
                                                                            "rotate": 7.5}
