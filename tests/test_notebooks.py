"""Every notebook: its structure as committed, the mechanics it teaches, and one QUICK run of the whole series done
the way a student does it (the parameters cell's source edited, Run all with nbclient, a faked Colab with Drive and
/content in temporary folders), followed by a real run on the same Drive."""

import ast
import json
import re
import sys
import zipfile

import nbformat
import pytest
from conftest import ROOT, fixed_answer
from nbclient.exceptions import CellExecutionError
from student import printed, run_as_student

import course
from course.handin import ANSWER_CHECKS
from course.runs import record_checksum

sys.path.insert(0, str(ROOT / "scripts"))
from class_results import notebook_spec  # noqa: E402  (the teacher's reading of a notebook)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURES = {  # what each notebook must save (more is fine)
    "01": {"01_class_counts.png", "01_samples_per_class.png", "01_augmentations.png"},
    "02": {"02_lr_finder_exp.png", "02_lr_finder_linear.png"},
    "03": {"03_history.png", "03_lr_schedule.png"},
    "04": {"04_history_steplr_cropflip.png", "04_history_steplr_cutout.png", "04_compare.png"},
    "05": {"05_history.png", "05_lr_schedule.png"},
    "06": {"06_grid.png", "06_test_curves.png", "06_final_history.png"},
    "07": {"07_misclassified.png", "07_gradcam_layer2.png", "07_gradcam_layer3.png",
           "07_gradcam_layers.png", "07_sanity_check.png", "07_gradcam_vs_plusplus.png", "07_one_mistake.png",
           "07_confusion.png", "07_confusion_normalized.png", "07_per_class.png"},
}
MECHANICS = {  # what each notebook writes out in its own code cells (then checks against the helper)
    "03": ["loss.backward()", "optimizer.zero_grad()", "optimizer.step()", "torch.optim.SGD(",
           "lr_scheduler.OneCycleLR(", "nn.CrossEntropyLoss(", "H.BasicBlock(", "torch.allclose(", "H.fit("],
    "04": ["lr_scheduler.StepLR(", "schedule.step()", "F.nll_loss(", "H.fit("],
    "05": ["lr_scheduler.ReduceLROnPlateau(", "plateau.step(val_acc)", "last_stride=LAST_STRIDE", "H.fit("],
    "06": ['H.make_norm("ln"', "mean(dim=(1, 2, 3))", "for sched_name in GRID_SCHEDULERS", "torch.optim.Adam(",
           "resnet50"],
    "07": ["register_forward_hook(", "torch.autograd.grad(", ".mean(dim=(2, 3))", "F.relu(", "torch.allclose(",
           "reset_parameters()", "H.GradCAMPlusPlus", "H.mistake_explorer("],
}
PRINTED = {  # what each notebook's QUICK run must print: its checks came out right
    "03": ["by hand = block: True", "H.train_one_epoch give the same weights: True", "per batch"],
    "04": ["equal: True", "per epoch"], "05": ["per metric"],
    "06": ["image 0 unchanged when the others change: BatchNorm False | LayerNorm True"],
    "07": ["by hand equals H.GradCAM: True", "rank correlation with the trained maps"],
}


def load(path):
    return nbformat.read(path, as_version=4)


def code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


def parameters(nb):
    """Names and default values of the parameters cell."""
    tree = ast.parse(parameters_cell(nb).source)
    return {t.targets[0].id: ast.literal_eval(t.value) for t in tree.body if isinstance(t, ast.Assign)}


