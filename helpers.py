"""helpers.py: the one module every notebook imports.

Each idea here is first written out and explained in a notebook (named in its docstring), then reused
from this module. Sections, in teaching order: setup, data (01), models (03), training with checkpoints
(03-05), results, LR finder (02), evaluation (07), plots, Grad-CAM (07). Accuracies are in percent;
images are uint8 HWC RGB until they are normalised into float CHW tensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import platform
import random
import sys
import time
import warnings
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


def workspace(drive_folder, output_dir="outputs", images_dir="images"):
    """(OUTPUT_DIR, IMAGES_DIR) of the course workspace: on Colab inside drive_folder on Google Drive, else as given."""
    if "google.colab" not in sys.modules:
        return output_dir, images_dir  # a local checkout: its own folders
    if not drive_folder:
        print("DRIVE_FOLDER = None: outputs and figures stay in this runtime; a reset or disconnect loses them")
        return output_dir, images_dir
    from google.colab import drive

    if not Path("/content/drive/MyDrive").exists():
        drive.mount("/content/drive")  # asks once for permission
    root = Path(drive_folder)
    root.mkdir(parents=True, exist_ok=True)
    print(f"workspace on Google Drive: {root} (checkpoints, results and figures survive a runtime reset)")
    return str(root / output_dir), str(root / images_dir)


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


# name: (kind, low, high, None allowed). Kinds: "int" (whole numbers), "float", "workers" (int or "auto").
PARAMETER_RULES = {
    "EPOCHS": ("int", 1, 1000, False), "SUBSET": ("int", 20, 50_000, True), "BATCH_SIZE": ("int", 2, 4096, False),
    "SEED": ("int", 0, 2**31 - 1, False), "N_SEEDS": ("int", 1, 10, False), "LR": ("float", 1e-6, 10.0, True),
    "VAL_FRACTION": ("float", 0.0, 0.5, False), "MOMENTUM": ("float", 0.0, 0.999, False),
    "WEIGHT_DECAY": ("float", 0.0, 0.1, False), "LABEL_SMOOTHING": ("float", 0.0, 0.5, False),
    "PCT_START": ("float", 0.05, 0.95, False), "GAMMA": ("float", 1e-4, 1.0, False),
    "STEP_SIZE": ("int", 1, 1000, False), "PATIENCE": ("int", 0, 100, False), "FACTOR": ("float", 1e-4, 0.99, False),
    "NUM_WORKERS": ("workers", 0, 32, False), "THRESHOLD": ("float", 0.0, 100.0, False),
    "NUM_ITER": ("int", 20, 10_000, False), "N_CAM": ("int", 1, 1000, False), "ALPHA": ("float", 0.0, 1.0, False),
}


def check_parameters(**params):
    """Check notebook parameters against PARAMETER_RULES before any time is spent; one error lists every bad one."""
    problems = []
    for name, value in params.items():
        if name in ("MODEL", "NORM"):  # names: one of a list
            valid = tuple(MODELS) if name == "MODEL" else NORMS
            problems += [] if value in valid else [f"{name} must be one of {', '.join(valid)}, got {value!r}"]
            continue
        if name == "AUGMENT":
            try:
                check_augment(value)
            except ValueError as err:
                problems.append(f"AUGMENT: {err}")
            continue
        kind, low, high, none_ok = PARAMETER_RULES[name]
        if value is None and none_ok:
            continue
        whole = isinstance(value, int) and not isinstance(value, bool)
        ok = (whole or (kind == "float" and isinstance(value, float) and math.isfinite(value))
              or (kind == "workers" and value == "auto"))
        if not ok or (value != "auto" and not low <= value <= high):
            what = {"int": "a whole number", "float": "a number", "workers": '"auto" or a whole number'}[kind]
            problems.append(f"{name} must be {what} from {low:g} to {high:g}{' (or None)' if none_ok else ''}, "
                            f"got {value!r}")
    if problems:
        raise ValueError("bad parameter(s) in the parameters cell:\n  " + "\n  ".join(problems))


# =============================================================================================
# Data (notebook 01)
# =============================================================================================

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # official train split, [0, 1] units
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # the true per-channel std (not kuangliu's 0.2023, ...)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
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


def load_cifar10(root="data", train=True, download=False, subset=None, seed=0):
    """Load CIFAR-10 from root/cifar-10-batches-py as (uint8 [N, 32, 32, 3], int64 [N]) (01)."""
    folder = Path(root) / "cifar-10-batches-py"
    names = _TRAIN_FILES if train else ("test_batch",)
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


def load_test_split(data_dir="data", subset=None, seed=0, download=False):
    """The test split; with a train SUBSET, a class-balanced fifth of that size (CIFAR's 5:1 ratio)."""
    return load_cifar10(data_dir, train=False, download=download,
                        subset=None if subset is None else max(10, subset // 5), seed=seed)


def balanced_subset(labels, n, seed=0):
    """Sorted indices of n samples with the classes as equal as possible (random within a class)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 1 <= int(n) <= len(labels):
        raise ValueError(f"SUBSET must be from 1 to {len(labels):,} (the images there are), got {n}")
    rng = np.random.default_rng(seed)
    counts = {c: int((labels == c).sum()) for c in classes}
    base, extra = divmod(int(n), len(classes))
    want = {c: base + (i < extra) for i, c in enumerate(classes)}
    if any(want[c] > counts[c] for c in classes):
        raise ValueError(f"SUBSET={n} needs {max(want.values())} images of every class; some class has fewer")
    keep = [rng.choice(np.flatnonzero(labels == c), size=want[c], replace=False) for c in classes]
    return np.sort(np.concatenate(keep))


def train_val_split(labels, val_fraction=0.1, seed=0):
    """Stratified split of the train split into (train indices, validation indices)."""
    labels = np.asarray(labels)
    if not 0 <= val_fraction <= 0.5:
        raise ValueError(f"VAL_FRACTION must be from 0 to 0.5, got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    val = np.sort(np.concatenate([v[: int(round(val_fraction * len(v)))] for v in val]))
    return np.setdiff1d(np.arange(len(labels)), val), val


def dataset_mean_std(images):
    """Per-channel mean and std of uint8 [N, H, W, C] images, in [0, 1] units (01)."""
    channels = [np.asarray(images)[..., c] for c in range(images.shape[-1])]  # one channel at a time: less memory
    mean = tuple(round(float(ch.mean(dtype=np.float64)) / 255, 6) for ch in channels)
    std = tuple(round(float(ch.std(dtype=np.float64)) / 255, 6) for ch in channels)
    return mean, std


AUGMENT = {"crop": True, "flip": True, "cutout": 0, "rotate": 0}  # pad-4 crop + flip: the headline recipe


def check_augment(aug):
    """AUGMENT with the defaults filled in; unknown keys raise an error listing the valid ones."""
    aug = {**AUGMENT, **(aug or {})}
    unknown = set(aug) - set(AUGMENT)
    if unknown:
        raise ValueError(f"unknown augmentation {sorted(unknown)}; valid keys: {', '.join(AUGMENT)} "
                         f"(crop: bool, flip: bool, cutout: hole size in px or 0, rotate: max degrees or 0)")
    aug["cutout"] = 16 if aug["cutout"] is True else int(aug["cutout"] or 0)
    return aug


def make_transforms(aug=None, train=True, normalize=True, preview=False, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """An albumentations 2.x pipeline from an AUGMENT dict (01); the test pipeline only normalises.

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


class CIFARDataset(Dataset):
    """Numpy images + labels, each passed through an albumentations pipeline."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, int(self.labels[i])


def _epoch_seed(seed, epoch):
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _seed_worker(worker_id):
    """In each loader worker: seed the augmentations from torch's worker seed (set by the loader's generator)."""
    info = torch.utils.data.get_worker_info()
    if info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(info.seed % 2**32)


def make_loader(images, labels, transform=None, batch_size=512, shuffle=False, num_workers="auto",
                device="cpu", seed=0):
    """A DataLoader over numpy arrays; set_epoch() makes each epoch's order and augmentations repeatable."""
    device = get_device(device)
    workers = (0 if device.type == "cpu" else min(8, os.cpu_count() or 1)) if num_workers == "auto" else num_workers
    dataset = CIFARDataset(images, labels, transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                        drop_last=shuffle and len(dataset) % batch_size == 1,  # no batch of one for BatchNorm
                        pin_memory=device.type == "cuda", worker_init_fn=_seed_worker,
                        generator=torch.Generator().manual_seed(seed))
    loader.seed = seed
    return loader


def set_epoch(loader, epoch):
    """Reseed a make_loader loader: shuffling and augmentations become a function of (seed, epoch) only."""
    if hasattr(loader, "set_epoch"):  # a loader that seeds itself (benchmarks/gpu_loader.py)
        return loader.set_epoch(epoch)
    seed = _epoch_seed(loader.seed, epoch)
    loader.generator.manual_seed(seed)  # the shuffle order and every worker's seed come from it
    if loader.num_workers == 0 and loader.dataset.transform is not None:
        loader.dataset.transform.set_random_seed(seed)


@dataclass
class CifarData:
    """Everything a training or analysis notebook needs from the data."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    test_images: np.ndarray
    test_labels: np.ndarray


def make_data(data_dir="data", aug=None, batch_size=512, val_fraction=0.1, subset=None, seed=0,
              num_workers="auto", device="auto", download=False):
    """Train (augmented), validation (carved from train) and test loaders for CIFAR-10 (03)."""
    x, y = load_cifar10(data_dir, train=True, download=download, subset=subset, seed=seed)
    xt, yt = load_test_split(data_dir, subset=subset, seed=seed, download=download)
    tr, va = train_val_split(y, val_fraction, seed=seed)
    if len(va) and len(np.unique(y[va])) < 10:
        raise ValueError(f"VAL_FRACTION={val_fraction} leaves no validation image for some class; raise it or SUBSET")
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device, seed=seed)
    train = make_loader(x[tr], y[tr], make_transforms(aug, train=True), shuffle=True, **common)
    val = make_loader(x[va], y[va], make_transforms(train=False), **common) if len(va) else None
    return CifarData(train, val, make_loader(xt, yt, make_transforms(train=False), **common), xt, yt)


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
# Models: the CIFAR ResNets of every seed (3x3 stride-1 stem, no max-pool) (03, 05, 06)
# =============================================================================================

NORMS = ("bn", "ln", "gn")


def make_norm(norm, channels, gn_groups=32):
    """BatchNorm ("bn"), LayerNorm over C, H, W ("ln" = GroupNorm with one group) or GroupNorm ("gn") (06)."""
    _choice(norm, NORMS, "norm")
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(1 if norm == "ln" else min(gn_groups, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet18/34) (03)."""

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


def make_model(name="resnet18", norm="bn", num_classes=10, last_stride=2):
    """A CIFAR ResNet by name; last_stride=1 keeps layer4 at 8x8 (same parameter count) (05)."""
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

    summary(model, input_size, device="cuda" if next(model.parameters()).is_cuda else "cpu")


# =============================================================================================
# Training: one epoch, evaluation, and fit with checkpoints, resume and a results file (03)
# =============================================================================================

SPEED_KEYS = ("num_workers", "amp", "channels_last", "device", "data_on_gpu")  # never make a saved run stale


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class StaleRun(RuntimeError):
    """A saved run was made with other settings than the ones asked for now."""


def amp_dtype(device):
    """Mixed precision: bf16 on GPUs with native bf16 (compute capability 8.0+), fp16 below (T4), None off CUDA."""
    device = get_device(device)
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16  # is_bf16_supported() is also True when emulated


def step_unit(scheduler):
    """When fit steps a scheduler: "batch" (OneCycleLR), "metric" (ReduceLROnPlateau) or "epoch" (04, 05)."""
    sched = torch.optim.lr_scheduler
    if scheduler is None:
        return None
    if isinstance(scheduler, sched.ReduceLROnPlateau):
        return "metric"
    return "batch" if isinstance(scheduler, (sched.OneCycleLR, sched.CyclicLR)) else "epoch"


def _to(device, x, y, channels_last=False):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(model, loader, optimizer, criterion, scheduler=None, scaler=None, device="cpu", dtype=None,
                    channels_last=False, lr_log=None, desc="train", progress=True):
    """One pass over loader (the step 03 writes by hand); returns (mean loss, accuracy %) while training."""
    device = get_device(device)
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a NaN/inf loss
    seen, lrs = 0, []
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress)
    for step, (x, y) in enumerate(bar):
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
        if step % 10 == 0 or step == len(loader) - 1:  # .item() syncs: not every step
            if first_bad.item() >= 0:
                bad = first_bad.item()
                raise Diverged(f"the loss became NaN or infinite at step {bad + 1} of {len(loader)} ({desc}) with LR "
                               f"{lrs[bad]:.3g}: the LR is too high for this model; try a lower LR (e.g. a tenth)")
            if progress:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                                lr=f"{lrs[-1]:.3g}")
    if lr_log is not None:
        lr_log.extend(lrs)
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


