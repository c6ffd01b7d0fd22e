"""Issue 23's "no silent wrong, round 3": the lock taken atomically, no advice that loses work, temporary files that
only their own process removes, Drive folders that only look like MyDrive, a real run that QUICK's clean-up must not
touch, settings a notebook can change in its code, and parameters of the wrong kind."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import types

import pytest
import torch
from conftest import Tiny, make_workspace

import course
import course.workspace as W
import helpers as H
from course.files import RunBusy, RunLock
from course.runs import StaleRun


def _take(path, results, go):
    go.wait()
    lock = RunLock(path, "x")
    try:
        lock.acquire()
        results.put("won")
        time.sleep(0.3)
        lock.release()
    except RunBusy:
        results.put("refused")


@pytest.mark.slow
def test_of_two_processes_taking_one_lock_at_once_exactly_one_wins(tmp_path):
    ctx = mp.get_context("fork")
    for trial in range(12):
        path, results, go = tmp_path / f"{trial}.lock", ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_take, args=(path, results, go)) for _ in range(2)]
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(30)
        assert sorted(results.get(timeout=5) for _ in procs) == ["refused", "won"], f"trial {trial}"


def test_the_refusal_never_advises_deleting_the_lock(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the first tab, still training
    try:
        holder = RunLock(tmp_path / "r.lock", "r")
        (tmp_path / "r.lock").write_text(json.dumps({**holder.me, "pid": live.pid, "heartbeat": time.time()}))
        with pytest.raises(RunBusy) as err:
            RunLock(tmp_path / "r.lock", "r").acquire()
        assert f"PID {live.pid}" in str(err.value) and "another EXPERIMENT name" in str(err.value)
        assert "delete" not in str(err.value).lower()  # deleting it let a second writer in beside the first
    finally:
        live.kill()


def test_a_run_removes_only_temporary_files_of_dead_processes(tmp_path, fake_cifar):
    ws = make_workspace(tmp_path, EPOCHS=1)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = ws.outputs / "checkpoints"
        folder.mkdir(parents=True)
        mine = folder / f".r_last.pt.{live.pid}-abcd1234.tmp"  # another process writing right now
        dead = folder / ".r_last.pt.999999999-abcd1234.tmp"  # left by a killed process
        mine.write_bytes(b"x")
        dead.write_bytes(b"x")
        data = H.make_data(fake_cifar, batch_size=50, subset=50, val_fraction=0.2)
        model = Tiny()
        H.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1, run=ws.run("r"), progress=False)
        assert mine.exists() and not dead.exists()
    finally:
        live.kill()


@pytest.fixture
def on_colab(tmp_path, monkeypatch):
    colab, drive = types.ModuleType("google.colab"), types.ModuleType("google.colab.drive")
    drive.mount = lambda path, **kw: (tmp_path / "content" / "drive" / "MyDrive").mkdir(parents=True, exist_ok=True)
    colab.drive = drive
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    monkeypatch.setattr(W, "CONTENT", tmp_path / "content")


@pytest.mark.parametrize("folder", ["drive/MyDrive2/course", "drive/.Trash/course", "drive/Shareddrives/x"])
def test_folders_that_only_look_like_mydrive_are_refused(on_colab, tmp_path, folder):
    with pytest.raises(ValueError, match="must be a folder inside .*MyDrive"):
        course.start({}, drive_folder=str(tmp_path / "content" / folder))


def test_quick_clean_up_never_deletes_a_real_run_whose_folder_is_named_quick(tmp_path):
    ws = course.start({"QUICK": False}, outputs=tmp_path / "quick", images=tmp_path / "images", data_dir=tmp_path)
    (ws.outputs / "results").mkdir(parents=True)
    (ws.outputs / "results" / "real.json").write_text("{}")
    ws.free_space(quick=True)
    assert (tmp_path / "quick" / "results" / "real.json").exists()


def _run(ws, data, weight_decay=(5e-4, 5e-4), monitor="val_acc"):
    model = Tiny()
    groups = [{"params": [model.conv.weight, model.conv.bias], "weight_decay": weight_decay[0]},
              {"params": list(model.fc.parameters()), "weight_decay": weight_decay[1]}]
    opt = torch.optim.SGD(groups, lr=0.01)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")
    return H.fit(model, data, opt, sched, epochs=1, run=ws.run("r"), monitor=monitor, progress=False)


def test_a_changed_weight_decay_of_one_group_or_a_changed_monitor_is_a_changed_run(tmp_path, fake_cifar):
    ws = make_workspace(tmp_path)
    data = H.make_data(fake_cifar, batch_size=50, subset=100, val_fraction=0.2)
    record = _run(ws, data)
    assert [g["weight_decay"] for g in record["config"]["optimizer"]["groups"]] == [5e-4, 5e-4]
    assert record["config"]["monitor"] == "val_acc"
    with pytest.raises(StaleRun, match=r"optimizer\.groups: .*0\.0"):
        _run(ws, data, weight_decay=(5e-4, 0.0))
    with pytest.raises(StaleRun, match=r"monitor: 'val_acc' -> 'val_loss'"):
        _run(ws, data, monitor="val_loss")


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu"}, "device must be 'auto', 'cpu', 'cuda'"),
    ({"start_over": "yes"}, "start_over must be True or False, got 'yes'"),
])
def test_start_keywords_of_the_wrong_kind_are_refused_by_name(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        course.start({}, outputs=tmp_path / "o", images=tmp_path / "i", data_dir=tmp_path, **kwargs)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("params, message", [
    ({"EPOCHS": "20"}, "EPOCHS must be a whole number from 1 to 1000, got '20'"),
    ({"QUICK": "False"}, "QUICK must be True or False, got 'False'"),
    ({"GRID_MODELS": "resnet18"}, "GRID_MODELS must be a list"),
    ({"RUNS": {"ok": "crop"}}, "AUGMENT"),
    ({"AUGMENT": {"crop": True, "cutuot": 16}}, "unknown augmentation \\['cutuot'\\]"),
])
def test_a_parameter_of_the_wrong_type_is_named_with_what_is_allowed(params, message):
    with pytest.raises(ValueError, match=message):
        course.checks.check_parameters(params)
    assert os.getcwd()  # nothing else happened