def test_the_series_is_complete():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_runs_its_own_defaults(path):
    """No papermill cell, no second parameters cell: a student's Run all runs the parameters cell as it stands."""
    nb = load(path)
    tags = [t for c in nb.cells for t in c.metadata.get("tags", [])]
    assert "injected-parameters" not in tags, "papermill's injected cell would override the parameters cell"
    assert tags.count("parameters") == 1
    sources = [c.source for c in code(nb)]
    assert not [s for s in sources if s.lstrip().startswith("# Parameters")], "an untagged copy of an injected cell"
    params = parameters(nb)
    assert params["QUICK"] is False and params.get("SUBSET", None) is None and params.get("CLASS_BUDGET") in (None,
                                                                                                            False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_parameters_cell_holds_the_experiment_only_and_every_knob_is_checked(path):
    """No path, device or worker count among the knobs (they are course.start's keywords); every knob has a rule."""
    params = parameters(load(path))
    plumbing = {"DATA_DIR", "DOWNLOAD", "OUTPUT_DIR", "IMAGES_DIR", "DRIVE_FOLDER", "DEVICE", "NUM_WORKERS",
                "START_OVER", "AMP", "CHANNELS_LAST"}
    assert not plumbing & set(params), plumbing & set(params)
    assert not [k for k, v in params.items() if isinstance(v, str) and ("/" in v or v in ("cuda", "cpu", "auto"))
                and k != "PHOTO_URL"]
    assert set(params) <= set(course.checks.RULES), f"no rule for {set(params) - set(course.checks.RULES)}"
    course.checks.check_parameters(params)  # the defaults pass their own checks


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_show_no_path_of_the_machine_that_ran_them(path):
    text = "".join(str(o.get("text", "")) + json.dumps(o.get("data", {})) for c in code(load(path)) for o in c.outputs)
    assert not re.findall(r"(?<![\w.])/(?:work|tmp|root|home)/[\w./-]+", text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_notebooks_say_how_they_were_run(path):
    """A notebook committed with outputs has a banner (settings, hardware, date) and no QUICK or widget output."""
    nb = load(path)
    if not any(c.get("outputs") for c in code(nb)):
        assert not [c for c in nb.cells if "run-banner" in c.metadata.get("tags", [])]
        return
    banners = [c for c in nb.cells if "run-banner" in c.metadata.get("tags", [])]
    assert len(banners) == 1 and nb.cells.index(banners[0]) == 1
    text = banners[0].source
    assert re.search(r"Executed on \d{4}-\d{2}-\d{2} on .+, in [\d.]+ min", text) and "Run all" in text
    assert "QUICK = True" not in text and "SUBSET" not in text
    widget = "application/vnd.jupyter.widget-view+json"
    assert not [o for c in code(nb) for o in c.outputs if widget in o.get("data", {})], "stateless widget outputs"
    assert "QUICK = True: a sandbox" not in "".join(o.get("text", "") for c in code(nb) for o in c.outputs)


def test_one_setup_cell_and_one_address_everywhere():
    setups = {code(load(p))[0].source for p in NOTEBOOKS}
    assert len(setups) == 1, "the setup cell differs between notebooks"
    setup = setups.pop()
    lines = [line for line in setup.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= 8, f"the setup cell has {len(lines)} code lines (at most 8)"
    assert "import course, helpers as H" in setup and "pip" in setup and "!" not in setup.replace("!=", "")
    url = re.search(r'REPO_URL, REPO_REF = "([^"]+)", "([^"]+)"', setup)
    readme = (ROOT / "README.md").read_text()
    assert url and url.group(1) in readme
    for path in NOTEBOOKS:
        badge = f"colab.research.google.com/github/{url.group(1).split('github.com/')[1]}/blob/{url.group(2)}/" \
                f"notebooks/{path.name}"
        assert badge in load(path).cells[0].source, f"{path.name}: no Open in Colab badge"
        assert badge in readme, f"README has no badge for {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    nb = load(path)
    nb.cells = [c for c in nb.cells if "run-banner" not in c.metadata.get("tags", [])]
    number = path.name[:2]
    params = parameters(nb)
    assert ("CLASS_BUDGET" in params) == (number in ("03", "04", "05", "06"))
    for line in parameters_cell(nb).source.splitlines():
        if "=" in line.split("#")[0] and not line.startswith(" "):
            assert "#" in line, f"parameter without a comment: {line}"
    index = nb.cells.index(parameters_cell(nb))
    for i, cell in enumerate(nb.cells[index + 1:], start=index + 1):
        if cell.cell_type == "code":
            assert nb.cells[i - 1].cell_type == "markdown", f"cell {i} has no markdown before it"
    start = nb.cells[index + 2].source
    assert "if QUICK:" in start and "ws = course.start(globals())" in start
    boilerplate = [code(nb)[0].source, start, code(nb)[-1].source]  # setup, start, hand-in
    lines = [line for s in boilerplate for line in s.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= 17, f"{len(lines)} lines of setup, start and hand-in (aim: about 15)"
    assert index <= 3, "the parameters come right after the title and the setup: the first idea is on the first screen"
    first = nb.cells[0].source
    assert "**Cost.**" in first and "Drive" in first and ("T4" in first or number == "01")
    if number not in ("01", "02", "07"):  # the estimate's basis is said once, in README
        assert "estimate" in first and "Where the T4 times come from" in " ".join(first.split())
        assert "**Class budget**" in first
    names = re.findall(r'ws\.(?:show|savefig)\(fig, f?"([^"]+)"', "\n".join(c.source for c in code(nb)))
    assert names and all(name.startswith(path.name[:3]) for name in names), names
    assert ("accelerator" in nb.metadata) == (number not in ("01", "02")), "only 03-07 ask for a GPU"
    text = "\n".join(c.source for c in nb.cells).lower()
    for wrong in ("seed 00", "seeds 00", "seed report", "the seeds'", "the seed's", "seed-faithful"):
        assert wrong not in text, f"a student report called a seed: {wrong!r} (say 'report 000')"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercises_have_ids_answer_cells_and_a_hand_in(path):
    nb = load(path)
    number = path.name[:2]
    ids = re.findall(rf"\*\*Exercise ({number}\.\d)\*\* \(([^)]+)\)", "\n".join(c.source for c in nb.cells))
    assert 3 <= len(ids) <= 5 and [i for i, _ in ids] == [f"{number}.{k}" for k in range(1, len(ids) + 1)]
    spec = notebook_spec(path.stem)
    assert spec["exercises"] == [i for i, _ in ids], "every exercise has an ANSWER_ cell, in order"
    for exercise, cost in ids:
        cell = next(i for i, c in enumerate(nb.cells) if f"**Exercise {exercise}**" in c.source)
        answer = nb.cells[cell + 1]
        assert answer.cell_type == "code" and f"ANSWER_{exercise.replace('.', '_')} = " in answer.source
        checked = f'ws.check("{exercise}"' in answer.source
        assert checked == (exercise in ANSWER_CHECKS), f"{exercise}: self-check and ANSWER_CHECKS disagree"
        assert checked or "*A good answer*" in nb.cells[cell].source, f"{exercise}: an open question needs a checklist"
        assert any(w in cost for w in ("no cost", "seconds", "min", "hour")), f"{exercise}: no cost in {cost!r}"
    last = nb.cells[-1]
    assert last.cell_type == "code" and f'ws.hand_in("{path.stem}", globals(), STUDENT' in last.source
    assert "STUDENT = " in last.source
    hand_in = nb.cells[-2].source
    assert "zip" in hand_in and "README" in hand_in  # what to submit and how: said once, in README


@pytest.mark.parametrize("number", sorted(MECHANICS))
def test_each_mechanism_is_written_out_in_its_notebook(number):
    source = "\n".join(c.source for c in code(load(next(p for p in NOTEBOOKS if p.name.startswith(number)))))
    for snippet in MECHANICS[number]:
        assert snippet in source, f"notebook {number} does not write out {snippet}"
    assert "def " not in source, "functions belong in helpers.py"


# ---- the student's path, run once for the whole module (and for tests/test_teacher.py) ----------------------


@pytest.mark.parametrize("number", ["01", "02", "03", "04", "05", "06", "07"])
def test_quick_run_as_a_student(number, student_run):
    """QUICK = True typed into the parameters cell, Run all on a fresh kernel: every cell runs, the figures and the
    hand-in zip land in the QUICK sandbox on Drive, and the checks the notebook teaches print True."""
    nb, ws = student_run["notebooks"][number], student_run["workspace"]
    text = printed(nb)
    assert "QUICK = True: a sandbox. Everything goes to MyDrive/resnet-cifar10-course/outputs/quick" in text
    paths = re.findall(r"(?<![\w.])/(?:work|tmp|root|home)/[\w./-]+", text)
    assert not paths, f"printed a path of the machine that ran it: {paths[:3]}"
    written = {p.name for p in (ws / "images" / "quick").glob(f"{number}_*.png")}
    assert FIGURES[number] <= written, f"missing figures: {FIGURES[number] - written}"
    for expected in PRINTED.get(number, []):
        assert expected in text, f"{number} did not print {expected!r}"
    assert "This is a QUICK run: its numbers mean nothing" in text
    with zipfile.ZipFile(next((ws / "outputs" / "quick" / "handin").glob(f"{number}_*.zip"))) as z:
        manifest = json.loads(z.read("manifest.json"))
        names = z.namelist()
        records = {n: json.loads(z.read(n)) for n in names if n.startswith("results/")}
    assert manifest["quick"] is True and manifest["notebook"].startswith(number)
    assert {f"figures/{f}" for f in FIGURES[number]} <= set(names)
    assert manifest["unanswered"] == sorted(notebook_spec(manifest["notebook"])["exercises"])  # nothing typed in
    assert manifest["parameters"]["QUICK"] is True
    assert sorted(f"results/{name}.json" for name in manifest["runs"]) == sorted(n for n in names
                                                                                if n.startswith("results/"))
    assert (number in ("01", "02")) == (not manifest["runs"])
    for record in records.values():
        assert record["quick"] is True and record["status"] == "complete"
        assert record_checksum(record) == record["checksum"] and record["run_id"]


def test_quick_runs_write_only_to_their_sandbox_on_drive(student_run):
    """Nothing of the QUICK series outside quick/ on Drive, nothing in the checkout, no lr_finder.json a real run
    would read; and a finished run keeps only its best weights."""
    ws = student_run["workspace"]
    outside = [p for p in student_run["drive_before_real_run"] if "quick" not in p.relative_to(ws).parts]
    assert outside == [], outside
    assert student_run["checkout_untouched"]
    checkpoints = sorted(p.name for p in (ws / "outputs" / "quick" / "checkpoints").glob("resnet18_onecycle*"))
    assert checkpoints == ["resnet18_onecycle_best.pt"]  # _last.pt and _prev.pt freed at the end


def test_the_real_run_after_quick_trains_and_ignores_quick_results(student_run):
    """README's order, QUICK first, then the defaults on the same Drive: the real 03 trains (no StaleRun), takes the
    documented default LR and says why (the QUICK run's lr_finder.json is never read), writes outside quick/, and
    its record says quick: false. QUICK's results never appear as expected results."""
    ws, text = student_run["workspace"], printed(student_run["real_03"])
    assert "LR 0.1: the stated default (no LR range test result at" in text and "a QUICK run's LR" in text
    assert "resnet18_onecycle: the course ships no finished run of it yet" in text  # QUICK's is no expected result
    shipped = json.loads((ROOT / "course" / "expected.json").read_text())  # what it does ship
    assert shipped and all(f"shipped with the course: {name}: {line}" in text for name, line in shipped.items())
    assert "one seed: " in text and "no spread" in text and "std" not in text.split("one seed: ")[1][:200]
    record = json.loads((ws / "outputs" / "results" / "resnet18_onecycle.json").read_text())
    assert record["quick"] is False and record["status"] == "complete"
    assert json.loads((ws / "outputs" / "quick" / "results" / "resnet18_onecycle.json").read_text())["quick"] is True
    with zipfile.ZipFile(ws / "outputs" / "handin" / "03_resnet18_onecycle.zip") as z:
        manifest = json.loads(z.read("manifest.json"))
    right = fixed_answer("03.1")  # None in the class's copy: Bob then types 1, a wrong answer
    assert manifest["self_checks"]["03.1"] == {"right": right is not None, "answer": right or 1, "tries": 1}
    assert manifest["self_checks"]["03.2"]["right"] is False and manifest["student"] == "Bob"


def test_a_second_runtime_loads_the_finished_run_from_drive(student_run):
    text = printed(student_run["quick_03_again"])
    assert "'resnet18_onecycle': finished earlier (1/1 epochs); loaded its best weights (epoch 1)" in text
    assert "epoch   1/1 |" not in text


def test_07_never_trains_or_touches_another_notebooks_run(student_run, tmp_path):
    """Pointed at a run that is not there, 07 stops with the runs it could explain; nothing in the workspace moves."""
    ws = student_run["workspace"]
    before = {p: p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file()}
    with pytest.raises(CellExecutionError, match="run notebook 03 first.*one of: .*resnet18_onecycle"):
        run_as_student("07", student_run["env"], out=tmp_path / "07.ipynb", QUICK="True", EXPERIMENT='"never_trained"')
    assert {p: p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file()} == before


def test_execute_notebook_drops_the_injected_cell_and_writes_a_banner():
    """What scripts/execute_notebook.py does after papermill: the executed notebook runs its defaults again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("execute_notebook", ROOT / "scripts" / "execute_notebook.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    nb = load(next(p for p in NOTEBOOKS if p.name.startswith("03")))
    nb.cells = [c for c in nb.cells if "run-banner" not in c.metadata.get("tags", [])]
    index = nb.cells.index(parameters_cell(nb)) + 1
    nb.cells.insert(index, nbformat.v4.new_code_cell("# Parameters\nEPOCHS = 5\n",
                                                     metadata={"tags": ["injected-parameters"]}))
    widget = {"output_type": "display_data", "metadata": {},
              "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "0%"}}
    stream = nbformat.v4.new_output("stream", name="stdout", text="epoch 1/5\n")
    code(nb)[1].outputs = [nbformat.from_dict(widget), stream]
    for _ in range(2):  # executed twice: still one banner
        nb = script.finish(nb, {"EPOCHS": 5, "EXPERIMENT": "cpu_ref"}, "CPU (AMD EPYC, 2 cores)", 4362.0,
                           "2026-11-25")
    tags = [t for c in nb.cells for t in c.metadata.get("tags", [])]
    assert "injected-parameters" not in tags and tags.count("run-banner") == 1 and tags.count("parameters") == 1
    banner = nb.cells[1].source
    assert "Executed on 2026-11-25 on CPU (AMD EPYC, 2 cores), in 72.7 min" in banner
    assert "`EPOCHS = 5`, `EXPERIMENT = 'cpu_ref'`" in banner and "*Run all* runs the defaults" in banner
    assert code(nb)[1].outputs == [stream]
    assert parameters(nb)["EPOCHS"] == 20  # the defaults are what Run all runs


@pytest.mark.slow
def test_execute_notebook_leaves_the_notebook_as_it_was_when_the_run_fails(tmp_path):
    """A failed run (or an older run's leftover injected cell) never reaches the committed notebook; -p names must be
    parameters, and a -p equal to the default is not listed as a change."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("execute_notebook", ROOT / "scripts" / "execute_notebook.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path / "toy.ipynb"
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_markdown_cell("# toy"),
                nbformat.v4.new_code_cell("X = 1  # a knob", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("X = 2", metadata={"tags": ["injected-parameters"]}),  # an old run's
                nbformat.v4.new_code_cell("print('X is', X)\nraise ValueError('broken')")]
    nbformat.write(nb, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="broken"):
        script.main([str(path)])
    assert path.read_bytes() == before
    with pytest.raises(SystemExit, match="DEVICE: not in the parameters cell"):
        script.main([str(path), "-p", "DEVICE", "cuda"])
    nb.cells[3].source = "print('X is', X)"
    nbformat.write(nb, path)
    script.main([str(path), "-p", "X", "1"])
    done = nbformat.read(path, as_version=4)
    assert "none (the defaults)" in done.cells[1].source and done.cells[-1].outputs[0]["text"] == "X is 1\n"
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in done.cells)
