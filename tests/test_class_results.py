"""scripts/class_results.py on hand-in zips built here: honest students are not flagged (the README's class budget
included); every hostile or broken file becomes a flagged row saying why while the table, CSV and figure are written
for everyone else; what a manifest or a record claims is checked against what can be re-derived."""

import csv
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import uuid
import zipfile
import zlib

import pytest
from conftest import ROOT, fixed_answer

import helpers as H
from course.handin import ANSWER_CHECKS, answer_hash
from course.runs import RECORD_FIELDS, record_checksum

sys.path.insert(0, str(ROOT / "scripts"))
import class_results as cr  # noqa: E402

NB = {"03": "03_resnet18_onecycle", "04": "04_steplr_cutout", "05": "05_plateau_stride1",
      "06": "06_norm_scheduler_grid"}
BUDGET = {"03": {"CLASS_BUDGET": True}, "04": {"CLASS_BUDGET": True}}  # the README's example, and 04's


def model_answer(exercise):
    """A fixed exercise's answer, from teacher/answers; the class's copy has none."""
    value = fixed_answer(exercise)
    if value is None:
        pytest.skip("the class's copy has no teacher/ (the answers stay private)")
    return value


# ---- building hand-ins ------------------------------------------------------------------------------------------


def record(name="resnet18_onecycle", *, epochs=8, batch=512, lr=0.1, train=45_000, val=5_000, quick=False, seed=0,
           scheduler="OneCycleLR", run_id=None, **fields):
    """A results record as course.runs writes it (every RECORD_FIELDS field), checksummed; fields override."""
    history = H.empty_history()
    history["steps_per_epoch"] = max(1, train // batch)
    for e in range(1, epochs + 1):
        acc = round(90 - 50 * 0.7 ** e + seed * 0.13, 2)
        history["epoch"].append(e)
        history["train_loss"].append(2.3 * 0.8 ** e)
        history["train_acc"].append(acc + 2)
        history["val_loss"].append(2.2 * 0.8 ** e)
        history["val_acc"].append(acc + 0.5)
        history["test_loss"].append(2.25 * 0.8 ** e)
        history["test_acc"].append(acc)
        history["epoch_time"].append(31.5 + seed + e / 100)
    history["lr"] = [lr / 25, lr, lr / 1e4]
    group = {"params": 11173962, "lr": lr / 25, "momentum": 0.95, "weight_decay": 5e-4, "nesterov": True,
             "initial_lr": lr / 25, "max_lr": lr} if scheduler == "OneCycleLR" else \
        {"params": 11173962, "lr": lr, "momentum": 0.9, "weight_decay": 5e-4, "initial_lr": lr}
    config = {"quick": quick, "model": {"name": "resnet18", "norm": "bn", "num_classes": 10, "last_stride": 2},
              "epochs": epochs, "monitor": "val_acc",
              "data": {"train_images": train, "val_images": val, "test_images": 10_000 if not quick else 100,
                       "batch_size": batch, "seed": seed, "augment": ["PadIfNeeded(...)", "HorizontalFlip(p=0.5)"]},
              "optimizer": {"name": "SGD", "groups": [group]},
              "scheduler": {"name": scheduler, "total_steps": epochs * history["steps_per_epoch"]},
              "criterion": {"name": "CrossEntropyLoss", "reduction": "mean", "label_smoothing": 0.1}}
    summary = H.summarize(history)
    rec = {"experiment": name, "run_id": run_id or uuid.uuid4().hex[:12], "status": "complete", "quick": quick,
           "config": config, "params": 11173962, **summary, "wall_time_s": summary["wall_time_s"] + 14.2,
           "device": "NVIDIA Tesla T4", "versions": {"python": "3.11.7", "torch": "2.5.1"},
           "finished_at": "2026-11-29 13:49:03"}
    rec.update(fields)
    assert set(RECORD_FIELDS) <= set(rec)
    rec["checksum"] = record_checksum(rec)
    return rec


def manifest(number="03", student="Ada", params=None, answers=None, checks=None, runs=(), **fields):
    """A manifest as course.handin writes it: the notebook's defaults changed by params."""
    parameters = {**cr.notebook_spec(NB.get(number, number))["parameters"], **(params or {})}
    out = {"notebook": NB.get(number, number), "student": student, "created": "2026-11-29 14:00:00",
           "quick": bool(parameters.get("QUICK")), "parameters": parameters, "answers": answers or {},
           "unanswered": [], "self_checks": checks or {}, "runs": list(runs), "missing_runs": [], "figures": [],
           "files": [], "device": "NVIDIA Tesla T4", "versions": {"python": "3.11.7"}}
    out.update(fields)
    return out


def handin(path, man, records=(), raw=None):
    """A hand-in zip at path: manifest.json (a dict, or bytes as they are) and results/<experiment>.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", man if isinstance(man, bytes) else json.dumps(man))
        for rec in records:
            z.writestr(f"results/{rec['experiment']}.json", json.dumps(rec))
        for name, data in (raw or {}).items():
            z.writestr(name, data)
    return path


def budget_03(folder, student="Ada", seed=0, **record_fields):
    """An honest 03 at the class budget (README's example): one seed, 20 epochs, checked answers."""
    rec = record(epochs=20, seed=seed, **record_fields)
    man = manifest("03", student, params={"CLASS_BUDGET": True, "N_SEEDS": 1},
                   answers={"03.1": "75%", "03.1 why": "layer4 holds most", "03.2": [1760, 440]},
                   checks={"03.1": {"right": True, "answer": "75%", "tries": 2},
                           "03.2": {"right": True, "answer": [1760, 440], "tries": 1}},
                   runs=[rec["experiment"]])
    return handin(folder / "03_resnet18_onecycle.zip", man, [rec]), man, rec


def budget_04(folder, student="Bob"):
    """An honest 04 at the class budget: 24 epochs, the LR dropping every 8, both runs."""
    recs = [record(name, epochs=24, batch=128, train=50_000, val=0, scheduler="StepLR", seed=i)
            for i, name in enumerate(("steplr_cropflip", "steplr_cutout"))]
    man = manifest("04", student, params={"CLASS_BUDGET": True, "EPOCHS": 24, "STEP_SIZE": 8},
                   answers={"04.1": 0.4}, checks={"04.1": {"right": True, "answer": 0.4, "tries": 3}},
                   runs=[r["experiment"] for r in recs])
    return handin(folder / "04_steplr_cutout.zip", man, recs)


def raw_zip(path, members):
    """A zip written byte by byte, for what zipfile will not write: members are (name, payload, method, flags, crc,
    inflated size)."""
    body, central = b"", b""
    for name, payload, method, flags, crc, size in members:
        n = name.encode()
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, flags, method, 0, 0x21, crc, len(payload), size,
                               len(n), 0, 0, 0, 0, 0, len(body)) + n
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0x21, crc, len(payload), size, len(n),
                            0) + n + payload
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(body), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body + central + end)
    return path


