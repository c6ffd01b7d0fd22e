"""course.handin: a self-check says right or not without showing the answer and counts its tries; the hand-in zip
holds the answers, the notebook's figures, its runs' results and a manifest, reports each self-check for the answer
handed in (not an earlier one), goes to QUICK's sandbox for a QUICK run, and is written whole or not at all. (The
model answers against the hashed checks: test_teacher.py.)"""

import errno
import io
import json
import zipfile

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import Tiny, make_workspace

import course
import helpers as H
from course import handin
from course.files import load_checkpoint


@pytest.fixture
def ws(tmp_path, fake_cifar):
    return make_workspace(tmp_path, data_dir=fake_cifar, EPOCHS=1, AUGMENT={"cutout": 16})


@pytest.fixture(autouse=True)
def made_up_answer(monkeypatch):
    """03.1's check hashes a made-up answer, 42, here: the mechanism is tested without a real answer in the tests."""
    monkeypatch.setitem(course.handin.ANSWER_CHECKS, "03.1", course.handin.answer_hash("03.1", 42))


def manifest(path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("manifest.json"))


def test_a_self_check_counts_its_tries_and_never_shows_the_answer(ws, capsys):
    assert ws.check("03.1", 70) is False
    out = capsys.readouterr().out
    assert out.startswith("Exercise 03.1: not right yet: look again (the answer is not shown) (try 1).")
    assert "42" not in out and "your teacher reads the answer" in out
    assert ws.check("03.1", None) is None and ws.check("03.1", "  ") is None  # not answered yet: no try counted
    assert "no answer yet. Set ANSWER_03_1 and run this cell again" in capsys.readouterr().out
    assert ws.self_checks == {"03.1": {"right": False, "answer": 70, "tries": 1}}
    assert ws.check("03.1", "42%") is True
    assert "Exercise 03.1: right (try 2)." in capsys.readouterr().out
    assert ws.check("03.2", "ab", scheduler=None) is False  # unreadable: a wrong try, with the reason
    assert "could not read 'ab' as an answer (ValueError" in capsys.readouterr().out
    assert ws.self_checks == {"03.1": {"right": True, "answer": "42%", "tries": 2},
                              "03.2": {"right": False, "answer": "ab", "tries": 1}}
    with pytest.raises(ValueError, match="exercise '03.4' has no self-check.*checkable: 01.2, 01.3, 02.1"):
        ws.check("03.4", "text")
    assert "03.4" not in ws.self_checks


def test_the_tries_survive_a_restart_and_stay_in_their_sandbox(tmp_path, fake_cifar):
    ws = make_workspace(tmp_path, data_dir=fake_cifar)
    ws.check("03.1", 70)
    again = make_workspace(tmp_path, data_dir=fake_cifar)  # a restart, or Run all: the start cell runs again
    assert again.self_checks == {"03.1": {"right": False, "answer": 70, "tries": 1}}
    assert again.check("03.1", 42) and again.self_checks["03.1"]["tries"] == 2
    assert make_workspace(tmp_path, data_dir=fake_cifar, QUICK=True).self_checks == {}  # QUICK counts its own
    for damaged in ("not JSON", "[1, 2]"):  # unreadable, or not a record of checks: the count starts again
        (tmp_path / "outputs" / "self_checks.json").write_text(damaged)
        assert make_workspace(tmp_path, data_dir=fake_cifar).self_checks == {}


def test_a_self_check_reads_the_students_own_run(ws):
    history = {**H.empty_history(), "epoch": [1, 2, 3], "test_acc": [60.0, 71.5, 70.25]}
    assert ws.check("04.1", 1.25, record={"history": history})  # the best minus the final test accuracy
    assert not ws.check("04.1", 0.0, record={"history": history})
    assert ws.self_checks["04.1"] == {"right": False, "answer": 0.0, "tries": 2}


@pytest.mark.parametrize("a, b", [("11,173,962", 11173962.0), ((8, 8), "8x8"), ("60%", 60), ("3x", 3), (" Cat ", "cat"),
                                  ([1, 2], "1x2"), (np.int64(128), "128.0"), (0.5, "0.5")])
