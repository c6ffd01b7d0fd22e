"""FLOPs of one forward pass of each course model on a 32x32 image, counted by torch's FLOP counter.

    python benchmarks/flops.py

The T4 time estimates of notebooks 05 and 06 scale ResNet18's measured epoch time by these ratios. Writes
benchmarks/results/flops.json.
"""

import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_dataloader import write_record  # noqa: E402  (same folder)

import helpers as H  # noqa: E402
from course.system import versions  # noqa: E402

MODELS = {"resnet18": {}, "resnet18 stride-1 layer4": {"last_stride": 1}, "resnet34": {"name": "resnet34"},
          "resnet50": {"name": "resnet50"}}


def forward_flops(model):
    """FLOPs (a multiply-add counts 2) of one forward pass of one 3x32x32 image, in eval mode."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops()


def main():
    flops = {label: forward_flops(H.make_model(**{"name": "resnet18", **kw})) for label, kw in MODELS.items()}
    base = flops["resnet18"]
    rows = {label: {"gflops": f / 1e9, "ratio_to_resnet18": f / base} for label, f in flops.items()}
    for label, r in rows.items():
        print(f"{label:>26}: {r['gflops']:.2f} GFLOP per image, {r['ratio_to_resnet18']:.2f}x ResNet18")
    write_record({"benchmark": "flops", "what": "one forward pass, one 3x32x32 image, torch.utils.flop_counter",
                  "results": rows, "versions": versions(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}, "flops.json")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help: say what it does, run nothing
    main()
