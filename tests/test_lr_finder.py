"""LR range test: restores the model, suggestion rules with known answers, clear errors. The LR file that notebook
02 writes and 03 reads (ws.save_lr, ws.lr) is tested in test_course_workspace.py."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers as H


class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


@pytest.fixture(scope="module")
def loader(fake_cifar):
    return H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0).train


def sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def snapshot(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            json.dumps(optimizer.state_dict()["param_groups"]))


def test_range_test_restores_model_and_optimizer(loader):
    torch.manual_seed(0)
    model = TinyBN()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    optimizer.zero_grad()
    model(next(iter(loader))[0]).sum().backward()
    optimizer.step()  # give the optimizer momentum state to restore
    weights, groups = snapshot(model, optimizer)
    momentum = {k: v["momentum_buffer"].clone() for k, v in optimizer.state_dict()["state"].items()}
    result = H.find_lr(model, optimizer, nn.CrossEntropyLoss(), loader, end_lr=1, num_iter=30)
    assert len(result.lrs) == 30 and result.lrs[0] == pytest.approx(1e-5) and not result.diverged
    after, groups_after = snapshot(model, optimizer)
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # weights and BN running stats
    assert groups == groups_after  # LR back to 1e-5, no 'initial_lr' left behind
    for k, v in optimizer.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], momentum[k])
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)  # a scheduler can attach again
    assert set(result.suggestions) == {"steepest", "valley", "minimum", "minimum/10"}
    assert all(1e-5 <= v <= 1 for v in result.suggestions.values())


def test_steepest_rule_has_the_known_answer():
    lrs = np.logspace(-5, 1, 100)
    losses = 2 - np.tanh((np.arange(100) - 60) / 5.0)  # steepest descent at index 60
    assert H.suggest_lrs(lrs, losses, 10, 5)["steepest"] == pytest.approx(lrs[60])


def test_steepest_rule_equals_the_library_plot():
    from torch_lr_finder import LRFinder

    rng = np.random.default_rng(0)
    lrs = list(np.logspace(-6, 0, 80))
    losses = list(2.3 - np.cumsum(rng.normal(0.01, 0.05, 80)))
    model = nn.Linear(2, 2)
    finder = LRFinder(model, torch.optim.SGD(model.parameters(), lr=1e-6), nn.MSELoss())
    finder.history = {"lr": lrs, "loss": losses}
    fig, ax = plt.subplots()
    _, library = finder.plot(skip_start=7, skip_end=3, ax=ax, suggest_lr=True)
    plt.close(fig)
    assert H.suggest_lrs(lrs, losses, 7, 3)["steepest"] == library


def test_valley_rule_is_the_middle_of_the_longest_descent():
    lrs = np.logspace(-6, 1, 120)
    losses = np.concatenate([np.full(30, 2.3), np.linspace(2.29, 0.5, 60), np.linspace(0.6, 5, 30)])
    losses[10:20] += np.array([0.1, -0.1] * 5)  # a ragged start must not win
    lr = H.suggest_lrs(lrs, losses, 0, 0)["valley"]
    i = int(np.argmin(np.abs(lrs - lr)))
    assert 30 + 60 / 3 <= i <= 30 + 2 * 60 / 3


def test_minimum_rules_are_the_lowest_loss_and_a_tenth_of_it():
    lrs = np.logspace(-4, 0, 50)
    losses = (np.arange(50) - 40.0) ** 2
    rules = H.suggest_lrs(lrs, losses, 0, 0)
    assert rules["minimum"] == pytest.approx(lrs[40]) and rules["minimum/10"] == pytest.approx(lrs[40] / 10)
    assert H.suggest_lrs(lrs, losses, 0, 12)["minimum"] == pytest.approx(lrs[37])  # skipped ends do not count


def test_short_or_diverged_runs_give_clear_messages(loader):
    model = TinyBN()
    with pytest.raises(ValueError, match="num_iter=8 is too small"):
        H.find_lr(model, sgd(model, 1e-4), nn.CrossEntropyLoss(), loader, num_iter=8)
    with pytest.raises(ValueError, match="diverged after"):
        H.find_lr(model, sgd(model, 1.0), nn.CrossEntropyLoss(), loader, end_lr=1e8,
                  num_iter=40, diverge_th=1.5)


def test_linear_mode_uses_the_validation_loss(fake_cifar):
    data = H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)
    model = TinyBN()
    result = H.find_lr(model, sgd(model, 1e-3), nn.CrossEntropyLoss(), data.train, end_lr=0.5,
                       num_iter=20, step_mode="linear", val_loader=data.val, skip_start=2, skip_end=2)
    assert np.allclose(np.diff(result.lrs), np.diff(result.lrs)[0])  # linear steps
    with pytest.raises(ValueError, match="exp, linear"):
        H.find_lr(model, sgd(model, 0.1), nn.CrossEntropyLoss(), data.train, step_mode="cos")


@pytest.mark.parametrize("kwargs, message", [
    ({"start_lr": 1e-2, "end_lr": 1e-4}, "end_lr must be a number above the first LR of the test \\(0.01\\)"),
    ({"end_lr": float("nan")}, "end_lr must be a number above"),
    ({"end_lr": -1}, "got -1"),
    ({"start_lr": 0}, "start_lr must be a positive number \\(or None: the optimizer's LR\\), got 0"),
    ({"num_iter": 0}, "num_iter must be a whole number of steps"),
])
def test_range_test_settings_that_make_no_sense_are_refused(loader, kwargs, message):
    model = TinyBN()
    with pytest.raises(ValueError, match=message):
        H.find_lr(model, sgd(model, 1e-5), nn.CrossEntropyLoss(), loader, **kwargs)


def test_plot_marks_each_rule_at_the_lr_it_names():
    """A suggestion is drawn at its own LR, even off the tested range (the old plot snapped it to the nearest point)."""
    lrs = list(np.linspace(0.04, 1.0, 30))
    result = H.LRFinderResult(lrs=lrs, losses=list(np.linspace(3, 1, 30)), skip_start=2, skip_end=2, diverged=False,
                              suggestions={"minimum": 0.0408, "minimum/10": 0.00408})
    fig = H.plot_lr_finder(result, log_lr=False)
    marks = {line.get_label(): line.get_xdata()[0] for line in fig.axes[0].lines if ":" in line.get_label()}
    assert marks == {"minimum: 0.0408": 0.0408, "minimum/10: 0.00408": 0.00408}
    fig = H.plot_lr_finder(result, rules=())  # a test the notebook calls meaningless: no marks at all
    assert not [line for line in fig.axes[0].lines if ":" in line.get_label()]
    plt.close("all")
