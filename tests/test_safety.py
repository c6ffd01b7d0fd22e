"""No silent wrong result: runs that break down, two writers of one run, old and doubled results files, bad names,
a full disk, bad inputs to the LR finder and Grad-CAM, the worker count, and what a run's record holds. Each case
is written as a student would trigger it; each asserts the message or the result."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, NanAfter, Tiny

import helpers as H


@pytest.fixture(scope="module")
def data(fake_cifar):
    return H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)


def fit(model, data, tmp_path, epochs=2, lr=0.05, name="run", scheduler=None, criterion=None, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return H.fit(model, data, optimizer, scheduler(optimizer) if scheduler else None, criterion, epochs=epochs,
                 name=name, output_dir=tmp_path, device="cpu", progress=False, **kwargs)


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---- 1. a run that broke down is stopped, never "complete" -------------------------------------------------


def test_nan_only_in_evaluation_stops_the_run_and_keeps_the_epoch_before(data, tmp_path):
    with pytest.raises(H.Diverged, match=r"in epoch 2 the validation loss is nan.*last good checkpoint \(epoch 1\)"):
        fit(NanAfter(good=len(data.train), in_eval=True, width=8), data, tmp_path, epochs=3)
    rec = H.load_results(tmp_path)["run"]
    assert rec["status"] == "diverged" and rec["epochs_run"] == 1 and np.isfinite(rec["history"]["val_loss"]).all()
    assert H.load_checkpoint(tmp_path / "checkpoints" / "run_last.pt")["epoch"] == 1


class NanGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient backward: the step poisons the weights, the loss that step was fine."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class PoisonedStep(Tiny):
    def forward(self, x):
        return NanGrad.apply(super().forward(x)) if self.training else super().forward(x)


def test_one_step_per_epoch_whose_step_poisons_the_weights_is_stopped(fake_cifar, tmp_path):
    """One batch per epoch, its training loss finite: the NaN shows only in the weights and the evaluation."""
    one_batch = H.make_data(fake_cifar, batch_size=200, device="cpu", num_workers=0)
    assert len(one_batch.train) == 1
    with pytest.raises(H.Diverged, match="in epoch 1 the validation loss is nan.*No epoch had finished"):
        fit(PoisonedStep(width=8), one_batch, tmp_path, epochs=2)
    assert H.load_results(tmp_path)["run"]["status"] == "diverged"
    assert not (tmp_path / "checkpoints" / "run_last.pt").exists()


def test_a_loss_that_explodes_without_nan_is_stopped(data, tmp_path):
    """Logits 1000x too large: the loss stays finite, far above a uniform guess's 2.30; recorded as stopped."""
    with pytest.raises(H.Diverged, match=r"training loss averaged [\d.e+]+ over the epoch, far above the 2.30 of a "
                                         r"uniform guess \(the limit is 46.1\)"):
        fit(Tiny(width=8, scale=1000.0), data, tmp_path, epochs=2)
    rec = H.load_results(tmp_path)["run"]
    assert rec["status"] == "diverged" and "far above" in rec["error"]
    assert "0/2 (stopped: diverged)" in H.results_table(tmp_path)


@pytest.mark.parametrize("content, message", [
    ({"lr": 0, "batch_size": 128}, "must be a number from 1e-06 to 10, got 0"),
    ({"lr": 50, "batch_size": 128}, "lr_finder.json must be a number from 1e-06 to 10, got 50"),
    ({"lr": 5, "batch_size": 128}, "\\(5 at batch 128\\) scaled to batch 512 must be a number from 1e-06 to 10, "
                                   "got 20"),
    ({"lr": -0.1, "batch_size": 128}, "got -0.1"),
    ({"lr": "0.02", "batch_size": 128}, "got '0.02'"),
    ({"lr": 0.02, "batch_size": 0}, "holds batch_size 0; it must be a whole number"),
    ({"lr": 0.02}, "is damaged \\(KeyError"),
    ([0.02], "is damaged"),
])
def test_an_lr_from_lr_finder_json_is_checked_before_training(tmp_path, content, message):
    (tmp_path / "lr_finder.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as err:
        H.resolve_lr(None, tmp_path, batch_size=512)
    assert "notebook 02" in str(err.value)


@pytest.mark.parametrize("lr", [0.0, 50.0, float("nan")])
def test_fit_refuses_an_lr_outside_the_sane_range_before_writing_anything(data, tmp_path, lr):
    with pytest.raises(ValueError, match="learning rate the optimizer and scheduler were built with must be a number"):
        fit(Tiny(width=8), data, tmp_path, lr=lr)
    assert files(tmp_path) == []


def test_onecycle_is_checked_at_its_peak(data, tmp_path):
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=40.0, total_steps=40)  # noqa: E731
    with pytest.raises(ValueError, match="got 40.0"):
        fit(Tiny(width=8), data, tmp_path, lr=1.0, scheduler=sched)