def test_one_answer_spelled_two_ways_reads_alike(a, b):
    assert handin.answer_key(a) == handin.answer_key(b)
    assert handin.answer_hash("03.1", a) == handin.answer_hash("03.1", b)
    assert handin.answer_hash("03.1", a) != handin.answer_hash("05.1", a)  # the hash names its exercise
    assert handin.answer_hash("03.1", a).startswith("sha256:") and len(handin.answer_hash("03.1", a)) == 23


def test_true_or_false_is_no_answer():
    with pytest.raises(TypeError, match="True/False is not an answer"):
        handin.answer_key(True)
    checks = {}
    assert handin.check_answer(checks, "03.1", True) is False and checks["03.1"]["tries"] == 1


def notebook_vars(**answers):
    return {"EPOCHS": 1, "model": object(), "STUDENT": "ignored: passed as student", "ANSWER_03_1": 42,
            "ANSWER_03_1_WHY": "a made-up reason", "ANSWER_03_2": None,
            "ANSWER_03_3": "  ", "ANSWER_04_1": 3, **answers}


def train_tiny(ws, data, name):
    model = Tiny(width=8)
    return H.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=1, run=ws.run(name),
                 device="cpu", progress=False)


def test_the_hand_in_zip_holds_answers_figures_results_and_a_manifest(ws, fake_cifar, tmp_path, capsys):
    data = H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)
    train_tiny(ws, data, "r")
    for name in ("03_history.png", "04_history.png"):
        ws.savefig(plt.figure(), name)
    plt.close("all")
    lr_file = ws.save_lr(H.LRFinderResult([0.01, 0.1], [2, 1], {"minimum": 0.08}, 0, 0, False))
    ws.check("03.1", 42)
    ws.check("04.1", 1.0, record={"history": {"test_acc": [2.0, 1.0]}})  # another notebook's exercise
    capsys.readouterr()
    path = ws.hand_in("03_resnet18_onecycle", notebook_vars(), student=" Ada ", runs=["r", "ghost"],
                      files=[lr_file, tmp_path / "missing.txt"])
    assert path == ws.outputs / "handin" / "03_resnet18_onecycle.zip"
    assert sorted(p.name for p in path.parent.iterdir()) == ["03_resnet18_onecycle.zip"]  # no temporary file
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["figures/03_history.png", "files/lr_finder.json", "manifest.json",
                                        "results/r.json"]
        assert z.read("results/r.json") == (ws.outputs / "results" / "r.json").read_bytes()
        assert z.read("files/lr_finder.json") == lr_file.read_bytes()
        assert z.read("figures/03_history.png") == (ws.images / "03_history.png").read_bytes()
    m = manifest(path)
    assert m["notebook"] == "03_resnet18_onecycle" and m["student"] == "Ada" and m["quick"] is False
    assert m["parameters"] == {"EPOCHS": 1, "AUGMENT": {"cutout": 16}}
    assert m["answers"] == {"03.1": 42, "03.1 why": "a made-up reason"}
    assert m["unanswered"] == ["03.2", "03.3"]
    assert m["self_checks"] == {"03.1": {"right": True, "answer": 42, "tries": 1}}  # 04.1 is another notebook's
    assert (m["runs"], m["missing_runs"]) == (["r"], ["ghost"])
    assert (m["figures"], m["files"]) == (["03_history.png"], ["lr_finder.json"])
    assert m["device"].startswith("CPU") and "torch" in m["versions"] and m["created"]
    out = capsys.readouterr().out
    assert "hand-in zip: outputs/handin/03_resnet18_onecycle.zip (" in out and "student: Ada" in out
    assert ("inside: answers to 03.1, 03.1 why (no answer yet: 03.2, 03.3); 1 figures; results of 1 run and "
            "lr_finder.json") in out
    assert "workspace: " in out and "To hand in: this zip, and the notebook with its outputs" in out


