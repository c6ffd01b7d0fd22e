"""course.runs: a run's checkpoints every epoch and only the best weights at the end, an exact resume (after a real
SIGKILL too), a finished run loaded not retrained, changed settings refused, a run that broke down recorded as
stopped, the best checkpoint repaired, damaged files, the model rebuilt from its checkpoint, and the results records
and table (old, bad and doubled files)."""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, Frozen, NanAfter, PoisonedStep, Tiny, make_workspace

import course
import helpers as H
from course import runs as R
from course.files import load_checkpoint, write_json


@pytest.fixture(scope="module")
def data(fake_cifar):
    return H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)


@pytest.fixture
def ws(tmp_path, fake_cifar):
    return make_workspace(tmp_path, data_dir=fake_cifar)


def train(ws, model, data, name="run", epochs=2, lr=0.1, scheduler=None, criterion=None, config=None, **kwargs):
    """H.fit with a plain SGD, as a course run of ws."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return H.fit(model, data, optimizer, scheduler(optimizer) if scheduler else None, criterion, epochs=epochs,
                 run=ws.run(name, config), device="cpu", progress=False, **kwargs)


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def epochs_in(path):
    return len(load_checkpoint(path)["history"]["epoch"])


class StopAfter(Exception):
    """Raised right after an epoch's record is written: the process 'dies' there."""


def interrupt_after(monkeypatch, epoch):
    """Make fit stop (as a kill would) right after the record of `epoch` is written."""
    real = R.Run._write_record

    def write(self, history, status, **extra):
        real(self, history, status, **extra)
        if status == "running" and len(history["epoch"]) == epoch:
            raise StopAfter

    monkeypatch.setattr(R.Run, "_write_record", write)


# ---- a run's files ---------------------------------------------------------------------------------------------


def test_a_run_writes_its_record_and_returns_it(ws, data):
    torch.manual_seed(0)
    rec = train(ws, Tiny(), data, epochs=3, lr=0.2)
    h = rec["history"]
    assert rec["status"] == "complete" and rec["epochs_run"] == 3 and h["epoch"] == [1, 2, 3]
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert rec == json.loads((ws.outputs / "results" / "run.json").read_text())
    assert set(R.RECORD_FIELDS) <= set(rec) and re.fullmatch(r"[0-9a-f]{12}", rec["run_id"])
    assert rec["checksum"] == course.record_checksum(rec)
    assert course.record_checksum({**rec, "final_test_acc": 99.9}) != rec["checksum"]  # an edited number shows
    assert rec["params"] == H.count_params(Tiny()) and rec["device"].startswith("CPU") and not rec["quick"]
    assert rec["data_files"] == "a copy of CIFAR-10 that is not the official files"  # synthetic batches
    summary = H.summarize(h)
    for key in ("final_train_acc", "final_test_acc", "best_val_acc", "best_epoch", "test_acc_at_best_val"):
        assert rec[key] == summary[key], key
    assert rec["config"]["epochs"] == 3 and rec["config"]["model"] == {"class": "Tiny", "params": rec["params"]}
    assert tree(ws.outputs) == ["checkpoints/run_best.pt", "results/run.json"]


def test_a_record_says_whether_it_read_the_official_files(ws, data, tmp_path, fake_cifar, monkeypatch):
    """Accuracies on a re-encoded copy (the JPEG-decoded one of ../shared) differ from the official files'."""
    from torchvision.datasets import CIFAR10

    from course.system import data_files

    assert data_files(tmp_path / "nowhere") is None
    folder = fake_cifar / "cifar-10-batches-py"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5[n]] for n, _ in CIFAR10.test_list])
    assert data_files(fake_cifar) == "the official CIFAR-10 files"  # torchvision's md5 of every batch matches
    rec = train(ws, Tiny(), data, epochs=1)
    assert rec["data_files"] == "the official CIFAR-10 files"
    line = _update_readme().expected(ws.outputs)["run"]
    assert line.endswith("; data: the official CIFAR-10 files)")
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", "0" * 32]])  # one file differs
    assert data_files(fake_cifar) == "a copy of CIFAR-10 that is not the official files"


