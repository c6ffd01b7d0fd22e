"""helpers.py: the one module every notebook imports.

ResNets on CIFAR-10 for teaching: data and augmentation, CIFAR ResNets, a training loop with
checkpoints, the LR range test, evaluation, plots and Grad-CAM. Sections, in order:
setup, data, models, training, checkpoints, experiments and results, LR finder, evaluation,
plots, Grad-CAM. Accuracies are in percent everywhere; images are uint8 HWC RGB until they
are normalised into float CHW tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

# =============================================================================================
# Setup
# =============================================================================================

IN_COLAB = "google.colab" in sys.modules


def get_device(name="auto"):
    """Return a torch.device: "auto" picks cuda, then mps, then cpu."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={name!r} but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return device


def device_name(device="auto"):
    """A readable name of the hardware behind a device (GPU model or CPU model and cores)."""
    device = get_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU ({model}, {os.cpu_count()} cores)"


def seed_everything(seed=0):
    """Seed python, numpy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global RNG is what we must seed)
    torch.manual_seed(seed)


def versions():
    """Versions of python and the libraries the series uses."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "albumentations", "torch-lr-finder", "torchsummary",
                "matplotlib", "seaborn", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def print_versions():
    """Print library versions and what hardware "auto" would use."""
    for k, v in versions().items():
        print(f"{k:>16}: {v}")
    print(f"{'auto device':>16}: {get_device('auto')} ({device_name('auto')})")


def _choice(value, valid, what):
    """Return value if it is one of valid, else raise a ValueError that lists them."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")
    return value


def _kwargs_for(fn, cfg):
    """The entries of cfg that are optional (defaulted) parameters of fn."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in cfg.items() if k in params and params[k].default is not inspect.Parameter.empty}


# =============================================================================================
# Data
# =============================================================================================

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # official train split, [0, 1] units
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # the true per-channel std (not kuangliu's 0.2023, ...)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)
_OFFICIAL_MD5 = {  # torchvision's list; used only to say which copy of CIFAR-10 a run used
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
}


def _missing_data_message(folder, missing):
    return (f"CIFAR-10 not found: {folder} has no {missing}. Put CIFAR-10's python-format batches "
            f"there (data_batch_1 ... data_batch_5, test_batch, batches.meta: the folder "
            f"'cifar-10-batches-py' inside {CIFAR10_URL}), or set download=True where there is internet.")


def _download_cifar10(root):
    """Download and extract CIFAR-10 into root with torchvision's utility."""
    from torchvision.datasets.utils import download_and_extract_archive

    folder = Path(root) / "cifar-10-batches-py"
    try:
        download_and_extract_archive(CIFAR10_URL, download_root=str(root), md5=CIFAR10_MD5)
    except Exception as err:  # URLError, timeouts, bad archive: one clear message instead
        raise FileNotFoundError(f"{_missing_data_message(folder, 'batch files')} The download "
                                f"failed ({type(err).__name__}: {err}).") from None


def _read_batch(path):
    """Read one CIFAR-10 python batch file into (uint8 [N, 32, 32, 3], int64 [N])."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise ValueError(f"data has shape {data.shape} for {len(labels)} labels")
    except Exception as err:  # truncated pickle, wrong keys, wrong shapes
        raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete the "
                         f"'cifar-10-batches-py' folder and fetch CIFAR-10 again") from None
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, H, W, C)
    return np.ascontiguousarray(images), labels


def load_cifar10(root="data", train=True, download=False, subset=None, seed=0):
    """Load CIFAR-10 from root/cifar-10-batches-py as (uint8 [N, 32, 32, 3], int64 [N])."""
    folder = Path(root) / "cifar-10-batches-py"
    names = _TRAIN_FILES if train else _TEST_FILES
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and download:
        _download_cifar10(root)
        missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(_missing_data_message(folder, missing[0]))
    parts = [_read_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if subset is not None:
        keep = balanced_subset(labels, subset, seed=seed)
        images, labels = images[keep], labels[keep]
    return images, labels


def data_source(root="data"):
    """Say which copy of CIFAR-10 is in root: the official files (by md5) or another copy."""
    folder = Path(root) / "cifar-10-batches-py"
    for name, md5 in _OFFICIAL_MD5.items():
        path = folder / name
        if not path.is_file() or hashlib.md5(path.read_bytes()).hexdigest() != md5:
            return "CIFAR-10, non-official copy (e.g. the JPEG-decoded copy)"
    return "CIFAR-10, official files"


def balanced_subset(labels, n, seed=0):
    """Sorted indices of n samples with the classes as equal as possible (random within a class)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    base, extra = divmod(int(n), len(classes))
    keep = []
    for i, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        take = min(len(idx), base + (i < extra))
        keep.append(rng.choice(idx, size=take, replace=False))
    return np.sort(np.concatenate(keep))


def train_val_split(labels, val_fraction=0.1, seed=0):
    """Stratified split of the train split into (train indices, validation indices)."""
    labels = np.asarray(labels)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[: int(round(val_fraction * len(idx)))])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def dataset_mean_std(images):
    """Per-channel mean and std of uint8 [N, H, W, C] images, in [0, 1] units."""
    flat = np.asarray(images).reshape(-1, images.shape[-1])
    total = np.zeros(flat.shape[1])
    total_sq = np.zeros(flat.shape[1])
    for start in range(0, len(flat), 1 << 22):  # chunks keep float64 memory small
        chunk = flat[start:start + (1 << 22)].astype(np.float64) / 255.0
        total += chunk.sum(0)
        total_sq += (chunk**2).sum(0)
    mean = total / len(flat)
    std = np.sqrt(total_sq / len(flat) - mean**2)
    return tuple(mean.round(6).tolist()), tuple(std.round(6).tolist())


def build_transforms(train=True, mean=CIFAR10_MEAN, std=CIFAR10_STD, crop=True, flip=True,
                     cutout=False, cutout_size=16, cutout_p=0.5, rotate=0, pad=4,
                     pad_mode="constant", normalize=True, always=False):
    """An albumentations 2.x pipeline; the test pipeline (train=False) only normalises.

    always=True applies every chosen augmentation with probability 1 (for previews).
    """
    border = {"constant": cv2.BORDER_CONSTANT, "reflect": cv2.BORDER_REFLECT_101}[
        _choice(pad_mode, ("constant", "reflect"), "pad_mode")]
    fill = tuple(255.0 * m for m in mean)  # the dataset mean in pixel space (before Normalize)
    steps = []
    if train and crop:  # pad 4 then random 32x32 crop; padding is black (or mirrored)
        steps += [A.PadIfNeeded(min_height=32 + 2 * pad, min_width=32 + 2 * pad, position="center",
                                border_mode=border, fill=0),
                  A.RandomCrop(height=32, width=32)]
    if train and flip:
        steps.append(A.HorizontalFlip(p=1.0 if always else 0.5))
    if train and rotate:
        steps.append(A.Rotate(limit=(-rotate, rotate), interpolation=cv2.INTER_LINEAR,
                              border_mode=cv2.BORDER_CONSTANT, fill=fill, p=1.0 if always else 0.5))
    if train and cutout:  # Cutout = one square hole filled with the mean pixel
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(cutout_size, cutout_size),
                                     hole_width_range=(cutout_size, cutout_size), fill=fill,
                                     p=1.0 if always else cutout_p))
    if normalize:
        steps += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


