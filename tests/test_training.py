"""Training: fit's history, losses, schedulers, checkpoints and an exact resume after a real kill."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, NanAfter, Tiny

import helpers as H


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
    return H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)


def per_epoch_lr(history):
    n = history["steps_per_epoch"]
    return [history["lr"][i * n] for i in range(len(history["epoch"]))]


def sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def run(model, data, tmp_path, epochs=2, lr=0.1, scheduler=None, name="run", **kwargs):
    """fit with a plain SGD and a fresh output folder per test."""
    optimizer = sgd(model, lr)
    if callable(scheduler):
        scheduler = scheduler(optimizer)
    return H.fit(model, data, optimizer, scheduler, epochs=epochs, name=name, output_dir=tmp_path, device="cpu",
                 progress=False, **kwargs)


def test_fit_learns_and_records_history(data, tmp_path):
    torch.manual_seed(0)
    rec = run(Tiny(), data, tmp_path, epochs=10, lr=0.2, scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.2, epochs=10, steps_per_epoch=len(data.train)))
    h = rec["history"]
    assert h["epoch"] == list(range(1, 11)) and rec["status"] == "complete" and rec["epochs_run"] == 10
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "epoch_time"):
        assert len(h[key]) == 10
    assert len(h["lr"]) == 10 * len(data.train) and h["steps_per_epoch"] == len(data.train)
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert h["test_acc"][-1] >= 70  # classes differ by colour: far above the 10% of chance
    assert rec == json.loads((tmp_path / "results" / "run.json").read_text())


def test_the_step_by_hand_equals_train_one_epoch(data):
    """Notebook 03's five lines (forward, loss, zero_grad, backward, step) are what the helper does per batch."""
    torch.manual_seed(0)
    a = Tiny()
    b = Tiny()
    b.load_state_dict(a.state_dict())
    x, y = next(iter(data.train))
    opt_a, opt_b = sgd(a), sgd(b)
    loss = nn.CrossEntropyLoss()(a(x), y)
    opt_a.zero_grad()
    loss.backward()
    opt_a.step()
    H.train_one_epoch(b, [(x, y)], opt_b, nn.CrossEntropyLoss(), progress=False)
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-7), k


def test_schedulers_step_by_their_unit(data, tmp_path):
    """OneCycle per batch (as torch computes it), StepLR per epoch, ReduceLROnPlateau on validation accuracy."""
    sched = torch.optim.lr_scheduler
    onecycle = lambda o: sched.OneCycleLR(o, max_lr=0.1, epochs=3, steps_per_epoch=len(data.train),  # noqa: E731
                                          pct_start=0.3, anneal_strategy="linear")
    h = run(Tiny(), data, tmp_path, epochs=3, scheduler=onecycle, name="onecycle")["history"]
    opt = sgd(Tiny())
    ref = onecycle(opt)
    expected = []
    for _ in range(3 * len(data.train)):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert np.allclose(h["lr"], expected, rtol=1e-12)
    h = run(Tiny(), data, tmp_path, epochs=5, scheduler=lambda o: sched.StepLR(o, step_size=2, gamma=0.1),
            name="step")["history"]
    assert np.allclose(per_epoch_lr(h), [0.1, 0.1, 0.01, 0.01, 0.001])
    assert len(set(h["lr"][:2 * h["steps_per_epoch"]])) == 1  # constant inside an epoch
    assert [H.step_unit(s) for s in (ref, sched.StepLR(opt, 2), sched.ReduceLROnPlateau(opt), None)] == [
        "batch", "epoch", "metric", None]