def test_checkpoints_every_epoch_then_only_the_best_weights(ws, data, monkeypatch, capsys):
    """While a run trains: _last.pt (weights, optimizer, schedule, RNG; no second copy of the best weights), _prev.pt
    and _best.pt. When it finishes: only _best.pt and the results file, and the model holds the best weights."""
    torch.manual_seed(0)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(StopAfter):
        train(ws, Tiny(), data, epochs=3, lr=0.05, name="exp")
    checkpoints = ws.outputs / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["exp_best.pt", "exp_last.pt", "exp_prev.pt"]  # no
    # .tmp left behind, the lock released
    last = load_checkpoint(checkpoints / "exp_last.pt")
    assert len(last["history"]["epoch"]) == 2
    assert set(last) >= {"model", "optimizer", "scheduler", "scaler", "history", "rng", "best", "config", "run_id"}
    assert last["best"].keys() == {"epoch", "score"}  # the best weights live only in _best.pt
    assert epochs_in(checkpoints / "exp_prev.pt") == 1
    assert course.load_results(ws.outputs / "results")["exp"]["status"] == "running"
    monkeypatch.undo()
    model = Tiny()
    rec = train(ws, model, data, epochs=3, lr=0.05, name="exp")
    assert "'exp': resumed after epoch 2/3 from outputs/checkpoints/exp_last.pt" in capsys.readouterr().out
    assert rec["run_id"] == last["run_id"]  # one run, interrupted and resumed
    assert sorted(p.name for p in checkpoints.iterdir()) == ["exp_best.pt"]
    best = load_checkpoint(checkpoints / "exp_best.pt")
    assert best["epoch"] == rec["best_epoch"] == 1 + int(np.argmax(rec["history"]["val_acc"]))
    assert rec["test_acc_at_best_val"] == rec["history"]["test_acc"][best["epoch"] - 1]
    assert best["experiment"] == "exp" and best["arch"] == rec["config"]["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), best["model"][k]), k  # fit leaves the best weights in the model


def test_a_trained_resnet_is_rebuilt_from_its_checkpoint(tmp_path, fake_cifar, capsys):
    ws = make_workspace(tmp_path, data_dir=fake_cifar)
    small = H.make_data(fake_cifar, batch_size=20, subset=40, val_fraction=0, device="cpu", num_workers=0)
    torch.manual_seed(0)
    train(ws, H.make_model("resnet18", norm="gn"), small, name="r18", epochs=1, lr=0.05)
    best = load_checkpoint(ws.outputs / "checkpoints" / "r18_best.pt")
    assert best["arch"] == {"name": "resnet18", "norm": "gn", "num_classes": 10, "last_stride": 2}
    model, ckpt = ws.load_trained("r18")
    assert isinstance(model, H.ResNet) and not model.training and ckpt["epoch"] == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in best["model"].items())
    train(ws, Tiny(), small, name="tiny", epochs=1)
    with pytest.raises(ValueError, match="does not record a course ResNet's architecture"):
        ws.load_trained("tiny")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint outputs/checkpoints/r34_best\.pt: run notebook 03 "
                                                r"first.*set EXPERIMENT to one of: r18, tiny"):
        ws.load_trained("r34")


@pytest.mark.parametrize("name, norm, last_stride, classes", [("resnet18", "bn", 2, 10), ("resnet34", "gn", 1, 10),
                                                              ("resnet50", "ln", 1, 100), ("resnet50", "bn", 2, 10)])
def test_the_architecture_is_read_from_the_model_itself(name, norm, last_stride, classes):
    model = H.make_model(name, norm=norm, num_classes=classes, last_stride=last_stride)
    arch = R.describe_model(model)
    assert arch == {"name": name, "norm": norm, "num_classes": classes, "last_stride": last_stride}
    rebuilt = H.make_model(**arch)
    rebuilt.load_state_dict(model.state_dict())  # the same structure, key for key and shape for shape
    assert R.describe_model(nn.Linear(3, 2)) == {"class": "Linear", "params": 8}


