"""Training: fit's history, losses, schedulers, checkpoints and an exact resume after a real kill."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT

import helpers as H


class Tiny(nn.Module):
    """A small CNN that trains in seconds on the CPU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class Frozen(nn.Module):
    """Constant predictions and zero gradients: every metric stays flat from epoch to epoch."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("logits", torch.arange(10.0))

    def forward(self, x):
        return self.logits.expand(len(x), 10) + 0 * self.w * x.mean()


@pytest.fixture(scope="module")
def data(fake_cifar):
    return H.make_loaders(fake_cifar, batch_size=20, device="cpu", num_workers=0)


def per_epoch_lr(history):
    n = history["steps_per_epoch"]
    return [history["lr"][i * n] for i in range(len(history["epoch"]))]


def test_fit_learns_and_records_history(data):
    torch.manual_seed(0)
    h = H.fit(Tiny(), data.train, data.test, val_loader=data.val, epochs=10, lr=0.2, scheduler="onecycle",
              device="cpu", progress=False)
    assert h["epoch"] == list(range(1, 11))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "train_time", "epoch_time"):
        assert len(h[key]) == 10
    assert len(h["lr"]) == 10 * len(data.train) and h["steps_per_epoch"] == len(data.train)
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert h["test_acc"][-1] >= 70  # classes differ by colour: far above the 10% of chance
    assert all(t > 0 for t in h["epoch_time"])


def test_nll_on_log_softmax_equals_cross_entropy():
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(H.make_criterion("nll")(logits, y), F.cross_entropy(logits, y))
    smooth = H.make_criterion("ce", label_smoothing=0.1)(logits, y)
    assert not torch.allclose(smooth, F.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="ce, nll"):
        H.make_criterion("mse")


def test_onecycle_lr_per_step_matches_torch(data):
    h = H.fit(Tiny(), data.train, data.test, epochs=3, lr=0.1, scheduler="onecycle", pct_start=0.3,
              device="cpu", progress=False)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, epochs=3, steps_per_epoch=len(data.train),
                                              pct_start=0.3, anneal_strategy="linear")
    expected = []
    for _ in range(3 * len(data.train)):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert np.allclose(h["lr"], expected, rtol=1e-12)
    assert 0.095 < max(h["lr"]) <= 0.1 and h["lr"][0] == pytest.approx(0.1 / 25)


def test_steplr_changes_at_the_right_epoch(data):
    h = H.fit(Tiny(), data.train, data.test, epochs=5, lr=0.1, scheduler="step", step_size=2, gamma=0.1,
              device="cpu", progress=False)
    assert np.allclose(per_epoch_lr(h), [0.1, 0.1, 0.01, 0.01, 0.001])
    n = h["steps_per_epoch"]
    assert len(set(h["lr"][:2 * n])) == 1  # constant inside an epoch


def test_plateau_reduces_after_patience_flat_validation_epochs(data, fake_cifar):
    """Flat validation accuracy: with patience 2 the LR drops after epochs 4 and 7, whatever the test set says."""
    runs = []
    xt, yt = H.load_cifar10(fake_cifar, train=False)
    for label in (9, 0):  # a test set the model gets 100% right, then 0%: the schedule must not change
        test = H.make_loader(xt, np.full_like(yt, label), H.build_transforms(train=False), batch_size=25)
        runs.append(H.fit(Frozen(), data.train, test, val_loader=data.val, epochs=8, lr=0.1, scheduler="plateau",
                          patience=2, threshold=0.1, threshold_mode="abs", factor=0.1, device="cpu", progress=False))
    a, b = runs
    assert a["test_acc"] == [100.0] * 8 and b["test_acc"] == [0.0] * 8
    assert np.allclose(per_epoch_lr(a), [0.1] * 4 + [0.01] * 3 + [0.001])
    assert a["lr"] == b["lr"]


def test_plateau_never_uses_the_test_set(data):
    with pytest.raises(ValueError, match="val_acc, val_loss, train_acc, train_loss"):
        H.fit(Tiny(), data.train, data.test, val_loader=data.val, epochs=1, scheduler="plateau",
              plateau_metric="test_acc", device="cpu", progress=False)
    with pytest.raises(ValueError, match="validation split"):
        H.fit(Tiny(), data.train, data.test, epochs=1, scheduler="plateau", device="cpu", progress=False)
    with pytest.raises(ValueError, match="onecycle, step, plateau, cosine, none"):
        H.fit(Tiny(), data.train, data.test, epochs=1, scheduler="exp", device="cpu", progress=False)


def test_checkpoints_are_written_every_epoch(data, tmp_path):
    torch.manual_seed(0)
    model = H.build_model("resnet18")
    h = H.fit(model, data.train, data.test, val_loader=data.val, epochs=2, lr=0.05, device="cpu",
              experiment="exp", checkpoint_dir=tmp_path, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "exp_last.pt" in names and "exp_best.pt" in names
    assert any(n.startswith("exp_2") and n.endswith(".pt") for n in names)  # exp_<YYYYMMDD_HHMMSS>.pt
    assert not any(n.endswith(".tmp") for n in names)
    ckpt = H.load_checkpoint(tmp_path / "exp_last.pt")
    assert ckpt["epoch"] == 2 and ckpt["history"]["test_acc"] == h["test_acc"]
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "history", "epoch", "rng", "arch"}
    best = H.load_checkpoint(tmp_path / "exp_best.pt")
    assert best["epoch"] == 1 + int(np.argmax(h["val_acc"]))
    rebuilt, _ = H.model_from_checkpoint(tmp_path / "exp_last.pt")
    for (k, v), (_, w) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(v, w), k


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model = H.build_model("resnet18")
    H.save_checkpoint(tmp_path / "r18.pt", model=model.state_dict(), arch=model.arch)
    with pytest.raises(ValueError, match="holds a resnet18.*the model is a resnet34"):
        H.load_checkpoint(tmp_path / "r18.pt", H.build_model("resnet34"))
    with pytest.raises(ValueError, match="norm=bn.*norm=ln"):
        H.load_checkpoint(tmp_path / "r18.pt", H.build_model("resnet18", norm="ln"))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((tmp_path / "r18.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="damaged"):
        H.load_checkpoint(damaged, model)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no 'model' entry"):
        H.load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="run the training notebook first"):
        H.load_checkpoint(tmp_path / "missing.pt")
    plain = nn.Linear(3, 2)
    H.save_checkpoint(tmp_path / "lin.pt", model=nn.Linear(4, 2).state_dict())
    with pytest.raises(ValueError, match="does not fit this model"):
        H.load_checkpoint(tmp_path / "lin.pt", plain)


def test_resume_refuses_a_different_run(data, tmp_path):
    H.fit(Tiny(), data.train, data.test, epochs=1, lr=0.1, device="cpu", experiment="e", checkpoint_dir=tmp_path,
          progress=False)
    with pytest.raises(ValueError, match="use another experiment name"):
        H.fit(Tiny(), data.train, data.test, epochs=3, lr=0.1, device="cpu", experiment="e",
              checkpoint_dir=tmp_path, resume=True, progress=False)


RUN = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, {root!r})
    import torch, helpers as H
    data_dir, ckpt_dir, kill_after, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    H.seed_everything(0)
    data = H.make_loaders(data_dir, subset=80, batch_size=16, cutout=True, device="cpu", num_workers=0)
    model = H.build_model("resnet18")
    def kill(epoch, history):
        if epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    h = H.fit(model, data.train, data.test, val_loader=data.val, epochs=3, lr=0.05, scheduler="onecycle",
              device="cpu", experiment="run", checkpoint_dir=ckpt_dir, resume=True, callbacks=[kill], progress=False)
    torch.save(model.state_dict(), out + ".pt")
    json.dump(h, open(out + ".json", "w"))
""")


def test_killed_run_resumes_to_the_same_result(fake_cifar, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN.format(root=str(ROOT)))

    def run(ckpt_dir, kill_after, out):
        return subprocess.run([sys.executable, str(script), str(fake_cifar), str(tmp_path / ckpt_dir),
                               str(kill_after), str(tmp_path / out)], capture_output=True, text=True, timeout=600)

    straight = run("a", 0, "straight")
    assert straight.returncode == 0, straight.stderr
    killed = run("b", 1, "killed")
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    assert H.load_checkpoint(tmp_path / "b" / "run_last.pt")["epoch"] == 1
    resumed = run("b", 0, "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming 'run' after epoch 1/3" in resumed.stdout
    h1, h2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("straight", "resumed"))
    for key in h1:
        if key not in ("epoch_time", "train_time"):
            assert np.allclose(h1[key], h2[key], rtol=1e-5, atol=1e-6), key
    w1, w2 = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("straight", "resumed"))
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), rtol=1e-4, atol=1e-5), k
