"""Every plot helper on small data: whole-number epoch ticks, legends that never cover the data, image grids whose
height grows with their rows and nothing else."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.legend import Legend

import helpers as H

HISTORY = {"epoch": [1, 2, 3, 4, 5], "train_loss": [1.6, 1.2, 1.0, 0.9, 0.8], "train_acc": [46, 66, 74, 79, 82],
           "val_loss": [1.5, 1.3, 1.2, 1.0, 0.9], "val_acc": [57, 68, 70, 78, 83.6],
           "test_loss": [1.5, 1.28, 1.18, 1.02, 0.9], "test_acc": [56, 67, 71.8, 78, 83.08], "lr": [0.1] * 50,
           "steps_per_epoch": 10, "epoch_time": [1.0] * 5}


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def legend_clear_of(ax, artists):
    """The axes' legend is placed by matplotlib's 'best' rule, or lies outside the axes, or covers none of artists."""
    legend = ax.get_legend()
    if legend is None:
        return True
    renderer = drawn(ax.figure)
    box = legend.get_window_extent(renderer)
    if legend._loc == Legend.codes["best"] or not box.overlaps(ax.get_window_extent(renderer)):
        return True
    return not any(box.overlaps(a.get_window_extent(renderer)) for a in artists)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_history_ticks_whole_epochs_and_names_the_final_test_accuracy_in_its_legend():
    fig = H.plot_history(HISTORY, title="t")
    drawn(fig)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert legend_clear_of(ax, ax.lines)
        assert not ax.texts, "no annotation over the curves"
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "test (final 83.08%)" in labels


def test_bar_chart_legends_stay_off_the_bars():
    counts = H.plot_class_counts(np.repeat(np.arange(10), 50), np.repeat(np.arange(10), 10))
    cm = np.diag(np.full(10, 90)) + 1
    per_class = H.plot_per_class(H.per_class_metrics(cm))
    for fig in (counts, per_class):
        ax = fig.axes[0]
        assert legend_clear_of(ax, ax.patches)
        box = ax.get_legend().get_window_extent(drawn(fig))
        assert not box.overlaps(ax.get_window_extent(drawn(fig))), "legend outside the axes"


def test_lr_finder_and_test_curves_place_their_legends_clear_of_the_data():
    result = H.LRFinderResult(lrs=list(np.logspace(-5, 1, 60)), losses=list(np.linspace(2.3, 1.0, 60)),
                              suggestions={"minimum": 0.1, "valley": 0.01, "steepest": 0.05, "minimum/10": 0.01},
                              skip_start=5, skip_end=5, diverged=False)
    fig = H.plot_lr_finder(result)
    assert legend_clear_of(fig.axes[0], fig.axes[0].lines)
    fig = H.plot_test_curves({"a": {"history": HISTORY}, "b": {"history": HISTORY}})
    ax = fig.axes[0]
    assert legend_clear_of(ax, ax.lines)
    assert all(float(t).is_integer() for t in ax.get_xticks())


@pytest.mark.parametrize("n, maps, titled", [(25, 2, True), (6, 2, True), (5, 4, False)])
def test_image_grids_are_as_tall_as_their_rows_and_no_taller(n, maps, titled):
    """Height per row group: its rows of square cells, one title line pair, a small margin; no empty bands."""
    images = torch.rand(n, 3, 32, 32)
    heat = [torch.rand(n, 32, 32) for _ in range(maps)]
    titles = [f"cat ({i}%)\nis dog" for i in range(n)] if titled else None
    fig = H.plot_cams(images, heat, [f"m{i}" for i in range(maps)], titles, suptitle="s")
    groups = -(-n // 5)
    height = fig.get_size_inches()[1]
    assert height <= groups * ((maps + 1) * 1.7 + (0.42 if titled else 0)) + 0.6
    assert len([a for a in fig.axes if a.images]) == n * (maps + 1)


def test_one_image_is_laid_out_in_one_row():
    fig = H.plot_cams(torch.rand(1, 3, 32, 32), [torch.rand(1, 32, 32)] * 4, ["a", "b", "c", "d"], ["t"])
    assert fig.get_size_inches()[1] < 3.5 and len([a for a in fig.axes if a.images]) == 5