@torch.no_grad()
def evaluate(model, loader, criterion, device="cpu", dtype=None, channels_last=False):
    """Mean loss and accuracy % over a loader, in eval mode."""
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


def run_config(model, optimizer, scheduler, criterion, epochs, data, config=None):
    """The settings that define a run: the notebook's config plus what the objects themselves say."""
    opt = {k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float, bool, tuple)) and
           k not in ("foreach", "fused", "differentiable", "capturable", "maximize")}
    cfg = {**(config or {}), "model": getattr(model, "arch", type(model).__name__), "epochs": epochs,
           "batch_size": data.train.batch_size, "train_images": len(data.train.dataset),
           "optimizer": {"name": type(optimizer).__name__, **opt},
           "scheduler": type(scheduler).__name__ if scheduler is not None else None, "criterion": repr(criterion)}
    return json.loads(json.dumps(cfg))  # as the results file will hold it (tuples become lists)


def _check_same_settings(what, saved, now):
    """Raise StaleRun naming every result-changing setting that differs; speed-only settings never count."""
    keys = [k for k in dict.fromkeys([*saved, *now]) if k not in SPEED_KEYS and saved.get(k) != now.get(k)]
    if keys:
        changes = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys)
        raise StaleRun(f"{what} was run with other settings ({changes}). Nothing was changed. To keep it: choose "
                       f"another EXPERIMENT name. To start over: set START_OVER = True (its files move to archive/).")