class CIFARDataset(Dataset):
    """Numpy images + labels with an albumentations pipeline; augmentations are seeded per epoch."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform
        self._epoch_seed = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by workers
        self._seeded = None

    def set_epoch(self, seed, epoch):
        """Make this epoch's augmentations a function of (seed, epoch) in every worker."""
        self._epoch_seed[0] = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])

    def _reseed(self):
        key = int(self._epoch_seed[0])
        if self.transform is not None and key != self._seeded:
            info = torch.utils.data.get_worker_info()
            worker = info.id if info else 0
            self.transform.set_random_seed(int(np.random.SeedSequence([key, worker]).generate_state(1)[0]))
            self._seeded = key

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self._reseed()
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, int(self.labels[i])


class EpochLoader(DataLoader):
    """A DataLoader whose order and augmentations depend only on (seed, epoch): resumes repeat them."""

    def __init__(self, dataset, seed=0, **kwargs):
        self.seed = seed
        super().__init__(dataset, generator=torch.Generator().manual_seed(seed), **kwargs)

    def set_epoch(self, epoch):
        """Reseed shuffling and augmentation for this epoch."""
        self.generator.manual_seed(int(np.random.SeedSequence([self.seed, epoch, 1]).generate_state(1)[0]))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.seed, epoch)


def default_workers(device="cpu"):
    """Loader workers: none when training on the CPU (they would compete), else up to 8."""
    return 0 if get_device(device).type == "cpu" else min(8, os.cpu_count() or 1)


def make_loader(images, labels, transform=None, batch_size=512, train=False, num_workers="auto",
                device="cpu", seed=0, persistent_workers=True):
    """DataLoader over numpy arrays: shuffled for train, fixed order for test."""
    device = get_device(device)
    workers = default_workers(device) if num_workers == "auto" else int(num_workers)
    dataset = CIFARDataset(images, labels, transform)
    return EpochLoader(dataset, seed=seed, batch_size=batch_size, shuffle=train,
                       drop_last=train and len(dataset) % batch_size == 1,  # no batch of one for BN
                       num_workers=workers, pin_memory=device.type == "cuda",
                       persistent_workers=persistent_workers and workers > 0)


class GPULoader:
    """The dataset kept on the device; crop, flip and Cutout done batched on device tensors."""

    def __init__(self, images, labels, batch_size=512, train=False, device="cuda", mean=CIFAR10_MEAN,
                 std=CIFAR10_STD, crop=True, flip=True, cutout=False, cutout_size=16, cutout_p=0.5,
                 rotate=0, pad=4, pad_mode="constant", seed=0):
        if rotate:
            raise ValueError("rotate is not available with data_on_gpu=True; use the albumentations loader")
        self.device = get_device(device)
        self.images = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(self.device)  # (N,C,H,W) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        self.crop, self.flip, self.cutout = train and crop, train and flip, train and cutout
        self.cutout_size, self.cutout_p, self.pad = cutout_size, cutout_p, pad
        self.pad_mode = _choice(pad_mode, ("constant", "reflect"), "pad_mode")
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.dataset = self.images  # len(loader.dataset) works as for a DataLoader

    def set_epoch(self, epoch):
        """Reseed shuffling and augmentation for this epoch."""
        self.epoch = epoch

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.train and n % self.batch_size == 1 else math.ceil(n / self.batch_size)

    def _augment(self, x, gen):
        n, _, h, w = x.shape
        if self.crop:
            mode = "constant" if self.pad_mode == "constant" else "reflect"
            padded = F.pad(x, (self.pad,) * 4, mode=mode)
            dy = torch.randint(0, 2 * self.pad + 1, (n,), device=x.device, generator=gen)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), device=x.device, generator=gen)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N,1,H,1)
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N,1,1,W)
            x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                       torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
        if self.flip:
            do = torch.rand(n, device=x.device, generator=gen) < 0.5
            x = torch.where(do[:, None, None, None], x.flip(3), x)
        if self.cutout:
            s = self.cutout_size
            y0 = torch.randint(0, h - s + 1, (n, 1, 1), device=x.device, generator=gen)
            x0 = torch.randint(0, w - s + 1, (n, 1, 1), device=x.device, generator=gen)
            r = torch.arange(h, device=x.device).view(1, h, 1)
            c = torch.arange(w, device=x.device).view(1, 1, w)
            hole = (r >= y0) & (r < y0 + s) & (c >= x0) & (c < x0 + s)
            hole &= (torch.rand(n, 1, 1, device=x.device, generator=gen) < self.cutout_p)
            x = torch.where(hole[:, None], self.mean, x)  # the mean pixel, before normalising
        return x

    def __iter__(self):
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, 1]).generate_state(1)[0]))
        n = len(self.labels)
        order = (torch.randperm(n, device=self.device, generator=gen) if self.train
                 else torch.arange(n, device=self.device))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx].float().div_(255)  # (B, C, H, W) in [0, 1]
            if self.train:
                x = self._augment(x, gen)
            yield (x - self.mean) / self.std, self.labels[idx]


