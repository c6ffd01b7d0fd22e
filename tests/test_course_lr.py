"""The LR between notebooks 02 and 03: 02 writes it with the settings of the run that found it, an exercise's variant
of 02 leaves notebook 03's LR alone unless chosen, and 03 says which run its LR came from."""

import json
from types import SimpleNamespace

import pytest

import course

RESULT = SimpleNamespace(suggestions={"minimum": 0.0248, "valley": 0.00115, "steepest": 2.48, "minimum/10": 0.00248},
                         diverged=False)


@pytest.fixture
def ws(tmp_path):
    return course.start({"QUICK": False}, outputs=tmp_path / "outputs", images=tmp_path / "images",
                        data_dir=tmp_path / "data")


def test_the_main_run_writes_the_lr_03_reads_with_its_settings(ws, capsys):
    ws.save_lr(RESULT, rule="minimum", batch_size=128, subset=None, label_smoothing=0.1, num_iter=100)
    saved = json.loads((ws.outputs / "lr_finder.json").read_text())
    assert saved["lr"] == 0.0248 and saved["batch_size"] == 128 and saved["num_iter"] == 100 and saved["when"]
    lr, why = ws.lr(None, batch_size=512)
    assert lr == pytest.approx(0.0992) and "notebook 02's run: when " in why and "num_iter 100" in why
    assert str(ws.outputs) not in why and "outputs/lr_finder.json" in why  # a workspace path, not the machine's


def test_an_exercise_variant_of_02_leaves_03s_lr_alone(ws, capsys):
    ws.save_lr(RESULT, rule="minimum", batch_size=128)
    variant = SimpleNamespace(suggestions={**RESULT.suggestions, "minimum": 0.05}, diverged=False)
    path = ws.save_lr(variant, rule="minimum", batch_size=512, for_03=False)
    assert path.name == "lr_finder_variant.json" and "notebook 03 does not read it" in capsys.readouterr().out
    assert json.loads((ws.outputs / "lr_finder.json").read_text())["lr"] == 0.0248
    assert ws.lr(None, batch_size=128)[0] == pytest.approx(0.0248)


def test_without_a_range_test_03_takes_the_stated_default_and_says_so(ws):
    lr, why = ws.lr(None, batch_size=512, default=0.1)
    assert lr == 0.1 and "the stated default" in why and "run notebook 02 with QUICK = False" in why