def test_plateau_watches_validation_never_the_test_set(data, fake_cifar, tmp_path):
    """Flat validation accuracy: with patience 2 the LR drops after epochs 4 and 7, whatever the test set says."""
    xt, yt = H.load_cifar10(fake_cifar, train=False)
    runs = []
    for label in (9, 0):  # a test set the model gets 100% right, then 0%: the schedule must not change
        test = H.make_loader(xt, np.full_like(yt, label), H.make_transforms(train=False), batch_size=25)
        d = H.CifarLoaders(data.train, data.val, test, xt, yt)
        runs.append(run(Frozen(), d, tmp_path / str(label), epochs=8, scheduler=lambda o: (
            torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max", patience=2, threshold=0.1,
                                                       threshold_mode="abs", factor=0.1)))["history"])
    a, b = runs
    assert a["test_acc"] == [100.0] * 8 and b["test_acc"] == [0.0] * 8
    assert np.allclose(per_epoch_lr(a), [0.1] * 4 + [0.01] * 3 + [0.001])
    assert a["lr"] == b["lr"]
    no_val = H.CifarLoaders(data.train, None, data.test, xt, yt)
    with pytest.raises(ValueError, match="validation split"):
        run(Tiny(), no_val, tmp_path, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(ValueError, match="val_acc, val_loss"):
        run(Tiny(), data, tmp_path, monitor="test_acc")


class StopAfter(Exception):
    """Raised by a patched save_results: the process 'dies' right after an epoch's record is written."""


def interrupt_after(monkeypatch, epoch):
    """Make fit stop (as a kill would) right after the record of `epoch` is written."""
    real = H.save_results

    def save(record, output_dir="outputs"):
        out = real(record, output_dir)
        if record["epochs_run"] == epoch and record["status"] == "running":
            raise StopAfter
        return out

    monkeypatch.setattr(H, "save_results", save)
    return real


def test_checkpoints_every_epoch_then_only_the_best_weights(data, tmp_path, monkeypatch, capsys):
    """While a run trains: _last.pt (weights, optimizer, schedule, RNG; no second copy of the best weights), _prev.pt
    and _best.pt. When it finishes: only _best.pt and the results file, and the model holds the best weights."""
    torch.manual_seed(0)
    model = H.make_model("resnet18")
    real = interrupt_after(monkeypatch, 2)
    with pytest.raises(StopAfter):
        run(model, data, tmp_path, epochs=3, lr=0.05, name="exp")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["exp_best.pt", "exp_last.pt", "exp_prev.pt"]  # no .tmp left behind, the lock released
    last = H.load_checkpoint(tmp_path / "checkpoints" / "exp_last.pt")
    assert last["epoch"] == 2 and set(last) >= {"model", "optimizer", "scheduler", "scaler", "history", "rng", "arch"}
    assert last["best"].keys() == {"epoch", "score"}  # the best weights live only in _best.pt
    assert H.load_checkpoint(tmp_path / "checkpoints" / "exp_prev.pt")["epoch"] == 1
    monkeypatch.setattr(H, "save_results", real)
    model = H.make_model("resnet18")
    rec = run(model, data, tmp_path, epochs=3, lr=0.05, name="exp")
    assert "resumed after epoch 2/3" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["exp_best.pt"]
    best = H.load_checkpoint(tmp_path / "checkpoints" / "exp_best.pt")
    assert best["epoch"] == rec["best_epoch"] == 1 + int(np.argmax(rec["history"]["val_acc"]))
    assert rec["test_acc_at_best_val"] == rec["history"]["test_acc"][best["epoch"] - 1]
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), best["model"][k]), k  # fit leaves the best weights in the model
    rebuilt, _ = H.model_from_checkpoint(tmp_path / "checkpoints" / "exp_best.pt")
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in best["model"].items())


def test_a_finished_run_is_loaded_not_retrained(data, tmp_path, capsys):
    torch.manual_seed(0)
    first = run(Tiny(), data, tmp_path, epochs=2, name="done")
    model = Tiny()
    again = run(model, data, tmp_path, epochs=2, name="done", config={"num_workers": 2, "amp": False})  # speed only
    assert again == first and "finished earlier (2/2 epochs); loaded its best weights" in capsys.readouterr().out
    saved = H.load_checkpoint(tmp_path / "checkpoints" / "done_best.pt")["model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    (tmp_path / "checkpoints" / "done_best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="finished earlier.*done_best.pt is missing.*START_OVER"):
        run(Tiny(), data, tmp_path, epochs=2, name="done")


