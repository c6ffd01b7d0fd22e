"""GPULoader: the dataset kept on the device, crop, flip and Cutout done batched on device tensors.

A speed lever for the benchmarks (bench_dataloader, bench_recipe --data-on-gpu) when the CPU cannot feed a fast
GPU; no notebook default uses it. Its batches match helpers.make_data's (normalised (B, 3, 32, 32) floats).
"""

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402


class GPULoader:
    """The dataset kept on the device; crop, flip and Cutout done batched on device tensors."""

    def __init__(self, images, labels, aug=None, batch_size=512, train=False, device="cuda", seed=0,
                 mean=H.CIFAR10_MEAN, std=H.CIFAR10_STD, cutout_p=0.5, pad=4):
        aug = H.check_augment(aug)
        if aug["rotate"]:
            raise ValueError("rotate is not available on the GPU loader; use helpers.make_data")
        self.device = H.get_device(device)
        self.images = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(self.device)  # (N,C,H,W) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        self.crop, self.flip, self.cutout_size = train and aug["crop"], train and aug["flip"], train and aug["cutout"]
        self.cutout_p, self.pad = cutout_p, pad
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
            padded = F.pad(x, (self.pad,) * 4)  # black border, as helpers.make_transforms
            dy = torch.randint(0, 2 * self.pad + 1, (n,), device=x.device, generator=gen)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), device=x.device, generator=gen)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N,1,H,1)
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N,1,1,W)
            x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                       torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
        if self.flip:
            do = torch.rand(n, device=x.device, generator=gen) < 0.5
            x = torch.where(do[:, None, None, None], x.flip(3), x)
        if self.cutout_size:
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

