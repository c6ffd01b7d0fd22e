"""course.start and the Workspace: parameters checked before anything is spent, the folders it opens (Google Drive
on a faked Colab, whose rules refuse a folder a reset would lose), a folder that cannot be written, QUICK's sandbox
that no real run reads, the LR file of notebook 02, figures, what the course shipped, and the space the work uses."""

import json
import re
import sys
import types

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import Tiny, make_workspace

import course
import helpers as H
from course import checks
from course import workspace as W


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---- start: the parameters, then the folders ---------------------------------------------------------------------


def test_start_opens_the_given_folders_checks_the_parameters_and_seeds(tmp_path, fake_cifar, capsys):
    notebook = {"EPOCHS": 3, "SEED": 7, "MODEL": "resnet18", "model": object(), "NUM_WORKERS": "many", "x": 1}
    ws = course.start(notebook, data_dir=fake_cifar, device="cpu", outputs=tmp_path / "o", images=tmp_path / "i")
    assert (ws.home, ws.home_images, ws.outputs, ws.images) == (tmp_path / "o", tmp_path / "i", tmp_path / "o",
                                                                tmp_path / "i")
    assert ws.data_dir == fake_cifar and ws.device == torch.device("cpu") and not ws.quick and not ws.start_over
    assert ws.parameters == {"EPOCHS": 3, "SEED": 7, "MODEL": "resnet18"}  # only the parameters it knows
    assert ws.self_checks == {} and (tmp_path / "o").is_dir() and (tmp_path / "i").is_dir() and tree(tmp_path) == []
    assert torch.initial_seed() == 7
    a = np.random.random()  # noqa: NPY002 (seed_everything seeds the legacy global RNG)
    H.seed_everything(7)
    assert a == np.random.random()  # noqa: NPY002
    out = capsys.readouterr().out
    assert out.startswith("device: cpu (CPU (") and "| torch " in out and "work in o" in out


def test_bad_parameters_stop_the_start_before_any_folder_is_made(tmp_path):
    with pytest.raises(ValueError, match=r"bad parameter\(s\) in the parameters cell:\n  EPOCHS must be a whole "
                                         r"number from 1 to 1000, got 0\n  BATCH_SIZE must be a whole number"):
        make_workspace(tmp_path, EPOCHS=0, BATCH_SIZE=0, SEED=1)
    folders = dict(outputs=tmp_path / "outputs", images=tmp_path / "images")
    with pytest.raises(ValueError, match="start_over must be True or False, got 'yes'"):
        course.start({}, start_over="yes", **folders)
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:0' or 'mps', got 'gpu'"):
        course.start({}, device="gpu", **folders)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but no CUDA GPU is visible; pass device='auto' or 'cpu'"):
            course.start({}, device="cuda", **folders)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("params, message", [
    ({"EPOCHS": 0}, "EPOCHS must be a whole number from 1 to 1000, got 0"),
    ({"EPOCHS": -3}, "EPOCHS must be a whole number"),
    ({"EPOCHS": 2.5}, "EPOCHS must be a whole number from 1 to 1000, got 2.5"),
    ({"EPOCHS": True}, "EPOCHS must be a whole number"),
    ({"EPOCHS": "20"}, "EPOCHS must be a whole number from 1 to 1000, got '20'"),
    ({"SUBSET": 1}, "SUBSET must be a whole number from 20 to 50000 \\(or None\\), got 1"),
    ({"SUBSET": -5}, "SUBSET"),
    ({"BATCH_SIZE": 0}, "BATCH_SIZE must be a whole number from 2 to 4096"),
    ({"VAL_FRACTION": 0.99}, "VAL_FRACTION must be a number from 0 to 0.5"),
    ({"LR": float("nan")}, "LR must be a number"),
    ({"LR": 50}, "LR must be a number from 1e-06 to 10 \\(or None\\), got 50"),
    ({"MODEL": "resnet19"}, "MODEL must be one of resnet18, resnet34, resnet50, got 'resnet19'"),
    ({"NORM": "batchnorm"}, "NORM must be one of bn, ln, gn"),
    ({"LAST_STRIDE": 3}, "LAST_STRIDE must be one of 1, 2, got 3"),
    ({"RULE": "fastest"}, "RULE must be one of steepest, valley, minimum, minimum/10"),
    ({"AUGMENT": {"cutuot": 16}}, "AUGMENT: unknown augmentation"),
    ({"QUICK": "yes"}, "QUICK must be True or False, got 'yes'"),
    ({"QUICK": 1}, "QUICK must be True or False, got 1"),
    ({"GRID_MODELS": []}, "GRID_MODELS must be a list of one or more of resnet18, resnet34, resnet50"),
    ({"GRID_NORMS": ["bn", "in"]}, "GRID_NORMS must be a list of one or more of bn, ln, gn"),
    ({"GALLERY_SIZES": [1, 0]}, "GALLERY_SIZES must be a list of whole numbers from 1 to 100"),
    ({"PHOTO_URL": " "}, "PHOTO_URL must be text"),
    ({"RUNS": {"a b": {}}}, "a run name in RUNS must be 1 to 64 letters"),
    ({"RUNS": {"cut": {"cutuot": 16}}}, "AUGMENT: unknown augmentation"),
    ({"RUNS": []}, "RUNS must be a dict of run name: AUGMENT dict"),
    ({"EXPERIMENT": "../x"}, "EXPERIMENT must be 1 to 64 letters, digits, '-', '_' or '.' \\(not first\\), got "
                             "'../x': it names the run's files"),
])
def test_parameters_are_checked_with_their_valid_range(params, message):
    with pytest.raises(ValueError, match=message):
        checks.check_parameters(params)


