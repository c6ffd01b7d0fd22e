"""helpers.py: the one module every notebook imports.

Each idea here is first written out in a notebook (named in its docstring), then reused from this module. The
sections follow the course: setup, data (01), models (03), LR finder (02), training (03-06), evaluation (07),
plots, Grad-CAM (07). The last section is machinery no notebook teaches (the workspace on Drive, checks of every
input, checkpoint files, locks, settings records, the hand-in): notebooks call some of it, none needs it read.
Accuracies are in percent; images are uint8 HWC RGB until they are normalised into float CHW tensors.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import platform
import random
import re
import shutil
import socket
import sys
import threading
import time
import uuid
import warnings
import zipfile
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
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

COURSE_ROOT = Path(__file__).resolve().parent  # the checkout (or Colab's clone) this module lives in

# =============================================================================================
# Setup (every notebook)
# =============================================================================================


def get_device(name="auto"):
    """A torch.device: "auto" picks cuda, then mps, then cpu (every notebook)."""
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


def seed_everything(seed=0):
    """Seed python, numpy and torch (all devices) so a run can be repeated (every notebook)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global RNG is what we must seed)
    torch.manual_seed(seed)


# =============================================================================================
# Data (notebook 01)
# =============================================================================================

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # official train split, [0, 1] units
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # the true per-channel std (not kuangliu's 0.2023, ...)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def load_cifar10(root="data", train=True, download=False, subset=None, seed=0):
    """CIFAR-10 from root/cifar-10-batches-py as (uint8 [N, 32, 32, 3], int64 [N]) (01).

    The batch files are read directly (torchvision's md5 check refuses any re-encoded copy), and checked: only plain
    data is unpickled, pixels must be uint8 and labels 0-9.
    """
    folder = Path(root) / "cifar-10-batches-py"
    names = tuple(f"data_batch_{i}" for i in range(1, 6)) if train else ("test_batch",)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and download:
        _download_cifar10(root)
        missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(_missing_data_message(folder, missing[0]))
    parts = [_read_batch(folder / n) for n in names]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if subset is not None:
        keep = balanced_subset(labels, subset, seed=seed)
        images, labels = images[keep], labels[keep]
    return images, labels


def load_test_split(data_dir="data", subset=None, seed=0, download=False):
    """The test split; with a train SUBSET, a class-balanced fifth of that size, CIFAR's 5:1 ratio (01, 07)."""
    return load_cifar10(data_dir, train=False, download=download,
                        subset=None if subset is None else max(10, subset // 5), seed=seed)


def balanced_subset(labels, n, seed=0):
    """Sorted indices of n samples with the classes as equal as possible, random within a class (01)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 1 <= int(n) <= len(labels):
        raise ValueError(f"SUBSET must be from 1 to {len(labels):,} (the images there are), got {n}")
    rng = np.random.default_rng(seed)
    base, extra = divmod(int(n), len(classes))
    want = {c: base + (i < extra) for i, c in enumerate(classes)}
    if any(want[c] > (labels == c).sum() for c in classes):
        raise ValueError(f"SUBSET={n} needs {max(want.values())} images of every class; some class has fewer")
    keep = [rng.choice(np.flatnonzero(labels == c), size=want[c], replace=False) for c in classes]
    return np.sort(np.concatenate(keep))


def train_val_split(labels, val_fraction=0.1, seed=0):
    """Stratified split of the train split into (train indices, validation indices) (03)."""
    labels = np.asarray(labels)
    if not 0 <= val_fraction <= 0.5:
        raise ValueError(f"VAL_FRACTION must be from 0 to 0.5, got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    val = np.sort(np.concatenate([v[: int(round(val_fraction * len(v)))] for v in val]))
    return np.setdiff1d(np.arange(len(labels)), val), val


def dataset_mean_std(images):
    """Per-channel mean and std of uint8 [N, H, W, C] images over all pixels, in [0, 1] units (01)."""
    channels = [np.asarray(images)[..., c] for c in range(images.shape[-1])]  # one channel at a time: less memory
    mean = tuple(round(float(ch.mean(dtype=np.float64)) / 255, 6) for ch in channels)
    std = tuple(round(float(ch.std(dtype=np.float64)) / 255, 6) for ch in channels)
    return mean, std


AUGMENT = {"crop": True, "flip": True, "cutout": 0, "rotate": 0}  # pad-4 crop + flip: the headline recipe


def make_transforms(aug=None, train=True, normalize=True, preview=False, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """An albumentations 2.x pipeline from an AUGMENT dict; the test pipeline only normalises (01).

    preview=True applies every chosen augmentation with probability 1 (for figures).
    """
    aug = check_augment(aug)
    p = 1.0 if preview else 0.5
    fill = tuple(255.0 * m for m in mean)  # the dataset mean in pixel space (before Normalize)
    steps = []
    if train and aug["crop"]:  # pad 4 with black, then a random 32x32 crop
        steps += [A.PadIfNeeded(min_height=40, min_width=40, position="center", border_mode=cv2.BORDER_CONSTANT,
                                fill=0),
                  A.RandomCrop(height=32, width=32)]
    if train and aug["flip"]:
        steps.append(A.HorizontalFlip(p=p))
    if train and aug["rotate"]:
        steps.append(A.Rotate(limit=(-aug["rotate"], aug["rotate"]), interpolation=cv2.INTER_LINEAR,
                              border_mode=cv2.BORDER_CONSTANT, fill=fill, p=p))
    if train and aug["cutout"]:  # Cutout = one square hole filled with the mean pixel
        size = (aug["cutout"], aug["cutout"])
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=size, hole_width_range=size,
                                     fill=fill, p=p))
    if normalize:
        steps += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


class ArrayDataset(Dataset):
    """Numpy images + labels, each image passed through an albumentations pipeline (01, 03).

    With a seed, image i's random augmentation in epoch e is drawn from (seed, e, i) alone: the same whichever
    worker process loads it, so the number of loader workers never changes what a run learns.
    """

    def __init__(self, images, labels, transform=None, seed=None):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform
        self.seed, self.epoch = seed, 0
        self._bits = np.random.PCG64(0)  # the pipeline's two generators, made once and re-seeded per image
        self._rng, self._inc = np.random.Generator(self._bits), self._bits.state["state"]["inc"]
        self._py_random = random.Random(0)
        self._seeds, self._seeds_for = None, None

    def __len__(self):
        return len(self.labels)

    def _epoch_seeds(self):
        """Every image's seeds for this epoch, drawn at once from (seed, epoch): (N, 3) uint64, row i = image i."""
        if self._seeds_for != (self.seed, self.epoch):
            stream = np.random.SeedSequence([self.seed, self.epoch]).spawn(1)[0]  # set_epoch's shuffle uses the parent
            self._seeds = np.random.PCG64(stream).random_raw((len(self), 3))  # row i: the same whatever N is
            self._seeds_for = (self.seed, self.epoch)
        return self._seeds

    def _seed_transform(self, i):
        """Re-seed the pipeline's two generators from image i's row (~10 us; building new ones: ~30 us)."""
        high, low, py_seed = self._epoch_seeds()[i].tolist()
        state = {"state": (high << 64) | low, "inc": self._inc}  # numpy: its 128-bit state, set directly
        self._bits.state = {"bit_generator": "PCG64", "state": state, "has_uint32": 0, "uinteger": 0}
        self._py_random.seed(py_seed)  # python's (flips, crop offsets, the number of holes)
        if self.transform.py_random is not self._py_random:  # once per pipeline, or if another dataset took it
            self.transform.set_random_state(self._rng, self._py_random)

    def __getitem__(self, i):
        image = self.images[i]
        if self.transform is not None:
            if self.seed is not None:
                self._seed_transform(int(i))
            image = self.transform(image=image)["image"]
        return image, int(self.labels[i])


def make_loader(images, labels, transform=None, batch_size=512, shuffle=False, num_workers="auto",
                device="cpu", seed=0):
    """A DataLoader over numpy arrays; a shuffled one draws its order and augmentations from (seed, epoch) (03)."""
    device = get_device(device)
    workers = (0 if device.type == "cpu" else min(8, os.cpu_count() or 1)) if num_workers == "auto" else num_workers
    dataset = ArrayDataset(images, labels, transform, seed=seed if shuffle else None)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      drop_last=shuffle and len(dataset) % batch_size == 1,  # no batch of one for BatchNorm
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))


def set_epoch(loader, epoch):
    """Make a shuffled make_loader loader's order and augmentations those of this epoch (03: fit calls it)."""
    if hasattr(loader, "set_epoch"):  # a loader that seeds itself (benchmarks/gpu_loader.py)
        return loader.set_epoch(epoch)
    seed = loader.dataset.seed  # None: an unshuffled loader, whose order and images never change
    if seed is not None:
        loader.generator.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    loader.dataset.epoch = epoch  # workers get a fresh copy of the dataset every epoch


@dataclass
class CifarLoaders:
    """The loaders a training or analysis notebook needs, and the settings that made them (03-07)."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    test_images: np.ndarray
    test_labels: np.ndarray
    augment: dict | None = None


def make_data(data_dir="data", aug=None, batch_size=512, val_fraction=0.1, subset=None, seed=0,
              num_workers="auto", device="auto", download=False):
    """Train (augmented), validation (carved from train) and test loaders for CIFAR-10 (03-06)."""
    x, y = load_cifar10(data_dir, train=True, download=download, subset=subset, seed=seed)
    xt, yt = load_test_split(data_dir, subset=subset, seed=seed, download=download)
    tr, va = train_val_split(y, val_fraction, seed=seed)
    if len(va) and len(np.unique(y[va])) < 10:
        raise ValueError(f"VAL_FRACTION={val_fraction} leaves no validation image for some class; raise it or SUBSET")
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device, seed=seed)
    train = make_loader(x[tr], y[tr], make_transforms(aug, train=True), shuffle=True, **common)
    val = make_loader(x[va], y[va], make_transforms(train=False), **common) if len(va) else None
    test = make_loader(xt, yt, make_transforms(train=False), **common)
    return CifarLoaders(train, val, test, xt, yt, augment=check_augment(aug))


def denormalize(x, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """Undo Normalize: a (C, H, W) or (N, C, H, W) tensor back to [0, 1] for display (01, 07)."""
    shape = (-1, 1, 1) if x.dim() == 3 else (1, -1, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x * s + m).clamp(0, 1)


def to_display(image):
    """Any image (uint8 HWC, float HWC, or a normalised CHW tensor) as float HWC in [0, 1] (01, 07)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] == 3:
            image = denormalize(image).permute(1, 2, 0)
        image = image.numpy()
    image = np.asarray(image)
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)


# =============================================================================================
# Models: the CIFAR ResNets of every report (3x3 stride-1 stem, no max-pool) (03, 05, 06)
# =============================================================================================

NORMS = ("bn", "ln", "gn")


