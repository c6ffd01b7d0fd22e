"""Training input pipeline throughput: our albumentations loader vs torchvision transforms over PIL images.

    python benchmarks/bench_dataloader.py [--data-dir data] [--batch-size 512] [--workers 2] [--batches 30]

Both pipelines do the same work per image (pad-4 random crop, horizontal flip, Cutout 16x16, normalise, to
tensor) in DataLoader worker processes, measured in one run on this machine. torchvision's side mirrors
torchvision.datasets.CIFAR10 (a PIL image per sample, v1 transforms, RandomErasing for Cutout). The
device-side batched augmentation (benchmarks/gpu_loader.py) is timed too, here on whatever device is given.
A JSON record goes to benchmarks/results/.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpu_loader import GPULoader  # noqa: E402  (same folder)

import helpers as H  # noqa: E402
from course.system import device_name, versions  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does: numpy -> PIL image -> transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def torchvision_pipeline():
    """pad-4 crop, flip, to tensor, normalise, Cutout 16x16 as RandomErasing of a quarter of the image (= 0 = mean)."""
    import torchvision.transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(H.CIFAR10_MEAN, H.CIFAR10_STD),
                      T.RandomErasing(p=0.5, scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0)])


def write_record(record, name):
    """Write a benchmark's record to benchmarks/results/<name> as JSON and say where."""
    out = ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


def images_per_second(loader, batches, warmup=3):
    """Iterate warmup + batches batches; images per second over the timed ones."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        n += len(x)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU loader's batches are ready only when its kernels are done
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the pipelines this many times; best kept")
    ap.add_argument("--gpu-loader-device", default="auto", help="device for the batched device-side augmentation")
    a = ap.parse_args()
    load_before = os.getloadavg()  # the machine may be shared: what else ran is part of the record
    x, y = H.load_cifar10(a.data_dir)
    need = a.batch_size * (a.batches + 3)
    x, y = x[: max(need, 1)], y[: max(need, 1)]

    def ours():
        pipe = H.make_transforms({"crop": True, "flip": True, "cutout": 16})
        return H.make_loader(x, y, pipe, batch_size=a.batch_size, shuffle=True, num_workers=a.workers)

    def theirs():
        return torch.utils.data.DataLoader(PILDataset(x, y, torchvision_pipeline()), batch_size=a.batch_size,
                                           shuffle=True, num_workers=a.workers)

    def batched():
        return GPULoader(x, y, {"cutout": 16}, batch_size=a.batch_size, train=True, device=a.gpu_loader_device)

    results = {"albumentations (ours)": [], "torchvision + PIL": [], "batched device-side": []}
    for _ in range(a.repeats):
        results["albumentations (ours)"].append(images_per_second(ours(), a.batches))
        results["torchvision + PIL"].append(images_per_second(theirs(), a.batches))
        results["batched device-side"].append(images_per_second(batched(), a.batches))
    best = {k: max(v) for k, v in results.items()}
    ratio = best["albumentations (ours)"] / best["torchvision + PIL"]
    hw = device_name("cpu")
    gpu_dev = H.get_device(a.gpu_loader_device)
    print(f"training input pipeline, batch {a.batch_size}, {a.workers} workers, {a.batches} batches, on {hw}")
    print(f"{'pipeline':>24} {'images/s':>10}")
    for k, v in best.items():
        where = f" ({gpu_dev})" if k.startswith("batched") else ""
        print(f"{k + where:>24} {v:>10,.0f}")
    print(f"ratio albumentations / torchvision: {ratio:.2f}x")
    record = {"benchmark": "dataloader", "machine": hw, "batch_size": a.batch_size, "workers": a.workers,
              "batches": a.batches, "images_per_s": best, "all_runs": results, "ratio_ours_over_torchvision": ratio,
              "batched_device": str(gpu_dev), "versions": versions(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()}}
    write_record(record, f"dataloader_{gpu_dev.type}.json")


if __name__ == "__main__":
    main()
