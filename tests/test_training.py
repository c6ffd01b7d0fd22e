"""Training in memory (helpers only): fit learns and writes nothing, summarize's numbers, the step by hand, schedulers
stepped by their unit, plateau on validation, every kind of breakdown raised as H.Diverged, mixed precision, and
the worker count that never changes what a run learns. A run's files (checkpoints, resume, records) are in
test_course_runs.py."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import Frozen, NanAfter, PoisonedStep, Tiny

import helpers as H


@pytest.fixture(scope="module")
def data(fake_cifar):
    return H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)


def per_epoch_lr(history):
    n = history["steps_per_epoch"]
    return [history["lr"][i * n] for i in range(len(history["epoch"]))]


def sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def run(model, data, epochs=2, lr=0.1, scheduler=None, **kwargs):
    """fit in memory with a plain SGD."""
    optimizer = sgd(model, lr)
    if callable(scheduler):
        scheduler = scheduler(optimizer)
    return H.fit(model, data, optimizer, scheduler, epochs=epochs, device="cpu", progress=False, **kwargs)


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_fit_learns_records_history_and_writes_nothing(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the old fit wrote outputs/
    torch.manual_seed(0)
    out = run(Tiny(), data, epochs=10, lr=0.2, scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.2, epochs=10, steps_per_epoch=len(data.train)))
    h = out["history"]
    assert h["epoch"] == list(range(1, 11)) and out["epochs_run"] == 10
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "epoch_time"):
        assert len(h[key]) == 10
    assert len(h["lr"]) == 10 * len(data.train) and h["steps_per_epoch"] == len(data.train)
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert h["test_acc"][-1] >= 70  # classes differ by colour: far above the 10% of chance
    assert out == H.summarize(h)
    assert files(tmp_path) == []  # run=None: nothing written anywhere


def test_summarize_quotes_the_final_numbers_and_the_first_best_epoch_on_validation():
    h = H.empty_history()
    h.update(epoch=[1, 2, 3, 4], train_acc=[50.0, 60.0, 70.0, 80.0], val_acc=[40.0, 55.0, 55.0, 50.0],
             val_loss=[2.0, 1.5, 1.2, 1.4], test_acc=[41.0, 54.0, 56.0, 52.0], epoch_time=[1.0, 2.0, 3.0, 4.0])
    s = H.summarize(h)
    assert s == {"epochs_run": 4, "best_epoch": 2, "final_train_acc": 80.0, "final_test_acc": 52.0,
                 "best_val_acc": 55.0, "test_acc_at_best_val": 54.0, "wall_time_s": 10.0, "history": h}
    assert H.summarize(h, monitor="val_loss")["best_epoch"] == 3  # the lowest validation loss
    assert H.summarize(h, monitor="val_loss")["test_acc_at_best_val"] == 56.0
    no_val = {**h, "val_acc": [], "val_loss": []}
    assert H.summarize(no_val)["best_epoch"] is None and H.summarize(no_val)["test_acc_at_best_val"] is None
    empty = H.summarize(H.empty_history())
    assert empty["epochs_run"] == 0 and empty["final_test_acc"] is None and empty["wall_time_s"] == 0


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


def test_schedulers_step_by_their_unit(data):
    """OneCycle per batch (as torch computes it), StepLR per epoch, ReduceLROnPlateau on validation accuracy."""
    sched = torch.optim.lr_scheduler
    onecycle = lambda o: sched.OneCycleLR(o, max_lr=0.1, epochs=3, steps_per_epoch=len(data.train),  # noqa: E731
                                          pct_start=0.3, anneal_strategy="linear")
    h = run(Tiny(), data, epochs=3, scheduler=onecycle)["history"]
    opt = sgd(Tiny())
    ref = onecycle(opt)
    expected = []
    for _ in range(3 * len(data.train)):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert np.allclose(h["lr"], expected, rtol=1e-12)
    h = run(Tiny(), data, epochs=5, scheduler=lambda o: sched.StepLR(o, step_size=2, gamma=0.1))["history"]
    assert np.allclose(per_epoch_lr(h), [0.1, 0.1, 0.01, 0.01, 0.001])
    assert len(set(h["lr"][:2 * h["steps_per_epoch"]])) == 1  # constant inside an epoch
    assert [H.step_unit(s) for s in (ref, sched.StepLR(opt, 2), sched.ReduceLROnPlateau(opt), None)] == [
        "batch", "epoch", "metric", None]
    assert H.lr_drops(h) == [3, 5]


def test_plateau_watches_validation_never_the_test_set(data, fake_cifar):
    """Flat validation accuracy: with patience 2 the LR drops after epochs 4 and 7, whatever the test set says."""
    xt, yt = H.load_cifar10(fake_cifar, train=False)
    runs = []
    for label in (9, 0):  # a test set the model gets 100% right, then 0%: the schedule must not change
        test = H.make_loader(xt, np.full_like(yt, label), H.make_transforms(train=False), batch_size=25)
        d = H.CifarLoaders(data.train, data.val, test, xt, yt)
        runs.append(run(Frozen(), d, epochs=8, scheduler=lambda o: (
            torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max", patience=2, threshold=0.1,
                                                       threshold_mode="abs", factor=0.1)))["history"])
    a, b = runs
    assert a["test_acc"] == [100.0] * 8 and b["test_acc"] == [0.0] * 8
    assert np.allclose(per_epoch_lr(a), [0.1] * 4 + [0.01] * 3 + [0.001])
    assert a["lr"] == b["lr"] and H.lr_drops(a) == [5, 8]
    no_val = H.CifarLoaders(data.train, None, data.test, xt, yt)
    with pytest.raises(ValueError, match="validation split"):
        run(Tiny(), no_val, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(ValueError, match="val_acc, val_loss"):
        run(Tiny(), data, monitor="test_acc")


# ---- a run that broke down raises H.Diverged, whichever way it broke ----------------------------------------------


def test_a_nan_training_loss_stops_at_its_step(data):
    steps = len(data.train)
    with pytest.raises(H.Diverged, match=rf"the training loss became NaN or infinite at step 3 of {steps} "
                                         r"\(epoch 2/3\) with LR 0\.1$"):
        run(NanAfter(good=steps + 2), data, epochs=3)


def test_a_nan_only_in_evaluation_stops_the_run(data):
    with pytest.raises(H.Diverged, match=r"in epoch 2 the val loss is nan"):
        run(NanAfter(good=len(data.train), in_eval=True, width=8), data, epochs=3)


def test_one_step_per_epoch_whose_step_poisons_the_weights_is_stopped(fake_cifar):
    """One batch per epoch, its training loss finite: the NaN shows only in the weights and the evaluation."""
    one_batch = H.make_data(fake_cifar, batch_size=200, device="cpu", num_workers=0)
    assert len(one_batch.train) == 1
    with pytest.raises(H.Diverged, match="in epoch 1 the val loss is nan"):
        run(PoisonedStep(width=8), one_batch, epochs=2)


def test_a_loss_that_explodes_without_nan_is_stopped(data):
    """Logits 1000x too large: the loss stays finite, far above a uniform guess's 2.30."""
    with pytest.raises(H.Diverged, match=r"in epoch 1 the training loss averaged [\d.e+]+, far above the 2.30 of a "
                                         r"uniform guess \(the limit is 46.1\)"):
        run(Tiny(width=8, scale=1000.0), data, epochs=2, lr=0.05)


