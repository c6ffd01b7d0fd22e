"""helpers.py: what the course teaches, in its order (every notebook imports it as H); each idea is written out in
the notebook its docstring names, then reused from here. What keeps runs safe lives in the `course` package, which
imports this module, never the reverse. Accuracies are in percent; images are uint8 HWC RGB until normalised."""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import random
import time
import warnings
from dataclasses import dataclass
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
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:0' or 'mps', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA GPU is visible; pass device='auto' or 'cpu' (course.start)")
    return device


def seed_everything(seed=0):
    """Seed python, numpy and torch (all devices) so a run can be repeated (every notebook)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global RNG is what we must seed)
    torch.manual_seed(seed)


def _whole(value):  # a whole number (python's or numpy's), not a bool: for the input checks below
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _real(value):  # a finite number (python's or numpy's), not a bool
    return (_whole(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


# =============================================================================================
# Data (notebook 01)
# =============================================================================================

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # official train split, [0, 1] units
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # the true per-channel std (not kuangliu's 0.2023, ...)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def load_cifar10(root="data", train=True, download=True, subset=None, seed=0):
    """CIFAR-10's python batches under root as (uint8 [N, 32, 32, 3], int64 [N]), fetched if missing (01)."""
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


def load_test_split(data_dir="data", subset=None, seed=0, download=True):
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
    """An albumentations 2.x pipeline from an AUGMENT dict; test: only Normalize; preview: every step fires (01)."""
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
    """Numpy images + labels, each image passed through an albumentations pipeline (03: make_loader builds it).

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
    """The loaders a training or analysis notebook needs, and the test images as arrays (02-06)."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    test_images: np.ndarray
    test_labels: np.ndarray


def make_data(data_dir="data", aug=None, batch_size=512, val_fraction=0.1, subset=None, seed=0,
              num_workers="auto", device="auto", download=True):
    """Train (augmented), validation (carved from train) and test loaders; fetches CIFAR-10 if missing (02-06)."""
    x, y = load_cifar10(data_dir, train=True, download=download, subset=subset, seed=seed)
    xt, yt = load_test_split(data_dir, subset=subset, seed=seed, download=download)
    tr, va = train_val_split(y, val_fraction, seed=seed)
    if val_fraction > 0 and len(np.unique(y[va])) < 10:
        raise ValueError(f"SUBSET={subset} too small for VAL_FRACTION={val_fraction}: a class gets no validation image")
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device, seed=seed)
    train = make_loader(x[tr], y[tr], make_transforms(aug, train=True), shuffle=True, **common)
    val = make_loader(x[va], y[va], make_transforms(train=False), **common) if len(va) else None
    test = make_loader(xt, yt, make_transforms(train=False), **common)
    return CifarLoaders(train, val, test, xt, yt)


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


def check_augment(aug):
    """AUGMENT with the defaults filled in; unknown keys or values out of range raise an error (01, 03-06)."""
    aug = {**AUGMENT, **(aug or {})}
    rules = "crop: True/False, flip: True/False, cutout: hole size 0-32 px (True: 16), rotate: max degrees 0-180"
    if set(aug) - set(AUGMENT):
        raise ValueError(f"unknown augmentation {sorted(set(aug) - set(AUGMENT))}; valid keys: {rules}")
    aug["cutout"] = 16 if aug["cutout"] is True else aug["cutout"] or 0
    if not (all(isinstance(aug[k], bool) for k in ("crop", "flip")) and _whole(aug["cutout"])
            and 0 <= aug["cutout"] <= 32 and _real(aug["rotate"]) and 0 <= aug["rotate"] <= 180):
        raise ValueError(f"bad augmentation values {aug}; allowed: {rules}")
    return aug


CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# What a CIFAR-10 batch pickle may name: numpy's array rebuilders, nothing that can run other code.
_PICKLE_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{module}", name) for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a batch file cannot run code."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refused to load '{module}.{name}': a CIFAR-10 batch holds only plain data")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core is numpy._core since 2.0
            return super().find_class(module, name)