def make_norm(norm, channels, gn_groups=32):
    """BatchNorm ("bn"), LayerNorm over C, H, W ("ln" = GroupNorm with one group) or GroupNorm ("gn") (06)."""
    _choice(norm, NORMS, "norm")
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(1 if norm == "ln" else min(gn_groups, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection: relu(F(x) + shortcut(x)) (ResNet18/34) (03)."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, norm="bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, planes)
        self.shortcut = nn.Sequential()  # identity, or a 1x1 conv where the shape changes
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          make_norm(norm, planes))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 down, 3x3, 1x1 up (x4) with a residual connection (ResNet50) (06)."""

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
    """CIFAR ResNet: 3x3 stem, stages layer1..layer4 at 32, 16, 8, 4 px, global average pool, linear (03)."""

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


def make_model(name="resnet18", norm="bn", num_classes=10, last_stride=2):
    """A CIFAR ResNet by name; last_stride=1 keeps layer4 at 8x8 with the same parameters (03, 05, 06)."""
    block, blocks = MODELS[_choice(name, tuple(MODELS), "model")]
    _choice(norm, NORMS, "norm")
    _choice(last_stride, (1, 2), "last_stride")
    model = ResNet(block, blocks, num_classes=num_classes, norm=norm, last_stride=last_stride)
    model.arch = {"name": name, "norm": norm, "num_classes": num_classes, "last_stride": last_stride}
    return model


def count_params(model):
    """Number of trainable parameters (03, 06)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_summary(model, input_size=(3, 32, 32)):
    """Print torchsummary's layer table: output shapes, parameters, memory (03, 05, 06)."""
    from torchsummary import summary

    summary(model, input_size, device="cuda" if next(model.parameters()).is_cuda else "cpu")


# =============================================================================================
# LR finder (notebook 02): torch-lr-finder's range test, with the suggestions and restore it leaves to us
# =============================================================================================


@dataclass
class LRFinderResult:
    """The range test's learning rates, (smoothed) losses and suggested LRs by rule (02)."""

    lrs: list
    losses: list
    suggestions: dict
    skip_start: int
    skip_end: int
    diverged: bool


def suggest_lrs(lrs, losses, skip_start=10, skip_end=5):
    """Suggested LRs: 'steepest' (torch-lr-finder), 'valley' (fastai's default), 'minimum' and 'minimum/10' (02)."""
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
    """LR range test with torch-lr-finder; the model and optimizer are restored afterwards (02)."""
    from torch_lr_finder import LRFinder

    _choice(step_mode, ("exp", "linear"), "step_mode")
    _check_range_test(optimizer, start_lr, end_lr, num_iter)
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


def save_lr_choice(result, rule="minimum", batch_size=512, output_dir="outputs", **extra):
    """Write the chosen LR to OUTPUT_DIR/lr_finder.json, which notebooks 03-06 read (02)."""
    _choice(rule, tuple(result.suggestions), "rule")
    record = {"lr": check_lr(result.suggestions[rule], f"the '{rule}' suggestion"), "rule": rule,
              "batch_size": batch_size, "suggestions": result.suggestions, "diverged": result.diverged, **extra}
    path = Path(output_dir) / "lr_finder.json"
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return path


def resolve_lr(lr=None, output_dir="outputs", batch_size=512, default=0.1):
    """The LR to train with: lr if given, else 02's range-test LR scaled linearly to batch_size, else default (03)."""
    if lr is not None:
        return check_lr(lr, "LR"), f"LR {lr:g} (set in the parameters cell)"
    path = Path(output_dir) / "lr_finder.json"
    if not path.is_file():
        return check_lr(default, "DEFAULT_LR"), (
            f"LR {default:g}: the stated default (no LR range test result at {path}: run notebook 02 with "
            f"QUICK = False; a QUICK run's LR stays in its sandbox and is never used)")
    found = _read_lr_choice(path)
    scaled = check_lr(found["lr"] * batch_size / found["batch_size"],
                      f"the LR in {path} ({found['lr']:g} at batch {found['batch_size']}) scaled to batch {batch_size}")
    return scaled, (f"LR {scaled:.3g}: the LR range test's '{found['rule']}' suggestion {found['lr']:.3g} at batch "
                    f"{found['batch_size']}, scaled linearly to batch {batch_size} ({path})")


# =============================================================================================
# Training: one epoch, evaluation, and fit with a checkpoint after every epoch (03-06)
# =============================================================================================


def amp_dtype(device):
    """Mixed precision: bf16 on GPUs with native bf16 (compute capability 8.0+), fp16 below (T4), None off CUDA (03)."""
    device = get_device(device)
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16  # is_bf16_supported() is also True when emulated


def step_unit(scheduler):
    """When fit steps a scheduler: "batch" (OneCycleLR), "metric" (ReduceLROnPlateau) or "epoch" (03, 04, 05)."""
    sched = torch.optim.lr_scheduler
    if scheduler is None:
        return None
    if isinstance(scheduler, sched.ReduceLROnPlateau):
        return "metric"
    return "batch" if isinstance(scheduler, (sched.OneCycleLR, sched.CyclicLR)) else "epoch"


def lr_drops(history):
    """The epochs that started with a lower LR than the epoch before (05: when ReduceLROnPlateau acted)."""
    n = history["steps_per_epoch"]
    epoch_lr = [history["lr"][i * n] for i in range(len(history["epoch"]))]
    return [e + 1 for e in range(1, len(epoch_lr)) if epoch_lr[e] < epoch_lr[e - 1]]


def _to(device, x, y, channels_last=False):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(model, loader, optimizer, criterion, scheduler=None, scaler=None, device="cpu", dtype=None,
                    channels_last=False, lr_log=None, desc="train", progress=True):
    """One pass over loader, the step 03 writes by hand; returns (mean loss, accuracy %) while training (03)."""
    device = get_device(device)
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first step whose loss was NaN or infinite
    seen, lrs = 0, []
    bar = tqdm(total=len(loader), desc=desc, leave=False, disable=not progress)  # not tqdm(loader): tqdm.auto
    for step, (x, y) in enumerate(loader):  # would start a second pass over the loader, shifting its random order
        x, y = _to(device, x, y, channels_last)
        lrs.append(optimizer.param_groups[0]["lr"])
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
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        loss_sum += loss.detach().float() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        if step % 10 == 0 or step == len(loader) - 1:  # .item() waits for the GPU: not at every step
            _stop_if_not_finite(first_bad.item(), lrs, len(loader), desc)
            if progress:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                                lr=f"{lrs[-1]:.3g}", refresh=False)
        bar.update()
    bar.close()
    if lr_log is not None:
        lr_log.extend(lrs)
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


@torch.no_grad()
def evaluate(model, loader, criterion, device="cpu", dtype=None, channels_last=False):
    """Mean loss and accuracy % over a loader, in eval mode (03)."""
    device = get_device(device)
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


def fit(model, data, optimizer, scheduler=None, criterion=None, epochs=20, name="run", output_dir="outputs",
        config=None, monitor="val_acc", start_over=False, amp=True, channels_last=True, device="auto", progress=True):
    """Train for `epochs`: the loop 03 writes by hand, with a checkpoint after every epoch (03-06).

    An interrupted run resumes where it stopped; a finished one is loaded, not trained again. Returns the results
    record. At the end the model holds its best weights (chosen on the validation split, never the test set), and
    the workspace keeps only those (<name>_best.pt) and the results file.
    """
    device = get_device(device)
    _choice(monitor, ("val_acc", "val_loss"), "monitor (the test set is never used to choose)")
    unit = step_unit(scheduler)
    if unit == "metric" and data.val is None:
        raise ValueError("ReduceLROnPlateau watches the validation split: set VAL_FRACTION > 0 "
                         "(the test set is only reported, never used to schedule)")
    criterion = criterion or nn.CrossEntropyLoss()
    settings = run_settings(model, optimizer, scheduler, criterion, epochs, data, config)  # what defines the run
    channels_last = channels_last and device.type in ("cuda", "cpu")  # NHWC: 1.25x on our 2-core CPU too
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    dtype = amp_dtype(device) if amp else None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    run_on = dict(device=device, dtype=dtype, channels_last=channels_last)
    with _Run(output_dir, name, settings, epochs, model, device, start_over, monitor) as run:  # the lock, old files
        if run.finished:
            return run.load_finished(model)
        run.resume(model, optimizer, scheduler, scaler)  # from the last checkpoint, if there is one
        for epoch in range(run.epoch, epochs):
            t0, lrs = time.perf_counter(), []  # lrs: the LR of every step of this epoch
            set_epoch(data.train, epoch)
            train_loss, train_acc = train_one_epoch(
                model, data.train, optimizer, criterion, scheduler=scheduler if unit == "batch" else None,
                scaler=scaler, lr_log=lrs, desc=f"epoch {epoch + 1}/{epochs}", progress=progress, **run_on)
            val_loss, val_acc = evaluate(model, data.val, criterion, **run_on) if data.val else (None, None)
            test_loss, test_acc = evaluate(model, data.test, criterion, **run_on)  # reported, never used to choose
            if unit == "epoch":
                scheduler.step()
            elif unit == "metric":
                scheduler.step(val_acc if monitor == "val_acc" else val_loss)
            row = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                       val_acc=val_acc, test_loss=test_loss, test_acc=test_acc, epoch_time=time.perf_counter() - t0)
            run.check_learning(row, model, lrs[-1])  # a NaN or exploding loss stops the run here
            val_text = f" | val loss {val_loss:.4f} acc {val_acc:5.2f}%" if data.val else ""
            print(f"epoch {epoch + 1:3d}/{epochs} | train loss {train_loss:.4f} acc {train_acc:5.2f}%{val_text} | "
                  f"test loss {test_loss:.4f} acc {test_acc:5.2f}% | lr {lrs[-1]:.3g} | "
                  f"{row['epoch_time']:.1f}s" + run.time_left(row))
            run.save_epoch(row, lrs, model, optimizer, scheduler, scaler)  # and _best.pt, if the best on validation
        return run.finish(model)


# =============================================================================================
# Evaluation (notebook 07): one pass over the fixed-order test loader, everything else computed from it
# =============================================================================================


@torch.no_grad()
def predict(model, loader, device=None, tta=False):
    """Labels, predictions and softmax probabilities in loader order (eval mode); tta adds flipped views (03, 07)."""
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
    """Accuracy % of a predict() result (03, 07)."""
    return 100.0 * float((pred["preds"] == pred["labels"]).mean())


def misclassified(pred):
    """Indices of the wrong predictions, most confident mistakes first (07)."""
    wrong = np.flatnonzero(pred["preds"] != pred["labels"])
    confidence = pred["probs"][wrong, pred["preds"][wrong]]
    return wrong[np.argsort(-confidence, kind="stable")]