def test_check_epoch_judges_losses_and_weights_never_a_finite_evaluation_loss():
    model = Tiny(width=4)
    row = dict(epoch=3, train_loss=1.0, val_loss=3e4, test_loss=3e4)  # eval-mode BatchNorm early on: healthy
    H.check_epoch(row, model)
    H.check_epoch({**row, "val_loss": None}, model)  # no validation split
    assert H.TRAIN_LOSS_LIMIT == pytest.approx(20 * math.log(10)) and H.UNIFORM_LOSS == pytest.approx(2.302585)
    H.check_epoch({**row, "train_loss": H.TRAIN_LOSS_LIMIT}, model)  # at the limit: still training
    with pytest.raises(H.Diverged, match="in epoch 3 the test loss is inf"):
        H.check_epoch({**row, "test_loss": float("inf")}, model)
    with pytest.raises(H.Diverged, match="in epoch 3 the train loss is nan"):
        H.check_epoch({**row, "train_loss": float("nan")}, model)
    with pytest.raises(H.Diverged, match="far above"):
        H.check_epoch({**row, "train_loss": H.TRAIN_LOSS_LIMIT * 1.01}, model)
    with torch.no_grad():
        model.fc.bias[0] = float("inf")
    with pytest.raises(H.Diverged, match="after epoch 3 the weights hold NaN or infinite values"):
        H.check_epoch(row, model)


def test_mixed_precision_follows_the_gpu(monkeypatch):
    """bf16 only where the GPU has it natively (compute capability 8.0+); a T4 (7.5) gets fp16; no AMP on a CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # True even when only emulated
    for capability, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert H.amp_dtype("cuda") == dtype
    assert H.amp_dtype(torch.device("cpu")) is None


def test_the_number_of_workers_never_changes_what_a_run_learns(fake_cifar):
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
        run(model, data, epochs=2, lr=0.05)
        weights[workers] = model.state_dict()
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