def fit(model, data, optimizer, scheduler=None, criterion=None, epochs=20, name="run", output_dir="outputs",
        config=None, monitor="val_acc", start_over=False, amp=True, channels_last=True, device="auto", progress=True):
    """Train and evaluate for `epochs`; checkpoint every epoch, resume after a disconnect; returns the results record.

    A finished run with the same settings is loaded, not trained again. Notebook 03 writes the loop out by hand.
    """
    device = get_device(device)
    _choice(monitor, ("val_acc", "val_loss"), "monitor (the test set is never used to choose)")
    unit = step_unit(scheduler)
    if unit == "metric" and data.val is None:
        raise ValueError("ReduceLROnPlateau watches the validation split: set VAL_FRACTION > 0 "
                         "(the test set is only reported, never used to schedule)")
    criterion = criterion or nn.CrossEntropyLoss()
    cfg = run_config(model, optimizer, scheduler, criterion, epochs, data, config)
    paths = checkpoint_paths(output_dir, name)
    if start_over:
        archive_run(output_dir, name)
    done = load_results(output_dir).get(name)
    if done and done["status"] == "diverged":
        print(f"'{name}' diverged last time ({done.get('error', '')}); its files go to archive/, training again")
        archive_run(output_dir, name)
        done = None
    if done:
        _check_same_settings(f"'{name}' in {output_dir}", done["config"], cfg)
    cuda = device.type == "cuda"
    channels_last = channels_last and device.type in ("cuda", "cpu")  # NHWC: 1.25x on our 2-core CPU too
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = cuda
    dtype = amp_dtype(device) if amp else None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    history = {"steps_per_epoch": len(data.train), **{k: [] for k in (
        "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "epoch_time", "lr")}}
    start, spent, best = 0, 0.0, {"epoch": 0, "score": -math.inf, "model": None}
    resume = next((p for p in (paths["last"], paths["prev"]) if p.exists()), None)
    if done and done["status"] == "complete" and resume is None:
        raise FileNotFoundError(f"'{name}' finished earlier ({done['epochs_run']} epochs) but {paths['last']} is "
                                f"missing: restore it (e.g. from Drive's bin), or set START_OVER = True to train again")
    if resume is not None:
        ckpt = load_checkpoint(resume, model)
        _check_same_settings(resume, ckpt["config"], cfg)
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        history, start, spent, best = ckpt["history"], ckpt["epoch"], ckpt["wall_time"], ckpt["best"]
        _set_rng_state(ckpt["rng"])
        _repair_best(paths["best"], best, ckpt)
        print(f"'{name}': loaded epoch {start}/{epochs} from {resume}" + (" (finished)" if start >= epochs else ""))
    run = dict(device=device, dtype=dtype, channels_last=channels_last)
    t_start = time.perf_counter()
    record = lambda status, **extra: save_results(run_record(  # noqa: E731
        name, cfg, history, model, device, spent + time.perf_counter() - t_start, status, **extra), output_dir)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        set_epoch(data.train, epoch)
        try:
            tr_loss, tr_acc = train_one_epoch(model, data.train, optimizer, criterion, scaler=scaler,
                                              scheduler=scheduler if unit == "batch" else None, lr_log=history["lr"],
                                              desc=f"epoch {epoch + 1}/{epochs}", progress=progress, **run)
        except KeyboardInterrupt:
            print(f"Interrupted in epoch {epoch + 1}: {paths['last']} holds epoch {epoch}; run the cell again.")
            raise
        except Diverged as err:
            record("diverged", error=str(err))
            raise Diverged(f"'{name}' stopped in epoch {epoch + 1}: {err}. The last good checkpoint (epoch {epoch}) "
                           f"is kept; the run is recorded as diverged and restarts when run again.") from None
        val_loss, val_acc = evaluate(model, data.val, criterion, **run) if data.val else (None, None)
        te_loss, te_acc = evaluate(model, data.test, criterion, **run)
        if unit == "epoch":
            scheduler.step()
        elif unit == "metric":
            scheduler.step(val_acc if monitor == "val_acc" else val_loss)
        for k, v in [("epoch", epoch + 1), ("train_loss", tr_loss), ("train_acc", tr_acc), ("val_loss", val_loss),
                     ("val_acc", val_acc), ("test_loss", te_loss), ("test_acc", te_acc),
                     ("epoch_time", time.perf_counter() - t0)]:
            if v is not None:
                history[k].append(v)
        score = te_acc if val_acc is None else (val_acc if monitor == "val_acc" else -val_loss)  # no val split: final
        if val_acc is None or score > best["score"]:
            best = {"epoch": epoch + 1, "score": score, "model": _cpu_state(model)}
        val_txt = f" | val loss {val_loss:.4f} acc {val_acc:5.2f}%" if data.val else ""
        eta = np.mean(history["epoch_time"]) * (epochs - epoch - 1) / 60
        print(f"epoch {epoch + 1:3d}/{epochs} | train loss {tr_loss:.4f} acc {tr_acc:5.2f}%{val_txt} | "
              f"test loss {te_loss:.4f} acc {te_acc:5.2f}% | lr {history['lr'][-1]:.3g} | "
              f"{history['epoch_time'][-1]:.1f}s" + (f" | about {eta:.1f} min to go" if eta > 0 else ""))
        ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), history=history, epoch=epoch + 1,
                    scheduler=scheduler.state_dict() if scheduler is not None else None, best=best, config=cfg,
                    scaler=scaler.state_dict() if scaler is not None else None, rng=_rng_state(),
                    arch=getattr(model, "arch", None), wall_time=spent + time.perf_counter() - t_start, experiment=name)
        save_checkpoint(paths["last"], keep_previous=paths["prev"], **ckpt)
        _repair_best(paths["best"], best, ckpt)
        rec = record("complete" if epoch + 1 == epochs else "running")
    return rec if start < epochs else (done or record("complete"))


# =============================================================================================
# Checkpoints: atomic, every epoch, loaded with weights_only=True
# =============================================================================================


def checkpoint_paths(output_dir, name):
    """A run's checkpoints: <name>_last.pt (every epoch), _prev.pt (the epoch before) and _best.pt (by validation)."""
    d = Path(output_dir) / "checkpoints"
    return {"dir": d, "last": d / f"{name}_last.pt", "prev": d / f"{name}_prev.pt", "best": d / f"{name}_best.pt"}


def save_checkpoint(path, keep_previous=None, **state):
    """torch.save to a temporary file, then os.replace: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)  # a kill right here leaves the previous epoch to resume from
    os.replace(tmp, path)


def _cpu_state(model):
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _repair_best(path, best, ckpt):
    """Write <name>_best.pt from the best weights stored in last.pt, unless it already holds that epoch."""
    if best["model"] is None:
        return
    with contextlib.suppress(Exception):
        if torch.load(path, map_location="cpu", weights_only=True)["epoch"] == best["epoch"]:
            return
    hist = {k: (v[: best["epoch"]] if isinstance(v, list) else v) for k, v in ckpt["history"].items()}
    save_checkpoint(path, model=best["model"], epoch=best["epoch"], arch=ckpt["arch"], config=ckpt["config"],
                    history=hist, experiment=ckpt["experiment"])


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
                                f"OUTPUT_DIR/checkpoints/<experiment>_last.pt and _best.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        size = path.stat().st_size
        raise ValueError(f"{path} is damaged ({size:,} bytes; {type(err).__name__}: {reason}). To go on: run "
                         f"H.set_aside('{path}') and run the training cell again; it resumes from the epoch before "
                         f"(_prev.pt) if that is intact, else starts over.") from None
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


def set_aside(path):
    """Rename a damaged file to <name>.damaged-<time> (nothing is deleted); returns the new path."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d_%H%M%S')}")
    os.replace(path, dest)
    print(f"moved {path} to {dest}")
    return dest


