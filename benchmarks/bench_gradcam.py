"""Grad-CAM speed: ours vs pytorch-grad-cam, same model, inputs and layer, measured in one run.

    python benchmarks/bench_gradcam.py [--images 25] [--layer layer3] [--repeats 20] [--checkpoint PATH]

Times the whole call (forward, backward, maps at input size in [0, 1]) for Grad-CAM and Grad-CAM++ on a
ResNet18 (a trained checkpoint if given, else a random one with the classifier scaled so maps are not tiny),
checks the two agree, and writes a JSON record to benchmarks/results/.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_dataloader import write_record  # noqa: E402  (same folder)

import helpers as H  # noqa: E402
from course.system import device_name, versions  # noqa: E402


def timed(fns, repeats):
    """Median seconds of each fn() over repeats runs, after one warm-up each; the fns alternate, so a slow spell of
    the machine (another job) hits them alike."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main():
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=25)
    ap.add_argument("--layer", default="layer3")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    load_before = os.getloadavg()  # the machine may be shared: what else ran is part of the record
    device = H.get_device(a.device)
    torch.manual_seed(0)
    if a.checkpoint:
        ckpt = torch.load(a.checkpoint, map_location="cpu", weights_only=True)  # a course _best.pt
        model = H.make_model(**ckpt["arch"]).to(device).eval()
        model.load_state_dict(ckpt["model"])
    else:
        model = H.make_model("resnet18").to(device).eval()
        with torch.no_grad():
            model.linear.weight.mul_(1e3)
    x = torch.randn(a.images, 3, 32, 32, device=device)
    targets = torch.randint(0, 10, (a.images,)).tolist()
    layer = getattr(model, a.layer)
    rows = {}
    for ours_cls, ref_name in ((H.GradCAM, "GradCAM"), (H.GradCAMPlusPlus, "GradCAMPlusPlus")):
        with ours_cls(model, layer) as ours, getattr(pytorch_grad_cam, ref_name)(model, [layer]) as ref:
            ref_targets = [ClassifierOutputTarget(t) for t in targets]
            diff = np.abs(ours(x, targets).numpy() - ref(x, ref_targets)).max()
            t_ours, t_ref = timed([lambda: ours(x, targets),
                                   lambda: ref(x, [ClassifierOutputTarget(t) for t in targets])], a.repeats)
        rows[ref_name] = {"ours_ms": 1e3 * t_ours, "pytorch_grad_cam_ms": 1e3 * t_ref,
                          "ratio_ref_over_ours": t_ref / t_ours, "max_abs_diff": float(diff)}
    hw = device_name(device)
    print(f"{a.images} images, ResNet18 {a.layer}, median of {a.repeats}, on {hw}")
    print(f"{'method':>16} {'ours ms':>9} {'pytorch-grad-cam ms':>20} {'theirs / ours':>14} {'max |diff|':>11}")
    for name, r in rows.items():
        print(f"{name:>16} {r['ours_ms']:>9.1f} {r['pytorch_grad_cam_ms']:>20.1f} {r['ratio_ref_over_ours']:>13.2f}x "
              f"{r['max_abs_diff']:>11.1e}")
    record = {"benchmark": "gradcam", "machine": hw, "images": a.images, "layer": a.layer, "repeats": a.repeats,
              "checkpoint": a.checkpoint, "results": rows, "versions": versions(),
              "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_record(record, f"gradcam_{device.type}_{a.layer}.json")


if __name__ == "__main__":
    main()