def stored(name, data, method=0, flags=0):
    data = data if isinstance(data, bytes) else json.dumps(data).encode()
    return name, data, method, flags, zlib.crc32(data), len(data)


@pytest.fixture(scope="module")
def zeros():
    """512 MiB of zeros, deflated (about 0.5 MB), with its CRC: built from one flushed MiB repeated."""
    chunk, pack = bytes(1 << 20), zlib.compressobj(9, zlib.DEFLATED, -15)
    first = pack.compress(chunk) + pack.flush(zlib.Z_FULL_FLUSH)
    again = pack.compress(chunk) + pack.flush(zlib.Z_FULL_FLUSH)
    assert again == pack.compress(chunk) + pack.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(512):
        crc = zlib.crc32(chunk, crc)
    return first + again * 511 + pack.flush(), crc, 512 << 20


posix = pytest.mark.skipif(os.name != "posix", reason="FIFOs and symlinks")


def rows_of(folder, assignment=None):
    return cr.collect(folder, assignment)[0]


def one(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, [(r["file"], r["run"], r["flags"]) for r in rows])
    return found[0]


# ---- honest work ------------------------------------------------------------------------------------------------


def test_honest_students_following_the_readme_class_budget_are_not_flagged(tmp_path):
    budget_03(tmp_path / "ada")
    budget_04(tmp_path / "bob")
    rows = rows_of(tmp_path, BUDGET)
    assert [(r["student"], r["run"], r["flags"]) for r in rows] == [
        ("Ada", "resnet18_onecycle", "-"), ("Bob", "steplr_cropflip", "-"), ("Bob", "steplr_cutout", "-")]
    ada = rows[0]
    assert ada["self-checks"] == "03.1 right (2 tries), 03.2 right (1 try)"
    assert ada["epochs"] == "20/20" and ada["batch"] == "512" and ada["lr"] == "0.1" and ada["run id"] != "-"
    assert ada["answers"] == "2/5 (missing 03.3, 03.4, 03.5)"
    assert rows[1]["self-checks"] == "04.1 right (3 tries)" and rows[1]["epochs"] == "24/24"
    flags = one(rows_of(tmp_path), run="resnet18_onecycle")["flags"]  # without the assignment: the defaults
    assert "settings differ: CLASS_BUDGET True (assignment False), N_SEEDS 1 (assignment 3)" in flags