def test_a_finished_run_is_loaded_not_retrained(ws, data, capsys):
    torch.manual_seed(0)
    first = train(ws, Tiny(), data, epochs=2, name="done")
    capsys.readouterr()
    model = Tiny()
    again = train(ws, model, data, epochs=2, name="done", config={"num_workers": 2, "amp": False})  # speed only
    out = capsys.readouterr().out
    assert again == first and "'done': finished earlier (2/2 epochs); loaded its best weights (epoch" in out
    assert "epoch   1/2" not in out  # nothing trained
    saved = load_checkpoint(ws.outputs / "checkpoints" / "done_best.pt")["model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    assert tree(ws.outputs) == ["checkpoints/done_best.pt", "results/done.json"]  # the lock released
    (ws.outputs / "checkpoints" / "done_best.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"'done' finished earlier \(2 epochs\) but outputs/checkpoints/"
                                                r"done_best\.pt is missing: restore it.*start_over=True"):
        train(ws, Tiny(), data, epochs=2, name="done")


def test_changed_settings_stop_with_what_differs_and_lose_nothing(tmp_path, fake_cifar, data):
    ws = make_workspace(tmp_path, data_dir=fake_cifar)
    train(ws, Tiny(), data, epochs=2, name="e", config={"augment": {"cutout": 0}})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(course.StaleRun, match=r"^'e' in outputs was run with other settings \(optimizer\.groups: "
                                              r".*'lr': 0\.1.* -> .*'lr': 0\.05.*Nothing was changed.*another name "
                                              r"\(EXPERIMENT, or RUNS in 04\).*course\.start\(globals\(\), "
                                              r"start_over=True\) moves the files of every run this notebook opens"):
        train(ws, Tiny(), data, epochs=2, lr=0.05, name="e", config={"augment": {"cutout": 0}})
    with pytest.raises(course.StaleRun, match=r"augment\.cutout: 0 -> 16.*another name"):
        train(ws, Tiny(), data, epochs=2, name="e", config={"augment": {"cutout": 16}})
    with pytest.raises(course.StaleRun, match="epochs: 2 -> 3"):
        train(ws, Tiny(), data, epochs=3, name="e", config={"augment": {"cutout": 0}})
    with pytest.raises(course.StaleRun, match=rf"model\.params: {H.count_params(Tiny())} -> "
                                              rf"{H.count_params(Tiny(width=32))}"):
        train(ws, Tiny(width=32), data, epochs=2, name="e", config={"augment": {"cutout": 0}})
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing moved, no lock left
    again = make_workspace(tmp_path, data_dir=fake_cifar, start_over=True)
    rec = train(again, Tiny(), data, epochs=3, name="e", config={"augment": {"cutout": 0}})
    assert rec["epochs_run"] == 3 and len(list((ws.outputs / "archive").glob("e_*/e_best.pt"))) == 1
    assert len(list((ws.outputs / "archive").glob("e_*/e.json"))) == 1


def test_a_half_finished_run_asked_for_with_other_settings_stops_at_its_checkpoint(ws, data, monkeypatch):
    interrupt_after(monkeypatch, 1)
    with pytest.raises(StopAfter):
        train(ws, Tiny(), data, epochs=3, name="h")
    monkeypatch.undo()
    (ws.outputs / "results" / "h.json").unlink()  # only the checkpoint says how it was run
    last = ws.outputs / "checkpoints" / "h_last.pt"
    with pytest.raises(course.StaleRun, match=r"^outputs/checkpoints/h_last\.pt was run with other settings \(epochs: "
                                              r"3 -> 4"):
        train(ws, Tiny(), data, epochs=4, name="h")
    assert epochs_in(last) == 1


def test_what_counts_as_another_setting():
    saved = {"epochs": 2, "num_workers": 0, "amp": True, "device": "cuda", "data": {"batch_size": 20}}
    R.check_same_settings("r", saved, {**saved, "num_workers": 8, "amp": False, "device": "cpu"})  # speed only
    with pytest.raises(course.StaleRun, match=r"data\.batch_size: 20 -> 32"):
        R.check_same_settings("r", saved, {**saved, "data": {"batch_size": 32}})
    with pytest.raises(course.StaleRun, match=r"label_smoothing: '\(none\)' -> 0\.1"):
        R.check_same_settings("r", saved, {**saved, "label_smoothing": 0.1})
    many = {f"k{i}": i for i in range(11)}
    with pytest.raises(course.StaleRun, match=r"k7: 7 -> 8; and 3 more\)"):
        R.check_same_settings("r", many, {k: v + 1 for k, v in many.items()})


def test_the_record_holds_loss_scheduler_augmentation_and_data_settings(ws, fake_cifar):
    data = H.make_data(fake_cifar, aug={"crop": True, "flip": False, "cutout": 16, "rotate": 5}, batch_size=20,
                       device="cpu", num_workers=0)
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=2 * len(data.train),  # noqa
                                                          pct_start=0.25, anneal_strategy="linear")
    rec = train(ws, Tiny(width=8), data, lr=0.05, scheduler=sched, criterion=nn.CrossEntropyLoss(label_smoothing=0.1))
    cfg = rec["config"]
    assert cfg["criterion"] == {"name": "CrossEntropyLoss", "reduction": "mean", "ignore_index": -100,
                                "label_smoothing": 0.1}
    s, group = cfg["scheduler"], cfg["optimizer"]["groups"][0]
    assert s["name"] == "OneCycleLR" and s["total_steps"] == 2 * len(data.train) and s["cycle_momentum"] is True
    assert s["schedule_phases"][0]["end_step"] == pytest.approx(0.25 * s["total_steps"] - 1)
    assert group["max_lr"] == 0.05 and (group["base_momentum"], group["max_momentum"]) == (0.85, 0.95)
    assert cfg["optimizer"]["name"] == "SGD" and group["params"] == H.count_params(Tiny(width=8))
    assert {k: cfg["data"][k] for k in ("train_images", "val_images", "test_images", "batch_size", "seed")} == {
        "train_images": 180, "val_images": 20, "test_images": 50, "batch_size": 20, "seed": 0}
    augment = " ".join(cfg["data"]["augment"])
    assert "RandomCrop" in augment and "HorizontalFlip" not in augment and "limit=(-5.0, 5.0)" in augment
    assert "hole_height_range=(16, 16)" in augment and cfg["monitor"] == "val_acc" and cfg["quick"] is False
    step = train(ws, Tiny(width=8), data, name="step", scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.2))
    assert {"name": "StepLR", "step_size": 7, "gamma": 0.2}.items() <= step["config"]["scheduler"].items()
    with pytest.raises(course.StaleRun, match=r"criterion\.label_smoothing: 0\.1 -> 0\.0"):
        train(ws, Tiny(width=8), data, lr=0.05, scheduler=sched, criterion=nn.CrossEntropyLoss())
    with pytest.raises(course.StaleRun, match=r"optimizer\.groups: .*'max_momentum': 0\.95.* -> .*'max_momentum': "
                                              r"0\.9\b"):
        train(ws, Tiny(width=8), data, lr=0.05, criterion=nn.CrossEntropyLoss(label_smoothing=0.1),
              scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=2 * len(data.train),
                                                                     pct_start=0.25, anneal_strategy="linear",
                                                                     max_momentum=0.9))
    cutout8 = H.make_data(fake_cifar, aug={"crop": True, "flip": False, "cutout": 8, "rotate": 5}, batch_size=20,
                          device="cpu", num_workers=0)
    with pytest.raises(course.StaleRun, match=r"data\.augment: .*hole_height_range=\(16, 16\).* -> .*"
                                              r"hole_height_range=\(8, 8\)"):
        train(ws, Tiny(width=8), cutout8, lr=0.05, scheduler=sched, criterion=nn.CrossEntropyLoss(label_smoothing=0.1))