def _missing_data_message(folder, missing):
    return (f"CIFAR-10 not found: {folder} has no {missing}. Put CIFAR-10's python-format batches there (the folder "
            f"'cifar-10-batches-py' inside {CIFAR10_URL}), or let the notebook download it where there is internet.")


def _download_cifar10(root):
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10_URL, download_root=str(root), md5=CIFAR10_MD5)
    except Exception as err:  # URLError, timeouts, bad archive: one clear message instead
        raise FileNotFoundError(f"{_missing_data_message(Path(root) / 'cifar-10-batches-py', 'batch files')} "
                                f"The download failed ({type(err).__name__}: {err}).") from None


def _read_batch(path):
    """One CIFAR-10 python batch file as (uint8 [N, 32, 32, 3], int64 [N]), its values checked."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except Exception as err:  # a refused class, a truncated pickle, wrong keys
        what = "not a plain CIFAR-10 batch (nothing was run)" if "refused" in str(err) else "truncated or corrupt"
        raise ValueError(f"{path} is {what}: {type(err).__name__}: {err}. Delete the 'cifar-10-batches-py' folder "
                         f"and fetch CIFAR-10 again") from None
    problem = ("pixels must be uint8 (0-255)" if data.dtype != np.uint8 else
               f"data has shape {data.shape} for {len(labels)} labels; expected [N, 3072]"
               if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels) else
               f"labels must be whole numbers 0-9, got {labels.dtype} {labels.min()}..{labels.max()}"
               if labels.dtype.kind not in "iu" or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9)
               else None)
    if problem:
        raise ValueError(f"{path}: {problem}; this is not CIFAR-10's format")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels.astype(np.int64)


# =============================================================================================
# Models: the CIFAR ResNets of every report (3x3 stride-1 stem, no max-pool) (03, 05, 06)
# =============================================================================================

NORMS = ("bn", "ln", "gn")


def _choice(value, valid, what):
    """Return value if it is one of valid, else raise a ValueError that lists them."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")
    return value


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

    def forward(self, x):  # x: (B, 3, 32, 32); e = block.expansion (1 for ResNet18/34, 4 for ResNet50)
        out = F.relu(self.norm1(self.conv1(x)))  # (B, 64, 32, 32)
        out = self.layer1(out)  # (B, 64e, 32, 32)
        out = self.layer2(out)  # (B, 128e, 16, 16)
        out = self.layer3(out)  # (B, 256e, 8, 8)
        out = self.layer4(out)  # (B, 512e, 4, 4), or 8x8 with last_stride=1
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 512 * expansion)
        return self.linear(out)  # (B, num_classes) logits


MODELS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
          "resnet50": (Bottleneck, (3, 4, 6, 3))}


def make_model(name="resnet18", norm="bn", num_classes=10, last_stride=2):
    """A CIFAR ResNet by name; last_stride=1 keeps layer4 at 8x8 with the same parameters (02-06)."""
    block, blocks = MODELS[_choice(name, tuple(MODELS), "model")]
    _choice(norm, NORMS, "norm")
    _choice(last_stride, (1, 2), "last_stride")
    return ResNet(block, blocks, num_classes=num_classes, norm=norm, last_stride=last_stride)


def count_params(model):
    """Number of trainable parameters (03, 05, 06)."""
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


def _check_range_test(optimizer, start_lr, end_lr, num_iter):
    """Refuse range-test settings that would run a meaningless test (a downward sweep, NaN, zero steps)."""
    if start_lr is not None and not (_real(start_lr) and start_lr > 0):
        raise ValueError(f"start_lr must be a positive number (or None: the optimizer's LR), got {start_lr!r}")
    first = optimizer.param_groups[0]["lr"] if start_lr is None else start_lr
    if not (_real(end_lr) and end_lr > first):
        raise ValueError(f"end_lr must be a number above the first LR of the test ({first:g}), got {end_lr!r}: the "
                         f"range test raises the LR from start_lr up to end_lr")
    if not (_whole(num_iter) and num_iter >= 2):
        raise ValueError(f"num_iter must be a whole number of steps, at least 2, got {num_iter!r}")


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