def confusion_matrix(labels, preds, num_classes=10):
    """Counts [actual, predicted] (07)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_metrics(cm):
    """Per-class recall (the per-class accuracy), precision and support from a confusion matrix (07)."""
    cm = np.asarray(cm, dtype=float)
    tp, actual, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    return {"recall": 100 * recall, "precision": 100 * precision, "support": actual.astype(int)}


def most_confused(cm, k=10, classes=CLASSES):
    """The k largest off-diagonal cells as (actual, predicted, count), largest first (07)."""
    cm = np.asarray(cm)
    off = [(cm[i, j], i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(classes[i], classes[j], int(c)) for c, i, j in off[:k]]


# =============================================================================================
# Plots: every helper returns its figure; notebooks save it to IMAGES_DIR, then show it
# =============================================================================================


def save_figure(fig, images_dir, name, dpi=120):
    """Save a figure as IMAGES_DIR/name (PNG) and return the path (every notebook)."""
    path = Path(images_dir) / name
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    return path


def _image_grid(rows, cols, size=1.7, title_rows=()):
    """A grid of square image cells; rows listed in title_rows get room for a two-line title above them."""
    title_h = 0.42  # inches for a two-line 9 pt title
    heights = [size + (title_h if r in title_rows else 0.0) for r in range(rows)]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1.4, sum(heights) + 0.5), squeeze=False,
                             layout="constrained", gridspec_kw={"height_ratios": heights})
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, hspace=0.0, wspace=0.0)
    for r, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
        ax.set_anchor("S" if r // cols in title_rows else "C")  # a titled image sits right under its title
    return fig, axes


def plot_class_counts(train_labels, test_labels, classes=CLASSES):
    """Bar chart of images per class in the train and test splits (01)."""
    fig, ax = plt.subplots(figsize=(9, 3.4), layout="constrained")
    x = np.arange(len(classes))
    for offset, (name, labels) in zip((-0.2, 0.2), (("train", train_labels), ("test", test_labels))):
        bars = ax.bar(x + offset, np.bincount(labels, minlength=len(classes)), width=0.4,
                      label=f"{name} ({len(labels):,})")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, classes, rotation=30)
    ax.set(ylabel="images", title="Images per class")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    return fig


def plot_images(rows, row_titles=None, titles=None, suptitle=""):
    """A grid of images (rows of uint8/float HWC or normalised CHW), pixels drawn as pixels (01, 07)."""
    n_rows = len(rows)
    fig, axes = _image_grid(n_rows, max(len(r) for r in rows), size=1.3 if titles is None else 1.9,
                            title_rows=range(n_rows) if titles is not None else ())
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            axes[r, c].imshow(to_display(image), interpolation="nearest")
            if titles is not None:
                axes[r, c].set_title(titles[r][c], fontsize=9)
        if row_titles:
            axes[r, 0].set_ylabel(row_titles[r], rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(suptitle)
    return fig


def plot_history(history, title=""):
    """Loss and accuracy per epoch: train, validation and test on the same epoch axis (03-06)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    epochs = history["epoch"]
    for split, style in (("train", "-"), ("val", "--"), ("test", "-")):
        if history[f"{split}_loss"]:
            final = f" (final {history[f'{split}_acc'][-1]:.2f}%)" if split == "test" else ""
            ax_loss.plot(epochs, history[f"{split}_loss"], style, marker=".", label=split)
            ax_acc.plot(epochs, history[f"{split}_acc"], style, marker=".", label=split + final)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy %", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(title)
    return fig


def plot_lr_schedule(history, title="Learning rate used at every step"):
    """The LR actually used at every optimizer step, on an epoch axis (03, 05)."""
    fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
    ax.plot(np.arange(len(history["lr"])) / max(1, history["steps_per_epoch"]), history["lr"])
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    return fig


def plot_lr_finder(result, rules=None, log_lr=True, log_loss=False, title="LR range test"):
    """Loss against LR, each suggestion in rules (default: all) marked by a line at the exact LR it names (02)."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    s, e = result.skip_start, len(result.lrs) - result.skip_end
    lrs, losses = np.asarray(result.lrs), np.asarray(result.losses)
    ax.plot(lrs, losses, color="0.75", label="skipped ends")
    ax.plot(lrs[s:e], losses[s:e], color="C0", label="loss (smoothed)")
    rules = result.suggestions if rules is None else rules
    for rule, color in zip(rules, ("C3", "C2", "C4", "C1")):
        lr = result.suggestions[rule]
        ax.axvline(lr, color=color, ls="--", lw=1.2, label=f"{rule}: {lr:.3g}")
    if log_lr:
        ax.set_xscale("log")
    if log_loss:
        ax.set_yscale("log")
    else:  # the kept range fills the plot; skipped ends may fall outside
        ax.set_ylim(losses[s:e].min() * 0.95, losses[s:e].max() * 1.05)
    ax.set(xlabel="learning rate", ylabel="loss", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best")
    return fig


def plot_test_curves(records, title="Test accuracy per epoch, every run"):
    """Overlay the test-accuracy curves of several results records (04, 06)."""
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    for name, rec in records.items():
        h = rec["history"]
        if h["test_acc"]:
            ax.plot(h["epoch"], h["test_acc"], label=f"{name} ({h['test_acc'][-1]:.1f}%)")
    ax.set(xlabel="epoch", ylabel="test accuracy %", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if records:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_results_heatmap(table, xlabel="scheduler", ylabel="model / norm", title="final test accuracy %"):
    """Heatmap of {row name: {column name: value}} (06's grid)."""
    rows, cols = sorted(table), sorted({c for r in table.values() for c in r})
    data = np.array([[table[r].get(c, np.nan) for c in cols] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2.5, 0.6 * len(rows) + 1.5), layout="constrained")
    sns.heatmap(data, annot=True, fmt=".2f", cmap="viridis", xticklabels=cols, yticklabels=rows, ax=ax)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return fig


def plot_confusion(cm, classes=CLASSES, normalize=False):
    """Confusion matrix heatmap (rows: actual, columns: predicted); normalize shows row fractions (07)."""
    cm = np.asarray(cm, dtype=float)
    data = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(7.5, 6.2), layout="constrained")
    sns.heatmap(data, annot=True, fmt=".2f" if normalize else ".0f", cmap="Blues", xticklabels=classes,
                yticklabels=classes, ax=ax, cbar=True, annot_kws={"fontsize": 8})
    ax.set(xlabel="predicted", ylabel="actual",
           title="Confusion matrix" + (" (each row sums to 1)" if normalize else " (counts)"))
    return fig