@dataclass
class CifarData:
    """Everything a training or analysis notebook needs from the data."""

    train: object
    val: object
    test: object
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def load_test_split(data_dir="data", subset=None, seed=0, download=False):
    """The test split; with a train SUBSET, a class-balanced fifth of that size (CIFAR's 5:1 ratio)."""
    return load_cifar10(data_dir, train=False, download=download,
                        subset=None if subset is None else max(10, subset // 5), seed=seed)


def make_loaders(data_dir="data", subset=None, val_fraction=0.1, batch_size=512, crop=True, flip=True,
                 cutout=False, cutout_size=16, cutout_p=0.5, rotate=0, pad_mode="constant",
                 num_workers="auto", data_on_gpu=False, device="auto", seed=0, download=False):
    """Train (augmented), validation (carved from train) and test loaders for CIFAR-10."""
    device = get_device(device)
    x, y = load_cifar10(data_dir, train=True, download=download, subset=subset, seed=seed)
    xt, yt = load_test_split(data_dir, subset=subset, seed=seed, download=download)
    tr, va = train_val_split(y, val_fraction, seed=seed)
    aug = dict(crop=crop, flip=flip, cutout=cutout, cutout_size=cutout_size, cutout_p=cutout_p,
               rotate=rotate, pad_mode=pad_mode)
    if data_on_gpu:
        def loader(xs, ys, train):
            return GPULoader(xs, ys, batch_size=batch_size, train=train, device=device, seed=seed, **aug)
    else:
        def loader(xs, ys, train):
            return make_loader(xs, ys, build_transforms(train=train, **aug), batch_size=batch_size,
                               train=train, num_workers=num_workers, device=device, seed=seed)
    return CifarData(train=loader(x[tr], y[tr], True), val=loader(x[va], y[va], False) if len(va) else None,
                     test=loader(xt, yt, False), test_images=xt, test_labels=yt, source=data_source(data_dir))


def loaders_from_config(cfg, data_dir="data", device="auto", download=False):
    """make_loaders with the data settings of an experiment config."""
    return make_loaders(data_dir, device=device, download=download, **_kwargs_for(make_loaders, cfg))


def denormalize(x, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """Undo Normalize: a (C, H, W) or (N, C, H, W) tensor back to [0, 1] for display."""
    shape = (-1, 1, 1) if x.dim() == 3 else (1, -1, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x * s + m).clamp(0, 1)


def to_display(image):
    """Any image (uint8 HWC, float HWC, or a normalised CHW tensor) as float HWC in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] == 3:
            image = denormalize(image).permute(1, 2, 0)
        image = image.numpy()
    image = np.asarray(image)
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)


# =============================================================================================
# Models: the CIFAR ResNets of every seed (3x3 stride-1 stem, no max-pool)
# =============================================================================================

NORMS = ("bn", "ln", "gn")


def make_norm(norm, channels, gn_groups=32):
    """BatchNorm ("bn"), LayerNorm over C, H, W ("ln" = GroupNorm with one group) or GroupNorm ("gn")."""
    _choice(norm, NORMS, "norm")
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(1 if norm == "ln" else min(gn_groups, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet18/34)."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, norm="bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          make_norm(norm, planes))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 down, 3x3, 1x1 up (x4) with a residual connection (ResNet50)."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1, norm="bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm2 = make_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.norm3 = make_norm(norm, 4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride=stride, bias=False),
                                          make_norm(norm, 4 * planes))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, stages layer1..layer4 at 32, 16, 8, 4 px, global average pool, linear."""

    def __init__(self, block, num_blocks, num_classes=10, norm="bn", last_stride=2):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.norm1 = make_norm(norm, 64)
        self.layer1 = self._stage(block, 64, num_blocks[0], 1, norm)
        self.layer2 = self._stage(block, 128, num_blocks[1], 2, norm)
        self.layer3 = self._stage(block, 256, num_blocks[2], 2, norm)
        self.layer4 = self._stage(block, 512, num_blocks[3], last_stride, norm)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _stage(self, block, planes, n, stride, norm):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s, norm))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):  # x: (B, 3, 32, 32)
        out = F.relu(self.norm1(self.conv1(x)))  # (B, 64, 32, 32)
        out = self.layer1(out)  # (B, 64, 32, 32)
        out = self.layer2(out)  # (B, 128, 16, 16)
        out = self.layer3(out)  # (B, 256, 8, 8)
        out = self.layer4(out)  # (B, 512, 4, 4), or 8x8 with last_stride=1
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 512 * expansion)
        return self.linear(out)  # (B, num_classes) logits


MODELS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
          "resnet50": (Bottleneck, (3, 4, 6, 3))}


def build_model(name="resnet18", norm="bn", num_classes=10, last_stride=2):
    """A CIFAR ResNet by name; last_stride=1 keeps layer4 at 8x8 (same parameter count)."""
    block, blocks = MODELS[_choice(name, tuple(MODELS), "model")]
    _choice(norm, NORMS, "norm")
    _choice(last_stride, (1, 2), "last_stride")
    model = ResNet(block, blocks, num_classes=num_classes, norm=norm, last_stride=last_stride)
    model.arch = {"name": name, "norm": norm, "num_classes": num_classes, "last_stride": last_stride}
    return model


def count_params(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_summary(model, input_size=(3, 32, 32)):
    """Print torchsummary's layer table (output shapes, parameters, memory)."""
    from torchsummary import summary

    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    summary(model, input_size, device=device)


# =============================================================================================
# Training
# =============================================================================================

LOSSES = ("ce", "nll")
SCHEDULERS = ("onecycle", "step", "plateau", "cosine", "none")
PLATEAU_METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")


class NLLOnLogits(nn.Module):
    """The seeds' loss: log-softmax then NLL (the same number as cross-entropy without smoothing)."""

    def forward(self, logits, target):
        return F.nll_loss(F.log_softmax(logits, dim=1), target)


def make_criterion(loss="ce", label_smoothing=0.0):
    """Cross-entropy (with optional label smoothing) or the seeds' log-softmax + NLL."""
    if _choice(loss, LOSSES, "loss") == "nll":
        if label_smoothing:
            raise ValueError("label smoothing needs loss='ce'")
        return NLLOnLogits()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def make_optimizer(model, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4):
    """SGD with momentum (optionally Nesterov) and weight decay."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)


def make_scheduler(optimizer, name="onecycle", epochs=20, steps_per_epoch=1, max_lr=0.1, pct_start=0.25,
                   step_size=50, gamma=0.1, plateau_metric="val_acc", patience=3, threshold=0.1,
                   threshold_mode="abs", factor=0.1):
    """Return (scheduler, when): when is "batch", "epoch", "metric" (plateau) or None."""
    _choice(name, SCHEDULERS, "scheduler")
    sched = torch.optim.lr_scheduler
    if name == "onecycle":
        total = epochs * steps_per_epoch
        if total < 4:
            raise ValueError(f"OneCycleLR needs at least 4 steps, this run has {total} "
                             f"({epochs} epochs x {steps_per_epoch} batches): lower the batch size")
        if pct_start * total < 2:  # torch divides by zero when the warm-up is shorter than 2 steps
            print(f"OneCycle: warm-up widened from pct_start={pct_start} to {2 / total:.3g} (only {total} steps)")
            pct_start = 2 / total
        return sched.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                pct_start=pct_start, anneal_strategy="linear"), "batch"
    if name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch), "batch"
    if name == "step":
        return sched.StepLR(optimizer, step_size=step_size, gamma=gamma), "epoch"
    if name == "plateau":
        _choice(plateau_metric, PLATEAU_METRICS, "plateau_metric (the test set is never used to schedule)")
        mode = "max" if plateau_metric.endswith("acc") else "min"
        return sched.ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience,
                                       threshold=threshold, threshold_mode=threshold_mode), "metric"
    return None, None


def amp_dtype(device):
    """Mixed-precision dtype for a device: bf16 where the GPU has it, else fp16; None off CUDA."""
    device = get_device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _to(device, x, y, channels_last=False):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(model, loader, optimizer, criterion, device="cpu", scheduler=None, scaler=None,
                    dtype=None, channels_last=False, lr_log=None, desc="train", progress=True):
    """One pass over loader; returns (mean loss, accuracy %) measured while training."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress)
    for step, (x, y) in enumerate(bar):
        x, y = _to(device, x, y, channels_last)
        lr = optimizer.param_groups[0]["lr"]
        if lr_log is not None:
            lr_log.append(lr)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
            loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        if progress and (step % 10 == 0 or step == len(loader) - 1):  # .item() syncs: not every step
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                            lr=f"{lr:.3g}")
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