# ---- the learning rate is checked before anything is written ----------------------------------------------------


@pytest.mark.parametrize("lr", [0.0, 50.0, float("nan")])
def test_fit_refuses_an_lr_outside_the_sane_range_before_writing_anything(ws, data, lr):
    with pytest.raises(ValueError, match="the learning rate the optimizer and scheduler were built with must be a "
                                         "number from 1e-06 to 10"):
        train(ws, Tiny(width=8), data, lr=lr)
    assert tree(ws.outputs) == []


def test_onecycle_is_checked_at_its_peak(ws, data):
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=40.0, total_steps=40)  # noqa: E731
    with pytest.raises(ValueError, match="got 40.0"):
        train(ws, Tiny(width=8), data, lr=1.0, scheduler=sched)
    assert tree(ws.outputs) == []


@pytest.mark.parametrize("name", ["../../x", "a/b", "", " ", "x" * 300, ".hidden", "a b", None, 5])
def test_a_run_name_that_could_not_name_files_safely_is_refused(ws, tmp_path, name):
    with pytest.raises(ValueError, match=r"letters, digits, '-', '_' or '.' \(not first\)"):
        ws.run(name)
    with pytest.raises(ValueError, match="EXPERIMENT must be 1 to 64 letters"):
        course.checks.check_parameters({"EXPERIMENT": name})
    with pytest.raises(ValueError, match="EXPERIMENT must be 1 to 64 letters"):
        make_workspace(tmp_path / "other", EXPERIMENT=name)
    assert tree(tmp_path) == [] and not (tmp_path / "other").exists()


