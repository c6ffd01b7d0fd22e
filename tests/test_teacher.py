"""The teacher's side: model answers for every exercise, self-checks that never show the answer, the class's results
table made from real hand-in zips (a tampered one among them), and the class's copy without teacher/."""

import ast
import csv
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT

import helpers as H
from course.handin import ANSWER_CHECKS, check_answer
from course.runs import record_checksum

sys.path.insert(0, str(ROOT / "scripts"))
from class_results import notebook_spec  # noqa: E402

ANSWERS = ROOT / "teacher" / "answers"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
pytestmark = pytest.mark.skipif(not ANSWERS.is_dir(), reason="the class's copy has no teacher/: its tests are ours")


def model_answers():
    """{exercise id: its model answer's text} from teacher/answers/NN.md."""
    out = {}
    for path in sorted(ANSWERS.glob("*.md")):
        for exercise, body in re.findall(r"^## (\d\d\.\d+)\n(.*?)(?=^## |\Z)", path.read_text(), re.M | re.S):
            out[exercise] = body
    return out


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_exercise_has_a_model_answer_and_every_answer_an_exercise():
    exercises = [e for p in NOTEBOOKS for e in notebook_spec(p.stem)["exercises"]]
    answers = model_answers()
    assert len(exercises) == len(set(exercises)) >= 7 * 3
    assert sorted(answers) == sorted(exercises), (f"no model answer: {sorted(set(exercises) - set(answers))}; "
                                                  f"answers to no exercise: {sorted(set(answers) - set(exercises))}")
    assert all(len(body.split()) >= 25 for body in answers.values()), "a model answer says what a good answer says"


def test_fixed_self_checks_accept_the_model_answer_and_refuse_others(capsys):
    """Each 'check: VALUE' in the model answers is right by check_answer; a wrong value is not; nothing shows it."""
    fixed = {e: ast.literal_eval(v) for e, body in model_answers().items()
             for v in re.findall(r"check: (-?[\d.]+)", body)}
    hashed = {e for e, c in ANSWER_CHECKS.items() if isinstance(c, str)}
    assert hashed <= set(fixed), f"hashed checks without a model value: {hashed - set(fixed)}"
    checks = {}
    for exercise, value in fixed.items():
        assert check_answer(checks, exercise, value) is True, exercise
        assert check_answer(checks, exercise, value + 3) is False, exercise
    assert check_answer(checks, "03.1", "75 ") and check_answer(checks, "03.1", 75.0)  # spellings of one answer
    assert check_answer(checks, "03.1", "75%")  # a number plainly written as a percentage
    out = capsys.readouterr().out
    assert "right (try 1)" in out and "not right yet" in out and "answer is not shown" in out
    assert checks["03.1"] == {"right": True, "answer": "75%", "tries": 5}
    assert check_answer(checks, "03.1", None) is None and "no answer yet" in capsys.readouterr().out
    assert check_answer(checks, "03.1", True) is False and "could not read" in capsys.readouterr().out
    with pytest.raises(ValueError, match="has no self-check.*checkable: 01.2"):
        check_answer(checks, "03.4", "text")
    source = "".join(p.read_text() for p in (ROOT / "course").glob("*.py")) + (ROOT / "helpers.py").read_text()
    for exercise, value in fixed.items():
        if isinstance(ANSWER_CHECKS[exercise], str):
            assert f'"{exercise}": {value}' not in source and f"answer == {value}" not in source


def test_self_checks_read_the_students_own_run():
    def ok(exercise, answer, **run):
        return check_answer({}, exercise, answer, **run)

    cm = np.zeros((10, 10), int)
    cm[3, 5], cm[5, 3] = 40, 30  # cats called dogs most
    assert ok("07.1", ("cat", "dog"), cm=cm) and not ok("07.1", ("dog", "cat"), cm=cm)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(probe, max_lr=0.1, total_steps=1760, pct_start=0.25)
    assert ok("03.2", (1760, 439), scheduler=schedule)
    assert ok("03.2", (1760, 440), scheduler=schedule)  # 0.25 x 1760: one step either way
    assert not ok("03.2", (1760, 600), scheduler=schedule)
    history = {"steps_per_epoch": 2, "epoch": [1, 2, 3, 4], "lr": [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]}
    assert H.lr_drops(history) == [3, 4]
    assert ok("05.2", [3, 4], record={"history": history}) and not ok(
        "05.2", [], record={"history": history})
    assert ok("06.2", "step", row={"onecycle": 80.0, "step": 81.5, "plateau": 79.0})
    assert ok("01.2", 1.21, std=(0.2452, 0.2428, 0.2606))