@torch.no_grad()
def evaluate(model, loader, criterion, device="cpu", dtype=None, channels_last=False):
    """Mean loss and accuracy % over a loader, in eval mode."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = _to(device, x, y, channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
            loss = criterion(out, y)
        loss_sum += loss.float().item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    return loss_sum / seen, 100.0 * correct / seen


def _new_history(steps_per_epoch):
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
            "train_time", "epoch_time", "lr")
    return {"steps_per_epoch": steps_per_epoch, **{k: [] for k in keys}}


def fit(model, train_loader, test_loader, val_loader=None, epochs=20, lr=0.1, momentum=0.9, nesterov=False,
        weight_decay=5e-4, loss="ce", label_smoothing=0.0, scheduler="onecycle", pct_start=0.25,
        step_size=50, gamma=0.1, plateau_metric="val_acc", patience=3, threshold=0.1, threshold_mode="abs",
        factor=0.1, amp=True, channels_last=True, device="auto", experiment="run", checkpoint_dir=None,
        resume=False, callbacks=(), progress=True):
    """Train and evaluate for `epochs`; checkpoint every epoch; return the history dict."""
    device = get_device(device)
    if scheduler == "plateau" and plateau_metric.startswith("val") and val_loader is None:
        raise ValueError("the plateau scheduler watches the validation split: give val_loader "
                         "(VAL_FRACTION > 0); the test set is only reported, never used to schedule")
    cuda = device.type == "cuda"
    channels_last = channels_last and cuda
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = cuda
    criterion = make_criterion(loss, label_smoothing)
    optimizer = make_optimizer(model, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    steps = len(train_loader)
    sched, when = make_scheduler(optimizer, scheduler, epochs=epochs, steps_per_epoch=steps, max_lr=lr,
                                 pct_start=pct_start, step_size=step_size, gamma=gamma,
                                 plateau_metric=plateau_metric, patience=patience, threshold=threshold,
                                 threshold_mode=threshold_mode, factor=factor)
    dtype = amp_dtype(device) if amp else None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    signature = {"epochs": epochs, "lr": lr, "scheduler": scheduler, "steps_per_epoch": steps, "loss": loss,
                 "batch_size": getattr(train_loader, "batch_size", None)}
    history, start = _new_history(steps), 0
    paths = checkpoint_paths(checkpoint_dir, experiment) if checkpoint_dir else None
    if resume and paths and paths["last"].exists():
        ckpt = load_checkpoint(paths["last"], model)
        if ckpt.get("signature") != signature:
            raise ValueError(f"{paths['last']} was written by a run with {ckpt.get('signature')}, this run "
                             f"has {signature}: use another experiment name, or resume=False to start over")
        optimizer.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        history, start = ckpt["history"], ckpt["epoch"]
        _set_rng_state(ckpt["rng"])
        print(f"Resuming '{experiment}' after epoch {start}/{epochs} from {paths['last']}")
    best = max(history["val_acc"], default=-math.inf)
    run = dict(device=device, dtype=dtype, channels_last=channels_last)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        try:
            tr_loss, tr_acc = train_one_epoch(model, train_loader, optimizer, criterion, scaler=scaler,
                                              scheduler=sched if when == "batch" else None, lr_log=history["lr"],
                                              desc=f"epoch {epoch + 1}/{epochs}", progress=progress, **run)
        except KeyboardInterrupt:
            done = f"{paths['last']} holds epoch {epoch}" if paths else "no checkpoint_dir was given"
            print(f"Interrupted during epoch {epoch + 1}: {done}; run again with resume=True to continue.")
            raise
        train_time = time.perf_counter() - t0
        val_loss, val_acc = evaluate(model, val_loader, criterion, **run) if val_loader else (None, None)
        te_loss, te_acc = evaluate(model, test_loader, criterion, **run)
        metrics = {"train_loss": tr_loss, "train_acc": tr_acc, "val_loss": val_loss, "val_acc": val_acc}
        if when == "epoch":
            sched.step()
        elif when == "metric":
            sched.step(metrics[plateau_metric])
        for k, v in [("epoch", epoch + 1), *metrics.items(), ("test_loss", te_loss), ("test_acc", te_acc),
                     ("train_time", train_time), ("epoch_time", time.perf_counter() - t0)]:
            if v is not None:
                history[k].append(v)
        val_txt = f" | val loss {val_loss:.4f} acc {val_acc:5.2f}%" if val_loader else ""
        eta = np.mean(history["epoch_time"]) * (epochs - epoch - 1) / 60
        print(f"epoch {epoch + 1:3d}/{epochs} | train loss {tr_loss:.4f} acc {tr_acc:5.2f}%{val_txt} | "
              f"test loss {te_loss:.4f} acc {te_acc:5.2f}% | lr {history['lr'][-1]:.3g} | "
              f"{history['epoch_time'][-1]:.1f}s" + (f" | about {eta:.1f} min to go" if eta > 0 else ""))
        if paths:
            save_checkpoint(paths["last"], model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=sched.state_dict() if sched is not None else None,
                            scaler=scaler.state_dict() if scaler is not None else None, history=history,
                            epoch=epoch + 1, rng=_rng_state(), arch=getattr(model, "arch", None),
                            signature=signature, experiment=experiment)
            if val_acc is not None and val_acc > best:
                best = val_acc
                _atomic_copy(paths["last"], paths["best"])
        for callback in callbacks:
            callback(epoch + 1, history)
    if paths and start < epochs:
        _atomic_copy(paths["last"], paths["dir"] / f"{experiment}_{time.strftime('%Y%m%d_%H%M%S')}.pt")
    return history


# =============================================================================================
# Checkpoints: atomic, every epoch, loaded with weights_only=True
# =============================================================================================


def checkpoint_paths(checkpoint_dir, experiment):
    """Where an experiment's checkpoints live: <experiment>_last.pt and <experiment>_best.pt."""
    d = Path(checkpoint_dir)
    return {"dir": d, "last": d / f"{experiment}_last.pt", "best": d / f"{experiment}_best.pt"}


