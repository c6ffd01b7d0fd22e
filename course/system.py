"""The hardware, library versions and data files every results file and hand-in records."""

import contextlib
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

import helpers as H


def cpu_model():
    """The CPU's model name from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device="auto"):
    """The hardware behind a device: the GPU's model, or the CPU's model and cores."""
    device = H.get_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "Apple MPS" if device.type == "mps" else f"CPU ({cpu_model()}, {os.cpu_count()} cores)"


def versions():
    """Versions of python and of the libraries the series uses."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "albumentations", "torch-lr-finder", "torchsummary", "matplotlib", "seaborn",
                "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


OFFICIAL_DATA = "the official CIFAR-10 files"  # what data_files says of them (the class table reads it too)


def data_files(data_dir):
    """Which CIFAR-10 files a run read: the official ones (torchvision's md5 of every batch), another copy, or None."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder, names = Path(data_dir) / "cifar-10-batches-py", CIFAR10.train_list + CIFAR10.test_list
    if not all((folder / name).is_file() for name, _ in names):
        return None
    official = all(check_integrity(str(folder / name), md5) for name, md5 in names)
    return OFFICIAL_DATA if official else "a copy of CIFAR-10 that is not the official files"