def test_changed_settings_stop_with_what_differs_and_lose_nothing(data, tmp_path):
    run(Tiny(), data, tmp_path, epochs=2, name="e", config={"augment": {"cutout": 0}})
    before = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(H.StaleRun, match=r"lr.*0\.1.*0\.05.*START_OVER = True"):
        run(Tiny(), data, tmp_path, epochs=2, lr=0.05, name="e", config={"augment": {"cutout": 0}})
    with pytest.raises(H.StaleRun, match="augment.*another EXPERIMENT name"):
        run(Tiny(), data, tmp_path, epochs=2, name="e", config={"augment": {"cutout": 16}})
    with pytest.raises(H.StaleRun, match="epochs: 2 -> 3"):
        run(Tiny(), data, tmp_path, epochs=3, name="e", config={"augment": {"cutout": 0}})
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == before  # nothing moved or deleted
    rec = run(Tiny(), data, tmp_path, epochs=3, name="e", config={"augment": {"cutout": 0}}, start_over=True)
    assert rec["epochs_run"] == 3 and len(list((tmp_path / "archive").glob("e_*/e_best.pt"))) == 1


def test_a_diverged_run_stops_keeps_the_last_good_checkpoint_and_says_so(data, tmp_path):
    steps = len(data.train)
    with pytest.raises(H.Diverged, match=rf"'nan' stopped: the training loss became NaN or infinite at step 3 of "
                                         rf"{steps} \(epoch 2/3\) with LR 0\.1.*try a tenth.*last good checkpoint "
                                         r"\(epoch 1\) is kept.*recorded as stopped"):
        run(NanAfter(good=steps + 2), data, tmp_path, epochs=3, name="nan")
    assert H.load_checkpoint(tmp_path / "checkpoints" / "nan_last.pt")["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in H.load_checkpoint(tmp_path / "checkpoints" / "nan_last.pt")[
        "model"].values() if v.is_floating_point())
    rec = H.load_results(tmp_path)["nan"]
    assert rec["status"] == "diverged" and rec["epochs_run"] == 1 and "step 3" in rec["error"]
    assert "1/3 (stopped: diverged)" in H.results_table(tmp_path)
    again = run(Tiny(), data, tmp_path, epochs=3, name="nan")  # a rerun trains again, from scratch
    assert again["status"] == "complete" and again["epochs_run"] == 3
    assert list((tmp_path / "archive").glob("nan_*/nan.json"))


def test_best_is_repaired_after_a_kill_between_last_and_best(fake_cifar, tmp_path, monkeypatch):
    """Killed after _last.pt but before _best.pt: the best epoch is the last one, whose weights _last.pt holds."""
    no_val = H.make_data(fake_cifar, batch_size=20, val_fraction=0, device="cpu", num_workers=0)  # best = last
    real = H._Run._write_best

    def killed(self, model):
        if self.epoch == 2:
            raise KeyboardInterrupt  # the process dies here
        real(self, model)

    monkeypatch.setattr(H._Run, "_write_best", killed)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run(Tiny(), no_val, tmp_path, epochs=2, lr=0.3, name="k")
    monkeypatch.setattr(H._Run, "_write_best", real)
    assert H.load_checkpoint(tmp_path / "checkpoints" / "k_best.pt")["epoch"] == 1
    last = H.load_checkpoint(tmp_path / "checkpoints" / "k_last.pt")
    rec = run(Tiny(), no_val, tmp_path, epochs=2, lr=0.3, name="k")  # nothing left to train: repair, finish
    best = H.load_checkpoint(tmp_path / "checkpoints" / "k_best.pt")
    assert best["epoch"] == 2 == rec["epochs_run"] and rec["status"] == "complete"
    assert all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())


def test_a_lost_best_checkpoint_is_chosen_again_with_a_warning(data, tmp_path, monkeypatch):
    """_best.pt deleted mid-run while it held an earlier epoch: those weights are gone; the best is chosen anew."""
    interrupt_after(monkeypatch, 2)
    with pytest.raises(StopAfter):
        run(Frozen(), data, tmp_path, epochs=3, name="f")  # flat validation accuracy: epoch 1 stays the best
    monkeypatch.undo()
    assert H.load_checkpoint(tmp_path / "checkpoints" / "f_best.pt")["epoch"] == 1
    (tmp_path / "checkpoints" / "f_best.pt").unlink()
    with pytest.warns(UserWarning, match=r"f_best.pt does not hold the best epoch \(1\); the best is chosen again "
                                         r"from epoch 2 on"):
        rec = run(Frozen(), data, tmp_path, epochs=3, name="f")
    assert rec["best_epoch"] == 2 and H.load_checkpoint(tmp_path / "checkpoints" / "f_best.pt")["epoch"] == 2