def _stop_if_not_finite(first_bad, lrs, steps, desc):
    if first_bad >= 0:
        raise Diverged(f"the training loss became NaN or infinite at step {first_bad + 1} of {steps} ({desc}) with "
                       f"LR {lrs[first_bad]:.3g}")


def train_one_epoch(model, loader, optimizer, criterion, scheduler=None, scaler=None, device="cpu", dtype=None,
                    channels_last=False, lr_log=None, desc="train", progress=True):
    """One pass over loader, the step 03 writes by hand; returns (mean loss, accuracy %) while training (03)."""
    device = get_device(device)
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first step whose loss was NaN or infinite
    seen, lrs = 0, []
    bar = tqdm(total=len(loader), desc=desc, leave=False, disable=not progress)  # updated by hand, below
    for step, (x, y) in enumerate(loader):
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


def empty_history():
    """The per-epoch lists fit fills, plus the LR of every step (03-06)."""
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "epoch_time", "lr")
    return {"steps_per_epoch": None, **{k: [] for k in keys}}


def summarize(history, monitor="val_acc"):
    """The numbers to quote from a history: final accuracies, and the best epoch on the validation split (03-06)."""
    val, test = history["val_acc"], history["test_acc"]
    score = val if monitor == "val_acc" else [-v for v in history["val_loss"]]
    best = 1 + int(np.argmax(score)) if score else None  # the first best epoch; without validation: none
    return {"epochs_run": len(history["epoch"]), "best_epoch": best,
            "final_train_acc": history["train_acc"][-1] if history["train_acc"] else None,
            "final_test_acc": test[-1] if test else None, "best_val_acc": max(val, default=None),
            "test_acc_at_best_val": test[best - 1] if best and len(test) >= best else None,
            "wall_time_s": sum(history["epoch_time"]), "history": history}


class Diverged(RuntimeError):
    """Training broke down: a NaN or infinite loss, or one far above a uniform guess's (03-06, from fit)."""


UNIFORM_LOSS = math.log(10)  # the cross-entropy of a uniform guess over 10 classes: ln 10 = 2.30
# An epoch's mean training loss above this: the run exploded. Measured on 500 images (ResNet18, one epoch, batch 32):
# runs that recover average 12-20 in their first epoch (BatchNorm at LR 0.5-2, LayerNorm at 0.05-0.2); at LR 9, 37,000.
TRAIN_LOSS_LIMIT = 20 * UNIFORM_LOSS


def check_epoch(row, model):
    """Raise Diverged if an epoch's loss is NaN, infinite or exploded, or its weights are not finite (03).

    A finite evaluation loss is never judged by its size: eval-mode BatchNorm gives huge ones early in healthy runs."""
    for key in ("train_loss", "val_loss", "test_loss"):
        if row.get(key) is not None and not math.isfinite(row[key]):
            raise Diverged(f"in epoch {row['epoch']} the {key.replace('_', ' ')} is {row[key]}")
    if row["train_loss"] > TRAIN_LOSS_LIMIT:
        raise Diverged(f"in epoch {row['epoch']} the training loss averaged {row['train_loss']:.4g}, far above the "
                       f"{UNIFORM_LOSS:.2f} of a uniform guess (the limit is {TRAIN_LOSS_LIMIT:.3g})")
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise Diverged(f"after epoch {row['epoch']} the weights hold NaN or infinite values")


