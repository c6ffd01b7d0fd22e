"""course.files: every write whole or absent (a failed write keeps the file from before and says where and how much
space is free), temporary files private to their process, one writer per run (the lock and its heartbeat), damaged
files set aside and runs archived, never deleted; a full disk met by a real training process."""

import errno
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import ROOT, Tiny, make_workspace

import course
import helpers as H
from course import files as F


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---- writes: whole or absent ---------------------------------------------------------------------------------


def test_temporary_files_are_private_to_the_writing_process(tmp_path, monkeypatch):
    written = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path: (written.append(path), real(obj, path)))
    F.save_checkpoint(tmp_path / "a_last.pt", model={})
    F.save_checkpoint(tmp_path / "a_last.pt", model={})
    assert len({str(p) for p in written}) == 2 and all(f".{os.getpid()}-" in p.name for p in written)
    assert all(p.name.startswith(".a_last.pt.") and p.name.endswith(".tmp") for p in written)
    assert [p.name for p in tmp_path.iterdir()] == ["a_last.pt"]


def test_keep_previous_moves_the_file_before_only_once_the_new_one_is_written(tmp_path):
    last, prev = tmp_path / "r_last.pt", tmp_path / "r_prev.pt"
    F.save_checkpoint(last, keep_previous=prev, model={"w": torch.ones(1)}, epoch=1)
    assert not prev.exists()
    F.save_checkpoint(last, keep_previous=prev, model={"w": torch.ones(1)}, epoch=2)
    assert F.load_checkpoint(last)["epoch"] == 2 and F.load_checkpoint(prev)["epoch"] == 1

    def fail(tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(F.WriteFailed):
        F.atomic_write(last, fail, keep_previous=prev)
    assert F.load_checkpoint(last)["epoch"] == 2 and F.load_checkpoint(prev)["epoch"] == 1  # nothing moved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r_last.pt", "r_prev.pt"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed")])
def test_a_failed_write_keeps_the_file_before_and_says_where_and_how_much_space_is_free(tmp_path, error):
    path = F.write_json(tmp_path / "results" / "r.json", {"epoch": 1})

    def fail(tmp):
        tmp.write_text('{"epo')  # half written when the disk filled up
        raise error

    with pytest.raises(F.WriteFailed) as err:
        F.atomic_write(path, fail)
    message = str(err.value)
    assert message.startswith(f"could not write {path} ({type(error).__name__}: ")
    assert f"{path.parent} has " in message and " free space" in message and ("MB" in message or "GB" in message)
    assert "Nothing half-written was left" in message and "ws.free_space()" in message and "resumes" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # one message, no chained traceback
    assert json.loads(path.read_text()) == {"epoch": 1} and tree(tmp_path) == ["results/r.json"]


@pytest.mark.parametrize("error", [ValueError("a bug, not a full disk"), KeyboardInterrupt()])
def test_other_errors_pass_through_and_leave_no_temporary_file(tmp_path, error):
    def fail(tmp):
        tmp.write_text("partial")
        raise error

    with pytest.raises(type(error)):
        F.atomic_write(tmp_path / "x.json", fail)
    assert tree(tmp_path) == []


def test_json_and_checkpoints_read_back(tmp_path):
    assert json.loads(F.write_json(tmp_path / "a" / "b.json", {"x": [1, 2]}).read_text()) == {"x": [1, 2]}
    F.save_checkpoint(tmp_path / "c.pt", model=Tiny(width=4).state_dict(), epoch=3)
    model = Tiny(width=4)
    ckpt = F.load_checkpoint(tmp_path / "c.pt", model)
    assert ckpt["epoch"] == 3 and all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt["model"].items())
    assert F.mb(1_500_000) == "1.5 MB" and F.mb(2_500_000_000) == "2.50 GB"
    assert F.folder_bytes(tmp_path) == sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert F.folder_bytes(tmp_path / "c.pt") == (tmp_path / "c.pt").stat().st_size
    assert F.folder_bytes(tmp_path / "nothing") == 0


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model = H.make_model("resnet18")
    F.save_checkpoint(tmp_path / "r18.pt", model=model.state_dict(),
                      arch=course.runs.describe_model(model))
    saved = r"r18\.pt holds a \{'name': 'resnet18', 'norm': 'bn'.*"
    with pytest.raises(ValueError, match=saved + r"not a \{'name': 'resnet34', 'norm': 'bn'.*build the model"):
        F.load_checkpoint(tmp_path / "r18.pt", H.make_model("resnet34"))
    with pytest.raises(ValueError, match=saved + r"not a \{'name': 'resnet18', 'norm': 'ln'"):
        F.load_checkpoint(tmp_path / "r18.pt", H.make_model("resnet18", norm="ln"))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((tmp_path / "r18.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"damaged\.pt is damaged \(5,000 bytes.*course\.set_aside\("):
        F.load_checkpoint(damaged, model)
    damaged.rename(tmp_path / "r_best.pt")  # a finished run's only checkpoint: nothing to resume from
    with pytest.raises(ValueError, match=r"r_best\.pt is damaged.*restore it .*start_over=True\)\.$"):
        F.load_checkpoint(tmp_path / "r_best.pt", model)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no 'model' entry"):
        F.load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="run the training notebook first"):
        F.load_checkpoint(tmp_path / "missing.pt")
    F.save_checkpoint(tmp_path / "lin.pt", model=torch.nn.Linear(4, 2).state_dict())
    with pytest.raises(ValueError, match=r"lin\.pt holds a model of another shape, not a \{'class': 'Linear'.*size"):
        F.load_checkpoint(tmp_path / "lin.pt", torch.nn.Linear(3, 2))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """weights_only: a pickle naming a callable is refused, and nothing runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt is damaged"):
        F.load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_damaged_files_are_set_aside_and_runs_archived_never_deleted(tmp_path, capsys):
    bad = tmp_path / "r_last.pt"
    bad.write_bytes(b"")
    moved = course.set_aside(bad)
    assert not bad.exists() and moved.parent == tmp_path and moved.name.startswith("r_last.pt.damaged-")
    assert f"moved {bad} to {moved}" in capsys.readouterr().out
    run_files = [tmp_path / n for n in ("r.json", "r_best.pt")]
    for p in run_files:
        p.write_text(p.name)
    F.move_to_archive([*run_files, tmp_path / "r_prev.pt"], tmp_path / "archive", "r")  # a missing file is skipped
    (dest,) = (tmp_path / "archive").iterdir()
    assert dest.name.startswith("r_") and sorted(p.read_text() for p in dest.iterdir()) == ["r.json", "r_best.pt"]
    assert "moved 'r' (2 files) to" in capsys.readouterr().out
    F.move_to_archive([tmp_path / "nothing.pt"], tmp_path / "archive2", "n")
    assert not (tmp_path / "archive2").exists()


# ---- one writer per run --------------------------------------------------------------------------------------


def test_the_lock_names_its_holder_and_refuses_a_live_one(tmp_path):
    path = tmp_path / "r.lock"
    other = {"host": socket.gethostname(), "pid": os.getppid(), "token": "x", "started": "2026-01-01 10:00:00",
             "heartbeat": time.time()}  # a live process of this machine: pytest's parent
    path.write_text(json.dumps(other))
    lock = F.RunLock(path, "r")
    with pytest.raises(course.RunBusy, match=rf"'r' is being trained by another process right now \(host "
                                             rf"{socket.gethostname()}, PID {os.getppid()}, started 2026-01-01 "
                                             rf"10:00:00, last seen \d s ago\)\. This one stops before writing "
                                             rf"anything.*another EXPERIMENT name.*in 2 minutes"):
        lock.acquire()
    lock.release()  # a refused lock never removes the other's
    assert json.loads(path.read_text()) == other
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({**other, "pid": dead.pid}))  # its process is gone: abandoned
    lock.acquire()
    try:
        mine = json.loads(path.read_text())
        assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname() and mine["token"] != "x"
        assert [p.name for p in tmp_path.iterdir()] == ["r.lock"]  # the abandoned lock is gone, nothing set aside
    finally:
        lock.release()
    assert not path.exists()


def test_a_lock_from_another_machine_counts_until_its_heartbeat_is_stale(tmp_path):
    path = tmp_path / "shared.lock"
    other = {"host": "colab-runtime-2", "pid": 77, "token": "x", "started": "2026-01-01 10:00:00"}
    path.write_text(json.dumps({**other, "heartbeat": time.time() - 10}))
    with pytest.raises(course.RunBusy, match="host colab-runtime-2, PID 77.*last seen 1\\d s ago.*in 2 minutes"):
        F.RunLock(path, "shared").acquire()
    path.write_text(json.dumps({**other, "heartbeat": time.time() - 600}))  # that runtime died 10 minutes ago
    lock = F.RunLock(path, "shared")
    lock.acquire()
    lock.release()
    path.write_text(json.dumps(other))  # no heartbeat at all: abandoned
    lock.acquire()
    lock.release()
    path.write_text("")  # a lock whose writer was killed before it wrote: it counts by its age, as a heartbeat
    with pytest.raises(course.RunBusy, match="last seen \\d s ago"):
        lock.acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    lock.acquire()
    lock.release()
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    lock = F.RunLock(tmp_path / "r.lock", "r")
    lock.BEAT_S = 0.05
    lock.acquire()
    try:
        first = json.loads(lock.path.read_text())["heartbeat"]
        deadline = time.time() + 10
        while json.loads(lock.path.read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads(lock.path.read_text())["heartbeat"] > first
    finally:
        lock.release()
    assert not lock.path.exists() and not lock._thread.is_alive()


HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from course.files import RunLock
    lock = RunLock(sys.argv[1], "busy")
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.mark.slow
def test_a_second_writer_is_refused_at_start_and_named(fake_cifar, tmp_path):
    """Another kernel trains 'busy': this one stops before reading or writing the run, naming the other process;
    once that process is gone its lock is abandoned and the run trains."""
    script = tmp_path / "hold.py"
    script.write_text(HOLD.format(root=str(ROOT)))
    ws = make_workspace(tmp_path / "ws", data_dir=fake_cifar)
    data = H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)
    lock = ws.outputs / "checkpoints" / "busy.lock"
    lock.parent.mkdir(parents=True)

    def train():
        model = Tiny(width=8)
        return H.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=2, run=ws.run("busy"),
                     device="cpu", progress=False)

    other = subprocess.Popen([sys.executable, str(script), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(course.RunBusy, match=rf"'busy' is being trained by another process right now \(host "
                                                 rf"{socket.gethostname()}, PID {other.pid}, started .*another "
                                                 rf"EXPERIMENT"):
            train()
        assert tree(ws.outputs) == ["checkpoints/busy.lock"]
    finally:
        other.kill()
        other.wait()
    rec = train()  # its process is gone: the lock is abandoned
    assert rec["status"] == "complete" and not lock.exists()


# ---- a full disk ---------------------------------------------------------------------------------------------


def test_a_full_disk_during_training_keeps_the_epoch_before_and_a_rerun_resumes(fake_cifar, tmp_path, monkeypatch,
                                                                                capsys):
    """Epoch 2's checkpoint meets a full disk (in this process: torch.save fails as a full Drive makes it fail)."""
    ws = make_workspace(tmp_path, data_dir=fake_cifar)
    data = H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)
    real, calls = torch.save, []

    def full_from_the_third_file(obj, path):  # epoch 1 writes _last.pt and _best.pt; then the disk is full
        calls.append(path)
        if len(calls) > 2:
            with open(path, "wb") as f:
                f.write(b"PK partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(torch, "save", full_from_the_third_file)

    def train():
        torch.manual_seed(0)
        model = Tiny(width=8)
        return H.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=2, run=ws.run("full"),
                     device="cpu", progress=False)

    checkpoints = ws.outputs / "checkpoints"
    with pytest.raises(course.WriteFailed, match=rf"could not write {re.escape(str(checkpoints / 'full_last.pt'))} "
                                                 rf"\(OSError: .*No space left on device\); "
                                                 rf"{re.escape(str(checkpoints))} has .* free space"):
        train()
    assert len(F.load_checkpoint(checkpoints / "full_last.pt")["history"]["epoch"]) == 1
    assert course.load_results(ws.outputs / "results")["full"]["epochs_run"] == 1
    assert tree(ws.outputs) == ["checkpoints/full_best.pt", "checkpoints/full_last.pt", "results/full.json"]
    monkeypatch.setattr(torch, "save", real)  # space freed
    rec = train()
    assert "resumed after epoch 1/2" in capsys.readouterr().out and rec["status"] == "complete"


FULL = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, {root!r})
    import torch, helpers as H, course
    from course.runs import Run
    data_dir, out_dir, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    record = Run._write_record
    def record_then_fill_the_disk(self, history, status, **extra):
        record(self, history, status, **extra)
        if limit and len(history["epoch"]) == 1:  # from now on no file may grow past `limit` bytes
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    Run._write_record = record_then_fill_the_disk
    H.seed_everything(0)
    data = H.make_data(data_dir, batch_size=20, subset=40, val_fraction=0, device="cpu", num_workers=0)
    model = H.make_model("resnet18")  # a 45 MB checkpoint
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    try:
        rec = H.fit(model, data, opt, epochs=2, run=Run(out_dir, "full"), device="cpu", progress=False)
        print("complete", rec["epochs_run"])
    except course.WriteFailed as err:
        print("WriteFailed:", err)
""")


@pytest.mark.slow
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
    assert len(F.load_checkpoint(checkpoints / "full_last.pt")["history"]["epoch"]) == 1
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    again = subprocess.run([sys.executable, str(script), str(fake_cifar), str(out), "0"], capture_output=True,
                           text=True, timeout=600)
    assert "complete 2" in again.stdout, again.stderr
    assert "resumed after epoch 1/2" in again.stdout