def plot_per_class(metrics, classes=CLASSES):
    """Per-class accuracy (= recall) and precision as grouped bars (07)."""
    fig, ax = plt.subplots(figsize=(10, 3.6), layout="constrained")
    x = np.arange(len(classes))
    for offset, key in zip((-0.2, 0.2), ("recall", "precision")):
        bars = ax.bar(x + offset, metrics[key], width=0.4, label="accuracy (recall)" if key == "recall" else key)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, classes, rotation=30)
    ax.set(ylabel="%", ylim=(0, 105), title="Per-class accuracy (= recall) and precision on the test set")
    ax.axhline(np.mean(metrics["recall"]), color="k", lw=0.8, ls="--", label="mean accuracy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    return fig


def plot_cams(images, maps, row_titles, titles=None, alpha=0.5, per_row=5, suptitle=""):
    """Images with one row of Grad-CAM overlays per entry of maps ([N, H, W] each), at most per_row images a group (07).

    A single image is laid out in one row: the image, then each map titled by row_titles.
    """
    single = len(images) == 1
    groups = [range(i, min(i + per_row, len(images))) for i in range(0, len(images), per_row)]
    per_group = len(maps) + 1
    if single:
        fig, axes = _image_grid(1, per_group, size=2.2, title_rows=(0,))
    else:
        fig, axes = _image_grid(len(groups) * per_group, min(per_row, len(images)),
                                title_rows={g * per_group for g in range(len(groups))} if titles is not None else ())
    for g, idx in enumerate(groups):
        top = g * per_group
        for c, i in enumerate(idx):
            img = to_display(images[i])
            cells = list(axes[0]) if single else [axes[top + r, c] for r in range(per_group)]
            cells[0].imshow(img, interpolation="nearest")
            if titles is not None:
                cells[0].set_title(titles[i], fontsize=9)
            for ax, m in zip(cells[1:], maps):
                ax.imshow(overlay_cam(img, m[i], alpha), interpolation="bilinear")
        for r, name in enumerate(["image", *row_titles]):
            if single:
                axes[0, r].set_xlabel(name, fontsize=9)
            else:
                axes[top + r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    if maps:
        heat = plt.cm.ScalarMappable(cmap="jet", norm=matplotlib.colors.Normalize(0, 1))
        fig.colorbar(heat, ax=axes, shrink=0.8 if single else min(0.6, 4.0 / len(axes)), aspect=25,
                     label="Grad-CAM (0: none, 1: strongest)")
    fig.suptitle(suptitle, fontsize=11)
    return fig


# =============================================================================================
# Grad-CAM and Grad-CAM++ (notebook 07 writes Grad-CAM out by hand for one image first)
# =============================================================================================


class GradCAM:
    """Grad-CAM (Selvaraju et al. 2017): `with GradCAM(model, "layer3") as cam: maps = cam(x, targets)` (07)."""

    label = "Grad-CAM"

    def __init__(self, model, target_layer):
        self.model, self.target_layer = model, _layer(model, target_layer)
        if isinstance(self.target_layer, (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d)):
            raise ValueError(f"Grad-CAM needs a layer with feature maps [N, C, H, W]; {self.target_layer} has none. "
                             f"Use a convolutional stage such as 'layer3'")
        self._handle, self._acts, self._capturing = None, None, False
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
        self._handle, self._acts, self._capturing = None, None, False

    def _forward_hook(self, module, inputs, output):
        """During a call, the layers above start from a copy of the maps: the backward pass stops at the layer."""
        if not self._capturing or not isinstance(output, torch.Tensor):
            return None  # the model's own forward passes inside the with block are left alone
        self._acts = output.detach().requires_grad_(True)  # a graph above even with frozen weights
        return self._acts.clone()  # a later in-place op (ReLU) changes the copy, never the maps

    def channel_weights(self, acts, grads):
        """Grad-CAM: the spatial mean of the gradients, one weight per channel."""
        return grads.mean(dim=(2, 3))

    def _maps_and_grads(self, images, targets):
        """One forward for the batch, then the gradients of the targets' scores at the target layer only."""
        self._capturing = True
        try:
            with torch.enable_grad():  # also inside a caller's torch.no_grad()
                logits = self.model(images.detach().to(next(self.model.parameters()).device).float())
                score = logits.gather(1, _cam_targets(targets, logits)[:, None]).sum()
        finally:
            self._capturing = False
        if self._acts is None:
            raise RuntimeError("the target layer gave no feature-map tensor in the forward pass; is it part of the "
                               "model?")
        if self._acts.dim() != 4:
            raise ValueError(f"Grad-CAM needs feature maps [N, C, H, W]; the target layer gives "
                             f"{tuple(self._acts.shape)}. Use a convolutional stage such as 'layer3'")
        grads = torch.autograd.grad(score, [self._acts], allow_unused=True)[0] if score.requires_grad else None
        if grads is None:  # autograd.grad: no parameter's .grad is touched, and nothing below the layer runs
            raise RuntimeError("the model's output does not depend on the target layer; is it part of the model?")
        return self._acts.detach(), grads

    def __call__(self, images, targets=None):
        """Maps [N, H, W] in [0, 1] at the input's size, for each image's target (None: predicted) class."""
        if self._handle is None:
            raise RuntimeError("use GradCAM inside a with block: `with GradCAM(model, layer) as cam: ...`")
        _check_cam_call(images)
        was_training = self.model.training
        self.model.eval()
        try:
            acts, grads = self._maps_and_grads(images, targets)
            acts, grads = acts.float(), grads.float()  # (N, C, h, w)
            self.map_size = tuple(acts.shape[-2:])
            cam = F.relu((self.channel_weights(acts, grads)[:, :, None, None] * acts).sum(1))  # (N, h, w)
            cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            return _minmax(cam).cpu()
        finally:
            self._acts = None
            self.model.train(was_training)


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19): pixel-weighted positive gradients (07)."""

    label = "Grad-CAM++"

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
    """Blend a [0, 1] heatmap (matplotlib colormap, RGB) onto a float RGB image in [0, 1] (07)."""
    image = np.asarray(image, dtype=np.float32)
    cam = np.asarray(cam.detach().cpu() if isinstance(cam, torch.Tensor) else cam, dtype=np.float32)
    _check_overlay(image, cam)
    heat = matplotlib.colormaps[cmap](np.clip(cam, 0, 1))[..., :3]
    return (1 - alpha) * image + alpha * heat


# #############################################################################################
# Machinery no notebook teaches: it keeps runs safe and does the bookkeeping. The workspace on Drive, results
# tables, self-checks and the hand-in zip; checks of every input with messages that say what to do; the files of
# a run (written whole or not at all, locked against a second writer, resumable); the settings record that tells
# an old run from a new one. Notebooks call some of it; nothing above needs it to be read.
# #############################################################################################


# ---- the workspace, results tables, self-checks and the hand-in (every notebook) -----------------------

def device_name(device="auto"):
    """The hardware behind a device: the GPU's model, or the CPU's model and cores (every notebook)."""
    device = get_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "Apple MPS" if device.type == "mps" else f"CPU ({_cpu_model()}, {os.cpu_count()} cores)"

def versions():
    """Versions of python and of the libraries the series uses (every notebook, and every results file)."""
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
    """Print library versions and what hardware "auto" would use (every notebook's setup cell)."""
    for k, v in versions().items():
        print(f"{k:>16}: {v}")
    print(f"{'auto device':>16}: {get_device('auto')} ({device_name('auto')})")

def check_parameters(**params):
    """Check a notebook's parameters before any time is spent; one error lists every bad one (every notebook).

    Every notebook calls it right after its parameters cell; the valid ranges are PARAMETER_RULES.
    """
    problems = [p for name, value in params.items() if (p := _parameter_problem(name, value))]
    if problems:
        raise ValueError("bad parameter(s) in the parameters cell:\n  " + "\n  ".join(problems))


COLAB_CONTENT = Path(os.environ.get("COURSE_CONTENT", "/content"))  # Colab's disk (the tests point it elsewhere)


def workspace(drive_folder, output_dir="outputs", images_dir="images", quick=False):
    """(OUTPUT_DIR, IMAGES_DIR) of this notebook: on Google Drive on Colab; QUICK = True: their quick/ (every notebook).

    A QUICK run is a sandbox: it writes only below quick/, and no real run ever reads from there.
    """
    if "google.colab" in sys.modules and drive_folder is not None:
        root = _drive_folder(drive_folder)  # under /content/drive, mounted, writable
        output_dir, images_dir = root / output_dir, root / images_dir
        print(f"workspace on Google Drive: {root} (checkpoints, results and figures survive a runtime reset)")
    elif "google.colab" in sys.modules:
        print("DRIVE_FOLDER = None: outputs and figures stay in this runtime; a reset or disconnect loses them")
    if quick:
        output_dir, images_dir = Path(output_dir) / "quick", Path(images_dir) / "quick"
        print(f"QUICK = True: a sandbox. Everything goes to {output_dir} and {images_dir}; no real run reads them")
    for folder in (output_dir, images_dir):
        _check_writable(folder)
    return str(output_dir), str(images_dir)


def results_table(output_dir="outputs", include_quick=True):
    """A markdown table of every run in OUTPUT_DIR/results; unfinished, stopped and QUICK runs say so (03-07)."""
    lines = ["| experiment | model | scheduler | params | epochs | final train acc % | final test acc % | "
             "test acc at best val % | wall time | device |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f=".2f": "-" if v is None else format(v, f)  # noqa: E731
    for name, rec in load_results(output_dir).items():
        if rec["quick"] and not include_quick:
            continue
        cfg = rec["config"] or {}
        state = {"complete": "", "diverged": " (stopped: diverged)"}.get(rec["status"], f" ({rec['status']})")
        epochs = f"{rec['epochs_run']}/{cfg.get('epochs', '-')}{state}" + (" (QUICK)" if rec["quick"] else "")
        model = cfg.get("model", "-")
        model = f"{model.get('name')} {model.get('norm')}" if isinstance(model, dict) else model
        sched = cfg.get("scheduler")
        sched = sched.get("name") if isinstance(sched, dict) else sched
        wall = "-" if rec["wall_time_s"] is None else f"{rec['wall_time_s'] / 60:.1f} min"
        lines.append(f"| {name} | {model} | {sched or '-'} | {fmt(rec['params'], ',')} | {epochs} | "
                     f"{fmt(rec['final_train_acc'])} | {fmt(rec['final_test_acc'])} | "
                     f"{fmt(rec['test_acc_at_best_val'])} | {wall} | {rec['device'] or '-'} |")
    return "\n".join(lines)


def print_expected(names, results_dir="outputs"):
    """Print what the course's own finished runs of these experiments reached, or "not measured yet" (03-06).

    They are the results files shipped in the checkout's outputs/results; QUICK runs never count.
    """
    runs = load_results(results_dir)
    for name in names:
        rec = runs.get(name)
        if rec and rec["status"] == "complete" and not rec["quick"] and rec["final_test_acc"] is not None:
            print(f"{name}: {rec['final_test_acc']:.2f}% test accuracy after {rec['epochs_run']} epochs, "
                  f"{rec['wall_time_s'] / 60:.0f} min on {rec['device']}")
        else:
            print(f"{name}: not measured yet")


def check_answer(exercise, answer, **your_run):
    """Say at once whether an answer is right, without showing the right one (every notebook's exercises).

    Fixed answers are compared by a hash; answers that depend on your run are computed from what you pass in
    your_run (e.g. cm=cm). Open questions have no check: your teacher reads them.
    """
    check = ANSWER_CHECKS.get(exercise)
    if check is None:
        raise ValueError(f"exercise {exercise!r} has no self-check (open questions are read by your teacher); "
                         f"checkable: {', '.join(sorted(ANSWER_CHECKS))}")
    if _blank(answer):
        print(f"Exercise {exercise}: no answer yet. Set ANSWER_{exercise.replace('.', '_')} and run this cell again.")
        return None
    try:
        right = _answer_hash(exercise, answer) == check if isinstance(check, str) else bool(check(answer, **your_run))
    except (TypeError, ValueError, KeyError, IndexError) as err:
        print(f"Exercise {exercise}: could not read {answer!r} as an answer ({type(err).__name__}: {err}); "
              f"the exercise says what form the answer takes.")
        right = False
    SELF_CHECKS[exercise] = right
    print(f"Exercise {exercise}: " + ("right." if right else "not right yet: look again (the answer is not shown)."))
    return right


def hand_in(notebook, variables, runs=(), files=(), output_dir="outputs", images_dir="images", student=""):
    """Zip what a teacher needs into OUTPUT_DIR/handin/<notebook>.zip and say what to submit (every notebook).

    variables is the notebook's globals(): the ANSWER_* variables of the exercises and the parameters as run. The zip
    holds your answers, this notebook's figures and the results files of its runs.
    """
    spec = notebook_spec(notebook)
    pattern = re.compile(rf"ANSWER_({notebook[:2]})_(\d+)((?:_\w+)?)")  # ANSWER_03_1_WHY is "03.1 why"
    answers = {f"{m[1]}.{m[2]}{m[3].replace('_', ' ').lower()}": value for name, value in variables.items()
               if (m := pattern.fullmatch(name))}
    given = {ex: _jsonable(a) for ex, a in sorted(answers.items()) if not _blank(a)}
    params = {name: _jsonable(variables.get(name)) for name in spec["parameters"]}
    quick = bool(variables.get("QUICK"))
    run_files = [Path(output_dir) / "results" / f"{name}.json" for name in runs]
    figures = sorted(Path(images_dir).glob(f"{notebook[:2]}_*.png"))
    manifest = {"notebook": notebook, "student": student.strip(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "quick": quick, "parameters": params,
                "changed": {k: [spec["parameters"][k], v] for k, v in params.items() if v != spec["parameters"][k]},
                "answers": given, "missing_answers": [ex for ex in spec["exercises"] if ex not in given],
                "self_checks": {ex: ok for ex, ok in SELF_CHECKS.items() if ex[:2] == notebook[:2]},
                "runs": [p.stem for p in run_files if p.exists()], "missing_runs": [p.stem for p in run_files
                                                                                     if not p.exists()],
                "figures": [p.name for p in figures], "files": [Path(f).name for f in files if Path(f).exists()],
                "device": device_name(), "versions": versions(),
                "course": {"url": variables.get("REPO_URL"), "ref": variables.get("REPO_REF")}}
    path = Path(output_dir) / "handin" / f"{notebook}.zip"
    _write_zip(path, manifest, {**{f"results/{p.name}": p for p in run_files if p.exists()},
                                **{f"figures/{p.name}": p for p in figures},
                                **{f"files/{Path(f).name}": Path(f) for f in files if Path(f).exists()}})
    _print_hand_in(path, manifest, output_dir, images_dir)
    return path


def workspace_size(output_dir="outputs", images_dir="images"):
    """Bytes the workspace uses by part: checkpoints, results, archive, sandbox, hand-ins (every notebook's hand-in)."""
    out, images = Path(output_dir), Path(images_dir)
    if out.name == "quick":  # a QUICK notebook: report the whole workspace, the sandbox as one part
        out, images = out.parent, images.parent
    parts = {"checkpoints": out / "checkpoints", "results": out / "results", "archive": out / "archive",
             "hand-ins": out / "handin", "quick sandbox": [out / "quick", images / "quick"], "figures": images}
    sizes = {name: sum(_folder_bytes(p) for p in (where if isinstance(where, list) else [where]))
             for name, where in parts.items()}
    sizes["figures"] -= _folder_bytes(images / "quick")
    sizes["other"] = _folder_bytes(out) - sum(sizes[k] for k in ("checkpoints", "results", "archive", "hand-ins")) \
        - _folder_bytes(out / "quick")
    return sizes


def free_space(output_dir="outputs", images_dir="images", archive=False, quick=False):
    """Show what the workspace holds and delete, if asked, runs moved to archive/ and QUICK's sandbox (every notebook).

    Finished runs already keep only their best weights and results file; this never touches them.
    """
    out, images = Path(output_dir), Path(images_dir)
    if out.name == "quick":
        out, images = out.parent, images.parent
    doomed = ([out / "archive"] if archive else []) + ([out / "quick", images / "quick"] if quick else [])
    freed = 0
    for folder in doomed:
        freed += _folder_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
    sizes = workspace_size(out, images)
    total = _mb(sum(sizes.values()))
    print("workspace: " + ", ".join(f"{k} {_mb(v)}" for k, v in sizes.items() if v) + f" (total {total})")
    if doomed:
        print(f"deleted {', '.join(str(f) for f in doomed)}: {_mb(freed)} freed")
    return freed


def mistake_explorer(model, images, pred, order, layers=("layer2", "layer3"), alpha=0.5):
    """The mistake explorer (07; ipywidgets 7/8): a slider over images[k] = test image order[k], and menus."""
    import ipywidgets as W

    def show(k=0, layer=layers[-1], method="Grad-CAM", for_class="predicted"):
        i = order[k]  # images[k] is test image order[k]
        cls = pred["preds"][i] if for_class == "predicted" else pred["labels"][i]
        with (GradCAM if method == "Grad-CAM" else GradCAMPlusPlus)(model, layer) as cam:
            heat = cam(images[k:k + 1], [cls])
        title = (f"#{k}: predicted {CLASSES[pred['preds'][i]]} ({pred['probs'][i].max():.0%}), actual "
                 f"{CLASSES[pred['labels'][i]]}")
        plot_cams(images[k:k + 1], [heat], [f"{method}\n{layer}\nfor {CLASSES[cls]}"], [title], alpha=alpha)
        plt.show()

    return W.interactive(show, k=W.IntSlider(min=0, max=max(0, len(order) - 1), description="mistake"),
                         layer=W.Dropdown(options=list(layers)), method=W.Dropdown(options=["Grad-CAM", "Grad-CAM++"]),
                         for_class=W.Dropdown(options=["predicted", "actual"], description="class"))


def _cpu_model():
    """The CPU's model name from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _choice(value, valid, what):
    """Return value if it is one of valid, else raise a ValueError that lists them."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")
    return value


# ---- parameters ------------------------------------------------------------------------------

def check_augment(aug):
    """AUGMENT with the defaults filled in; unknown keys raise an error listing the valid ones (01, 03-06)."""
    aug = {**AUGMENT, **(aug or {})}
    unknown = set(aug) - set(AUGMENT)
    if unknown:
        raise ValueError(f"unknown augmentation {sorted(unknown)}; valid keys: {', '.join(AUGMENT)} "
                         f"(crop: bool, flip: bool, cutout: hole size in px or 0, rotate: max degrees or 0)")
    aug["cutout"] = 16 if aug["cutout"] is True else int(aug["cutout"] or 0)
    return aug


# name: (kind, low, high, None allowed). Kinds: "int" (whole numbers), "float", "workers" (int or "auto"),
# "name" (a run's name; high = its longest length), "bool".
PARAMETER_RULES = {
    "EPOCHS": ("int", 1, 1000, False), "SUBSET": ("int", 20, 50_000, True), "BATCH_SIZE": ("int", 2, 4096, False),
    "SEED": ("int", 0, 2**31 - 1, False), "N_SEEDS": ("int", 1, 10, False), "LR": ("float", 1e-6, 10.0, True),
    "VAL_FRACTION": ("float", 0.0, 0.5, False), "MOMENTUM": ("float", 0.0, 0.999, False),
    "MAX_MOMENTUM": ("float", 0.0, 0.999, False), "BASE_MOMENTUM": ("float", 0.0, 0.999, False),
    "WEIGHT_DECAY": ("float", 0.0, 0.1, False), "LABEL_SMOOTHING": ("float", 0.0, 0.5, False),
    "PCT_START": ("float", 0.05, 0.95, False), "GAMMA": ("float", 1e-4, 1.0, False),
    "STEP_SIZE": ("int", 1, 1000, False), "PATIENCE": ("int", 0, 100, False), "FACTOR": ("float", 1e-4, 0.99, False),
    "NUM_WORKERS": ("workers", 0, 32, False), "THRESHOLD": ("float", 0.0, 100.0, False),
    "NUM_ITER": ("int", 20, 10_000, False), "N_CAM": ("int", 1, 1000, False), "ALPHA": ("float", 0.0, 1.0, False),
    "EXPERIMENT": ("name", 1, 64, False), "QUICK": ("bool", 0, 1, False), "CLASS_BUDGET": ("bool", 0, 1, False),
}
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _parameter_problem(name, value):
    """What is wrong with one parameter's value, or None."""
    if name in ("MODEL", "NORM"):  # names: one of a list
        valid = tuple(MODELS) if name == "MODEL" else NORMS
        return None if value in valid else f"{name} must be one of {', '.join(valid)}, got {value!r}"
    if name == "AUGMENT":
        try:
            check_augment(value)
        except (ValueError, TypeError) as err:
            return f"AUGMENT: {err}"
        return None
    kind, low, high, none_ok = PARAMETER_RULES[name]
    if value is None and none_ok:
        return None
    if kind == "name":
        return _name_problem(value, name, high)
    if kind == "bool":
        return None if isinstance(value, bool) else f"{name} must be True or False, got {value!r}"
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    ok = (whole or (kind == "float" and isinstance(value, float) and math.isfinite(value))
          or (kind == "workers" and value == "auto"))
    if ok and (value == "auto" or low <= value <= high):
        return None
    what = {"int": "a whole number", "float": "a number", "workers": '"auto" or a whole number'}[kind]
    return f"{name} must be {what} from {low:g} to {high:g}{' (or None)' if none_ok else ''}, got {value!r}"


def _name_problem(value, what="EXPERIMENT", max_len=80):
    if isinstance(value, str) and _NAME.fullmatch(value) and len(value) <= max_len:
        return None
    return (f"{what} must be 1 to {max_len} letters, digits, '-', '_' or '.' (not first), got {value!r}: it names "
            f"the run's files in the workspace, e.g. 'resnet18_no_smoothing'")


def check_experiment_name(name, what="EXPERIMENT", max_len=80):
    """A run's name, if it can name files safely (letters, digits, '-', '_', '.'), else a clear error (03-06)."""
    problem = _name_problem(name, what, max_len)
    if problem:
        raise ValueError(problem)
    return name


def check_lr(value, what="LR"):
    """A learning rate as a float if it is a number from 1e-6 to 10, else a clear error (03-06: resolve_lr, fit)."""
    low, high = PARAMETER_RULES["LR"][1:3]
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if number and math.isfinite(value) and low <= value <= high:
        return float(value)
    raise ValueError(f"{what} must be a number from {low:g} to {high:g}, got {value!r}: outside that range SGD does "
                     f"not train a ResNet. Set LR in the parameters cell, or run notebook 02 again")


def _real(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


# ---- the workspace's folders -------------------------------------------------------------------


def _drive_folder(drive_folder):
    """DRIVE_FOLDER as a folder on the mounted Google Drive; a name is a folder in MyDrive (workspace)."""
    drive = COLAB_CONTENT / "drive"
    if not isinstance(drive_folder, (str, Path)) or not str(drive_folder).strip():
        raise ValueError(f"DRIVE_FOLDER must be a folder name or path on Google Drive (or None), got {drive_folder!r}")
    folder = Path(drive_folder)
    if not folder.is_absolute():
        folder = drive / "MyDrive" / folder
        print(f"DRIVE_FOLDER {str(drive_folder)!r} is a name, not a path: using {folder} (in your Google Drive)")
    folder = Path(os.path.normpath(folder))
    if drive not in folder.parents or folder.parent == drive:
        raise ValueError(f"DRIVE_FOLDER must be a folder on Google Drive, inside {drive / 'MyDrive'} (e.g. "
                         f"'resnet-cifar10-course'), got {str(drive_folder)!r}: a folder elsewhere is lost when the "
                         f"runtime resets. DRIVE_FOLDER = None keeps the work in the runtime on purpose.")
    if not (drive / "MyDrive").exists():
        from google.colab import drive as colab_drive

        colab_drive.mount(str(drive))  # asks once for permission
    return folder


def _check_writable(folder):
    """Create folder if needed and prove it can be written, or say why not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot use {folder} as a folder: it, or a folder above it, is a file. Rename or move that "
                         f"file, or choose another folder") from None
    except OSError as err:
        raise ValueError(f"cannot write to {folder} ({err.strerror or err}). Choose a folder you can write to (on "
                         f"Colab: check that Google Drive is mounted and has free space)") from None


def _folder_bytes(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _mb(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ---- CIFAR-10 files ----------------------------------------------------------------------------

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# What a CIFAR-10 batch pickle may name: numpy's array rebuilders, nothing that can run other code.
_PICKLE_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                   *{(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                     for n in ("_reconstruct", "scalar")},
                   *{(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a batch file cannot run code."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core is numpy._core since 2.0
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}': a CIFAR-10 batch holds only plain data")


def _missing_data_message(folder, missing):
    return (f"CIFAR-10 not found: {folder} has no {missing}. Put CIFAR-10's python-format batches "
            f"there (data_batch_1 ... data_batch_5, test_batch, batches.meta: the folder "
            f"'cifar-10-batches-py' inside {CIFAR10_URL}), or set DOWNLOAD = True where there is internet.")


def _download_cifar10(root):
    """Download and extract CIFAR-10 into root with torchvision's utility."""
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10_URL, download_root=str(root), md5=CIFAR10_MD5)
    except Exception as err:  # URLError, timeouts, bad archive: one clear message instead
        raise FileNotFoundError(f"{_missing_data_message(Path(root) / 'cifar-10-batches-py', 'batch files')} "
                                f"The download failed ({type(err).__name__}: {err}).") from None


def _read_batch(path):
    """Read one CIFAR-10 python batch file into (uint8 [N, 32, 32, 3], int64 [N]), checking its values."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except pickle.UnpicklingError as err:
        if "refused" in str(err):
            raise ValueError(f"{path} is not a plain CIFAR-10 batch: {err}. Nothing was run; fetch CIFAR-10 again "
                             f"from its official address") from None
        raise ValueError(f"{path} is truncated or corrupt ({err}); delete the 'cifar-10-batches-py' folder and "
                         f"fetch CIFAR-10 again") from None
    except Exception as err:  # truncated pickle, wrong keys
        raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete the "
                         f"'cifar-10-batches-py' folder and fetch CIFAR-10 again") from None
    if data.dtype != np.uint8:
        raise ValueError(f"{path}: pixels must be uint8 (0-255), got {data.dtype}; this is not CIFAR-10's format")
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: data has shape {data.shape} for {len(labels)} labels; expected [N, 3072]")
    if labels.dtype.kind not in "iu" or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: labels must be whole numbers 0-9, got {labels.dtype} from "
                         f"{labels.min() if len(labels) else '-'} to {labels.max() if len(labels) else '-'}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, H, W, C)
    return np.ascontiguousarray(images), labels.astype(np.int64)


# ---- the LR range test's inputs and output ------------------------------------------------------


def _check_range_test(optimizer, start_lr, end_lr, num_iter):
    """Refuse range-test settings that would run a meaningless test (a downward sweep, NaN, zero steps)."""
    if start_lr is not None and not (_real(start_lr) and start_lr > 0):
        raise ValueError(f"start_lr must be a positive number (or None: the optimizer's LR), got {start_lr!r}")
    first = optimizer.param_groups[0]["lr"] if start_lr is None else start_lr
    if not (_real(end_lr) and end_lr > first):
        raise ValueError(f"end_lr must be a number above the first LR of the test ({first:g}), got {end_lr!r}: the "
                         f"range test raises the LR from start_lr up to end_lr")
    if not (isinstance(num_iter, int) and not isinstance(num_iter, bool) and num_iter >= 2):
        raise ValueError(f"num_iter must be a whole number of steps, at least 2, got {num_iter!r}")


def _read_lr_choice(path):
    """lr_finder.json's content, if its LR and batch size are usable numbers."""
    try:
        found = json.loads(Path(path).read_text())
        lr, batch = found["lr"], found["batch_size"]
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); run notebook 02 again, or delete it "
                         f"and set LR in the parameters cell") from None
    check_lr(lr, f"the LR in {path}")
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        raise ValueError(f"{path} holds batch_size {batch!r}; it must be a whole number from 1 up: run notebook 02 "
                         f"again, or delete it and set LR in the parameters cell")
    return {"rule": "?", **found}


# ---- Grad-CAM's inputs --------------------------------------------------------------------------


def _layer(model, layer):
    """A layer given as a module or by name (e.g. "layer3" or "layer3.1.conv2")."""
    if isinstance(layer, nn.Module):
        return layer
    names = [n for n, _ in model.named_children()]
    if not isinstance(layer, str):
        raise ValueError(f"target_layer must be a layer of the model or its name, got {layer!r}; top-level layers: "
                         f"{', '.join(names)}")
    try:
        return model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"the model has no layer {layer!r}; top-level layers: {', '.join(names)}") from None