def model_from_checkpoint(path, device="cpu"):
    """Rebuild the model a checkpoint was saved from and load its weights; returns (model, checkpoint)."""
    ckpt = load_checkpoint(path)
    if not ckpt.get("arch"):
        raise ValueError(f"{path} does not record its architecture; build the model and use load_checkpoint")
    model = make_model(**ckpt["arch"])
    load_checkpoint(path, model)
    return model.to(get_device(device)).eval(), ckpt


def archive_run(output_dir, name):
    """Move a run's results file and checkpoints to OUTPUT_DIR/archive/<name>_<time>/ (nothing is deleted)."""
    paths = checkpoint_paths(output_dir, name)
    files = [p for p in (Path(output_dir) / "results" / f"{name}.json", paths["last"], paths["prev"], paths["best"])
             if p.exists()]
    if files:
        dest = Path(output_dir) / "archive" / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
        dest.mkdir(parents=True, exist_ok=True)
        for path in files:
            os.replace(path, dest / path.name)
        print(f"moved '{name}' ({len(files)} files) to {dest}")


# =============================================================================================
# Results: one JSON file per run, one table
# =============================================================================================


def run_record(name, config, history, model, device, wall_time, status, **extra):
    """The results file's content: settings, history, accuracies, time, hardware and versions."""
    best_val = max(history["val_acc"], default=None)
    return {
        "experiment": name, "status": status, "config": config, "params": count_params(model),
        "epochs_run": len(history["epoch"]), **extra,
        "final_train_acc": history["train_acc"][-1] if history["train_acc"] else None,
        "final_test_acc": history["test_acc"][-1] if history["test_acc"] else None,
        "best_val_acc": best_val,
        "test_acc_at_best_val": history["test_acc"][history["val_acc"].index(best_val)] if best_val else None,
        "wall_time_s": wall_time, "device": device_name(device), "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "history": history,
    }