def test_the_best_weights_go_in_only_when_asked_in_half_precision(ws, fake_cifar, capsys):
    data = H.make_data(fake_cifar, batch_size=20, device="cpu", num_workers=0)
    train_tiny(ws, data, "r")
    capsys.readouterr()
    plain = ws.hand_in("03_resnet18_onecycle", notebook_vars(), runs=["r", "ghost"])
    assert manifest(plain)["weights"] == [] and "best weights" not in capsys.readouterr().out
    path = ws.hand_in("03_resnet18_onecycle", notebook_vars(), runs=["r", "ghost"], weights=True)
    assert manifest(path)["weights"] == ["r"] and "; the best weights of r" in capsys.readouterr().out
    best = load_checkpoint(ws.outputs / "checkpoints" / "r_best.pt")["model"]
    with zipfile.ZipFile(path) as z:
        assert "weights/r.pt" in z.namelist() and z.getinfo("weights/r.pt").compress_type == zipfile.ZIP_STORED
        half = torch.load(io.BytesIO(z.read("weights/r.pt")), weights_only=True)
    assert half.keys() == best.keys()
    assert all(v.dtype == torch.float16 and torch.equal(v, best[k].half()) for k, v in half.items())


def test_the_hand_in_reports_a_check_for_the_answer_handed_in_not_an_earlier_one(ws):
    ws.check("03.1", 70)
    ws.check("03.1", 42)  # right at the second try ...
    changed = manifest(ws.hand_in("03_resnet18_onecycle", notebook_vars(ANSWER_03_1=70)))  # ... then changed back
    assert changed["answers"]["03.1"] == 70
    assert changed["self_checks"]["03.1"] == {"right": False, "answer": 42, "tries": 2}
    kept = manifest(ws.hand_in("03_resnet18_onecycle", notebook_vars(ANSWER_03_1=42)))
    assert kept["self_checks"]["03.1"] == {"right": True, "answer": 42, "tries": 2}
    blank = manifest(ws.hand_in("03_resnet18_onecycle", notebook_vars(ANSWER_03_1=None)))
    assert blank["self_checks"]["03.1"]["right"] is False and "03.1" in blank["unanswered"]


def test_a_quick_hand_in_stays_in_the_sandbox_and_says_its_numbers_mean_nothing(tmp_path, capsys):
    ws = make_workspace(tmp_path, QUICK=True)
    ws.savefig(plt.figure(), "03_history.png")
    plt.close("all")
    (tmp_path / "images" / "03_real.png").write_bytes(b"a real run's figure")  # outside the sandbox: not taken
    path = ws.hand_in("03_resnet18_onecycle", notebook_vars())
    assert path == tmp_path / "outputs" / "quick" / "handin" / "03_resnet18_onecycle.zip"
    m = manifest(path)
    assert m["quick"] is True and m["figures"] == ["03_history.png"] and m["student"] == ""
    out = capsys.readouterr().out
    assert "(not set: type your name or ID into STUDENT and run this cell again)" in out
    assert "This is a QUICK run: its numbers mean nothing. Hand in the zip of a run with QUICK = False." in out
    assert not (tmp_path / "outputs" / "handin").exists()


def test_a_hand_in_that_cannot_be_written_leaves_the_one_before(ws, monkeypatch):
    path = ws.hand_in("03_resnet18_onecycle", notebook_vars())
    before = path.read_bytes()
    real = handin._write_zip

    def full_disk(tmp, *args, **kwargs):
        real(tmp, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(handin, "_write_zip", full_disk)
    with pytest.raises(course.WriteFailed, match=r"could not write .*03_resnet18_onecycle\.zip .*free space"):
        ws.hand_in("03_resnet18_onecycle", notebook_vars(ANSWER_03_1=80))
    assert path.read_bytes() == before and manifest(path)["answers"]["03.1"] == 42
    assert sorted(p.name for p in path.parent.iterdir()) == ["03_resnet18_onecycle.zip"]