# ---- 2. one writer per run -------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import helpers as H
    lock = H._RunLock(sys.argv[1], "busy")
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_writer_is_refused_at_start_and_named(data, tmp_path):
    """Another kernel trains 'busy': this one stops before reading or writing the run, naming the other process."""
    script = tmp_path / "scripts" / "hold.py"
    script.parent.mkdir()
    script.write_text(HOLD.format(root=str(ROOT)))
    tmp_path = tmp_path / "ws"
    lock = tmp_path / "checkpoints" / "busy.lock"
    lock.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, str(script), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(H.RunBusy, match=rf"'busy' is being trained by another process right now \(host "
                                            rf"{socket.gethostname()}, PID {other.pid}, started .*another EXPERIMENT"):
            fit(Tiny(width=8), data, tmp_path, name="busy")
        assert files(tmp_path) == ["checkpoints/busy.lock"]
    finally:
        other.kill()
        other.wait()
    rec = fit(Tiny(width=8), data, tmp_path, name="busy")  # its process is gone: the lock is abandoned
    assert rec["status"] == "complete" and not lock.exists()


def test_a_lock_from_another_machine_counts_until_its_heartbeat_is_stale(data, tmp_path):
    lock = tmp_path / "checkpoints" / "shared.lock"
    lock.parent.mkdir()
    other = {"host": "colab-runtime-2", "pid": 77, "token": "x", "started": "2026-01-01 10:00:00"}
    lock.write_text(json.dumps({**other, "heartbeat": time.time() - 10}))
    with pytest.raises(H.RunBusy, match="host colab-runtime-2, PID 77.*last seen 1\\d s ago.*in 2 minutes"):
        fit(Tiny(width=8), data, tmp_path, name="shared")
    lock.write_text(json.dumps({**other, "heartbeat": time.time() - 600}))  # that runtime died 10 minutes ago
    assert fit(Tiny(width=8), data, tmp_path, name="shared")["status"] == "complete"


def test_temporary_files_are_private_to_the_writing_process(tmp_path, monkeypatch):
    written = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path: (written.append(path), real(obj, path)))
    H.save_checkpoint(tmp_path / "a_last.pt", model={})
    H.save_checkpoint(tmp_path / "a_last.pt", model={})
    assert len({str(p) for p in written}) == 2 and all(f".{os.getpid()}-" in p.name for p in written)
    assert [p.name for p in tmp_path.iterdir()] == ["a_last.pt"]


# ---- 3. results files that outlive the code --------------------------------------------------------------------