def test_class_budget_is_what_the_notebooks_own_branch_sets(tmp_path):
    books = cr.Notebooks()
    expected = {n: books.expected(n, {n: {"CLASS_BUDGET": True}}) for n in ("03", "04", "05", "06")}
    assert expected["03"]["N_SEEDS"] == 1
    assert (expected["04"]["EPOCHS"], expected["04"]["STEP_SIZE"]) == (24, 8)
    assert expected["05"]["EPOCHS"] == 30
    assert (expected["06"]["GRID_MODELS"], expected["06"]["EPOCHS"]) == (["resnet18"], 8)
    assert books.expected("03", {})["N_SEEDS"] == 3  # without CLASS_BUDGET: the defaults
    _, notes = cr.check_assignment({"04": {"CLASS_BUDGET": True, "EPOCHS": 30}}, books)
    assert notes == ["04: EPOCHS 30 has no effect: CLASS_BUDGET sets it to 24 in the notebook"]
    # read from the notebook's code, not a table: a notebook whose branch says otherwise is read as it says
    source = (ROOT / "notebooks" / f"{NB['03']}.ipynb").read_text()
    assert source.count("    N_SEEDS = 1\\n") == 1
    (tmp_path / f"{NB['03']}.ipynb").write_text(source.replace("    N_SEEDS = 1\\n", "    N_SEEDS, EPOCHS = 2, 9\\n"))
    other = cr.Notebooks(tmp_path).expected("03", {"03": {"CLASS_BUDGET": True}})
    assert (other["N_SEEDS"], other["EPOCHS"]) == (2, 9)