def _check_cam_call(images):
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Grad-CAM needs gradients, but it was called inside torch.inference_mode(); "
                           "call it outside that block")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a float tensor [N, C, H, W], got {getattr(images, 'shape', type(images))}")


def _check_overlay(image, cam):
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {image.shape}")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"image values must be in [0, 1] (got {image.min():.3g}..{image.max():.3g}); "
                         f"use to_display() or denormalize() first")
    if cam.shape != image.shape[:2]:
        raise ValueError(f"cam shape {cam.shape} does not match image {image.shape[:2]}")


def _cam_targets(targets, logits):
    """Grad-CAM's target classes as a long tensor: None means the predicted class; only class indices are taken."""
    n, classes = logits.shape
    if targets is None:
        return logits.argmax(1)
    if isinstance(targets, (torch.Tensor, np.ndarray)):
        values = np.asarray(targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets).reshape(-1)
        values = values.tolist() if values.dtype.kind in "iu" else [float(v) if values.dtype.kind == "f" else v
                                                                     for v in values.tolist()]
    else:
        values = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    index = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))  # noqa: E731
    if len(values) != n or not all(index(v) and 0 <= v < classes for v in values):
        raise ValueError(f"targets must be None or {n} class indices (whole numbers from 0 to {classes - 1}, one per "
                         f"image), got {values!r}")
    return torch.tensor([int(v) for v in values], dtype=torch.long, device=logits.device)