def test_an_older_results_file_is_shown_with_dashes_and_a_warning(data, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    old = {"experiment": "old_run", "status": "complete", "config": {"epochs": 5, "model": "resnet18"},
           "history": {"epoch": [1, 2], "test_acc": [50.0, 60.0]}}  # no epochs_run, params, device, ...
    (results / "old_run.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning, match=r"old_run.json is in an older format \(it has no params, epochs_run"):
        table = H.results_table(tmp_path)
    assert "| old_run | resnet18 | - | - | 2/5 | - | - | - | - | - |" in table
    with pytest.warns(UserWarning):
        H.print_expected(["old_run"], tmp_path)
    assert "old_run: not measured yet" in capsys.readouterr().out  # no final test accuracy: nothing to expect
    with pytest.warns(UserWarning):
        assert fit(Tiny(width=8), data, tmp_path, name="new")["status"] == "complete"


def test_two_files_naming_one_experiment_are_flagged(tmp_path):
    def record(acc):
        h = {k: [1.0] for k in ("epoch", "train_acc", "test_acc", "val_acc")}
        h["test_acc"] = [acc]
        return H.run_record("r", {"epochs": 1}, h, 10, "cpu", 1.0, "complete", best_epoch=1)

    H.save_results(record(50.0), tmp_path)
    (tmp_path / "results" / "Copy of r.json").write_text(json.dumps(record(99.0)))
    with pytest.warns(UserWarning, match="Copy of r.json and .*r.json both hold experiment 'r'.*using r.json; "
                                         "rename or delete Copy of r.json"):
        runs = H.load_results(tmp_path)
    assert runs["r"]["final_test_acc"] == 50.0


# ---- 4. names and folders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "a/b", "", " ", "x" * 300, ".hidden", "a b"])
def test_a_run_name_that_could_not_name_files_safely_is_refused(data, tmp_path, name):
    work = tmp_path / "ws"
    with pytest.raises(ValueError, match=r"letters, digits, '-', '_' or '.' \(not first\)"):
        fit(Tiny(width=8), data, work, name=name)
    with pytest.raises(ValueError, match="EXPERIMENT must be 1 to 64 letters"):
        H.check_parameters(EXPERIMENT=name)
    assert files(tmp_path) == []


# ---- 5. a full disk -----------------------------------------------------------------------------------------

FULL = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, {root!r})
    import torch, helpers as H
    data_dir, out_dir, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    save = H.save_results
    def save_then_fill_the_disk(record, output_dir):
        out = save(record, output_dir)
        if limit and record["epochs_run"] == 1:  # from now on no file may grow past `limit` bytes
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return out
    H.save_results = save_then_fill_the_disk
    H.seed_everything(0)
    data = H.make_data(data_dir, batch_size=20, device="cpu", num_workers=0)
    model = H.make_model("resnet18")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    try:
        rec = H.fit(model, data, opt, None, epochs=2, name="full", output_dir=out_dir, device="cpu", progress=False)
        print("complete", rec["epochs_run"])
    except H.WriteFailed as err:
        print("WriteFailed:", err)
""")


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_where_and_how_much(fake_cifar, tmp_path):
    """The file system refuses to grow a file during epoch 2's checkpoint (as a full Drive does): a message naming
    the folder and its free space, epoch 1's checkpoint intact, no temporary file; a rerun with space resumes."""
    script = tmp_path / "full.py"
    script.write_text(FULL.format(root=str(ROOT)))
    out = tmp_path / "ws"
    done = subprocess.run([sys.executable, str(script), str(fake_cifar), str(out), str(1_000_000)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    checkpoints = out / "checkpoints"
    assert f"WriteFailed: could not write {checkpoints / 'full_last.pt'}" in done.stdout
    assert f"{checkpoints} has " in done.stdout and "free space" in done.stdout and "resumes" in done.stdout
    assert H.load_checkpoint(checkpoints / "full_last.pt")["epoch"] == 1
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    again = subprocess.run([sys.executable, str(script), str(fake_cifar), str(out), "0"], capture_output=True,
                           text=True, timeout=600)
    assert "complete 2" in again.stdout, again.stderr


# ---- 7. the LR finder's and Grad-CAM's inputs --------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"start_lr": 1e-2, "end_lr": 1e-4}, "end_lr must be a number above the first LR of the test \\(0.01\\)"),
    ({"end_lr": float("nan")}, "end_lr must be a number above"),
    ({"end_lr": -1}, "got -1"),
    ({"start_lr": 0}, "start_lr must be a positive number \\(or None: the optimizer's LR\\), got 0"),
    ({"num_iter": 0}, "num_iter must be a whole number of steps"),
])
def test_range_test_settings_that_make_no_sense_are_refused(data, kwargs, message):
    model = Tiny(width=8)
    with pytest.raises(ValueError, match=message):
        H.find_lr(model, torch.optim.SGD(model.parameters(), lr=1e-5), nn.CrossEntropyLoss(), data.train, **kwargs)


@pytest.mark.parametrize("targets", [[2.7, 1.2, 0.9], [True, False, True], ["cat", "dog", "cat"],
                                     [float("nan"), 1, 2], torch.tensor([2.7, 1.2, 0.9]), [1, 2], [0, 1, 10]])
def test_grad_cam_takes_only_class_indices(targets):
    model = H.make_model("resnet18").eval()
    with H.GradCAM(model, "layer3") as cam, pytest.raises(ValueError, match="3 class indices \\(whole numbers from "
                                                                         "0 to 9, one per image\\)"):
        cam(torch.randn(3, 3, 32, 32), targets)
    with H.GradCAM(model, "layer3") as cam:
        assert cam(torch.randn(3, 3, 32, 32), np.array([1, 2, 3])).shape == (3, 32, 32)


@pytest.mark.parametrize("layer", [3, None, 2.5])
def test_grad_cam_layer_must_be_a_layer_or_its_name(layer):
    with pytest.raises(ValueError, match="target_layer must be a layer of the model or its name.*layer3"):
        H.GradCAM(H.make_model("resnet18"), layer)


# ---- 8. the worker count never changes what a run learns -----------------------------------------------------


def test_augmentations_do_not_depend_on_the_number_of_workers(fake_cifar, tmp_path):
    x, y = H.load_cifar10(fake_cifar)
    batches = {}
    for workers in (0, 2):
        loader = H.make_loader(x[:64], y[:64], H.make_transforms({"cutout": 16, "rotate": 5}), batch_size=16,
                               shuffle=True, num_workers=workers, seed=5)
        H.set_epoch(loader, 3)
        batches[workers] = torch.cat([b for b, _ in loader])
    assert torch.equal(batches[0], batches[2])
    weights = {}
    for workers in (0, 2):
        data = H.make_data(fake_cifar, aug={"cutout": 16}, batch_size=20, device="cpu", num_workers=workers)
        torch.manual_seed(0)
        model = Tiny(width=8)
        fit(model, data, tmp_path / str(workers), epochs=2)
        weights[workers] = model.state_dict()
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


# ---- 9. a run's record holds every setting that changes its numbers -------------------------------------------


def test_the_record_holds_loss_scheduler_augmentation_and_data_settings(fake_cifar, tmp_path):
    data = H.make_data(fake_cifar, aug={"crop": True, "flip": False, "cutout": 16, "rotate": 5}, batch_size=20,
                       device="cpu", num_workers=0)
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=2 * len(data.train),  # noqa
                                                          pct_start=0.25, anneal_strategy="linear")
    rec = fit(Tiny(width=8), data, tmp_path, scheduler=sched, criterion=nn.CrossEntropyLoss(label_smoothing=0.1))
    cfg = rec["config"]
    assert cfg["criterion"] == {"name": "CrossEntropyLoss", "reduction": "mean", "ignore_index": -100,
                                "label_smoothing": 0.1}
    s = cfg["scheduler"]
    assert s["name"] == "OneCycleLR" and s["max_lr"] == 0.05 and s["total_steps"] == 2 * len(data.train)
    assert s["cycle_momentum"] is True and (s["base_momentum"], s["max_momentum"]) == (0.85, 0.95)
    assert s["schedule_phases"][0]["end_step"] == pytest.approx(0.25 * s["total_steps"] - 1)
    assert cfg["data"] == {"train_images": 180, "val_images": 20, "test_images": 50, "seed": 0,
                           "augment": {"crop": True, "flip": False, "cutout": 16, "rotate": 5}}
    step = fit(Tiny(width=8), data, tmp_path, name="step",
               scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.2))
    assert {"step_size": 7, "gamma": 0.2}.items() <= step["config"]["scheduler"].items()
    with pytest.raises(H.StaleRun, match=r"criterion.label_smoothing: 0.1 -> 0.0"):
        fit(Tiny(width=8), data, tmp_path, scheduler=sched, criterion=nn.CrossEntropyLoss())
    with pytest.raises(H.StaleRun, match=r"scheduler.max_momentum: 0.95 -> 0.9"):
        fit(Tiny(width=8), data, tmp_path, criterion=nn.CrossEntropyLoss(label_smoothing=0.1),
            scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=2 * len(data.train),
                                                                   pct_start=0.25, anneal_strategy="linear",
                                                                   max_momentum=0.9))