def test_good_parameters_pass_and_every_problem_is_listed():
    checks.check_parameters({"EPOCHS": 20, "SUBSET": None, "BATCH_SIZE": 512, "LR": None, "VAL_FRACTION": 0.1,
                             "SEED": np.int64(3), "MOMENTUM": np.float32(0.9), "QUICK": False, "MODEL": "resnet50",
                             "AUGMENT": {"cutout": 16}, "EXPERIMENT": "resnet18_no-smoothing.v2", "LAST_STRIDE": 1,
                             "GRID_SCHEDULERS": ("onecycle", "plateau"), "GALLERY_SIZES": [5, 10],
                             "RUNS": {"cutout16": {"cutout": 16}}, "PHOTO_URL": "https://example.org/cat.jpg"})
    with pytest.raises(ValueError) as err:
        checks.check_parameters({"EPOCHS": 0, "BATCH_SIZE": 0})
    assert "EPOCHS" in str(err.value) and "BATCH_SIZE" in str(err.value)
    assert checks.problem("EPOCHS", 20) is None and "EPOCHS" in checks.problem("EPOCHS", 0)


def test_learning_rates_and_run_names_have_their_own_checks():
    assert checks.check_lr(np.float32(0.5)) == 0.5 and isinstance(checks.check_lr(np.float32(0.5)), float)
    for bad in (0, 11, "0.1", None, True, float("inf")):
        with pytest.raises(ValueError, match=r"the LR in x must be a number from 1e-06 to 10, got .*notebook 02"):
            checks.check_lr(bad, "the LR in x")
    assert checks.check_name("x" * 100) == "x" * 100  # a run's name may be longer than EXPERIMENT (seed suffixes)
    with pytest.raises(ValueError, match="the run's name must be 1 to 100 letters"):
        checks.check_name("x" * 101)
    assert checks.problem("EXPERIMENT", "x" * 65).startswith("EXPERIMENT must be 1 to 64 letters")


# ---- Google Drive on a faked Colab -------------------------------------------------------------------------------