def fit(model, data, optimizer, scheduler=None, criterion=None, epochs=20, run=None, monitor="val_acc", amp=True,
        channels_last=True, device="auto", progress=True):
    """The loop 03 writes by hand, for `epochs` epochs, evaluated on validation and test after each (03-06).

    run=None: in memory, nothing written; returns summarize(history). run=ws.run(name) is told when training begins,
    after every epoch and at the end (resume, checkpoints, best weights, results record), and its record returned."""
    device = get_device(device)
    _choice(monitor, ("val_acc", "val_loss"), "monitor (the test set is never used to choose)")
    unit = step_unit(scheduler)
    if unit == "metric" and data.val is None:
        raise ValueError("ReduceLROnPlateau watches the validation split: set VAL_FRACTION > 0 "
                         "(the test set is only reported, never used to schedule)")
    criterion = criterion or nn.CrossEntropyLoss()
    channels_last = channels_last and device.type in ("cuda", "cpu")  # NHWC memory layout for the convolutions
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    dtype = amp_dtype(device) if amp else None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    on = dict(device=device, dtype=dtype, channels_last=channels_last)
    with run or contextlib.nullcontext():  # a run holds its lock until the end, and records a breakdown
        history = run.begin(model, optimizer, scheduler, criterion, data, epochs, scaler=scaler, monitor=monitor) \
            if run else empty_history()  # a run's saved history: resume from its last epoch, or all done
        for epoch in range(len(history["epoch"]), epochs):
            t0, lrs = time.perf_counter(), []  # lrs: the LR of every step of this epoch
            set_epoch(data.train, epoch)  # this epoch's order and augmentations
            train_loss, train_acc = train_one_epoch(
                model, data.train, optimizer, criterion, scheduler=scheduler if unit == "batch" else None,
                scaler=scaler, lr_log=lrs, desc=f"epoch {epoch + 1}/{epochs}", progress=progress, **on)
            val_loss, val_acc = evaluate(model, data.val, criterion, **on) if data.val else (None, None)
            test_loss, test_acc = evaluate(model, data.test, criterion, **on)  # reported, never used to choose
            if unit == "epoch":
                scheduler.step()
            elif unit == "metric":
                scheduler.step(val_acc if monitor == "val_acc" else val_loss)
            row = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                       val_acc=val_acc, test_loss=test_loss, test_acc=test_acc, epoch_time=time.perf_counter() - t0)
            check_epoch(row, model)  # a NaN or exploding loss stops the run here
            for key, value in row.items():
                if value is not None:
                    history[key].append(value)
            history["lr"] += lrs
            history["steps_per_epoch"] = len(lrs)
            _log_epoch(history, epochs)
            if run:
                run.end_epoch(history, model, optimizer, scheduler, scaler)  # checkpoint, best weights, record
        return run.finish(model, history) if run else summarize(history, monitor)


def _log_epoch(history, epochs):
    """One line per epoch: losses, accuracies, the LR, the time and about how long is left."""
    h, e = history, len(history["epoch"])
    val = f" | val loss {h['val_loss'][-1]:.4f} acc {h['val_acc'][-1]:5.2f}%" if h["val_acc"] else ""
    left = np.mean(h["epoch_time"]) * (epochs - e) / 60
    print(f"epoch {e:3d}/{epochs} | train loss {h['train_loss'][-1]:.4f} acc {h['train_acc'][-1]:5.2f}%{val} | "
          f"test loss {h['test_loss'][-1]:.4f} acc {h['test_acc'][-1]:5.2f}% | lr {h['lr'][-1]:.3g} | "
          f"{h['epoch_time'][-1]:.1f}s" + (f" | about {left:.1f} min to go" if left > 0 else ""))


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
# Plots: every helper returns its figure; a notebook saves it (ws.savefig), then shows it
# =============================================================================================


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


def plot_images(rows, row_titles=None, titles=None, suptitle="", size=None):
    """A grid of images (rows of HWC or normalised CHW), pixels as pixels; titles: per row, a list or None (01, 07)."""
    n_rows = len(rows)
    title_rows = [r for r in range(n_rows) if titles is not None and titles[r] is not None]
    fig, axes = _image_grid(n_rows, max(len(r) for r in rows), title_rows=title_rows,
                            size=size or (1.3 if titles is None else 1.9))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            axes[r, c].imshow(to_display(image), interpolation="nearest")
            if r in title_rows:
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