def test_a_run_another_runtime_holds_is_refused_before_anything_is_read_or_written(ws, data):
    lock = ws.outputs / "checkpoints" / "shared.lock"
    lock.parent.mkdir(parents=True)
    other = {"host": "colab-runtime-2", "pid": 77, "token": "x", "started": "2026-01-01 10:00:00"}
    lock.write_text(json.dumps({**other, "heartbeat": time.time() - 10}))
    with pytest.raises(course.RunBusy, match="'shared' is being trained by another process right now \\(host "
                                             "colab-runtime-2, PID 77.*last seen 1\\d s ago.*in 2 minutes"):
        train(ws, Tiny(width=8), data, name="shared")
    assert tree(ws.outputs) == ["checkpoints/shared.lock"] and json.loads(lock.read_text())["token"] == "x"
    lock.write_text(json.dumps({**other, "heartbeat": time.time() - 600}))  # that runtime died 10 minutes ago
    assert train(ws, Tiny(width=8), data, name="shared")["status"] == "complete" and not lock.exists()


# ---- a run that broke down is recorded as stopped, never "complete" --------------------------------------------


def test_a_diverged_run_stops_keeps_the_last_good_checkpoint_and_says_so(ws, data):
    steps = len(data.train)
    with pytest.raises(H.Diverged, match=rf"'nan' stopped: the training loss became NaN or infinite at step 3 of "
                                         rf"{steps} \(epoch 2/3\) with LR 0\.1\. .*try a tenth.*The last good "
                                         r"checkpoint \(epoch 1\) is kept.*recorded as stopped \(diverged\)"):
        train(ws, NanAfter(good=steps + 2), data, epochs=3, name="nan")
    last = load_checkpoint(ws.outputs / "checkpoints" / "nan_last.pt")
    assert len(last["history"]["epoch"]) == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    rec = ws.results()["nan"]
    assert rec["status"] == "diverged" and rec["epochs_run"] == 1 and "step 3" in rec["error"]
    assert "1/3 (stopped: diverged)" in course.results_table(ws.outputs / "results")
    assert not (ws.outputs / "checkpoints" / "nan.lock").exists()
    again = train(ws, Tiny(), data, epochs=3, name="nan")  # a rerun trains again, from scratch
    assert again["status"] == "complete" and again["epochs_run"] == 3 and again["run_id"] != rec["run_id"]
    assert list((ws.outputs / "archive").glob("nan_*/nan.json"))


def test_nan_only_in_evaluation_stops_the_run_and_keeps_the_epoch_before(ws, data):
    with pytest.raises(H.Diverged, match=r"in epoch 2 the val loss is nan.*last good checkpoint \(epoch 1\)"):
        train(ws, NanAfter(good=len(data.train), in_eval=True, width=8), data, epochs=3, lr=0.05)
    rec = ws.results()["run"]
    assert rec["status"] == "diverged" and rec["epochs_run"] == 1 and np.isfinite(rec["history"]["val_loss"]).all()
    assert epochs_in(ws.outputs / "checkpoints" / "run_last.pt") == 1


def test_one_step_per_epoch_whose_step_poisons_the_weights_is_stopped(ws, fake_cifar):
    """One batch per epoch, its training loss finite: the NaN shows only in the weights and the evaluation."""
    one_batch = H.make_data(fake_cifar, batch_size=200, device="cpu", num_workers=0)
    assert len(one_batch.train) == 1
    with pytest.raises(H.Diverged, match="in epoch 1 the val loss is nan.*No epoch had finished: there is no "
                                         "checkpoint"):
        train(ws, PoisonedStep(width=8), one_batch, epochs=2, lr=0.05)
    assert ws.results()["run"]["status"] == "diverged" and ws.results()["run"]["epochs_run"] == 0
    assert not (ws.outputs / "checkpoints" / "run_last.pt").exists()