@pytest.fixture
def on_colab(tmp_path, monkeypatch):
    """This process believes it is on Colab: google.colab imports, /content is tmp_path/content."""
    colab = types.ModuleType("google.colab")
    drive = types.ModuleType("google.colab.drive")
    mounted = []
    drive.mount = lambda path, **kw: (mounted.append(path), (tmp_path / "content" / "drive" / "MyDrive").mkdir(
        parents=True, exist_ok=True))
    colab.drive = drive
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    monkeypatch.setattr(W, "CONTENT", tmp_path / "content")
    return mounted


def test_drive_folder_a_name_is_a_folder_in_mydrive_and_says_so(on_colab, tmp_path, capsys):
    assert W.on_colab()
    ws = course.start({}, "my-course")
    drive = tmp_path / "content" / "drive"
    folder = drive / "MyDrive" / "my-course"
    assert (ws.home, ws.home_images) == (folder / "outputs", folder / "images") and on_colab == [str(drive)]
    assert ws.data_dir == tmp_path / "content" / "data" and ws.outputs.is_dir() and ws.images.is_dir()
    out = capsys.readouterr().out
    assert "workspace on Google Drive: MyDrive/my-course (checkpoints, results and figures survive" in out
    assert str(tmp_path) not in out and "work in MyDrive/my-course/outputs" in out  # never the machine's paths
    assert ws.shown(ws.outputs / "results" / "r.json") == "MyDrive/my-course/outputs/results/r.json"
    assert ws.shown(tmp_path / "content" / "data") == "/content/data"
    ws = course.start({"QUICK": True}, str(drive / "MyDrive" / "x"))  # absolute inside Drive: fine; mounted once
    assert ws.outputs == drive / "MyDrive" / "x" / "outputs" / "quick" and len(on_colab) == 1
    assert ws.images == drive / "MyDrive" / "x" / "images" / "quick"


@pytest.mark.parametrize("folder", ["/tmp/course", "{content}/drive", "{content}/drive/MyDrive/../../x", "", "  ",
                                    5])
def test_drive_folder_outside_google_drive_is_refused(on_colab, tmp_path, folder):
    folder = folder.format(content=tmp_path / "content") if isinstance(folder, str) else folder
    with pytest.raises(ValueError, match="drive_folder must be a folder") as err:
        course.start({}, folder)
    assert "lost when the runtime resets" in str(err.value) or "(or None)" in str(err.value)
    assert not (tmp_path / "x").exists() and on_colab == []  # refused before Drive is even mounted


def test_a_workspace_that_cannot_be_written_is_refused_with_the_reason(on_colab, tmp_path):
    drive = tmp_path / "content" / "drive" / "MyDrive"
    drive.mkdir(parents=True)
    (drive / "blocked").write_text("a file where the course folder should be")
    with pytest.raises(ValueError, match=r"cannot use .*blocked/outputs as a folder: it, or a folder above it, is a "
                                         r"file"):
        course.start({}, "blocked")
    with pytest.raises(ValueError, match="cannot write to /proc/course"):
        course.start({}, None, outputs="/proc/course")  # a read-only file system, even for root


def test_drive_folder_none_stays_in_the_runtime_and_says_a_reset_loses_it(on_colab, tmp_path, capsys):
    ws = course.start({}, None)
    assert ws.home == tmp_path / "content" / "outputs" and on_colab == []
    assert "a reset or disconnect loses them" in capsys.readouterr().out
    assert ws.shown(ws.outputs) == "outputs"  # the workspace's own folder: /content here


def test_off_colab_the_work_stays_in_the_checkout(tmp_path, monkeypatch):
    assert not W.on_colab()
    monkeypatch.setattr(W, "CHECKOUT", tmp_path / "checkout")
    ws = course.start({}, "my-course")  # drive_folder means nothing here
    assert (ws.home, ws.home_images, ws.data_dir) == (tmp_path / "checkout" / "outputs",
                                                      tmp_path / "checkout" / "images", tmp_path / "checkout" / "data")
    with pytest.raises(ValueError, match="cannot write to /proc/course"):
        course.start({}, outputs="/proc/course")


