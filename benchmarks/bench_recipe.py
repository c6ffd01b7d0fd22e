"""The headline recipe vs a seed-style baseline, in one process on one device.

    python benchmarks/bench_recipe.py --quick [--steps 8]               # any machine: throughput only
    python benchmarks/bench_recipe.py [--epochs 20] [--baseline-epochs 20] # a GPU: full training runs

The recipe is notebook 03's configuration (batch 512, OneCycle, Nesterov, label smoothing, mixed precision and
channels_last on CUDA, optionally data on the GPU with benchmarks/gpu_loader.py). The baseline is what the seeds
ran: fp32, batch 128, per-sample CPU augmentation, SGD 0.1 / momentum 0.9 / weight decay 5e-4 (StepLR every 50
epochs, so a constant LR within a 20-epoch budget).

--quick measures, for both, the input pipeline alone (images/s out of the train loader) and the training step
alone (images/s of forward + backward + update on batches already in memory), and prints the ratios.
Without --quick both are trained and evaluated every epoch: images/s, epoch time, test accuracy per epoch and
the wall time to first reach 90%, 93% and 94%. A JSON record goes to benchmarks/results/.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_dataloader import images_per_second, write_record  # noqa: E402  (same folder)
from gpu_loader import GPULoader  # noqa: E402  (same folder)

import course  # noqa: E402
import helpers as H  # noqa: E402
from course.system import data_files, device_name, versions  # noqa: E402

TARGETS = (90.0, 93.0, 94.0)


def configs(a):
    """(recipe, baseline) settings: notebook 03's recipe and the seeds' StepLR baseline."""
    ws = course.start({}, outputs=a.output_dir, images=Path(a.output_dir).parent / "images", data_dir=a.data_dir)
    lr, why = ws.lr(a.lr, batch_size=512)
    print(f"recipe: {why}")
    recipe = dict(name="recipe", epochs=a.epochs, batch_size=512, lr=lr, nesterov=True, label_smoothing=0.1,
                  schedule="onecycle", amp=True, channels_last=True, data_on_gpu=a.data_on_gpu)
    baseline = dict(name="seed_style_baseline", epochs=a.baseline_epochs, batch_size=128, lr=0.1, nesterov=False,
                    label_smoothing=0.0, schedule="step", amp=False, channels_last=False, data_on_gpu=False)
    return recipe, baseline


def make_data(cfg, a, device):
    """Loaders for a config: albumentations workers, or the whole set on the GPU (recipe --data-on-gpu)."""
    if not cfg["data_on_gpu"]:
        return H.make_data(a.data_dir, batch_size=cfg["batch_size"], subset=a.subset, seed=a.seed,
                           num_workers=a.workers, device=device)
    x, y = H.load_cifar10(a.data_dir, subset=a.subset, seed=a.seed)
    xt, yt = H.load_test_split(a.data_dir, subset=a.subset, seed=a.seed)
    tr, va = H.train_val_split(y, 0.1, seed=a.seed)
    gpu = dict(batch_size=cfg["batch_size"], device=device, seed=a.seed)
    return H.CifarLoaders(GPULoader(x[tr], y[tr], train=True, **gpu), GPULoader(x[va], y[va], **gpu),
                       GPULoader(xt, yt, **gpu), xt, yt)


def build(cfg, steps_per_epoch):
    """Model, optimizer, scheduler and loss of a config, as notebook 03 builds them."""
    model = H.make_model("resnet18")
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, nesterov=cfg["nesterov"], weight_decay=5e-4)
    if cfg["schedule"] == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], epochs=cfg["epochs"],
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.25,
                                                    anneal_strategy="linear")
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.1)
    return model, opt, sched, torch.nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])


def step_rate(cfg, device, steps):
    """Images per second of training steps on in-memory batches (the same train_one_epoch as fit)."""
    model, opt, _, criterion = build(cfg, 1)
    model.to(device)
    channels_last = cfg["channels_last"] and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    dtype = H.amp_dtype(device) if cfg["amp"] else None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    batch = (torch.randn(cfg["batch_size"], 3, 32, 32, device=device),
             torch.randint(0, 10, (cfg["batch_size"],), device=device))
    run = dict(device=device, dtype=dtype, channels_last=channels_last, scaler=scaler, progress=False)
    H.train_one_epoch(model, [batch] * 2, opt, criterion, **run)  # warm-up (cudnn autotuning)
    t0 = time.perf_counter()
    H.train_one_epoch(model, [batch] * steps, opt, criterion, **run)  # ends in .item(): synchronised
    return steps * cfg["batch_size"] / (time.perf_counter() - t0)


def time_to(history, target):
    """Wall time (train + evaluation) until test accuracy first reaches target, or None."""
    elapsed = np.cumsum(history["epoch_time"])
    for acc, t in zip(history["test_acc"], elapsed):
        if acc >= target:
            return float(t)
    return None


def full_run(cfg, a, device):
    H.seed_everything(a.seed)
    data = make_data(cfg, a, device)
    model, opt, sched, criterion = build(cfg, len(data.train))
    rec = H.fit(model, data, opt, sched, criterion, epochs=cfg["epochs"], amp=cfg["amp"],
                channels_last=cfg["channels_last"], device=device, progress=False)  # in memory: no files
    h = rec["history"]
    train_time = sum(h["epoch_time"])  # includes evaluation: an upper bound on training time
    return {"history": h, "train_images_per_s": len(data.train.dataset) * len(h["epoch"]) / train_time,
            "epoch_time_s": float(np.mean(h["epoch_time"])), "final_test_acc": h["test_acc"][-1],
            "time_to": {str(t): time_to(h, t) for t in TARGETS}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--output-dir", default="outputs", help="where 02's lr_finder.json is (the recipe's LR)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="throughput only (for a CPU)")
    ap.add_argument("--steps", type=int, default=8, help="--quick: batches timed per measurement")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--baseline-epochs", type=int, default=20, help="0: train the recipe alone")
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--workers", default="auto", type=lambda v: v if v == "auto" else int(v))
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-on-gpu", action="store_true")
    ap.add_argument("--tag", default="", help="added to the record's file name (recipe_cuda_TAG.json)")
    a = ap.parse_args()
    device = H.get_device(a.device)
    recipe, baseline = configs(a)
    for cfg in (recipe, baseline):  # the record says what ran: mixed precision only on CUDA (H.amp_dtype), and
        cfg["amp"] = cfg["amp"] and H.amp_dtype(device) is not None  # --quick's channels_last only on CUDA
        cfg["channels_last"] = cfg["channels_last"] and (device.type == "cuda" or not a.quick)
    hw = device_name(device)
    record = {"benchmark": "recipe", "machine": hw, "device": str(device), "quick": a.quick,
              "configs": {"recipe": recipe, "baseline": baseline}, "seed": a.seed, "subset": a.subset,
              "workers": a.workers, "versions": versions(),
              "data_files": data_files(a.data_dir), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.quick:
        rows = {}
        for name, cfg in (("recipe", recipe), ("baseline", baseline)):
            data = make_data(cfg, a, device)
            rows[name] = {"input_images_per_s": images_per_second(data.train, a.steps, warmup=2),
                          "step_images_per_s": step_rate(cfg, device, a.steps)}
        record["results"] = rows
        print(f"recipe vs seed-style baseline, throughput only ({a.steps} batches each), on {hw}")
        print(f"{'':>10} {'batch':>6} {'input pipeline img/s':>21} {'training step img/s':>20}")
        for name, cfg in (("recipe", recipe), ("baseline", baseline)):
            r = rows[name]
            print(f"{name:>10} {cfg['batch_size']:>6} {r['input_images_per_s']:>21,.0f} "
                  f"{r['step_images_per_s']:>20,.0f}")
        for key in ("input_images_per_s", "step_images_per_s"):
            record[f"ratio_{key}"] = rows["recipe"][key] / rows["baseline"][key]
            print(f"ratio recipe / baseline, {key.replace('_', ' ')}: {record[f'ratio_{key}']:.2f}x")
    else:
        chosen = (("recipe", recipe), ("baseline", baseline))[:2 if a.baseline_epochs else 1]
        rows = {name: full_run(cfg, a, device) for name, cfg in chosen}
        record["results"] = rows
        print(f"recipe ({recipe['epochs']} epochs) vs seed-style baseline ({baseline['epochs']} epochs), on {hw}")
        head = f"{'':>10} {'train img/s':>12} {'epoch s':>8} {'final test %':>13}"
        print(head + "".join(f" {'to ' + str(t) + '%':>10}" for t in TARGETS))
        for name, r in rows.items():
            reach = "".join(f" {(f'{v / 60:.1f} min' if v else 'never'):>10}" for v in r["time_to"].values())
            print(f"{name:>10} {r['train_images_per_s']:>12,.0f} {r['epoch_time_s']:>8.1f} {r['final_test_acc']:>13.2f}"
                  + reach)
        for name, r in rows.items():
            print(f"{name} test accuracy per epoch: " + ", ".join(f"{v:.1f}" for v in r["history"]["test_acc"]))
        if "baseline" in rows:
            ratio = rows["baseline"]["epoch_time_s"] / rows["recipe"]["epoch_time_s"]
            record["ratio_epoch_time_baseline_over_recipe"] = ratio
            print(f"epoch time ratio baseline / recipe: {ratio:.2f}x")
    tag = f"_{a.tag}" if a.tag else ""
    write_record(record, f"recipe_{'quick_' if a.quick else ''}{device.type}{tag}.json")


if __name__ == "__main__":
    main()