# ---- what a run is: its settings, and how they are compared -------------------------------------


class Diverged(RuntimeError):
    """Training broke down: a NaN or infinite loss, or one far above a uniform guess (03-06, from fit)."""


class StaleRun(RuntimeError):
    """A saved run was made with other settings than the ones asked for now (03-06, from fit)."""


class RunBusy(RuntimeError):
    """Another process is training the same run right now (03-06, from fit)."""


class WriteFailed(OSError):
    """A file could not be written (a full disk, a quota); nothing half-written was left (every notebook)."""


SPEED_KEYS = ("num_workers", "amp", "channels_last", "device", "data_on_gpu")  # never make a saved run stale
_SCHEDULER_STATE = {"optimizer", "last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step",
                    "best", "num_bad_epochs", "cooldown_counter", "mode_worse", "verbose", "base_lrs"}
_SCHEDULER_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")


def _plain(value):
    """True for values a settings record can hold as they are (numbers, text, lists and dicts of them)."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def _describe_scheduler(scheduler, optimizer):
    """A scheduler's class and hyper-parameters (OneCycle's momentum range included), none of its counters."""
    if scheduler is None:
        return None
    out = {"name": type(scheduler).__name__}
    out.update({k.lstrip("_"): v for k, v in vars(scheduler).items() if k not in _SCHEDULER_STATE and _plain(v)})
    if callable(getattr(scheduler, "anneal_func", None)):  # torch < 2.6 keeps OneCycle's anneal as a method
        out["anneal_func"] = scheduler.anneal_func.__name__
    group = optimizer.param_groups[0]
    out.update({k: group[k] for k in _SCHEDULER_GROUP_KEYS if k in group})
    return out


def _describe_criterion(criterion):
    """A loss's class and arguments (label smoothing, class weights, ...)."""
    if not isinstance(criterion, nn.Module):
        return {"name": getattr(criterion, "__name__", type(criterion).__name__)}
    out = {"name": type(criterion).__name__}
    out.update({k: v for k, v in vars(criterion).items() if not k.startswith("_") and k != "training" and _plain(v)})
    out.update({k: b.tolist() for k, b in criterion.named_buffers()})
    return out


def run_settings(model, optimizer, scheduler, criterion, epochs, data, config=None):
    """Every setting that changes a run's numbers: the notebook's config plus what the objects say (03-06, in fit)."""
    opt = {k: v for k, v in optimizer.defaults.items() if _plain(v) and
           k not in ("foreach", "fused", "differentiable", "capturable", "maximize")}
    loaders = {"train_images": len(data.train.dataset), "test_images": len(data.test.dataset),
               "val_images": len(data.val.dataset) if data.val is not None else 0,
               "augment": getattr(data, "augment", None),
               "seed": getattr(data.train.dataset, "seed", getattr(data.train, "seed", None))}  # GPULoader: its own
    cfg = {**(config or {}), "model": getattr(model, "arch", type(model).__name__), "epochs": epochs,
           "batch_size": data.train.batch_size, "data": loaders, "optimizer": {"name": type(optimizer).__name__, **opt},
           "scheduler": _describe_scheduler(scheduler, optimizer), "criterion": _describe_criterion(criterion)}
    return json.loads(json.dumps(cfg, default=str))  # as the results file will hold it (tuples become lists)


def _flat(settings, prefix=""):
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_settings(what, saved, now):
    """Raise StaleRun naming every result-changing setting that differs; speed-only settings never count."""
    saved, now = _flat(saved or {}), _flat(now)
    keys = [k for k in dict.fromkeys([*saved, *now]) if k.split(".")[0] not in SPEED_KEYS
            and saved.get(k) != now.get(k)]
    if keys:
        changes = "; ".join(f"{k}: {saved.get(k, '(none)')!r} -> {now.get(k, '(none)')!r}" for k in keys[:8])
        more = f"; and {len(keys) - 8} more" if len(keys) > 8 else ""
        raise StaleRun(f"{what} was run with other settings ({changes}{more}). Nothing was changed. To keep it: "
                       f"choose another EXPERIMENT name. To start over: set START_OVER = True (its files move to "
                       f"archive/).")


# ---- when training has broken down -------------------------------------------------------------

UNIFORM_LOSS = math.log(len(CLASSES))  # the cross-entropy of a uniform guess over 10 classes: ln 10 = 2.30
# An epoch's mean training loss above this: the run exploded. Measured on 500 images (ResNet18, one epoch, batch 32):
# runs that recover average 12-20 in their first epoch (BatchNorm at LR 0.5-2, LayerNorm at 0.05-0.2); at LR 9, 37,000.
TRAIN_LOSS_LIMIT = 20 * UNIFORM_LOSS


def _stop_if_not_finite(first_bad, lrs, steps, desc):
    if first_bad >= 0:
        raise Diverged(f"the training loss became NaN or infinite at step {first_bad + 1} of {steps} ({desc}) with "
                       f"LR {lrs[first_bad]:.3g}")


def _learning_problem(row, model):
    """Why an epoch's numbers show that training broke down, or None.

    Any loss NaN or infinite; the epoch's training loss far above a uniform guess's (it exploded); weights not
    finite. A finite evaluation loss is never judged by its size: eval-mode BatchNorm, whose running statistics lag
    the weights, gives huge validation losses early in healthy runs (3e4 after 9 steps on 200 images, measured),
    the breakdown notebook 02 shows.
    """
    for key in ("train_loss", "val_loss", "test_loss"):
        value = row.get(key)
        what = key.replace("_", " ").replace("val", "validation")
        if value is not None and not math.isfinite(value):
            return f"the {what} is {value}"
    if row["train_loss"] > TRAIN_LOSS_LIMIT:
        return (f"the training loss averaged {row['train_loss']:.4g} over the epoch, far above the "
                f"{UNIFORM_LOSS:.2f} of a uniform guess (the limit is {TRAIN_LOSS_LIMIT:.3g})")
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        return "the weights hold NaN or infinite values"
    return None


# ---- files: written whole or not at all -----------------------------------------------------------


def _is_write_error(err):
    if isinstance(err, WriteFailed):
        return False
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("inline_container", "PytorchStreamWriter", "write failed", "unexpected pos")))


def _atomic_write(path, write, keep_previous=None):
    """Write path through a temporary file private to this process, then rename it: a file is whole or absent.

    keep_previous: move the file there first (the checkpoint of the epoch before). A failed write (a full disk)
    removes its temporary file and says where, how much space is free, and what to do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)  # a kill right here leaves the previous epoch to resume from
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_write_error(err):
            free = "an unknown amount of"
            with contextlib.suppress(OSError):
                free = _mb(shutil.disk_usage(path.parent).free)
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            raise WriteFailed(
                f"could not write {path} ({type(err).__name__}: {reason}); {path.parent} has {free} free space. "
                f"Nothing half-written was left behind and the file from before is intact. Free some space (on "
                f"Colab: your Google Drive and its bin; H.free_space(OUTPUT_DIR) shows what the workspace holds), "
                f"then run the cell again: a run resumes from its last saved epoch.") from None
        raise
    return path


def checkpoint_paths(output_dir, name):
    """A run's files: <name>_last.pt, _prev.pt (the epoch before), _best.pt (by validation), .lock (03-07)."""
    d = Path(output_dir) / "checkpoints"
    return {"dir": d, "last": d / f"{name}_last.pt", "prev": d / f"{name}_prev.pt", "best": d / f"{name}_best.pt",
            "lock": d / f"{name}.lock"}


def save_checkpoint(path, keep_previous=None, **state):
    """torch.save through a private temporary file: never half a checkpoint (03-06, through fit)."""
    return _atomic_write(path, lambda tmp: torch.save(state, tmp), keep_previous)


def _describe_arch(arch):
    return f"{arch.get('name')} (norm={arch.get('norm')}, last_stride={arch.get('last_stride')}, " \
           f"{arch.get('num_classes')} classes)"