def test_an_unwritable_folder_is_refused_off_colab_too(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"cannot use .*file/images as a folder"):
        course.start({}, outputs=tmp_path / "o", images=tmp_path / "file" / "images")


# ---- QUICK's sandbox -----------------------------------------------------------------------------------------


def test_quick_writes_only_into_its_sandbox_which_no_real_run_reads(tmp_path, fake_cifar, capsys):
    quick = make_workspace(tmp_path, data_dir=fake_cifar, QUICK=True)
    assert quick.outputs == tmp_path / "outputs" / "quick" and quick.images == tmp_path / "images" / "quick"
    assert "QUICK = True: a sandbox. Everything goes to outputs/quick and images/quick" in capsys.readouterr().out
    data = H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)
    model = Tiny(width=8)
    rec = H.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=1, run=quick.run("r"),
                device="cpu", progress=False)
    assert rec["quick"] is True and rec["config"]["quick"] is True
    quick.savefig(plt.figure(), "03_history.png")
    result = H.LRFinderResult([0.01, 0.1], [2, 1], {"minimum": 0.08}, 0, 0, False)
    quick.save_lr(result, rule="minimum", batch_size=128)
    assert tree(tmp_path) == ["images/quick/03_history.png", "outputs/quick/checkpoints/r_best.pt",
                              "outputs/quick/lr_finder.json", "outputs/quick/results/r.json"]
    assert "(QUICK)" in course.results_table(quick.outputs / "results") and set(quick.results()) == {"r"}
    real = make_workspace(tmp_path, data_dir=fake_cifar)
    assert real.results() == {} and "| r |" not in course.results_table(real.outputs / "results")
    lr, why = real.lr(None, batch_size=128, default=0.1)
    assert lr == 0.1 and "the stated default" in why and "a QUICK run's LR stays in its sandbox" in why
    assert quick.lr(None, batch_size=128)[0] == pytest.approx(0.08)
    (quick.outputs / "lr_finder.json").unlink()  # a QUICK 03 reads only a QUICK 02's LR, and says so
    assert "run notebook 02 with QUICK = True" in quick.lr(None, batch_size=128)[1]
    model = Tiny(width=8)
    again = H.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=1, run=real.run("r"),
                  device="cpu", progress=False)  # the same name outside the sandbox: trained, never loaded
    assert again["quick"] is False and again["run_id"] != rec["run_id"]
    assert "finished earlier" not in capsys.readouterr().out


# ---- the LR that notebook 02 finds and notebook 03 uses -----------------------------------------------------------


def test_found_lr_flows_into_training(tmp_path, capsys):
    ws = make_workspace(tmp_path)
    result = H.LRFinderResult(lrs=[0.01, 0.1], losses=[2, 1], suggestions={"valley": 0.08, "steepest": 0.3},
                              skip_start=0, skip_end=0, diverged=False)
    path = ws.save_lr(result, rule="valley", batch_size=512, model="resnet18", subset=None, label_smoothing=0.1)
    assert path == ws.outputs / "lr_finder.json"
    assert "wrote outputs/lr_finder.json: LR 0.08 ('valley') at batch 512; notebook 03 reads it" \
        in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", saved.pop("when"))
    assert saved == {"lr": 0.08, "rule": "valley", "batch_size": 512, "diverged": False, "model": "resnet18",
                     "suggestions": {"valley": 0.08, "steepest": 0.3}, "subset": None, "label_smoothing": 0.1}
    lr, why = ws.lr(None, batch_size=128, default=0.5)
    assert lr == pytest.approx(0.02) and "'valley' suggestion 0.08 at batch 512, scaled linearly to batch 128" in why
    assert "(notebook 02's run: when " in why and "subset None, label_smoothing 0.1; outputs/lr_finder.json)" in why
    variant = ws.save_lr(result, rule="steepest", batch_size=512, for_03=False)  # an exercise's variant: beside it
    assert variant == ws.outputs / "lr_finder_variant.json" and "notebook 03 does not read it" in \
        capsys.readouterr().out
    assert ws.lr(None, batch_size=128)[0] == pytest.approx(0.02)  # 03 still reads the valley LR
    assert ws.lr(0.3, 128) == (0.3, "LR 0.3 (set in the parameters cell)")
    with pytest.raises(ValueError, match="LR must be a number from 1e-06 to 10, got 30"):
        ws.lr(30, 128)
    other = make_workspace(tmp_path / "nowhere")
    lr, why = other.lr(None, 128, default=0.5)
    assert lr == 0.5 and "default" in why and "run notebook 02" in why
    with pytest.raises(ValueError, match="DEFAULT_LR must be a number"):
        other.lr(None, 128, default=0)