def test_a_loss_that_explodes_without_nan_is_stopped(ws, data):
    """Logits 1000x too large: the loss stays finite, far above a uniform guess's 2.30; recorded as stopped."""
    with pytest.raises(H.Diverged, match=r"training loss averaged [\d.e+]+, far above the 2.30 of a uniform guess "
                                         r"\(the limit is 46.1\)"):
        train(ws, Tiny(width=8, scale=1000.0), data, epochs=2, lr=0.05)
    rec = ws.results()["run"]
    assert rec["status"] == "diverged" and "far above" in rec["error"]
    assert "0/2 (stopped: diverged)" in course.results_table(ws.outputs / "results")


# ---- kills, lost and damaged files ---------------------------------------------------------------------------


def test_best_is_repaired_after_a_kill_between_last_and_best(ws, fake_cifar, monkeypatch, capsys):
    """Killed after _last.pt but before _best.pt: the best epoch is the last one, whose weights _last.pt holds."""
    no_val = H.make_data(fake_cifar, batch_size=20, val_fraction=0, device="cpu", num_workers=0)  # best = last
    real = R.Run._write_best

    def killed(self, model, history):
        if len(history["epoch"]) == 2:
            raise KeyboardInterrupt  # the process dies here
        real(self, model, history)

    monkeypatch.setattr(R.Run, "_write_best", killed)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(ws, Tiny(), no_val, epochs=2, lr=0.3, name="k")
    assert "Interrupted: outputs/checkpoints/k_last.pt holds the last finished epoch; run the cell again to resume" \
        in capsys.readouterr().out and not (ws.outputs / "checkpoints" / "k.lock").exists()
    monkeypatch.undo()
    checkpoints = ws.outputs / "checkpoints"
    assert load_checkpoint(checkpoints / "k_best.pt")["epoch"] == 1
    last = load_checkpoint(checkpoints / "k_last.pt")
    rec = train(ws, Tiny(), no_val, epochs=2, lr=0.3, name="k")  # nothing left to train: repair, finish
    best = load_checkpoint(checkpoints / "k_best.pt")
    assert best["epoch"] == 2 == rec["epochs_run"] and rec["status"] == "complete"
    assert all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())


def test_a_lost_best_checkpoint_is_chosen_again_with_a_warning(ws, data, monkeypatch):
    """_best.pt deleted mid-run while it held an earlier epoch: those weights are gone; the best is chosen anew."""
    interrupt_after(monkeypatch, 2)
    with pytest.raises(StopAfter):
        train(ws, Frozen(), data, epochs=3, name="f")  # flat validation accuracy: epoch 1 stays the best
    monkeypatch.undo()
    best = ws.outputs / "checkpoints" / "f_best.pt"
    assert load_checkpoint(best)["epoch"] == 1
    best.unlink()
    with pytest.warns(UserWarning, match=r"f_best.pt does not hold the best epoch \(1\); the best is chosen again "
                                         r"from epoch 2 on"):
        rec = train(ws, Frozen(), data, epochs=3, name="f")
    assert rec["best_epoch"] == 2 and load_checkpoint(best)["epoch"] == 2


def test_damaged_checkpoints_name_the_file_and_the_way_forward(ws, data, monkeypatch, capsys):
    interrupt_after(monkeypatch, 2)
    with pytest.raises(StopAfter):
        train(ws, Tiny(), data, epochs=3, name="d")
    monkeypatch.undo()
    last = ws.outputs / "checkpoints" / "d_last.pt"
    last.write_bytes(b"")  # 0 bytes, e.g. a Drive sync that never finished
    with pytest.raises(ValueError, match=r"d_last\.pt is damaged \(0 bytes.*course\.set_aside\("):
        load_checkpoint(last)
    with pytest.raises(ValueError, match=r"d_last\.pt is damaged"):
        train(ws, Tiny(), data, epochs=3, name="d")
    assert not (ws.outputs / "checkpoints" / "d.lock").exists()
    course.set_aside(last)
    assert list(last.parent.glob("d_last.pt.damaged-*"))
    rec = train(ws, Tiny(), data, epochs=3, name="d")  # resumes from d_prev.pt (epoch 1)
    assert "resumed after epoch 1/3 from outputs/checkpoints/d_prev.pt" in capsys.readouterr().out
    assert rec["epochs_run"] == 3