def save_checkpoint(path, **state):
    """torch.save to a temporary file, then os.replace: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _atomic_copy(src, dst):
    tmp = Path(str(dst) + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _rng_state():
    np_state = np.random.get_state()  # noqa: NPY002
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))  # noqa: NPY002


def _describe_arch(arch):
    return f"{arch.get('name')} (norm={arch.get('norm')}, last_stride={arch.get('last_stride')}, " \
           f"{arch.get('num_classes')} classes)"


def load_checkpoint(path, model=None, map_location="cpu"):
    """Load a checkpoint (weights_only=True) and, if a model is given, its weights, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run the training notebook first (fit writes "
                                f"<experiment>_last.pt and <experiment>_best.pt to OUTPUT_DIR/checkpoints)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is damaged or is not a checkpoint written by helpers.fit "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by helpers.fit (it has no 'model' entry)")
    if model is not None:
        saved, ours = ckpt.get("arch"), getattr(model, "arch", None)
        if saved and ours and saved != ours:
            raise ValueError(f"{path} holds a {_describe_arch(saved)}, but the model is a {_describe_arch(ours)}; "
                             f"build the model with build_model(**checkpoint['arch']) or model_from_checkpoint()")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise ValueError(f"{path} does not fit this model: {str(err).splitlines()[0]}") from None
    return ckpt


def model_from_checkpoint(path, device="cpu"):
    """Rebuild the model a checkpoint was saved from and load its weights; returns (model, checkpoint)."""
    ckpt = load_checkpoint(path)
    if not ckpt.get("arch"):
        raise ValueError(f"{path} does not record its architecture; build the model and use load_checkpoint")
    model = build_model(**ckpt["arch"])
    load_checkpoint(path, model)
    return model.to(get_device(device)).eval(), ckpt


# =============================================================================================
# Experiments and results: one registry, one results file per run, one table
# =============================================================================================

BASE_CONFIG = dict(
    model="resnet18", norm="bn", last_stride=2,  # architecture
    epochs=20, batch_size=512,  # budget
    lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,  # SGD; lr is OneCycle's max LR (see resolve_lr)
    loss="ce", label_smoothing=0.1,
    scheduler="onecycle", pct_start=0.25, step_size=50, gamma=0.1,  # step: every epoch
    plateau_metric="val_acc", patience=3, threshold=0.1, threshold_mode="abs", factor=0.1,
    crop=True, flip=True, cutout=False, cutout_size=16, cutout_p=0.5, rotate=0, pad_mode="constant",
    val_fraction=0.1, subset=None, seed=0,  # data
    amp=True, channels_last=True, data_on_gpu=False, num_workers="auto",  # speed (CUDA only)
)
HEADLINE = "resnet18_onecycle"
_SEED000 = dict(epochs=150, batch_size=128, lr=0.1, nesterov=False, loss="nll", label_smoothing=0.0,
                scheduler="step", step_size=50, gamma=0.1)
_SEED001 = dict(epochs=20, batch_size=256, nesterov=False, label_smoothing=0.0, crop=True, flip=False,
                cutout=True, rotate=5, step_size=None)  # step_size None: a third of the epochs
EXPERIMENTS = {
    HEADLINE: dict(notebook="03"),
    **{f"{HEADLINE}_seed{s}": dict(notebook="03", seed=s) for s in (1, 2)},
    "seed000_steplr_cropflip": dict(notebook="04", **_SEED000),
    "seed000_steplr_cutout": dict(notebook="04", **_SEED000, crop=False, flip=False, cutout=True),
    "seed003_plateau_stride1": dict(notebook="05", last_stride=1, scheduler="plateau", epochs=50, batch_size=128,
                                    lr=0.05, nesterov=False, label_smoothing=0.0, cutout=True),
    **{f"seed001_{m}_{n}_{s}": dict(notebook="06", model=m, norm=n, scheduler=s, **_SEED001, lr=0.05)
       for m in ("resnet18", "resnet34") for n in ("bn", "ln") for s in ("onecycle", "step", "plateau")},
    "seed002_resnet50_onecycle": dict(notebook="06", model="resnet50", epochs=20),
}


def seed_experiment(name, seed):
    """The name of an experiment's run with another seed: seed 0 keeps the plain name."""
    return name if seed == 0 else f"{name}_seed{seed}"


def experiment_config(name, **overrides):
    """BASE_CONFIG + the named experiment + overrides (lower-case keys), with derived values filled in."""
    if name not in EXPERIMENTS and "notebook" not in overrides:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)} "
                         f"(or pass notebook=... to define a new one)")
    cfg = {**BASE_CONFIG, **EXPERIMENTS.get(name, {}), **overrides, "experiment": name}
    unknown = set(cfg) - set(BASE_CONFIG) - {"experiment", "notebook"}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; valid: {', '.join(BASE_CONFIG)}")
    if cfg["step_size"] is None:
        cfg["step_size"] = max(1, math.ceil(cfg["epochs"] / 3))
    return cfg


def resolve_lr(lr=None, output_dir="outputs", batch_size=512, default=0.1):
    """The LR to train with: lr if given, else the LR range test's (02) scaled linearly to batch_size, else default."""
    if lr is not None:
        return float(lr), f"LR {lr:g} (set in the parameters cell)"
    path = Path(output_dir) / "lr_finder.json"
    if not path.is_file():
        return float(default), f"LR {default:g}: the stated default (no LR range test result at {path}; run 02 first)"
    found = json.loads(path.read_text())
    scaled = found["lr"] * batch_size / found["batch_size"]
    return scaled, (f"LR {scaled:.3g}: the LR range test's '{found['rule']}' suggestion {found['lr']:.3g} "
                    f"at batch {found['batch_size']}, scaled linearly to batch {batch_size} ({path})")


def _atomic_write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_record(cfg, history, params, device, source, wall_time, complete):
    """The results file's content: config, history, accuracies, time, hardware and versions."""
    best_val = max(history["val_acc"], default=None)
    return {
        "experiment": cfg["experiment"], "notebook": cfg.get("notebook"), "config": cfg, "params": params,
        "epochs_run": len(history["epoch"]), "complete": complete,
        "final_train_acc": history["train_acc"][-1] if history["train_acc"] else None,
        "final_test_acc": history["test_acc"][-1] if history["test_acc"] else None,
        "best_test_acc": max(history["test_acc"], default=None),  # reported only, never used to select
        "best_val_acc": best_val,
        "test_acc_at_best_val": history["test_acc"][history["val_acc"].index(best_val)] if best_val else None,
        "wall_time_s": wall_time, "device": device_name(device), "data": source, "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "history": history,
    }


def save_results(record, output_dir="outputs"):
    """Write OUTPUT_DIR/results/<experiment>.json atomically; returns its path."""
    path = Path(output_dir) / "results" / f"{record['experiment']}.json"
    _atomic_write_text(path, json.dumps(record, indent=1))
    return path


def load_results(output_dir="outputs"):
    """All results files in OUTPUT_DIR/results, by experiment name."""
    out = {}
    for path in sorted((Path(output_dir) / "results").glob("*.json")):
        record = json.loads(path.read_text())
        out[record["experiment"]] = record
    return out


def run_experiment(cfg, data_dir="data", output_dir="outputs", device="auto", data=None, rerun=False,
                   progress=True, download=False):
    """Train one experiment with checkpoints and a results file; skips a finished one. Returns (record, model)."""
    device = get_device(device)
    output_dir = Path(output_dir)
    name = cfg["experiment"]
    ckpts = checkpoint_paths(output_dir / "checkpoints", name)
    done = load_results(output_dir).get(name)
    if done and done["config"] != cfg:
        changed = {k: (done["config"].get(k), v) for k, v in cfg.items() if done["config"].get(k) != v}
        _archive_run(output_dir, name)
        print(f"'{name}' was run with other settings ({changed}, as (before, now)); its files were moved to "
              f"{output_dir / 'archive'} and it is trained again")
        done = None
    if done and done["complete"] and ckpts["last"].exists() and not rerun:
        print(f"'{name}' already finished ({done['epochs_run']} epochs, test acc {done['final_test_acc']:.2f}%); "
              f"loading it (rerun=True trains it again)")
        model, _ = model_from_checkpoint(ckpts["last"], device)
        return done, model
    if rerun:
        for p in (ckpts["last"], ckpts["best"]):
            p.unlink(missing_ok=True)
    seed_everything(cfg["seed"])
    if data is None:
        data = loaders_from_config(cfg, data_dir, device=device, download=download)
    model = build_model(cfg["model"], norm=cfg["norm"], last_stride=cfg["last_stride"])
    params = count_params(model)
    t0 = time.perf_counter()
    spent = (done or {}).get("wall_time_s", 0.0) if not rerun else 0.0

    def record_progress(epoch, history):
        save_results(run_record(cfg, history, params, device, data.source,
                                spent + time.perf_counter() - t0, epoch == cfg["epochs"]), output_dir)

    fit_args = {k: v for k, v in _kwargs_for(fit, cfg).items() if k not in ("device", "experiment")}
    history = fit(model, data.train, data.test, val_loader=data.val, device=device, experiment=name,
                  checkpoint_dir=ckpts["dir"], resume=True, callbacks=[record_progress], progress=progress,
                  **fit_args)
    record = run_record(cfg, history, params, device, data.source, spent + time.perf_counter() - t0,
                        len(history["epoch"]) == cfg["epochs"])
    save_results(record, output_dir)
    return record, model