def save_results(record, output_dir="outputs"):
    """Write OUTPUT_DIR/results/<experiment>.json atomically; returns the record."""
    path = Path(output_dir) / "results" / f"{record['experiment']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record


def load_results(output_dir="outputs"):
    """All readable results files in OUTPUT_DIR/results by experiment; a bad file is skipped with one warning."""
    out = {}
    for path in sorted((Path(output_dir) / "results").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not {"experiment", "status", "config", "history"} <= set(record):
                raise ValueError("not a results record (it lacks experiment/status/config/history)")
        except (ValueError, OSError, UnicodeDecodeError) as err:
            warnings.warn(f"skipped {path}: {type(err).__name__}: {str(err)[:120]}", stacklevel=2)
            continue
        out[record["experiment"]] = record
    return out


def print_expected(names, results_dir="outputs"):
    """Print what the course's own runs of these experiments reached (shipped results files), or 'not measured yet'."""
    runs = load_results(results_dir)
    for name in names:
        rec = runs.get(name)
        if rec and rec["status"] == "complete":
            print(f"{name}: {rec['final_test_acc']:.2f}% test accuracy after {rec['epochs_run']} epochs, "
                  f"{rec['wall_time_s'] / 60:.0f} min on {rec['device']}")
        else:
            print(f"{name}: not measured yet")


def results_table(output_dir="outputs"):
    """A markdown table of every run in OUTPUT_DIR/results (diverged and unfinished runs say so)."""
    lines = ["| experiment | model | scheduler | params | epochs | final train acc % | final test acc % | "
             "test acc at best val % | wall time | device |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name, rec in load_results(output_dir).items():
        cfg = rec["config"]
        epochs = f"{rec['epochs_run']}/{cfg.get('epochs')}" + {"complete": "", "diverged": " (diverged)"}.get(
            rec["status"], f" ({rec['status']})")
        test = "diverged" if rec["status"] == "diverged" else fmt(rec["final_test_acc"])
        model = cfg.get("model", {})
        model = f"{model.get('name')} {model.get('norm')}" if isinstance(model, dict) else model
        lines.append(f"| {name} | {model} | {cfg.get('scheduler')} | {rec['params']:,} | {epochs} | "
                     f"{fmt(rec['final_train_acc'])} | {test} | {fmt(rec['test_acc_at_best_val'])} | "
                     f"{rec['wall_time_s'] / 60:.1f} min | {rec['device']} |")
    return "\n".join(lines)


# =============================================================================================
# LR finder (notebook 02): torch-lr-finder's range test, with the suggestions and restore it leaves to us
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
    """LR range test with torch-lr-finder (02); model and optimizer are restored afterwards."""
    from torch_lr_finder import LRFinder

    _choice(step_mode, ("exp", "linear"), "step_mode")
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
    """Write the chosen LR to OUTPUT_DIR/lr_finder.json, which notebook 03 reads."""
    _choice(rule, tuple(result.suggestions), "rule")
    record = {"lr": result.suggestions[rule], "rule": rule, "batch_size": batch_size,
              "suggestions": result.suggestions, "diverged": result.diverged, **extra}
    path = Path(output_dir) / "lr_finder.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


def resolve_lr(lr=None, output_dir="outputs", batch_size=512, default=0.1):
    """The LR to train with: lr if given, else 02's range-test LR scaled linearly to batch_size, else default."""
    if lr is not None:
        return float(lr), f"LR {lr:g} (set in the parameters cell)"
    path = Path(output_dir) / "lr_finder.json"
    if not path.is_file():
        return float(default), f"LR {default:g}: the stated default (no LR range test result at {path}; run 02 first)"
    try:
        found = json.loads(path.read_text())
        scaled = float(found["lr"]) * batch_size / int(found["batch_size"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); run 02 again or delete it") from None
    return scaled, (f"LR {scaled:.3g}: the LR range test's '{found.get('rule')}' suggestion {found['lr']:.3g} "
                    f"at batch {found['batch_size']}, scaled linearly to batch {batch_size} ({path})")


# =============================================================================================
# Evaluation (notebook 07): one pass over the fixed-order test loader, everything else computed from it
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
    """Per-class recall (the per-class accuracy), precision and support from a confusion matrix."""
    cm = np.asarray(cm, dtype=float)
    tp, actual, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    return {"recall": 100 * recall, "precision": 100 * precision, "support": actual.astype(int)}


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


def _image_grid(rows, cols, size=1.9, title_rows=True):
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1.2, rows * size * (1.2 if title_rows else 1.0)),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
    return fig, axes


def plot_class_counts(train_labels, test_labels, classes=CLASSES):
    """Bar chart of images per class in the train and test splits."""
    fig, ax = plt.subplots(figsize=(9, 3.2), layout="constrained")
    x = np.arange(len(classes))
    for offset, (name, labels) in zip((-0.2, 0.2), (("train", train_labels), ("test", test_labels))):
        bars = ax.bar(x + offset, np.bincount(labels, minlength=len(classes)), width=0.4,
                      label=f"{name} ({len(labels):,})")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, classes, rotation=30)
    ax.set(ylabel="images", title="Images per class")
    ax.legend()
    return fig


def plot_images(rows, row_titles=None, titles=None, suptitle=""):
    """A grid of images (rows of uint8/float HWC or normalised CHW), pixels drawn as pixels."""
    fig, axes = _image_grid(len(rows), max(len(r) for r in rows), size=1.3 if titles is None else 1.9)
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
        ax_acc.annotate(f"final test {history['test_acc'][-1]:.2f}%", (epochs[-1], history["test_acc"][-1]),
                        textcoords="offset points", xytext=(-80, -25), arrowprops={"arrowstyle": "->"})
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def plot_lr_schedule(history, title="Learning rate used at every step"):
    """The LR actually used at every optimizer step, on an epoch axis."""
    fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
    ax.plot(np.arange(len(history["lr"])) / max(1, history["steps_per_epoch"]), history["lr"])
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    return fig


def plot_lr_finder(result, rules=None, log_lr=True, log_loss=False, title="LR range test"):
    """Loss against LR, each suggestion in rules (default: all) marked by a line at the exact LR it names."""
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
        ax.legend(fontsize=8, loc="lower right")
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
    """Confusion matrix heatmap (rows: actual, columns: predicted); normalize shows row fractions."""
    cm = np.asarray(cm, dtype=float)
    data = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(7.5, 6.2), layout="constrained")
    sns.heatmap(data, annot=True, fmt=".2f" if normalize else ".0f", cmap="Blues", xticklabels=classes,
                yticklabels=classes, ax=ax, cbar=True, annot_kws={"fontsize": 8})
    ax.set(xlabel="predicted", ylabel="actual",
           title="Confusion matrix" + (" (each row sums to 1)" if normalize else " (counts)"))
    return fig