@pytest.mark.parametrize("assignment, message", [
    (b'{"03": {"CLASS_BUDGET": true,}}', "is not valid JSON"),
    (b'{"08": {"EPOCHS": 3}}', "unknown notebook '08'"),
    (b'{"03": {"EPOHCS": 3}}', "'03': unknown parameter 'EPOHCS' for 03_resnet18_onecycle (did you mean 'EPOCHS'?)"),
    (b'{"04": {"N_SEEDS": 1}}', "'04': unknown parameter 'N_SEEDS'"),
    (b'{"03": {"EPOCHS": 0}}', "'03': EPOCHS must be a whole number"),
    (b'{"03": 5}', "'03' must be an object"),
    (b'[1]', "must be a JSON object"),
])
def test_a_typo_in_the_assignment_stops_before_anything_is_read(tmp_path, capsys, assignment, message):
    budget_03(tmp_path / "hand" / "ada")
    (tmp_path / "assignment.json").write_bytes(assignment)
    rc = cr.main([str(tmp_path / "hand"), "--assignment", str(tmp_path / "assignment.json"), "--out",
                  str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(cr.AssignmentError):
        cr.collect(tmp_path / "hand", cr.read_assignment(tmp_path / "assignment.json"))


# ---- files that cannot be read ----------------------------------------------------------------------------------


def test_an_encrypted_zip_is_a_flagged_row(tmp_path):
    path = raw_zip(tmp_path / "carol" / "03.zip", [stored("manifest.json", manifest("03", "Carol"), flags=0x1)])
    with pytest.raises(RuntimeError, match="password required"):
        zipfile.ZipFile(path).read("manifest.json")
    budget_03(tmp_path / "ada")
    rows = rows_of(tmp_path)
    assert one(rows, file="carol/03.zip")["flags"] == "unreadable hand-in: manifest.json is password-protected " \
                                                      "(encrypted)"
    assert one(rows, student="Ada")["final test acc %"] != "-"


def test_a_compression_python_cannot_read_is_a_flagged_row_or_run(tmp_path):
    path = raw_zip(tmp_path / "dan" / "03.zip", [stored("manifest.json", manifest("03", "Dan"), method=99)])
    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(path).read("manifest.json")
    rec = record()
    raw_zip(tmp_path / "erin" / "03.zip", [stored("manifest.json", manifest("03", "Erin", runs=[rec["experiment"]])),
                                           stored("results/resnet18_onecycle.json", rec, method=99)])
    rows = rows_of(tmp_path)
    assert one(rows, file="dan/03.zip")["flags"] == "unreadable hand-in: manifest.json is compressed with method 99," \
                                                    " which Python cannot read"
    erin = one(rows, file="erin/03.zip")
    assert erin["student"] == "Erin" and erin["run"] == "resnet18_onecycle"
    assert "unreadable results file: results/resnet18_onecycle.json is compressed with method 99" in erin["flags"]


def test_deeply_nested_json_is_refused_without_recursion(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    handin(tmp_path / "fay" / "03.zip", deep)
    rec = record()
    handin(tmp_path / "gil" / "03.zip", manifest("03", "Gil", runs=["deep"]), raw={
        "results/deep.json": json.dumps({**rec, "config": json.loads("[" * 60 + "]" * 60)})})
    rows = rows_of(tmp_path)
    assert one(rows, file="fay/03.zip")["flags"] == "unreadable hand-in: manifest.json is nested deeper than 50 levels"
    assert "results/deep.json is nested deeper than 50 levels" in one(rows, file="gil/03.zip")["flags"]
    assert not cr.too_deep(json.dumps({"a": [[["[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]]]}).encode())
    assert cr.too_deep(b'{"x": "\\"", "y": ' + b"[" * 51 + b"]" * 51 + b"}")
    assert not cr.too_deep(b'"unterminated \\' + b"\\" * 10_000)


@pytest.mark.parametrize("content, reason", [
    (b"[1, 2]", "unreadable hand-in: the manifest is a list, not a JSON object"),
    (b"null", "unreadable hand-in: the manifest is null, not a JSON object"),
    (b"\xff\xfe not text", "unreadable hand-in: manifest.json is not UTF-8 text"),
    (b'{"notebook": "03_resnet18_onecycle", "student": 42, "answers": ["03.1"], "self_checks": [],'
     b' "parameters": "EPOCHS=20", "runs": {"a": 1}, "quick": "no"}',
     "manifest field 'student' is a number, not text; manifest field 'quick' is text, not true/false; manifest field"
     " 'parameters' is text, not an object; manifest field 'answers' is a list, not an object; manifest field "
     "'self_checks' is a list, not an object; manifest field 'runs' is an object, not a list"),
])
def test_a_manifest_of_the_wrong_shape_is_a_flagged_row(tmp_path, content, reason):
    handin(tmp_path / "gus" / "03.zip", content)
    row = one(rows_of(tmp_path), file="gus/03.zip")
    assert reason in row["flags"] and row["student"] == "gus"


def test_a_zip_bomb_is_refused_fast_without_the_memory(tmp_path, zeros):
    packed, crc, size = zeros
    raw_zip(tmp_path / "jo" / "03.zip", [("manifest.json", packed, 8, 0, crc, size)])
    rec = record()
    raw_zip(tmp_path / "kai" / "03.zip", [stored("manifest.json", manifest("03", "Kai", runs=["bomb"])),
                                          ("results/bomb.json", packed, 8, 0, crc, size)])
    liar = raw_zip(tmp_path / "liv" / "03.zip", [("manifest.json", packed, 8, 0, crc, 1000)])  # claims 1 kB
    handin(tmp_path / "ada" / "03.zip", manifest("03", "Ada", runs=[rec["experiment"]]), [rec])
    assert os.path.getsize(liar) < 600_000
    tracemalloc.start()
    start = time.perf_counter()
    rows = rows_of(tmp_path)
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 10 and peak < 40e6, (seconds, peak)
    assert one(rows, file="jo/03.zip")["flags"] == "unreadable hand-in: manifest.json is too large (512 MiB " \
                                                   "inflated; the limit is 5 MiB)"
    assert "unreadable results file: results/bomb.json is too large (512 MiB inflated; the limit is 50 MiB)" \
        in one(rows, file="kai/03.zip")["flags"]
    assert one(rows, file="liv/03.zip")["flags"].startswith("unreadable hand-in: manifest.json is damaged (Bad CRC")
    assert one(rows, file="ada/03.zip")["final test acc %"] != "-"


def test_too_many_members_and_not_a_zip(tmp_path):
    handin(tmp_path / "max" / "03.zip", manifest("03", "Max"), raw={f"figures/{i}.png": b"" for i in range(500)})
    (tmp_path / "mia").mkdir()
    (tmp_path / "mia" / "03.zip").write_bytes(b"PK\x03\x04 but nothing else")
    rows = rows_of(tmp_path)
    assert one(rows, file="max/03.zip")["flags"] == "unreadable hand-in: too many members (501; the limit is 500)"
    assert one(rows, file="mia/03.zip")["flags"] == "not a hand-in zip (not a zip file)"


@posix
def test_a_fifo_named_zip_is_skipped_not_waited_on(tmp_path):
    (tmp_path / "kim").mkdir()
    os.mkfifo(tmp_path / "kim" / "x.zip")
    budget_03(tmp_path / "ada")

    def hung(*_):
        raise TimeoutError("class_results waited on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        rows = rows_of(tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert one(rows, file="kim/x.zip")["flags"] == "skipped: not a regular file (a FIFO)"
    assert one(rows, file="kim/x.zip")["student"] == "kim"


@posix
def test_symlinked_folders_are_read_and_broken_or_looping_links_named(tmp_path):
    hand, elsewhere = tmp_path / "hand", tmp_path / "elsewhere"
    budget_03(elsewhere / "lee", "Lee")
    hand.mkdir()
    (hand / "lee").symlink_to(elsewhere / "lee", target_is_directory=True)
    (hand / "nia").symlink_to(tmp_path / "gone")
    (hand / "loop").symlink_to(hand, target_is_directory=True)
    rows = rows_of(hand, BUDGET)
    assert one(rows, file="lee/03_resnet18_onecycle.zip")["flags"] == "-"
    assert one(rows, file="nia")["flags"] == "skipped: a broken symlink"
    assert one(rows, file="loop")["flags"] == "skipped: a symlink loop (this folder is read already)"


# ---- who handed in what -----------------------------------------------------------------------------------------


def test_rows_are_keyed_by_file_and_show_the_name(tmp_path):
    budget_03(tmp_path / "sam_smith_1", "Sam Smith", seed=1)
    budget_03(tmp_path / "sam_smith_2", "Sam Smith", seed=2)
    _, man, rec = budget_03(tmp_path / "ned", "Ned", seed=3)
    rec2 = record(epochs=20, seed=4)
    handin(tmp_path / "ned" / "03_again.zip", {**man, "runs": [rec2["experiment"]]}, [rec2])
    budget_03(tmp_path / "ola", "Mallory", seed=5)
    rows = rows_of(tmp_path, BUDGET)
    assert [r["flags"] for r in rows if r["student"] == "Sam Smith"] == ["-", "-"]
    assert {r["file"] for r in rows if r["student"] == "Sam Smith"} == {"sam_smith_1/03_resnet18_onecycle.zip",
                                                                        "sam_smith_2/03_resnet18_onecycle.zip"}
    assert one(rows, file="ned/03_again.zip")["flags"] == "two hand-ins of 03 (also ned/03_resnet18_onecycle.zip)"
    assert one(rows, file="ned/03_resnet18_onecycle.zip")["flags"] == "two hand-ins of 03 (also ned/03_again.zip)"
    assert one(rows, student="Mallory")["flags"] == "folder and manifest disagree: folder 'ola', student 'Mallory'"
    keys = [(r["_identity"], r["_dup"]) for r in rows]
    assert len(set(keys)) == len(keys) == 5  # the figure has a row for each


def test_missing_runs_and_training_notebooks_without_a_run_are_flagged(tmp_path):
    rec = record(epochs=20)
    handin(tmp_path / "pam" / "03.zip", manifest("03", "Pam", params={"CLASS_BUDGET": True, "N_SEEDS": 1},
                                                 runs=["resnet18_onecycle", "resnet18_onecycle_seed1"],
                                                 missing_runs=["resnet18_onecycle_seed2"]), [rec])
    handin(tmp_path / "quinn" / "05.zip", manifest("05", "Quinn"))
    handin(tmp_path / "rae" / "01.zip", manifest("01_data_exploration", "Rae"))
    rows = rows_of(tmp_path, BUDGET)
    assert one(rows, run="resnet18_onecycle")["flags"] == "-"
    assert one(rows, run="resnet18_onecycle_seed1")["flags"] == "results file missing (the manifest lists this run)"
    assert one(rows, run="resnet18_onecycle_seed2")["flags"] == "run missing (no results file when the zip was made)"
    assert one(rows, student="Quinn")["flags"] == "no training run handed in"
    assert one(rows, student="Rae")["flags"] == "-"  # 01 trains nothing


# ---- names and numbers cannot break the files -------------------------------------------------------------------


def png_size(path):
    return struct.unpack(">2L", path.read_bytes()[16:24])


def test_names_and_numbers_cannot_break_the_files(tmp_path):
    names = {"tia": '=HYPERLINK("http://evil","x")', "uma": "Uma\nNewline | pipe", "vic": "v" * 20_000,
             "wes": "+SUM(A1)", "xan": "-2+3", "yul": "@cmd", "zoe": "$\\frac{1}{0}$ mathtext"}
    for i, (folder, name) in enumerate(names.items()):
        budget_03(tmp_path / "hand" / folder, name, seed=i)
    nan, inf, big = (record(name, epochs=20, seed=10 + i, final_test_acc=v, test_acc_at_best_val=v)
                     for i, (name, v) in enumerate((("nan", math.nan), ("inf", math.inf), ("big", 250.0))))
    handin(tmp_path / "hand" / "odd" / "03.zip", manifest("03", "Odd", params={"CLASS_BUDGET": True, "N_SEEDS": 1},
                                                         runs=["nan", "inf", "big"]), [nan, inf, big])
    rows = cr.class_results(tmp_path / "hand", BUDGET, tmp_path / "out")
    assert all(len(r["student"]) <= 60 and "\n" not in r["student"] for r in rows)
    assert one(rows, file="vic/03_resnet18_onecycle.zip")["student"] == "v" * 59 + "…"
    assert one(rows, file="uma/03_resnet18_onecycle.zip")["student"] == "Uma Newline | pipe"
    for run, shown in (("nan", "nan"), ("inf", "inf"), ("big", "250.0")):
        row = one(rows, run=run)
        assert row["final test acc %"] == "-" and f"impossible accuracy (final test acc {shown})" in row["flags"]
    with open(tmp_path / "out" / "class_results.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert len(table) == 1 + len(rows) and all(len(line) == len(cr.COLUMNS) for line in table)
    students = {line[0] for line in table[1:]}
    assert {"'=HYPERLINK(\"http://evil\",\"x\")", "'+SUM(A1)", "'-2+3", "'@cmd"} <= students
    assert not any(s[:1] in "=+-@" for s in students)
    md = (tmp_path / "out" / "class_results.md").read_text().splitlines()
    rows_md = [line for line in md if line.startswith("| ")]
    assert len(rows_md) == 1 + len(rows) and all(line.count(" | ") == len(cr.COLUMNS) - 1 for line in rows_md)
    width, height = png_size(tmp_path / "out" / "class_results.png")
    assert width < 3500 and height < 2000


def test_the_figure_shows_every_row_on_pages_of_bounded_size(tmp_path):
    for i in range(41):
        rec = record(epochs=2, seed=i)
        handin(tmp_path / "hand" / f"s{i:02d}" / "03.zip", manifest("03", f"S{i:02d}", runs=[rec["experiment"]]),
               [rec])
    rec = record(epochs=2, seed=99)
    handin(tmp_path / "hand" / "s00" / "03_b.zip", manifest("03", "S00", runs=[rec["experiment"]]), [rec])
    rows, _, _ = cr.collect(tmp_path / "hand")
    pages = cr.figures(rows)
    labels = [t.get_text() for fig in pages for t in fig.axes[0].get_yticklabels()]
    assert len(pages) == 2 and len(labels) == 42 and "S00 #2" in labels  # both of S00's hand-ins of 03
    for fig in pages:
        width, height = fig.get_size_inches() * 100
        assert width <= 3000 and height <= 1800


# ---- self-checks ------------------------------------------------------------------------------------------------


def test_self_checks_are_checked_again_for_the_answer_handed_in(tmp_path):
    right = model_answer("05.1")
    assert answer_hash("03.1", "75%") == answer_hash("03.1", 75) == ANSWER_CHECKS["03.1"]
    assert answer_hash("05.1", f"{right}x") == answer_hash("05.1", right) == ANSWER_CHECKS["05.1"]
    cases = {
        "honest": ({"05.1": f"{right}x"}, {"05.1": {"right": True, "answer": f"{right}x", "tries": 4}}),
        "claims": ({"05.1": right + 1}, {"05.1": {"right": True, "answer": right + 1, "tries": 1}}),
        "changed": ({"05.1": right + 1}, {"05.1": {"right": False, "answer": right, "tries": 2}}),
        "old": ({"05.1": right + 2}, {"05.1": True}),  # an older manifest: {id: bool}
        "unchecked": ({"05.1": str(right)}, {}),
    }
    for who, (answers, checks) in cases.items():
        handin(tmp_path / who / "05.zip", manifest("05", who, answers=answers, self_checks=checks))
    rows = {r["student"]: r for r in rows_of(tmp_path)}
    assert rows["honest"]["self-checks"] == "05.1 right (4 tries)"
    assert "self-check" not in rows["honest"]["flags"]
    assert rows["claims"]["self-checks"] == "05.1 wrong (1 try, claimed right)"
    assert "self-check claim does not match the answer (05.1)" in rows["claims"]["flags"]
    assert rows["changed"]["self-checks"] == "05.1 changed after the check (2 tries, now wrong)"
    assert "self-check claim" not in rows["changed"]["flags"]
    assert rows["old"]["self-checks"] == "05.1 wrong (claimed right)"
    assert "self-check claim does not match the answer (05.1)" in rows["old"]["flags"]
    assert rows["unchecked"]["self-checks"] == "05.1 right (not self-checked)"


# ---- what cannot be bought by editing a file --------------------------------------------------------------------


def edited(rec, **fields):
    """rec with fields changed (nested by 'a.b'), its checksum recomputed as a determined editor would."""
    rec = json.loads(json.dumps(rec))
    for key, value in fields.items():
        *path, last = key.split(".")
        target = rec
        for part in path:
            target = target[part]
        target[last] = value
    rec["checksum"] = record_checksum(rec)
    return rec


def test_edited_numbers_disagree_with_what_the_record_itself_shows(tmp_path):
    cases = {"acc": {"final_test_acc": 97.0}, "wall": {"wall_time_s": 60.0}, "epochs": {"config.epochs": 40},
             "batch": {"config.data.batch_size": 128}, "quick": {"quick": True},
             "small": {"config.data.train_images": 450, "config.data.val_images": 50}}
    recs = {who: edited(record(epochs=20, seed=i), **fields) for i, (who, fields) in enumerate(cases.items())}
    recs["hand"] = {**record(epochs=20, seed=9), "final_test_acc": 95.0}  # edited, the checksum left as it was
    recs["honest"] = record(epochs=20, seed=10)
    recs["official"] = record(epochs=20, seed=11, data_files="the official CIFAR-10 files")
    recs["jpeg"] = record(epochs=20, seed=12, data_files="a copy of CIFAR-10 that is not the official files")
    for who, rec in recs.items():
        handin(tmp_path / who / "03.zip", manifest("03", who, params={"CLASS_BUDGET": True, "N_SEEDS": 1},
                                                   runs=[rec["experiment"]]), [rec])
    found = rows_of(tmp_path, BUDGET)
    rows = {r["student"]: r["flags"] for r in found}
    marks = {t.get_text() for fig in cr.figures(found) for t in fig.axes[0].texts}
    assert {f"{float(recs[w]['final_test_acc']):.1f}\n{m}" for w, m in (("jpeg", "J"), ("quick", "QD"))} <= marks
    last = recs["acc"]["history"]["test_acc"][-1]
    assert rows["acc"] == f"final test acc differs from its history (97; last epoch {last})"
    spent = sum(recs["wall"]["history"]["epoch_time"]) / 60
    assert rows["wall"] == f"wall time shorter than its epochs (1.0 min; the epochs took {spent:.1f})"
    assert rows["epochs"] == "manifest and record disagree: epochs 40 in the record, EPOCHS 20 in the manifest"
    assert rows["batch"] == "manifest and record disagree: batch 128 in the record, BATCH_SIZE 512 in the manifest"
    assert rows["small"] == "QUICK-sized data (450 training images) not marked QUICK"
    assert rows["quick"] == "QUICK run; manifest and record disagree: quick (manifest false, record true, config " \
                            "false); manifest and record disagree: marked QUICK but trained on 45000 images"
    assert rows["hand"].startswith("record edited by hand; final test acc differs from its history (95; last epoch")
    assert rows["honest"] == rows["official"] == "-"  # a record from before the field, and one on the official files
    assert rows["jpeg"] == "data: a copy of CIFAR-10 that is not the official files"


def test_one_run_under_two_students_is_flagged_on_both(tmp_path):
    _, man, rec = budget_03(tmp_path / "ada", "Ada")
    handin(tmp_path / "zed" / "03.zip", {**man, "student": "Zed"}, [rec])  # the same file
    other = edited(rec, run_id="0123456789ab")  # a new id, the same history
    handin(tmp_path / "yan" / "03.zip", {**man, "student": "Yan"}, [other])
    handin(tmp_path / "ada" / "07.zip", manifest("07_gradcam_analysis", "Ada", runs=[rec["experiment"]]), [rec])
    _, _, own = budget_03(tmp_path / "ivy", "Ivy", seed=7)  # trained on its own: not flagged
    handin(tmp_path / "ivy" / "07.zip", manifest("07_gradcam_analysis", "Ivy", runs=[own["experiment"]]), [own])
    rows = rows_of(tmp_path, BUDGET)
    ada = "Ada (ada/03_resnet18_onecycle.zip, ada/07.zip)"  # both of Ada's zips hold the run: both are named
    assert [r["flags"] for r in rows if r["student"] == "Ada"] == ["same run as Zed (zed/03.zip), Yan (yan/03.zip)"] * 2
    assert one(rows, student="Zed")["flags"] == f"same run as {ada}, Yan (yan/03.zip)"
    assert one(rows, student="Yan")["flags"] == f"same run as {ada}, Zed (zed/03.zip)"
    assert [r["flags"] for r in rows if r["student"] == "Ivy"] == ["-", "-"]  # 07 explains Ivy's own 03 run


# ---- everything at once -----------------------------------------------------------------------------------------


@posix
def test_one_folder_holding_every_hostile_case_still_gives_the_class_its_table(tmp_path, zeros):
    hand, out = tmp_path / "hand", tmp_path / "out"
    budget_03(hand / "ada")
    budget_04(hand / "bob")
    packed, crc, size = zeros
    bad = {
        "carol/03.zip": "password-protected",
        "dan/03.zip": "compressed with method 99",
        "fay/03.zip": "nested deeper than 50 levels",
        "gus/03.zip": "the manifest is a list",
        "hal/03.zip": "the manifest is null",
        "ivy/03.zip": "manifest field 'student' is a number, not text; manifest field 'answers' is a list",
        "jo/03.zip": "manifest.json is too large (512 MiB inflated",
        "kim/x.zip": "skipped: not a regular file (a FIFO)",
        "mia/03.zip": "not a hand-in zip (not a zip file)",
        "nia": "skipped: a broken symlink",
        "max/03.zip": "too many members",
        "lee/03_resnet18_onecycle.zip": "same run as Zed",
        "zed/03.zip": "same run as Lee",
        "ned/03_resnet18_onecycle.zip": "two hand-ins of 03",
        "ned/03_b.zip": "two hand-ins of 03",
        "ola/03_resnet18_onecycle.zip": "folder and manifest disagree",
        "pam/03.zip": "results file missing",
        "quinn/05.zip": "no training run handed in",
        "tia/03_resnet18_onecycle.zip": "folder and manifest disagree",
        "uma/03.zip": "impossible accuracy (final test acc 250.0)",
    }
    raw_zip(hand / "carol" / "03.zip", [stored("manifest.json", manifest("03", "Carol"), flags=0x1)])
    raw_zip(hand / "dan" / "03.zip", [stored("manifest.json", manifest("03", "Dan"), method=99)])
    handin(hand / "fay" / "03.zip", b"{" * 1000 + b"}" * 1000)
    handin(hand / "gus" / "03.zip", b"[]")
    handin(hand / "hal" / "03.zip", b"null")
    handin(hand / "ivy" / "03.zip", manifest("03", 42, answers=["03.1"]))
    raw_zip(hand / "jo" / "03.zip", [("manifest.json", packed, 8, 0, crc, size)])
    (hand / "kim").mkdir()
    os.mkfifo(hand / "kim" / "x.zip")
    (hand / "mia").mkdir()
    (hand / "mia" / "03.zip").write_bytes(b"not a zip")
    (hand / "nia").symlink_to(tmp_path / "gone")
    handin(hand / "max" / "03.zip", manifest("03", "Max"), raw={f"figures/{i}.png": b"" for i in range(600)})
    _, man, rec = budget_03(tmp_path / "elsewhere" / "lee", "Lee", seed=1)
    (hand / "lee").symlink_to(tmp_path / "elsewhere" / "lee", target_is_directory=True)
    handin(hand / "zed" / "03.zip", {**man, "student": "Zed"}, [rec])
    budget_03(hand / "ned", "Ned", seed=2)
    rec_b = record(epochs=20, seed=3)
    handin(hand / "ned" / "03_b.zip", {**man, "student": "Ned", "runs": [rec_b["experiment"]]}, [rec_b])
    budget_03(hand / "ola", "Mallory", seed=4)
    handin(hand / "pam" / "03.zip", {**man, "student": "Pam", "runs": ["lost"]})
    handin(hand / "quinn" / "05.zip", manifest("05", "Quinn"))
    budget_03(hand / "tia", '=HYPERLINK("http://evil")' + "x" * 20_000, seed=5)
    rec_u = record(epochs=20, seed=6, final_test_acc=250.0)
    handin(hand / "uma" / "03.zip", {**man, "student": "Uma\nU", "runs": [rec_u["experiment"]]}, [rec_u])
    (hand / "__MACOSX").mkdir()
    (hand / "._03.zip").write_bytes(b"\0\5\26\7")
    (tmp_path / "assignment.json").write_text('{"03": {"CLASS_BUDGET": true}, "04": {"CLASS_BUDGET": true}}')
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "class_results.py"), str(hand), "--assignment",
                           str(tmp_path / "assignment.json"), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    with open(out / "class_results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_file = {r["file"]: r for r in rows}
    assert len(rows) == len(bad) + 3 and len(by_file) == len(bad) + 2  # a row per hand-in and run: Bob has two
    assert [r["flags"] for r in rows if r["file"].startswith(("ada/", "bob/"))] == ["-", "-", "-"]
    for file, reason in bad.items():
        assert reason in by_file[file]["flags"], (file, by_file[file]["flags"])
    assert by_file["tia/03_resnet18_onecycle.zip"]["student"].startswith("'=HYPERLINK")
    assert len(by_file["tia/03_resnet18_onecycle.zip"]["student"]) <= 61
    assert (out / "class_results.md").read_text().count("\n| ") == len(rows) + 1
    assert "skipped 2 macOS metadata files" in (out / "class_results.md").read_text()
    width, height = png_size(out / "class_results.png")
    assert 10_000 < (out / "class_results.png").stat().st_size and width < 3500 and height < 2000