def _archive_run(output_dir, name):
    """Move an experiment's results file and checkpoints to OUTPUT_DIR/archive/<name>_<time>/."""
    dest = Path(output_dir) / "archive" / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    paths = checkpoint_paths(Path(output_dir) / "checkpoints", name)
    for path in (Path(output_dir) / "results" / f"{name}.json", paths["last"], paths["best"]):
        if path.exists():
            os.replace(path, dest / path.name)


def _fmt(value, fmt="{:.2f}"):
    return "not run" if value is None else fmt.format(value)


def results_table(output_dir="outputs", experiments=EXPERIMENTS):
    """A markdown table of every registered experiment; runs without a results file say 'not run'."""
    results = load_results(output_dir)
    head = ("| experiment | notebook | model | norm | scheduler | params | epochs | final train acc % | "
            "final test acc % | best test acc % | wall time | device |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    names = list(experiments) + [n for n in results if n not in experiments]
    for name in names:
        rec = results.get(name)
        cfg = rec["config"] if rec else experiment_config(name)
        params = rec["params"] if rec else count_params(build_model(cfg["model"], norm=cfg["norm"]))
        if rec:
            epochs = f"{rec['epochs_run']}/{cfg['epochs']}" + ("" if rec["complete"] else " (incomplete)")
            wall = f"{rec['wall_time_s'] / 60:.1f} min"
            cells = [epochs, _fmt(rec["final_train_acc"]), _fmt(rec["final_test_acc"]), _fmt(rec["best_test_acc"]),
                     wall, rec["device"]]
        else:
            cells = [f"{cfg['epochs']} planned"] + ["not run"] * 5
        lines.append("| " + " | ".join([name, cfg.get("notebook") or "", cfg["model"], cfg["norm"], cfg["scheduler"],
                                        f"{params:,}", *cells]) + " |")
    return "\n".join(lines)


def update_readme(readme="README.md", output_dir="outputs"):
    """Replace the table between the results markers in README.md with a fresh one."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = Path(readme).read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no '{start}' ... '{end}' markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    _atomic_write_text(readme, f"{head}{start}\n{results_table(output_dir)}\n{end}{tail}")


# =============================================================================================
# LR finder: torch-lr-finder's range test, with the suggestions and restore it leaves to us
# =============================================================================================


@dataclass
class LRFinderResult:
    """The range test's learning rates, (smoothed) losses and suggested LRs by rule."""

    lrs: list
    losses: list
    suggestions: dict
    skip_start: int
    skip_end: int
    diverged: bool


def suggest_lrs(lrs, losses, skip_start=10, skip_end=5):
    """Suggested LRs: 'steepest' (torch-lr-finder), 'valley' (fastai's default), 'minimum' and 'minimum/10'."""
    need = skip_start + skip_end + 2
    if len(lrs) < need:
        raise ValueError(f"the range test recorded {len(lrs)} points, {need} are needed to suggest an LR "
                         f"(skip_start={skip_start}, skip_end={skip_end})")
    lrs = np.asarray(lrs[skip_start:len(lrs) - skip_end], dtype=float)
    losses = np.asarray(losses[skip_start:len(losses) - skip_end], dtype=float)
    steepest = int(np.gradient(losses).argmin())  # the same rule as LRFinder.plot(suggest_lr=True)
    n = len(losses)  # fastai's valley: the longest descending run, then 1/3 + 1/6 of the way down it
    lds, max_start, max_end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    valley = max_start + int(sections) + int(sections / 2)
    lowest = float(lrs[int(losses.argmin())])  # where the loss stops falling: Smith's upper bound
    return {"steepest": float(lrs[steepest]), "valley": float(lrs[valley]), "minimum": lowest,
            "minimum/10": lowest / 10}


def find_lr(model, optimizer, criterion, train_loader, end_lr=10, num_iter=100, step_mode="exp", val_loader=None,
            device=None, start_lr=None, smooth_f=0.05, diverge_th=5, skip_start=10, skip_end=5):
    """LR range test with torch-lr-finder; model and optimizer are restored afterwards."""
    from torch_lr_finder import LRFinder, TrainDataLoaderIter, ValDataLoaderIter

    _choice(step_mode, ("exp", "linear"), "step_mode")
    if not isinstance(train_loader, DataLoader):
        train_loader = TrainDataLoaderIter(train_loader)  # e.g. GPULoader
    if val_loader is not None and not isinstance(val_loader, DataLoader):
        val_loader = ValDataLoaderIter(val_loader)
    was_training = model.training
    finder = LRFinder(model, optimizer, criterion, device=get_device(device) if device else None)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            finder.range_test(train_loader, val_loader=val_loader, start_lr=start_lr, end_lr=end_lr,
                              num_iter=num_iter, step_mode=step_mode, smooth_f=smooth_f, diverge_th=diverge_th)
    finally:
        finder.reset()  # weights, BN statistics and optimizer state as they were before the test
        model.train(was_training)
    lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
    diverged = "diverged" in printed.getvalue()
    try:
        suggestions = suggest_lrs(lrs, losses, skip_start, skip_end)
    except ValueError as err:
        why = (f"the loss diverged after {len(lrs)} of {num_iter} steps (at lr={lrs[-1]:.3g}): lower start_lr "
               f"or end_lr" if diverged else f"num_iter={num_iter} is too small: raise it")
        raise ValueError(f"LR range test too short to suggest an LR: {err}; {why}") from None
    if diverged:
        print(f"The loss diverged at lr={lrs[-1]:.3g}; the test stopped after {len(lrs)} of {num_iter} steps.")
    return LRFinderResult(lrs, losses, suggestions, skip_start, skip_end, diverged)


def save_lr_choice(result, rule="valley", batch_size=512, output_dir="outputs", **extra):
    """Write the chosen LR to OUTPUT_DIR/lr_finder.json, which the training notebooks read."""
    _choice(rule, tuple(result.suggestions), "rule")
    record = {"lr": result.suggestions[rule], "rule": rule, "batch_size": batch_size,
              "suggestions": result.suggestions, "diverged": result.diverged, **extra}
    path = Path(output_dir) / "lr_finder.json"
    _atomic_write_text(path, json.dumps(record, indent=1))
    return path


# =============================================================================================
# Evaluation: one pass over the fixed-order test loader, everything else computed from it
# =============================================================================================


@torch.no_grad()
def predict(model, loader, device=None, tta=False):
    """Labels, predictions and softmax probabilities in loader order (eval mode); tta adds flipped views."""
    device = get_device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    labels, probs = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        p = model(x).float().softmax(1)
        if tta:
            p = (p + model(x.flip(3)).float().softmax(1)) / 2
        probs.append(p.cpu())
        labels.append(y.cpu())
    model.train(was_training)
    probs = torch.cat(probs).numpy()
    return {"labels": torch.cat(labels).numpy(), "preds": probs.argmax(1), "probs": probs}


def accuracy(pred):
    """Accuracy % of a predict() result."""
    return 100.0 * float((pred["preds"] == pred["labels"]).mean())


def misclassified(pred):
    """Indices of the wrong predictions, most confident mistakes first."""
    wrong = np.flatnonzero(pred["preds"] != pred["labels"])
    confidence = pred["probs"][wrong, pred["preds"][wrong]]
    return wrong[np.argsort(-confidence, kind="stable")]


def confusion_matrix(labels, preds, num_classes=10):
    """Counts [actual, predicted]."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_metrics(cm):
    """Per-class accuracy (= recall), precision and support from a confusion matrix."""
    cm = np.asarray(cm, dtype=float)
    tp, actual, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    return {"accuracy": 100 * recall, "recall": 100 * recall, "precision": 100 * precision,
            "support": actual.astype(int)}


def most_confused(cm, k=10, classes=CLASSES):
    """The k largest off-diagonal cells as (actual, predicted, count), largest first."""
    cm = np.asarray(cm)
    off = [(cm[i, j], i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(classes[i], classes[j], int(c)) for c, i, j in off[:k]]


# =============================================================================================
# Plots: every helper returns its figure; notebooks save it to IMAGES_DIR then show it
# =============================================================================================


def save_figure(fig, images_dir, name, dpi=120):
    """Save a figure as IMAGES_DIR/name (PNG) and return the path."""
    path = Path(images_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _grid(n, ncols, size=1.6):
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 1.15), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def plot_class_counts(train_labels, test_labels, classes=CLASSES):
    """Bar chart of images per class in the train and test splits."""
    fig, ax = plt.subplots(figsize=(9, 3.2), layout="constrained")
    x = np.arange(len(classes))
    for offset, (name, labels) in zip((-0.2, 0.2), (("train", train_labels), ("test", test_labels))):
        counts = np.bincount(labels, minlength=len(classes))
        bars = ax.bar(x + offset, counts, width=0.4, label=f"{name} ({len(labels):,})")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, classes, rotation=30)
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title("Images per class")
    return fig


def plot_samples_per_class(images, labels, classes=CLASSES, per_class=8, seed=0):
    """A grid with one row per class of randomly chosen images."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.1, len(classes) * 1.15),
                             layout="constrained")
    for c, name in enumerate(classes):
        idx = rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False)
        for j, i in enumerate(idx):
            axes[c, j].imshow(images[i])
            axes[c, j].set_xticks([])
            axes[c, j].set_yticks([])
        axes[c, 0].set_ylabel(name, rotation=0, ha="right", va="center")
    fig.suptitle("Random samples per class")
    return fig