@pytest.fixture(scope="module")
def handins(student_run, tmp_path_factory):
    """A class's hand-in folder made of the student run's real zips: Ada handed in her QUICK runs, Bob his real 03
    (one short epoch, with answers), Eve a copy of Bob's with a number edited by hand."""
    folder = tmp_path_factory.mktemp("handins")
    ws = student_run["workspace"]
    (folder / "ada").mkdir()
    for path in sorted((ws / "outputs" / "quick" / "handin").glob("*.zip")):
        shutil.copy(path, folder / "ada" / path.name)
    (folder / "bob").mkdir()
    bob = shutil.copy(ws / "outputs" / "handin" / "03_resnet18_onecycle.zip", folder / "bob")
    (folder / "eve").mkdir()
    with zipfile.ZipFile(bob) as src, zipfile.ZipFile(folder / "eve" / "03_resnet18_onecycle.zip", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "manifest.json":
                data = json.dumps({**json.loads(data), "student": "Eve"}).encode()
            if name.startswith("results/"):
                record = json.loads(data)
                record["final_test_acc"] = 94.5  # the tampering
                data = json.dumps(record).encode()
            dst.writestr(name, data)
    (folder / "eve" / "notes.zip").write_bytes(b"not a zip")
    return folder


def test_class_results_table_flags_quick_edited_incomplete_and_changed_runs(handins, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "class_results.py"), str(handins), "--out",
                           str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(out / "class_results.csv")))
    by = {(r["student"], r["notebook"][:2], r["run"]): r for r in rows}
    ada = by[("ada", "03", "resnet18_onecycle")]
    assert "QUICK run" in ada["flags"] and "settings differ: EPOCHS 1 (assignment 20), SUBSET 500 (assignment None)" \
        in ada["flags"]
    assert ada["answers"].startswith("0/5 (missing 03.1")
    assert {n for s, n, _ in by if s == "ada"} == {"01", "02", "03", "04", "05", "06", "07"}
    bob = by[("Bob", "03", "resnet18_onecycle")]
    assert "QUICK" not in bob["flags"] and "edited" not in bob["flags"]
    assert "settings differ" in bob["flags"] and "EPOCHS 1 (assignment 20)" in bob["flags"]
    assert bob["answers"] == "3/5 (missing 03.4, 03.5)"
    assert bob["self-checks"] == "03.1 right (1 try), 03.2 wrong (1 try)"
    assert bob["epochs"] == "1/1" and bob["model"] == "resnet18 bn" and bob["device"].startswith("CPU")
    eve = by[("Eve", "03", "resnet18_onecycle")]
    assert "record edited by hand" in eve["flags"] and eve["final test acc %"] == "94.50"
    assert any("not a hand-in zip" in r["flags"] for r in rows)
    table = (out / "class_results.md").read_text()
    assert "| Bob | 03_resnet18_onecycle | resnet18_onecycle |" in table and "record edited by hand" in table
    assert (out / "class_results.png").stat().st_size > 10_000
    assignment = tmp_path / "assignment.json"
    assignment.write_text(json.dumps({"03": {"EPOCHS": 1, "SUBSET": 500, "BATCH_SIZE": 32, "N_SEEDS": 1}}))
    rows = script("class_results").class_results(handins, json.loads(assignment.read_text()), tmp_path / "again")
    assert [r["flags"] for r in rows if r["student"] == "Bob"] == [  # Bob did what this assignment asked, on the
        "data: a copy of CIFAR-10 that is not the official files; "  # tests' data; Eve handed in his run
        "same run as Eve (eve/03_resnet18_onecycle.zip)"]


def test_incomplete_runs_are_flagged(tmp_path):
    record = {"experiment": "half", "status": "running", "config": {"epochs": 20}, "epochs_run": 0,
              "history": H.empty_history()}
    record["checksum"] = record_checksum(record)
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as z:
        z.writestr("manifest.json", json.dumps({"notebook": "03_resnet18_onecycle", "student": "Zed",
                                                "parameters": {}, "answers": {}, "unanswered": []}))
        z.writestr("results/half.json", json.dumps(record))
    rows = script("class_results").class_results(tmp_path, {}, tmp_path / "out")
    assert "run not complete (running)" in rows[0]["flags"]


def test_the_class_copy_leaves_teacher_out(tmp_path):
    """--publish writes the last commit without teacher/, with the address set there; the checkout is unchanged; a
    change not yet committed (a teacher's CLASS_BUDGET = True) is named, not silently left out."""
    checkout = tmp_path / "teachers"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True)
    script = [sys.executable, str(ROOT / "scripts" / "set_repo_url.py"), "https://github.com/my-school/resnet-course",
              "--ref", "v1.0", "--root", str(checkout)]
    before = (checkout / "README.md").read_text()
    done = subprocess.run([*script, "--publish", str(tmp_path / "class")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    copy = tmp_path / "class"
    assert (copy / "helpers.py").exists() and (copy / "course" / "runs.py").exists()
    assert (copy / "notebooks" / "03_resnet18_onecycle.ipynb").exists() and not (copy / "teacher").exists()
    assert "my-school/resnet-course/blob/v1.0/notebooks/03_resnet18_onecycle.ipynb" in (copy / "README.md").read_text()
    assert (checkout / "README.md").read_text() == before
    assert (copy / ".ci" / "run").stat().st_mode & 0o111 and not (copy / "helpers.py").stat().st_mode & 0o111
    (checkout / "notebooks" / "08_mine.ipynb").write_text("{}")  # a teacher's new file, not yet added
    done = subprocess.run([*script, "--publish", str(tmp_path / "class3")], capture_output=True, text=True)
    assert done.returncode != 0 and "notebooks/08_mine.ipynb" in done.stderr and not (tmp_path / "class3").exists()
    (checkout / "notebooks" / "08_mine.ipynb").unlink()
    notebook = checkout / "notebooks" / "03_resnet18_onecycle.ipynb"
    notebook.write_text(notebook.read_text().replace("CLASS_BUDGET = False", "CLASS_BUDGET = True"))
    done = subprocess.run([*script, "--publish", str(tmp_path / "class2")], capture_output=True, text=True)
    assert done.returncode != 0 and "notebooks/03_resnet18_onecycle.ipynb" in done.stderr and "Commit" in done.stderr
    assert not (tmp_path / "class2").exists()