def test_leftovers_of_a_killed_writer_are_removed_never_a_live_ones(ws, data):
    checkpoints, results = ws.outputs / "checkpoints", ws.outputs / "results"
    checkpoints.mkdir(parents=True)
    results.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = [checkpoints / f".t_last.pt.{dead.pid}-0a1b2c3d.tmp", results / f".t.json.{dead.pid}-0a1b2c3d.tmp"]
    alive = [checkpoints / f".t_best.pt.{os.getppid()}-0a1b2c3d.tmp",
             checkpoints / f".other_last.pt.{dead.pid}-0a1b2c3d.tmp"]  # a live writer's; another run's
    for p in killed + alive:
        p.write_bytes(b"partial")
    train(ws, Tiny(width=8), data, epochs=1, name="t")
    assert not any(p.exists() for p in killed) and all(p.exists() for p in alive)


# ---- results records and the table --------------------------------------------------------------------------


def record(name, epochs_run, epochs, test_acc, status="complete", quick=False):
    history = {"steps_per_epoch": 1, "epoch": list(range(1, epochs_run + 1)), "train_loss": [1.0] * epochs_run,
               "train_acc": [90.0] * epochs_run, "val_loss": [1.0] * epochs_run,
               "val_acc": [70.0 + i for i in range(epochs_run)],
               "test_loss": [1.0] * epochs_run, "test_acc": [test_acc - 1] * (epochs_run - 1) + [test_acc],
               "epoch_time": [60.0] * epochs_run, "lr": [0.1] * epochs_run}
    model = H.make_model("resnet18")
    config = {"model": R.describe_model(model), "epochs": epochs, "scheduler": {"name": "OneCycleLR"}}
    rec = {"experiment": name, "run_id": "0123456789ab", "status": status, "quick": quick, "config": config,
           "params": H.count_params(model), **H.summarize(history), "wall_time_s": 600.0, "device": "CPU (test)",
           "versions": {}, "finished_at": "2026-01-01 10:00:00"}
    return {**rec, "checksum": course.record_checksum(rec)}


def save(rec, results):
    return write_json(results / f"{rec['experiment']}.json", rec)


def test_table_lists_every_run_with_its_state(tmp_path):
    results = tmp_path / "results"
    save(record("resnet18_onecycle", 20, 20, 94.12), results)
    save(record("steplr_cutout", 40, 150, 85.5, status="running"), results)
    save(record("my_own_run", 3, 20, 10.0, status="diverged"), results)
    save(record("try", 1, 1, 30.0, quick=True), results)
    lines = course.results_table(results).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {ln.split("|")[1].strip(): dict(zip(head, [c.strip() for c in ln.strip("|").split("|")]))
            for ln in lines[2:]}
    assert set(rows) == {"resnet18_onecycle", "steplr_cutout", "my_own_run", "try"}
    headline = rows["resnet18_onecycle"]
    assert headline["final test acc %"] == "94.12" and headline["epochs"] == "20/20"
    assert headline["params"] == "11,173,962" and headline["wall time"] == "10.0 min"
    assert headline["model"] == "resnet18 bn" and headline["test acc at best val %"] == "94.12"
    assert headline["scheduler"] == "OneCycleLR" and headline["final train acc %"] == "90.00"
    assert rows["steplr_cutout"]["epochs"] == "40/150 (running)"
    assert rows["my_own_run"]["epochs"] == "3/20 (stopped: diverged)" and headline["device"] == "CPU (test)"
    assert rows["try"]["epochs"] == "1/1 (QUICK)"
    assert "| try |" not in course.results_table(results, include_quick=False)


def test_a_bad_results_file_is_skipped_with_one_warning_naming_it(tmp_path):
    results = tmp_path / "results"
    save(record("good", 1, 1, 50.0), results)
    (results / "truncated.json").write_text('{"experiment": "trunc')
    (results / "a_list.json").write_text("[1, 2]")
    (results / "notes.json").write_text(json.dumps({"note": "my notes"}))
    with pytest.warns(UserWarning) as caught:
        runs = course.load_results(results)
    assert set(runs) == {"good"}
    assert sorted(str(w.message).split(":")[0] for w in caught) == [
        f"skipped {results / n}" for n in ("a_list.json", "notes.json", "truncated.json")]
    with pytest.warns(UserWarning):
        assert "| good |" in course.results_table(results)
    assert course.load_results(tmp_path / "no results yet") == {}