def plot_augmentations(images, pipelines, seed=0):
    """Each pipeline (name -> albumentations Compose without Normalize) applied to the same images."""
    fig, axes = plt.subplots(len(pipelines) + 1, len(images), figsize=(len(images) * 1.4, (len(pipelines) + 1) * 1.5),
                             squeeze=False, layout="constrained")
    rows = [("original", None), *pipelines.items()]
    for r, (name, pipe) in enumerate(rows):
        if pipe is not None:
            pipe.set_random_seed(seed)
        for c, image in enumerate(images):
            shown = image if pipe is None else pipe(image=image)["image"]
            axes[r, c].imshow(shown)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center")
    fig.suptitle("Augmentations, each applied to the same images")
    return fig


def plot_history(history, title=""):
    """Loss and accuracy per epoch: train, validation and test on the same epoch axis."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    epochs = history["epoch"]
    for split, style in (("train", "-"), ("val", "--"), ("test", "-")):
        if history[f"{split}_loss"]:
            ax_loss.plot(epochs, history[f"{split}_loss"], style, marker=".", label=split)
            ax_acc.plot(epochs, history[f"{split}_acc"], style, marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy %", title="Accuracy")
    if history["test_acc"]:
        best = int(np.argmax(history["test_acc"]))
        ax_acc.annotate(f"final test {history['test_acc'][-1]:.2f}%", (epochs[-1], history["test_acc"][-1]),
                        textcoords="offset points", xytext=(-80, -25), arrowprops={"arrowstyle": "->"})
        ax_acc.plot(epochs[best], history["test_acc"][best], "k*", markersize=9, label="best test (reported only)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def plot_lr_schedule(history, title="Learning rate used at every step"):
    """The LR actually used at every optimizer step, on an epoch axis."""
    fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
    steps = np.arange(len(history["lr"])) / max(1, history["steps_per_epoch"])
    ax.plot(steps, history["lr"])
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    return fig


def plot_lr_finder(result, log_lr=True, log_loss=False, title="LR range test"):
    """Loss against LR with each suggestion marked (log_loss for curves that explode)."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    s, e = result.skip_start, len(result.lrs) - result.skip_end
    lrs, losses = np.asarray(result.lrs), np.asarray(result.losses)
    ax.plot(lrs, losses, color="0.75", label="skipped ends")
    ax.plot(lrs[s:e], losses[s:e], color="C0", label="loss (smoothed)")
    for (rule, lr), marker, color in zip(result.suggestions.items(), "ovDs", ("C3", "C2", "C4", "C1")):
        i = int(np.argmin(np.abs(np.log(lrs[s:e]) - np.log(lr)))) + s
        ax.scatter(lrs[i], losses[i], marker=marker, s=80, color=color, zorder=3, label=f"{rule}: {lr:.3g}")
    if log_lr:
        ax.set_xscale("log")
    if log_loss:
        ax.set_yscale("log")
    else:  # the kept range fills the plot; skipped ends may fall outside
        ax.set_ylim(losses[s:e].min() * 0.95, losses[s:e].max() * 1.05)
    ax.set(xlabel="learning rate", ylabel="loss", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def plot_test_curves(records, title="Test accuracy per epoch, every run"):
    """Overlay the test-accuracy curves of several results records."""
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    for name, rec in records.items():
        h = rec["history"]
        if h["test_acc"]:
            ax.plot(h["epoch"], h["test_acc"], label=f"{name} ({h['test_acc'][-1]:.1f}%)")
    ax.set(xlabel="epoch", ylabel="test accuracy %", title=title)
    ax.grid(alpha=0.3)
    if records:
        ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_results_heatmap(records, rows=("model", "norm"), col="scheduler", value="final_test_acc"):
    """Heatmap of one number per run (default final test accuracy), rows and columns from the configs."""
    table = {}
    for rec in records.values():
        cfg = rec["config"]
        table.setdefault(" / ".join(str(cfg[r]) for r in rows), {})[cfg[col]] = rec[value]
    row_names, col_names = sorted(table), sorted({c for r in table.values() for c in r})
    data = np.array([[table[r].get(c, np.nan) for c in col_names] for r in row_names], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 * len(col_names) + 2.5, 0.6 * len(row_names) + 1.5),
                           layout="constrained")
    sns.heatmap(data, annot=True, fmt=".2f", cmap="viridis", xticklabels=col_names, yticklabels=row_names, ax=ax)
    ax.set(xlabel=col, ylabel=" / ".join(rows), title=value.replace("_", " ") + " %")
    return fig