def plot_per_class(metrics, classes=CLASSES):
    """Per-class accuracy (= recall) and precision as grouped bars."""
    fig, ax = plt.subplots(figsize=(9, 3.5), layout="constrained")
    x = np.arange(len(classes))
    for offset, key in zip((-0.2, 0.2), ("recall", "precision")):
        bars = ax.bar(x + offset, metrics[key], width=0.4, label="accuracy (recall)" if key == "recall" else key)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, classes, rotation=30)
    ax.set(ylabel="%", ylim=(0, 105), title="Per-class accuracy (= recall) and precision on the test set")
    ax.axhline(np.mean(metrics["recall"]), color="k", lw=0.8, ls="--", label="mean accuracy")
    ax.legend(loc="lower right")
    return fig


def plot_cams(images, maps, row_titles, titles=None, alpha=0.5, per_row=5, suptitle=""):
    """Images with one row of Grad-CAM overlays per entry of maps ([N, H, W] each), at most per_row images a group.

    A single image is laid out in one row: the image, then each map titled by row_titles.
    """
    single = len(images) == 1
    groups = [range(i, min(i + per_row, len(images))) for i in range(0, len(images), per_row)]
    shape = (1, len(maps) + 1) if single else (len(groups) * (len(maps) + 1), min(per_row, len(images)))
    fig, axes = _image_grid(*shape, size=2.2 if single else 1.9, title_rows=single or titles is not None)
    for g, idx in enumerate(groups):
        top = g * (len(maps) + 1)
        for c, i in enumerate(idx):
            img = to_display(images[i])
            cells = [axes[0, k] for k in range(len(maps) + 1)] if single else [axes[top + r, c] for r in range(
                len(maps) + 1)]
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
        fig.colorbar(heat, ax=axes, shrink=0.8 if single else 0.5, label="Grad-CAM (0: none, 1: strongest)")
    fig.suptitle(suptitle, fontsize=11)
    return fig