def plot_lr_schedule(history, momentum=None, title="Learning rate used at every step"):
    """The LR used at every optimizer step on an epoch axis; with momentum (one per step), it too (03, 05)."""
    fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
    steps = np.arange(len(history["lr"])) / max(1, history["steps_per_epoch"])
    ax.plot(steps, history["lr"], label="learning rate")
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    if momentum is not None:
        twin = ax.twinx()
        twin.plot(steps[: len(momentum)], momentum[: len(steps)], color="C1", ls="--", label="momentum")
        twin.set_ylabel("momentum")
        fig.legend(loc="outside right upper")
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
    """Images, then a row of overlays per entry of maps ([N, H, W]), per_row images a group; one image: one row (07)."""
    shown = [to_display(image) for image in images]
    overlays = [[overlay_cam(image, m[i], alpha) for i, image in enumerate(shown)] for m in maps]
    if len(shown) == 1:  # the mistake explorer: the image and its maps side by side, each panel titled
        fig = plot_images([[shown[0], *(o[0] for o in overlays)]], titles=[[titles[0] if titles else "", *row_titles]],
                          suptitle=suptitle, size=2.2)
        shrink = 0.8
    else:
        rows, names, heads = [], [], []
        for s in range(0, len(shown), per_row):
            rows += [shown[s:s + per_row], *(o[s:s + per_row] for o in overlays)]
            names += ["image", *row_titles]
            heads += [titles[s:s + per_row] if titles is not None else None] + [None] * len(maps)
        fig = plot_images(rows, names, heads, suptitle, size=1.7)
        shrink = min(0.6, 4.0 / len(rows))
    if maps:
        heat = plt.cm.ScalarMappable(cmap="jet", norm=matplotlib.colors.Normalize(0, 1))
        fig.colorbar(heat, ax=fig.axes, shrink=shrink, aspect=25,
                     label="map value (0: none, 1: strongest)")
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
            raise RuntimeError("the target layer gave no feature map in the forward pass; is it part of the model?")
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


def map_correlation(a, b):
    """Spearman's rank correlation of each pair of maps a[i], b[i]; tied pixels (ReLU's zeros) share a rank (07)."""
    from scipy.stats import spearmanr  # scipy comes with albumentations

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant map has no rank order: its correlation is NaN
        return np.array([spearmanr(np.ravel(x), np.ravel(y)).statistic for x, y in zip(a, b)], dtype=float)


def mean_activation(model, images, layer="layer3"):
    """Where a layer is active at all, whatever the class: its channel mean, upsampled to the images' size (07)."""
    store = {}
    handle = _layer(model, layer).register_forward_hook(lambda module, inputs, output: store.update(A=output.detach()))
    try:
        with torch.no_grad():
            model(images.to(next(model.parameters()).device))
    finally:
        handle.remove()
    mean = store["A"].float().mean(1, keepdim=True)  # (N, 1, h, w)
    return F.interpolate(mean, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].cpu()


def overlay_cam(image, cam, alpha=0.5, cmap="jet"):
    """Blend a [0, 1] heatmap (matplotlib colormap, RGB) onto a float RGB image in [0, 1] (07)."""
    image = np.asarray(image, dtype=np.float32)
    cam = np.asarray(cam.detach().cpu() if isinstance(cam, torch.Tensor) else cam, dtype=np.float32)
    _check_overlay(image, cam)
    heat = matplotlib.colormaps[cmap](np.clip(cam, 0, 1))[..., :3]
    return (1 - alpha) * image + alpha * heat


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
                         layer=W.Dropdown(options=list(layers), value=layers[-1]),
                         method=W.Dropdown(options=["Grad-CAM", "Grad-CAM++"]),
                         for_class=W.Dropdown(options=["predicted", "actual"], description="class"))


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
    values = targets.tolist() if isinstance(targets, (torch.Tensor, np.ndarray)) else targets
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) != n or not all(_whole(v) and 0 <= v < classes for v in values):
        raise ValueError(f"targets must be None or {n} class indices (whole numbers from 0 to {classes - 1}, one per "
                         f"image), got {values!r}")
    return torch.tensor(values, dtype=torch.long, device=logits.device)