def test_a_bad_results_file_does_not_stop_training(ws, data):
    (ws.outputs / "results").mkdir(parents=True)
    (ws.outputs / "results" / "notes.json").write_text("not json")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10))
    with pytest.warns(UserWarning, match="notes.json"):
        rec = H.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1, run=ws.run("x"),
                    device="cpu", progress=False)
    assert rec["status"] == "complete"


def test_an_older_results_file_is_shown_with_dashes_and_a_warning(ws, data):
    results = ws.outputs / "results"
    results.mkdir(parents=True)
    old = {"experiment": "old_run", "status": "complete", "config": {"epochs": 5, "model": "resnet18"},
           "history": {"epoch": [1, 2], "test_acc": [50.0, 60.0]}}  # no epochs_run, params, device, ...
    (results / "old_run.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning, match=r"old_run.json is in an older format \(it has no params, epochs_run"):
        table = course.results_table(ws.outputs / "results")
    assert "| old_run | resnet18 | - | - | 2/5 | - | - | - | - | - |" in table
    with pytest.warns(UserWarning):
        full = ws.results()["old_run"]
    assert full["history"]["lr"] == [] and full["history"]["steps_per_epoch"] is None and full["quick"] is False
    with pytest.warns(UserWarning):
        assert train(ws, Tiny(width=8), data, name="new")["status"] == "complete"


def test_two_files_naming_one_experiment_are_flagged(tmp_path):
    results = tmp_path / "results"
    save(record("r", 1, 1, 50.0), results)
    (results / "Copy of r.json").write_text(json.dumps(record("r", 1, 1, 99.0)))
    with pytest.warns(UserWarning, match="Copy of r.json and .*r.json both hold experiment 'r'.*using r.json; "
                                         "rename or delete Copy of r.json"):
        runs = course.load_results(results)
    assert runs["r"]["final_test_acc"] == 50.0


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_update_readme_replaces_only_the_marked_table(tmp_path):
    script = _update_readme()
    save(record("r", 1, 1, 50.0), tmp_path / "results")
    save(record("q", 1, 1, 20.0, quick=True), tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    script.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:start -->\n| experiment |") and "| r |" in text
    assert "| q |" not in text  # never a QUICK run
    assert text.endswith("<!-- results:end -->\noutro\n") and "old" not in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        script.update_readme(readme, tmp_path)


# ---- a real kill ---------------------------------------------------------------------------------------------

RUN = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, {root!r})
    import torch, helpers as H
    from course.runs import Run
    data_dir, out_dir, kill_after, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    record = Run._write_record
    def record_then_die(self, history, status, **extra):
        record(self, history, status, **extra)
        if len(history["epoch"]) == kill_after and status == "running":
            os.kill(os.getpid(), signal.SIGKILL)
    Run._write_record = record_then_die
    H.seed_everything(0)
    data = H.make_data(data_dir, aug={{"cutout": 16}}, subset=80, batch_size=16, device="cpu", num_workers=0)
    model = H.make_model("resnet18")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, epochs=3, steps_per_epoch=len(data.train))
    rec = H.fit(model, data, opt, sched, epochs=3, run=Run(out_dir, "run"), device="cpu", progress=False)
    torch.save(model.state_dict(), out + ".pt")
    json.dump(rec["history"], open(out + ".json", "w"))
""")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(fake_cifar, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN.format(root=str(ROOT)))

    def go(out_dir, kill_after, out):
        return subprocess.run([sys.executable, str(script), str(fake_cifar), str(tmp_path / out_dir),
                               str(kill_after), str(tmp_path / out)], capture_output=True, text=True, timeout=600)

    straight = go("a", 0, "straight")
    assert straight.returncode == 0, straight.stderr
    killed = go("b", 1, "killed")
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    checkpoints = tmp_path / "b" / "checkpoints"
    assert epochs_in(checkpoints / "run_last.pt") == 1
    assert not list(checkpoints.glob("*.tmp")) and (checkpoints / "run.lock").exists()  # the dead process's lock
    resumed = go("b", 0, "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert "'run': resumed after epoch 1/3" in resumed.stdout and not (checkpoints / "run.lock").exists()
    h1, h2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("straight", "resumed"))
    for key in h1:
        if key != "epoch_time":
            assert np.allclose(h1[key], h2[key], rtol=1e-5, atol=1e-6), key
    w1, w2 = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("straight", "resumed"))
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), rtol=1e-4, atol=1e-5), k