def test_a_suggestion_outside_the_sane_range_is_not_saved(tmp_path):
    ws = make_workspace(tmp_path)
    result = H.LRFinderResult([0.01, 0.1], [2, 1], {"minimum": 40.0}, 0, 0, True)
    with pytest.raises(ValueError, match="the 'minimum' suggestion must be a number from 1e-06 to 10, got 40.0.*"
                                         "Choose another RULE, or narrow START_LR and END_LR"):
        ws.save_lr(result, rule="minimum")
    assert tree(tmp_path) == []


def test_an_unknown_rule_is_refused_with_the_valid_ones(tmp_path):
    ws = make_workspace(tmp_path)
    result = H.LRFinderResult([0.01, 0.1], [2, 1], {"valley": 0.08, "steepest": 0.3}, 0, 0, False)
    with pytest.raises(ValueError, match="valley, steepest"):
        ws.save_lr(result, rule="fastest")
    assert tree(tmp_path) == []


@pytest.mark.parametrize("content, message", [
    ({"lr": 0, "batch_size": 128}, "must be a number from 1e-06 to 10, got 0"),
    ({"lr": 50, "batch_size": 128}, "lr_finder.json must be a number from 1e-06 to 10, got 50"),
    ({"lr": 5, "batch_size": 128}, "\\(5 at batch 128\\) scaled to batch 512 must be a number from 1e-06 to 10, "
                                   "got 20"),
    ({"lr": -0.1, "batch_size": 128}, "got -0.1"),
    ({"lr": "0.02", "batch_size": 128}, "got '0.02'"),
    ({"lr": 0.02, "batch_size": 0}, "holds batch_size 0; it must be a whole number"),
    ({"lr": 0.02, "batch_size": True}, "holds batch_size True; it must be a whole number"),
    ({"lr": 0.02}, "is damaged \\(KeyError"),
    ([0.02], "is damaged"),
    ("not json", "is damaged \\(JSONDecodeError"),
])
def test_an_lr_from_lr_finder_json_is_checked_before_training(tmp_path, content, message):
    ws = make_workspace(tmp_path)
    (ws.outputs / "lr_finder.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message) as err:
        ws.lr(None, batch_size=512)
    assert "notebook 02" in str(err.value)


# ---- figures, what the course shipped, the space used ----------------------------------------------------------


def test_figures_are_saved_whole_into_images_then_shown(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path)
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(True))
    fig = H.plot_history({**H.empty_history(), "epoch": [1, 2], "train_loss": [2.0, 1.0], "train_acc": [10, 20],
                          "test_loss": [2.0, 1.5], "test_acc": [12.0, 18.0]})
    path = ws.savefig(fig, "03_history.png")
    assert path == tmp_path / "images" / "03_history.png" and path.read_bytes().startswith(b"\x89PNG")
    assert path.stat().st_size > 10_000 and not shown
    ws.show(fig, "03_again.png")
    assert shown == [True] and tree(tmp_path) == ["images/03_again.png", "images/03_history.png"]
    plt.close("all")