def test_damaged_checkpoints_name_the_file_and_the_way_forward(data, tmp_path, monkeypatch, capsys):
    real = interrupt_after(monkeypatch, 2)
    with pytest.raises(StopAfter):
        run(Tiny(), data, tmp_path, epochs=3, name="d")
    monkeypatch.setattr(H, "save_results", real)
    last = tmp_path / "checkpoints" / "d_last.pt"
    last.write_bytes(b"")  # 0 bytes, e.g. a Drive sync that never finished
    with pytest.raises(ValueError, match=r"d_last\.pt is damaged \(0 bytes.*H\.set_aside"):
        H.load_checkpoint(last)
    with pytest.raises(ValueError, match="is damaged"):
        run(Tiny(), data, tmp_path, epochs=3, name="d")
    H.set_aside(last)
    assert list(last.parent.glob("d_last.pt.damaged-*"))
    rec = run(Tiny(), data, tmp_path, epochs=3, name="d")  # resumes from d_prev.pt (epoch 1)
    assert "resumed after epoch 1/3 from" in capsys.readouterr().out and rec["epochs_run"] == 3


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model = H.make_model("resnet18")
    H.save_checkpoint(tmp_path / "r18.pt", model=model.state_dict(), arch=model.arch)
    with pytest.raises(ValueError, match="holds a resnet18.*the model is a resnet34"):
        H.load_checkpoint(tmp_path / "r18.pt", H.make_model("resnet34"))
    with pytest.raises(ValueError, match="norm=bn.*norm=ln"):
        H.load_checkpoint(tmp_path / "r18.pt", H.make_model("resnet18", norm="ln"))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((tmp_path / "r18.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="damaged.pt is damaged"):
        H.load_checkpoint(damaged, model)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no 'model' entry"):
        H.load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="run the training notebook first"):
        H.load_checkpoint(tmp_path / "missing.pt")
    H.save_checkpoint(tmp_path / "lin.pt", model=nn.Linear(4, 2).state_dict())
    with pytest.raises(ValueError, match="does not fit this model"):
        H.load_checkpoint(tmp_path / "lin.pt", nn.Linear(3, 2))


def test_mixed_precision_follows_the_gpu(monkeypatch):
    """bf16 only where the GPU has it natively (compute capability 8.0+); a T4 (7.5) gets fp16; no AMP on a CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # True even when only emulated
    for capability, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert H.amp_dtype("cuda") == dtype
    assert H.amp_dtype(torch.device("cpu")) is None


RUN = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, {root!r})
    import torch, helpers as H
    data_dir, out_dir, kill_after, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    save = H.save_results
    def save_then_die(record, output_dir):
        save(record, output_dir)
        if record["epochs_run"] == kill_after and record["status"] == "running":
            os.kill(os.getpid(), signal.SIGKILL)
        return record
    H.save_results = save_then_die
    H.seed_everything(0)
    data = H.make_data(data_dir, aug={{"cutout": 16}}, subset=80, batch_size=16, device="cpu", num_workers=0)
    model = H.make_model("resnet18")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, epochs=3, steps_per_epoch=len(data.train))
    rec = H.fit(model, data, opt, sched, epochs=3, name="run", output_dir=out_dir, device="cpu", progress=False)
    torch.save(model.state_dict(), out + ".pt")
    json.dump(rec["history"], open(out + ".json", "w"))
""")


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
    assert H.load_checkpoint(tmp_path / "b" / "checkpoints" / "run_last.pt")["epoch"] == 1
    assert not list((tmp_path / "b" / "checkpoints").glob("*.tmp"))
    resumed = go("b", 0, "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert "'run': resumed after epoch 1/3" in resumed.stdout
    h1, h2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("straight", "resumed"))
    for key in h1:
        if key != "epoch_time":
            assert np.allclose(h1[key], h2[key], rtol=1e-5, atol=1e-6), key
    w1, w2 = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("straight", "resumed"))
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), rtol=1e-4, atol=1e-5), k