def load_checkpoint(path, model=None, map_location="cpu"):
    """Load a checkpoint (weights_only=True) and, if a model is given, its weights, with clear errors (03-07)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run the training notebook first (fit writes "
                                f"OUTPUT_DIR/checkpoints/<experiment>_last.pt and _best.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path} is damaged ({path.stat().st_size:,} bytes; {type(err).__name__}: {reason}). To go "
                         f"on: run H.set_aside('{path}') and run the training cell again; it resumes from the epoch "
                         f"before (_prev.pt) if that is intact, else starts over.") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by helpers.fit (it has no 'model' entry)")
    if model is not None:
        saved, ours = ckpt.get("arch"), getattr(model, "arch", None)
        if saved and ours and saved != ours:
            raise ValueError(f"{path} holds a {_describe_arch(saved)}, but the model is a {_describe_arch(ours)}; "
                             f"build the model with make_model(**checkpoint['arch']) or model_from_checkpoint()")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise ValueError(f"{path} does not fit this model: {str(err).splitlines()[0]}") from None
    return ckpt


def load_trained(output_dir, name, device="cpu"):
    """A trained run's best weights (<name>_best.pt) in the model they came from; returns (model, checkpoint) (07).

    It never trains and never changes a file; a missing run is an error listing the runs there are.
    """
    path = checkpoint_paths(output_dir, name)["best"]
    if not path.exists():
        runs = sorted(p.name.removesuffix("_best.pt") for p in path.parent.glob("*_best.pt"))
        raise FileNotFoundError(f"no checkpoint {path}: run notebook 03 first (or the notebook that trains "
                                f"'{name}'), or set EXPERIMENT to one of: {', '.join(runs) or 'none yet'}")
    return model_from_checkpoint(path, device=device)


def model_from_checkpoint(path, device="cpu"):
    """Rebuild the model a checkpoint was saved from and load its weights; returns (model, checkpoint) (07)."""
    ckpt = load_checkpoint(path)
    if not ckpt.get("arch"):
        raise ValueError(f"{path} does not record its architecture; build the model and use load_checkpoint")
    model = make_model(**ckpt["arch"])
    load_checkpoint(path, model)
    return model.to(get_device(device)).eval(), ckpt


def set_aside(path):
    """Rename a damaged file to <name>.damaged-<time>, nothing deleted (03-06: a damaged checkpoint's message)."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d_%H%M%S')}")
    os.replace(path, dest)
    print(f"moved {path} to {dest}")
    return dest


def archive_run(output_dir, name):
    """Move a run's results file and checkpoints to OUTPUT_DIR/archive/<name>_<time>/ (03-06: START_OVER)."""
    paths = checkpoint_paths(output_dir, name)
    files = [p for p in (Path(output_dir) / "results" / f"{name}.json", paths["last"], paths["prev"], paths["best"])
             if p.exists()]
    if files:
        dest = Path(output_dir) / "archive" / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
        dest.mkdir(parents=True, exist_ok=True)
        for path in files:
            os.replace(path, dest / path.name)
        print(f"moved '{name}' ({len(files)} files) to {dest}")


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


# ---- one writer per run -----------------------------------------------------------------------------


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return isinstance(pid, int)
    return True


class _RunLock:
    """<name>.lock beside a run's checkpoints: who trains it (host, process, start), refreshed every 30 s.

    A second writer is refused at start. A lock is abandoned when its process is gone (same machine) or its
    heartbeat is older than STALE_S (another machine, e.g. a second Colab runtime on the same Drive).
    """

    STALE_S, BEAT_S = 120, 30

    def __init__(self, path, name):
        self.path, self.name = Path(path), name
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop, self._thread = threading.Event(), None

    def _read(self):
        with contextlib.suppress(OSError, ValueError):
            other = json.loads(self.path.read_text())
            return other if isinstance(other, dict) else None
        return None

    def _abandoned(self, other):
        if other.get("host") == self.me["host"]:
            return other.get("pid") == os.getpid() or not _pid_alive(other.get("pid"))
        heartbeat = other.get("heartbeat")
        return not _real(heartbeat) or time.time() - heartbeat > self.STALE_S

    def _write(self):
        _atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps({**self.me, "heartbeat": time.time()})))

    def acquire(self):
        other = self._read()
        if other and not self._abandoned(other):
            seen = other.get("heartbeat")
            seen = f", last seen {time.time() - seen:.0f} s ago" if _real(seen) else ""
            raise RunBusy(
                f"'{self.name}' is being trained by another process right now (host {other.get('host')}, PID "
                f"{other.get('pid')}, started {other.get('started')}{seen}; {self.path}). Two writers would spoil "
                f"each other's files, so this one stops before writing anything. Stop or finish the other, or give "
                f"this run another EXPERIMENT name. If the other is gone (a closed tab, a reset runtime), run this "
                f"cell again in {self.STALE_S // 60} minutes, or delete {self.path}.")
        self._write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(self.BEAT_S):
            with contextlib.suppress(OSError):
                self._write()

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        other = self._read()
        if other and other.get("token") == self.me["token"]:
            with contextlib.suppress(OSError):
                self.path.unlink()