# =============================================================================================
# Grad-CAM and Grad-CAM++ (notebook 07 writes Grad-CAM out by hand for one image first)
# =============================================================================================


def _layer(model, layer):
    """A layer given as a module or by name (e.g. "layer3" or "layer3.1.conv2")."""
    if not isinstance(layer, str):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"the model has no layer {layer!r}; top-level layers: {', '.join(names)}") from None


class GradCAM:
    """Grad-CAM (Selvaraju et al. 2017): `with GradCAM(model, "layer3") as cam: maps = cam(x, targets)`."""

    def __init__(self, model, target_layer):
        self.model, self.target_layer = model, _layer(model, target_layer)
        if isinstance(self.target_layer, (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d)):
            raise ValueError(f"Grad-CAM needs a layer with feature maps [N, C, H, W]; {self.target_layer} has none. "
                             f"Use a convolutional stage such as 'layer3'")
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
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Grad-CAM needs gradients, but it was called inside torch.inference_mode(); "
                               "call it outside that block")
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
                logits.gather(1, targets[:, None]).sum().backward(inputs=[x])  # parameter .grad untouched
            if self._acts is None or self._grads is None:
                raise RuntimeError("the target layer saw no forward/backward pass; is it part of the model?")
            if self._acts.dim() != 4:
                raise ValueError(f"Grad-CAM needs feature maps [N, C, H, W]; the target layer gives "
                                 f"{tuple(self._acts.shape)}. Use a convolutional stage such as 'layer3'")
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


def mistake_explorer(model, images, pred, order, layers=("layer2", "layer3"), alpha=0.5):
    """07's explorer (ipywidgets 7/8): a slider over images[k] = test image order[k]; layer, method, class menus."""
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