def test_expected_prints_what_the_course_shipped(tmp_path, monkeypatch, capsys):
    ws = make_workspace(tmp_path)
    capsys.readouterr()
    shipped = json.loads(W.EXPECTED.read_text())  # the file the course ships (scripts/update_readme.py)
    ws.expected(list(shipped))
    assert capsys.readouterr().out == "".join(f"{name}: {line}\n" for name, line in shipped.items())
    mine = tmp_path / "expected.json"
    mine.write_text(json.dumps({"r": "94.00% test accuracy after 20 epochs", "other": "80.00% test accuracy"}))
    monkeypatch.setattr(W, "EXPECTED", mine)
    ws.expected(["r", "mine"])
    assert capsys.readouterr().out == ("r: 94.00% test accuracy after 20 epochs\n"
                                       "mine: the course ships no finished run of it yet\n"
                                       "shipped with the course: other: 80.00% test accuracy\n")
    monkeypatch.setattr(W, "EXPECTED", tmp_path / "absent.json")
    ws.expected(["r"])
    assert capsys.readouterr().out == "r: the course ships no finished run of it yet\n"


def fill(path, n):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * n)


def test_size_and_free_space_show_and_delete_only_what_was_asked(tmp_path, capsys):
    ws = make_workspace(tmp_path, QUICK=True)
    out, images = ws.home, ws.home_images
    for rel, n in (("checkpoints/r_best.pt", 1000), ("results/r.json", 200), ("archive/r_1/r_best.pt", 3000),
                   ("handin/03.zip", 400), ("quick/results/q.json", 500), ("lr_finder.json", 50)):
        fill(out / rel, n)
    fill(images / "03_history.png", 700)
    fill(images / "quick" / "03_history.png", 600)
    assert ws.size() == {"checkpoints": 1000, "results": 200, "archive": 3000, "hand-ins": 400, "quick sandbox": 1100,
                         "figures": 700, "other": 50}
    capsys.readouterr()
    assert ws.free_space() == 0 and len(tree(tmp_path)) == 8
    assert capsys.readouterr().out == ("workspace: checkpoints 0.0 MB, results 0.0 MB, archive 0.0 MB, hand-ins 0.0 "
                                       "MB, quick sandbox 0.0 MB, figures 0.0 MB, other 0.0 MB (total 0.0 MB of a free "
                                       "Drive's 15 GB)\n")
    assert ws.free_space(archive=True) == 3000 and not (out / "archive").exists()
    assert "deleted outputs/archive: 0.0 MB freed" in capsys.readouterr().out
    assert ws.free_space(quick=True) == 1100 and not (out / "quick").exists() and not (images / "quick").exists()
    assert tree(tmp_path) == ["images/03_history.png", "outputs/checkpoints/r_best.pt", "outputs/handin/03.zip",
                              "outputs/lr_finder.json", "outputs/results/r.json"]
    assert ws.size() == {"checkpoints": 1000, "results": 200, "archive": 0, "hand-ins": 400, "quick sandbox": 0,
                         "figures": 700, "other": 50}


def test_parameters_that_only_clash_together_are_refused_at_the_start():
    from course import checks

    assert "GALLERY_SIZES must be a list of whole numbers from 1 to 100" in checks.problem("GALLERY_SIZES", [500])
    assert checks.problem("GALLERY_SIZES", [5, 100]) is None
    with pytest.raises(ValueError, match=r"PER_CLASS=8 needs SUBSET of at least 80 \(8 a class\), got 20"):
        checks.check_parameters({"SUBSET": 20, "PER_CLASS": 8})
    checks.check_parameters({"SUBSET": 80, "PER_CLASS": 8})
    with pytest.raises(ValueError, match="AUGMENT: bad augmentation values"):
        checks.check_parameters({"AUGMENT": {"cutout": 40}})