class _Run:
    """One run's files while fit trains it: the lock, the checkpoints, the results record."""

    def __init__(self, output_dir, name, settings, epochs, model, device, start_over, monitor="val_acc"):
        check_experiment_name(name, "the run's name (EXPERIMENT)", max_len=100)
        lr = (settings["scheduler"] or {}).get("max_lr", settings["optimizer"].get("lr"))  # OneCycle: its peak
        if lr is not None:
            check_lr(lr, "the learning rate the optimizer and scheduler were built with")
        self.output_dir, self.name, self.settings, self.epochs = Path(output_dir), name, settings, epochs
        self.paths = checkpoint_paths(output_dir, name)
        self.params, self.device, self.start_over = count_params(model), device_name(device), start_over
        self.monitor = monitor
        self.lock = _RunLock(self.paths["lock"], name)
        self.history = {"steps_per_epoch": None, **{k: [] for k in (
            "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "epoch_time", "lr")}}
        self.epoch, self.best, self.spent, self.finished = 0, {"epoch": 0, "score": None}, 0.0, None

    def __enter__(self):
        self.paths["dir"].mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # before anything is read or written
        try:
            self._remove_temporary_files()
            if self.start_over:
                archive_run(self.output_dir, self.name)
            done = load_results(self.output_dir).get(self.name)
            if done and done["status"] == "diverged":
                print(f"'{self.name}' stopped last time ({done.get('error', 'diverged')}); its files go to archive/ "
                      f"and it trains again from epoch 0")
                archive_run(self.output_dir, self.name)
                done = None
            if done:
                _check_same_settings(f"'{self.name}' in {self.output_dir}", done["config"], self.settings)
                self.finished = done if done["status"] == "complete" else None
        except BaseException:
            self.lock.release()
            raise
        self.t_start = time.perf_counter()
        return self

    def __exit__(self, kind, err, tb):
        try:
            if kind is not None and issubclass(kind, Diverged):
                self._record("diverged", error=str(err))
                kept = (f"the last good checkpoint (epoch {self.epoch}) is kept" if self.epoch else
                        "no epoch had finished, so there is no checkpoint to keep")
                raise Diverged(f"'{self.name}' stopped: {err}. The LR is probably too high for this model: try a "
                               f"tenth of it. {kept[0].upper() + kept[1:]}; the run is recorded as stopped "
                               f"(diverged) and trains again from epoch 0 when you run the cell again.") from None
            if kind is KeyboardInterrupt:
                print(f"Interrupted: {self.paths['last']} holds epoch {self.epoch}; run the cell again to resume.")
        finally:
            self.lock.release()
        return False

    def _remove_temporary_files(self):
        """Temporary files of this run left by a killed process (only this process writes the run now)."""
        pattern = re.compile(rf"\.({re.escape(self.name)}_(last|prev|best)\.pt|{re.escape(self.name)}\.json)\..*\.tmp")
        for folder in (self.paths["dir"], self.output_dir / "results"):
            for path in folder.glob(".*.tmp") if folder.is_dir() else []:
                if pattern.fullmatch(path.name):
                    with contextlib.suppress(OSError):
                        path.unlink()

    def load_finished(self, model):
        """A finished run: its best weights into model (nothing is trained), and the leftovers of a kill cleaned up."""
        best = self.paths["best"]
        if not best.exists():
            raise FileNotFoundError(f"'{self.name}' finished earlier ({self.finished['epochs_run']} epochs) but {best} "
                                    f"is missing: restore it (e.g. from Drive's bin), or set START_OVER = True to "
                                    f"train again")
        ckpt = load_checkpoint(best, model)
        self._free_finished()
        print(f"'{self.name}': finished earlier ({self.finished['epochs_run']}/{self.epochs} epochs); loaded its best "
              f"weights (epoch {ckpt['epoch']}) from {best}")
        return self.finished

    def resume(self, model, optimizer, scheduler, scaler):
        """Continue from the last checkpoint (or the one before, if the last is gone); returns the history."""
        path = next((p for p in (self.paths["last"], self.paths["prev"]) if p.exists()), None)
        if path is not None:
            ckpt = load_checkpoint(path, model)
            _check_same_settings(path, ckpt["config"], self.settings)
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            self.history, self.epoch, self.spent, self.best = (ckpt["history"], ckpt["epoch"], ckpt["wall_time"],
                                                               ckpt["best"])
            _set_rng_state(ckpt["rng"])
            self._repair_best(model)
            print(f"'{self.name}': resumed after epoch {self.epoch}/{self.epochs} from {path}")
        return self.history

    def _repair_best(self, model):
        """_best.pt must hold the best epoch. After a kill between _last.pt and _best.pt, the best epoch is the last
        one, whose weights the model holds now; if _best.pt is lost otherwise, the best is chosen anew from here."""
        with contextlib.suppress(Exception):
            if torch.load(self.paths["best"], map_location="cpu", weights_only=True)["epoch"] == self.best["epoch"]:
                return
        if self.best["epoch"] != self.epoch:
            warnings.warn(f"{self.paths['best']} does not hold the best epoch ({self.best['epoch']}); the best is "
                          f"chosen again from epoch {self.epoch} on", stacklevel=3)
            self.best = {"epoch": self.epoch, "score": self._score(self.history, self.epoch)}
        self._write_best(model)

    def _write_best(self, model):
        keep = {k: self.best["epoch"] * (self.history["steps_per_epoch"] or 1 if k == "lr" else 1)
                for k in self.history}
        hist = {k: (v[: keep[k]] if isinstance(v, list) else v) for k, v in self.history.items()}
        save_checkpoint(self.paths["best"], model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                        epoch=self.best["epoch"], arch=getattr(model, "arch", None), config=self.settings,
                        history=hist, experiment=self.name)

    def check_learning(self, row, model, lr):
        """Stop the run (Diverged) when this epoch shows that training broke down."""
        why = _learning_problem(row, model)
        if why:
            raise Diverged(f"in epoch {row['epoch']} {why} (LR {lr:.3g})")

    def time_left(self, row):
        left = np.mean([*self.history["epoch_time"], row["epoch_time"]]) * (self.epochs - row["epoch"]) / 60
        return f" | about {left:.1f} min to go" if left > 0 else ""

    def _score(self, history, epoch):
        """How good an epoch was on the validation split (higher is better); None without one: the last is best."""
        if not history["val_acc"]:
            return None
        return history["val_acc"][epoch - 1] if self.monitor == "val_acc" else -history["val_loss"][epoch - 1]

    def save_epoch(self, row, lrs, model, optimizer, scheduler, scaler):
        """Log the epoch; write _last.pt (the old one becomes _prev.pt), _best.pt if it is the best, the record."""
        for key, value in row.items():
            if value is not None:
                self.history[key].append(value)
        self.history["lr"].extend(lrs)
        self.history["steps_per_epoch"] = len(lrs)
        self.epoch = row["epoch"]
        score = self._score(self.history, self.epoch)
        is_best = score is None or self.best["score"] is None or score > self.best["score"]
        if is_best:
            self.best = {"epoch": self.epoch, "score": score}
        save_checkpoint(self.paths["last"], keep_previous=self.paths["prev"], model=model.state_dict(),
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict() if scheduler else None,
                        scaler=scaler.state_dict() if scaler is not None else None, history=self.history,
                        epoch=self.epoch, best=self.best, config=self.settings, rng=_rng_state(),
                        arch=getattr(model, "arch", None), wall_time=self._wall(), experiment=self.name)
        if is_best:
            self._write_best(model)
        self._record("complete" if self.epoch == self.epochs else "running")

    def finish(self, model):
        """The model gets its best weights; the files only resuming needed are removed."""
        if self.best["epoch"] != self.epoch:
            load_checkpoint(self.paths["best"], model)
        self._record("complete")  # before any file is removed
        freed, names = self._free_finished()
        best = self.paths["best"]
        print(f"'{self.name}' finished: the model holds its best weights (epoch {self.best['epoch']}); kept "
              f"{best.name} ({_mb(best.stat().st_size)}) and results/{self.name}.json; freed {_mb(freed)} "
              f"({' and '.join(names) or 'nothing'}: only a resume needs {'them' if len(names) > 1 else 'it'})")
        return self.record

    def _free_finished(self):
        """Remove _last.pt and _prev.pt of a finished run; returns (bytes freed, the names removed)."""
        freed, names = 0, []
        for key in ("last", "prev"):
            with contextlib.suppress(OSError):
                size = self.paths[key].stat().st_size
                self.paths[key].unlink()
                freed, names = freed + size, [*names, self.paths[key].name]
        return freed, names

    def _wall(self):
        return self.spent + time.perf_counter() - self.t_start

    def _record(self, status, **extra):
        val = self.history["val_acc"]
        best = self.best["epoch"] if val else None
        self.record = save_results(run_record(self.name, self.settings, self.history, self.params, self.device,
                                              self._wall(), status, best_epoch=best, **extra), self.output_dir)
        return self.record


# ---- results files ------------------------------------------------------------------------------

RECORD_FIELDS = ("experiment", "status", "quick", "config", "params", "epochs_run", "best_epoch", "final_train_acc",
                 "final_test_acc", "best_val_acc", "test_acc_at_best_val", "wall_time_s", "device", "versions",
                 "finished_at", "history")


def run_record(name, settings, history, params, device, wall_time, status, best_epoch=None, **extra):
    """A results file's content: settings, history, accuracies, time, hardware and versions (03-06, through fit)."""
    test, val = history["test_acc"], history["val_acc"]
    return {
        "experiment": name, "status": status, "quick": bool(settings.get("quick")), "config": settings,
        "params": params, "epochs_run": len(history["epoch"]), "best_epoch": best_epoch, **extra,
        "final_train_acc": history["train_acc"][-1] if history["train_acc"] else None,
        "final_test_acc": test[-1] if test else None, "best_val_acc": max(val, default=None),
        "test_acc_at_best_val": test[best_epoch - 1] if best_epoch and len(test) >= best_epoch else None,
        "wall_time_s": wall_time, "device": device, "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "history": history,
    }


def record_checksum(record):
    """A checksum over a results record but itself: a hand-edited number no longer matches (03-06; the class table)."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def save_results(record, output_dir="outputs"):
    """Write OUTPUT_DIR/results/<experiment>.json, whole or not at all, with its checksum (03-06, through fit)."""
    record = {**record, "checksum": record_checksum(record)}
    path = Path(output_dir) / "results" / f"{record['experiment']}.json"
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return record


def _complete_record(record):
    """A record with every field the code reads; those an older format lacks become None (shown as '-')."""
    history = record.get("history") if isinstance(record.get("history"), dict) else {}
    full = {field: record.get(field) for field in RECORD_FIELDS}
    full.update({k: v for k, v in record.items() if k not in full})
    full["history"] = {k: history.get(k, []) for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                                                      "test_loss", "test_acc", "epoch_time", "lr")}
    full["history"]["steps_per_epoch"] = history.get("steps_per_epoch")
    full["config"] = record.get("config") if isinstance(record.get("config"), dict) else {}
    full["status"] = record.get("status") or "unknown"
    full["quick"] = bool(record.get("quick"))
    if full["epochs_run"] is None:
        full["epochs_run"] = len(full["history"]["epoch"])
    return full


def load_results(output_dir="outputs"):
    """Every readable results file in OUTPUT_DIR/results, by experiment; bad, old and doubled files flagged (03-07).

    A file that is not a record is skipped with a warning naming it; a record in an older format is shown with '-'
    for what it lacks; two files naming one experiment (Drive's "Copy of ...") keep the one named after it.
    """
    out, where = {}, {}
    for path in sorted((Path(output_dir) / "results").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("experiment"), str):
                raise ValueError("not a results record (no experiment name)")
        except (ValueError, OSError, UnicodeDecodeError) as err:
            warnings.warn(f"skipped {path}: {type(err).__name__}: {str(err)[:120]}", stacklevel=2)
            continue
        missing = [f for f in RECORD_FIELDS if f not in record and f != "quick"]
        if missing:
            warnings.warn(f"{path} is in an older format (it has no {', '.join(missing)}): shown as '-'", stacklevel=2)
        name = record["experiment"]
        if name in out:
            keep, drop = (path, where[name]) if path.stem == name else (where[name], path)
            warnings.warn(f"{where[name]} and {path} both hold experiment '{name}' (Drive's 'Copy of ...' makes such "
                          f"copies): using {keep.name}; rename or delete {drop.name}", stacklevel=2)
            if keep != path:
                continue
        out[name], where[name] = _complete_record(record), path
    return out


# ---- exercises and hand-in ----------------------------------------------------------------------

SELF_CHECKS = {}  # exercise: right or not, at the last check_answer call in this kernel (goes into the hand-in)


def _close(answer, value, abs_tol=0.0, rel_tol=0.0):
    return _real(float(answer)) and math.isclose(float(answer), value, abs_tol=abs_tol, rel_tol=rel_tol)


def _peak_step(scheduler):
    return int(scheduler._schedule_phases[0]["end_step"])


ANSWER_CHECKS = {  # exercise: a hash of the fixed answer, or a function of the answer and the student's own run
    "01.2": lambda answer, std: _close(answer, std[0] / 0.2023, abs_tol=0.01),
    "01.3": lambda answer: _close(answer, -CIFAR10_MEAN[0] / CIFAR10_STD[0], abs_tol=0.01),
    "02.1": lambda answer, result: _close(answer, result.suggestions["minimum"] / result.suggestions["valley"],
                                          rel_tol=0.1),
    "03.1": "sha256:fbe20eb9ecce5095",  # the share of the parameters in layer4
    "03.2": lambda answer, scheduler: int(answer[0]) == scheduler.total_steps
    and abs(int(answer[1]) - _peak_step(scheduler)) <= 1,
    "04.1": lambda answer, record: _close(answer, max(record["history"]["test_acc"])
                                          - record["history"]["test_acc"][-1], abs_tol=0.01),
    "05.1": "sha256:d7e4f49c1e1f6dda",  # how much more layer4 computes at stride 1
    "05.2": lambda answer, record: sorted(int(a) for a in answer) == lr_drops(record["history"]),
    "06.1": "sha256:9fbcb7dd9db1a149",  # the parameters of a norm layer
    "06.2": lambda answer, row: str(answer).strip().lower() == max(row, key=row.get),
    "07.1": lambda answer, cm: tuple(str(a).strip().lower() for a in answer) == most_confused(cm, 1)[0][:2],
    "07.2": "sha256:26be318a824e400d",  # the channel weights at layer2
}


def _answer_key(answer):
    """An answer in one canonical spelling: '11,173,962' and 11173962.0 read alike, (8, 8) reads '8x8'."""
    if isinstance(answer, (bool, np.bool_)):
        raise TypeError("True/False is not an answer to this exercise")
    if isinstance(answer, (list, tuple)):
        return "x".join(_answer_key(a) for a in answer)
    if isinstance(answer, (int, np.integer)):
        return str(int(answer))
    if isinstance(answer, (float, np.floating)):
        return str(int(answer)) if float(answer).is_integer() else f"{float(answer):g}"
    text = re.sub(r"[\s,_]", "", str(answer).lower())
    return str(int(float(text))) if re.fullmatch(r"-?\d+(\.0*)?", text) else text


def _answer_hash(exercise, answer):
    return "sha256:" + hashlib.sha256(f"{exercise}:{_answer_key(answer)}".encode()).hexdigest()[:16]


def _blank(answer):
    return answer is None or (isinstance(answer, str) and not answer.strip())


def _jsonable(value):
    """value as JSON would give it back (tuples become lists), or its repr."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def notebook_spec(notebook, folder=None):
    """A course notebook's parameters (name: default) and exercise ids, from its file (every notebook's hand-in)."""
    path = Path(folder or COURSE_ROOT / "notebooks") / f"{notebook}.ipynb"
    cells = json.loads(path.read_text())["cells"]
    source = lambda c: "".join(c["source"]) if isinstance(c["source"], list) else c["source"]  # noqa: E731
    params = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assigns = [t for t in ast.parse(source(params)).body if isinstance(t, ast.Assign) and len(t.targets) == 1
               and isinstance(t.targets[0], ast.Name)]
    exercises = [f"{a}.{b}" for c in cells if c["cell_type"] == "code"
                 for a, b in re.findall(r"^ANSWER_(\d\d)_(\d+)\s*=", source(c), re.M)]
    return {"parameters": {t.targets[0].id: _jsonable(ast.literal_eval(t.value)) for t in assigns},
            "exercises": exercises}


def _write_zip(path, manifest, members):
    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=1))
            for arcname, source in members.items():
                z.write(source, arcname)

    _atomic_write(path, write)


def _print_hand_in(path, manifest, output_dir, images_dir):
    answers = ", ".join(manifest["answers"]) or "none"
    missing = f" (no answer yet: {', '.join(manifest['missing_answers'])})" if manifest["missing_answers"] else ""
    print(f"hand-in zip: {path.resolve()} ({_mb(path.stat().st_size)})")
    print(f"  student: {manifest['student'] or '(not set: type your name or ID into STUDENT and run this cell again)'}")
    runs = len(manifest["runs"])
    print(f"  inside: answers to {answers}{missing}; {len(manifest['figures'])} figures; results of {runs} "
          f"run{'s' * (runs != 1)}{' and ' + ', '.join(manifest['files']) if manifest['files'] else ''}")
    sizes = workspace_size(output_dir, images_dir)
    print("  workspace: " + ", ".join(f"{k} {_mb(v)}" for k, v in sizes.items() if v) +
          f" (total {_mb(sum(sizes.values()))} of a free Drive's 15 GB)")
    if manifest["quick"]:
        print("This is a QUICK run: its numbers mean nothing. Hand in the zip of a run with QUICK = False.")
    else:
        print("To hand in: (1) this zip; (2) the notebook with its outputs. On Colab, first File > Save a copy in "
              "Drive (a notebook opened from a link is not saved), then File > Download > Download .ipynb.")