def plot_gallery(images, titles, ncols=5, suptitle=""):
    """Images in a grid with a title each (e.g. 'pred: cat / actual: dog')."""
    fig, axes = _grid(len(images), ncols, size=1.9)
    for ax, image, t in zip(axes, images, titles):
        ax.imshow(to_display(image))
        ax.set_title(t, fontsize=8)
    fig.suptitle(suptitle)
    return fig


def plot_confusion(cm, classes=CLASSES, normalize=False):
    """Confusion matrix heatmap (rows: actual, columns: predicted); normalize shows row fractions."""
    cm = np.asarray(cm, dtype=float)
    data = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(7.5, 6.2), layout="constrained")
    sns.heatmap(data, annot=True, fmt=".2f" if normalize else ".0f", cmap="Blues", xticklabels=classes,
                yticklabels=classes, ax=ax, cbar=True, annot_kws={"fontsize": 7})
    ax.set(xlabel="predicted", ylabel="actual",
           title="Confusion matrix" + (" (each row sums to 1)" if normalize else " (counts)"))
    return fig


def plot_per_class(metrics, classes=CLASSES):
    """Per-class accuracy (recall) and precision as grouped bars."""
    fig, ax = plt.subplots(figsize=(9, 3.5), layout="constrained")
    x = np.arange(len(classes))
    for offset, key in zip((-0.2, 0.2), ("accuracy", "precision")):
        bars = ax.bar(x + offset, metrics[key], width=0.4, label=key)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, classes, rotation=30)
    ax.set(ylabel="%", ylim=(0, 105), title="Per-class accuracy (= recall) and precision on the test set")
    ax.axhline(np.mean(metrics["accuracy"]), color="k", lw=0.8, ls="--", label="mean accuracy")
    ax.legend(loc="lower right")
    return fig


def plot_cam_pairs(images, cams_pred, cams_actual, preds, labels, classes=CLASSES, ncols=3, alpha=0.5, title=""):
    """For each image: the image, Grad-CAM for the predicted class, Grad-CAM for the actual class."""
    fig, axes = _grid(3 * len(images), 3 * ncols, size=1.5)
    axes = list(axes)
    for k, image in enumerate(images):
        img = to_display(image)
        p, a = classes[preds[k]], classes[labels[k]]
        panels = [(img, f"pred: {p} / actual: {a}"), (overlay_cam(img, cams_pred[k], alpha), f"CAM for {p}"),
                  (overlay_cam(img, cams_actual[k], alpha), f"CAM for {a}")]
        for ax, (shown, t) in zip(axes[3 * k:3 * k + 3], panels):
            ax.imshow(shown)
            ax.set_title(t, fontsize=7)
    fig.suptitle(title)
    return fig


def plot_cam_rows(images, rows, row_titles, alpha=0.5, title=""):
    """One row per method or layer (name -> maps [N, H, W]) over the same images, with the images on top."""
    fig, axes = plt.subplots(len(rows) + 1, len(images), figsize=(len(images) * 1.5, (len(rows) + 1) * 1.6),
                             squeeze=False, layout="constrained")
    for c, image in enumerate(images):
        img = to_display(image)
        axes[0, c].imshow(img)
        for r, maps in enumerate(rows):
            axes[r + 1, c].imshow(overlay_cam(img, maps[c], alpha))
    for r, name in enumerate(["image", *row_titles]):
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return fig


# =============================================================================================
# Grad-CAM and Grad-CAM++ (ours: this is what the course teaches)
# =============================================================================================


class GradCAM:
    """Grad-CAM (Selvaraju et al. 2017): `with GradCAM(model, model.layer3) as cam: maps = cam(x, targets)`."""

    def __init__(self, model, target_layer):
        self.model, self.target_layer = model, target_layer
        self._handle, self._acts, self._grads = None, None, None
        self.map_size = None  # (h, w) of the target layer's maps at the last call, before upsampling

    def __enter__(self):
        self._handle = self.target_layer.register_forward_hook(self._forward_hook)
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Remove the hook and drop stored tensors."""
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._acts, self._grads = None, None, None

    def _forward_hook(self, module, inputs, output):
        self._acts = output.detach().clone()  # a copy: a later in-place op cannot change it
        if output.requires_grad:
            output.register_hook(self._save_grad)  # a tensor hook: fine with in-place ReLU after it

    def _save_grad(self, grad):
        self._grads = grad.detach()

    def channel_weights(self, acts, grads):
        """Grad-CAM: the spatial mean of the gradients, one weight per channel."""
        return grads.mean(dim=(2, 3))

    def __call__(self, images, targets=None):
        """Maps [N, H, W] in [0, 1] at the input's size, for each image's target (None: predicted) class."""
        if self._handle is None:
            raise RuntimeError("use GradCAM inside a with block: `with GradCAM(model, layer) as cam: ...`")
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a float tensor [N, C, H, W], got "
                             f"{getattr(images, 'shape', type(images))}")
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            x = images.detach().to(device).float().requires_grad_(True)  # a graph even if weights are frozen
            with torch.enable_grad():
                logits = self.model(x)  # one forward for the whole batch
                targets = self._targets(targets, logits)
                score = logits.gather(1, targets[:, None]).sum()
                score.backward(inputs=[x])  # one backward; parameter .grad stays untouched
            if self._acts is None or self._grads is None:
                raise RuntimeError("the target layer saw no forward/backward pass; is it part of the model?")
            acts, grads = self._acts.float(), self._grads.float()  # (N, C, h, w)
            self.map_size = tuple(acts.shape[-2:])
            cam = F.relu((self.channel_weights(acts, grads)[:, :, None, None] * acts).sum(1))  # (N, h, w)
            cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            return _minmax(cam).cpu()
        finally:
            self._acts, self._grads = None, None
            self.model.train(was_training)

    @staticmethod
    def _targets(targets, logits):
        n, classes = logits.shape
        if targets is None:
            return logits.argmax(1)
        targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device).reshape(-1)
        if len(targets) != n or targets.min() < 0 or targets.max() >= classes:
            raise ValueError(f"targets must be None or {n} class indices in [0, {classes}), got {targets.tolist()}")
        return targets


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19): pixel-weighted positive gradients."""

    def channel_weights(self, acts, grads):
        """Grad-CAM++ weights: sum over pixels of alpha * relu(grad)."""
        g2 = grads**2
        alpha = g2 / (2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads + 1e-6)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return (alpha * F.relu(grads)).sum(dim=(2, 3))


def _minmax(maps):
    """Scale each map to [0, 1]; a constant (e.g. all-zero) map becomes all zeros, never NaN."""
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp_min(1e-12), torch.zeros_like(maps))


def overlay_cam(image, cam, alpha=0.5, cmap="jet"):
    """Blend a [0, 1] heatmap (matplotlib colormap, RGB) onto a float RGB image in [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    cam = np.asarray(cam.detach().cpu() if isinstance(cam, torch.Tensor) else cam, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {image.shape}")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"image values must be in [0, 1] (got {image.min():.3g}..{image.max():.3g}); "
                         f"use to_display() or denormalize() first")
    if cam.shape != image.shape[:2]:
        raise ValueError(f"cam shape {cam.shape} does not match image {image.shape[:2]}")
    heat = matplotlib.colormaps[cmap](np.clip(cam, 0, 1))[..., :3]
    return (1 - alpha) * image + alpha * heat
