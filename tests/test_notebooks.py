"""Every notebook: its structure, the mechanics it teaches, and a real papermill run with QUICK = True."""

import ast
import json
import re
import time

import nbformat
import pytest
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURES = {  # what each notebook must save (more is fine)
    "01": {"01_class_counts.png", "01_samples_per_class.png", "01_augmentations.png"},
    "02": {"02_lr_finder_exp.png", "02_lr_finder_linear.png"},
    "03": {"03_history.png", "03_lr_schedule.png"},
    "04": {"04_history_steplr_cropflip.png", "04_history_steplr_cutout.png", "04_compare.png"},
    "05": {"05_history.png", "05_lr_schedule.png"},
    "06": {"06_grid.png", "06_test_curves.png", "06_final_history.png"},
    "07": {"07_misclassified_4.png", "07_misclassified_8.png", "07_gradcam_layer2.png", "07_gradcam_layer3.png",
           "07_gradcam_layers.png", "07_sanity_check.png", "07_gradcam_vs_plusplus.png", "07_one_mistake.png",
           "07_confusion.png", "07_confusion_normalized.png", "07_per_class.png"},
}
MECHANICS = {  # what each notebook writes out in its own code cells (then checks against the helper)
    "03": ["loss.backward()", "optimizer.zero_grad()", "optimizer.step()", "torch.optim.SGD(",
           "lr_scheduler.OneCycleLR(", "nn.CrossEntropyLoss(", "H.BasicBlock(", "torch.allclose(", "H.fit("],
    "04": ["lr_scheduler.StepLR(", "schedule.step()", "F.nll_loss(", "H.fit("],
    "05": ["lr_scheduler.ReduceLROnPlateau(", "plateau.step(val_acc)", "last_stride=LAST_STRIDE", "H.fit("],
    "06": ['H.make_norm("ln"', "mean(dim=(1, 2, 3))", "for sched_name in SCHEDULERS", "torch.optim.Adam(", "resnet50"],
    "07": ["register_forward_hook(", "torch.autograd.grad(", ".mean(dim=(2, 3))", "F.relu(", "torch.allclose(",
           "reset_parameters()", "H.GradCAMPlusPlus", "H.mistake_explorer("],
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
    assert NOTEBOOKS[0].name == "01_data_exploration.ipynb" and NOTEBOOKS[-1].name == "07_gradcam_analysis.ipynb"


def test_one_short_setup_cell_and_one_address_everywhere():
    setups = {code(load(p))[0].source for p in NOTEBOOKS}
    assert len(setups) == 1, "the setup cell differs between notebooks"
    setup = setups.pop()
    lines = [ln for ln in setup.splitlines() if ln.strip() and not ln.startswith(("#", "import ", "from "))]
    assert len(lines) <= 10 and "google.colab" in setup and "H.print_versions()" in setup  # about 8 statements
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
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]  # papermill's
    params = parameters(nb)
    assert params["QUICK"] is False and params.get("SUBSET", None) is None  # the defaults are the real full run
    assert {"DATA_DIR", "IMAGES_DIR"} <= set(params)
    for line in parameters_cell(nb).source.splitlines():
        if "=" in line.split("#")[0] and not line.startswith(" "):
            assert "#" in line, f"parameter without a comment: {line}"
    index = nb.cells.index(parameters_cell(nb))
    for i, cell in enumerate(nb.cells[index + 1:], start=index + 1):
        if cell.cell_type == "code":
            assert nb.cells[i - 1].cell_type == "markdown", f"cell {i} has no markdown before it"
    assert "if QUICK:" in nb.cells[index + 2].source and "H.check_parameters(" in nb.cells[index + 2].source
    text = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert any("## Takeaways" in t for t in text) and any("## Exercises" in t for t in text)
    exercises = len(re.findall(r"^\d\. ", next(t for t in text if "## Exercises" in t), re.M))
    assert 3 <= exercises <= 5 and sum(t.startswith("**Your answer") for t in text) == exercises
    assert "Hand-in summary" in nb.cells[-2].source and nb.cells[-1].cell_type == "code"
    for name in re.findall(r'save_figure\(fig, IMAGES_DIR, f?"([^"]+)"', "\n".join(c.source for c in code(nb))):
        assert name.startswith(path.name[:3]), name
    assert ("accelerator" in nb.metadata) == (path.name[:2] != "01"), "only the training notebooks ask for a GPU"


@pytest.mark.parametrize("number", sorted(MECHANICS))
def test_each_mechanism_is_written_out_in_its_notebook(number):
    source = "\n".join(c.source for c in code(load(next(p for p in NOTEBOOKS if p.name.startswith(number)))))
    for snippet in MECHANICS[number]:
        assert snippet in source, f"notebook {number} does not write out {snippet}"
    assert "def " not in source, "functions belong in helpers.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_hold_no_quick_run_output(path):
    nb = load(path)
    if not any(c.get("outputs") for c in code(nb)):
        return  # no outputs at all: fine
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected, "outputs without papermill's injected parameters: where do they come from?"
    for cell in injected:
        values = {t.targets[0].id: ast.literal_eval(t.value) for t in ast.parse(cell.source).body}
        assert not values.get("QUICK") and values.get("SUBSET") is None, "outputs of a quick run"
    widget = "application/vnd.jupyter.widget-view+json"
    widgets = [o for c in code(nb) for o in c.outputs if widget in o.get("data", {})]
    assert not widgets, "stateless widget outputs render as empty bars: strip them"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_dir):
    """A folder shared by the notebooks of one quick run, in order (02 feeds 03, 03 feeds 07)."""
    return {"dir": tmp_path_factory.mktemp("quick_run"), "data": data_dir}


def outputs_text(nb):
    return "".join(o.get("text", "") for c in code(nb) for o in c.outputs if o.get("output_type") == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_quick_true(path, quick_run):
    import papermill as pm

    out = quick_run["dir"]
    values = dict(QUICK=True, DATA_DIR=str(quick_run["data"]), IMAGES_DIR=str(out / "images"))
    if "OUTPUT_DIR" in parameters(load(path)):
        values["OUTPUT_DIR"] = str(out / "outputs")
    before = set((out / "images").glob("*.png")) if (out / "images").exists() else set()
    t0 = time.perf_counter()
    pm.execute_notebook(str(path), str(out / path.name), parameters=values, cwd=str(ROOT / "notebooks"),
                        kernel_name="python3", progress_bar=False, request_save_on_cell_execute=False)
    written = {p.name for p in set((out / "images").glob("*.png")) - before}
    assert FIGURES[path.name[:2]] <= written, f"missing figures: {FIGURES[path.name[:2]] - written}"
    assert all(name.startswith(path.name[:3]) for name in written)
    text = outputs_text(load(out / path.name))
    checks = {"03": ["by hand = block: True", "H.train_one_epoch give the same weights: True", "per batch"],
              "04": ["equal: True", "per epoch"], "05": ["per metric"],
              "06": ["image 0 unchanged when the others change: BatchNorm False | LayerNorm True"],
              "07": ["by hand equals H.GradCAM: True", "rank correlation"]}.get(path.name[:2], [])
    for expected in checks:
        assert expected in text, f"{path.name} did not print {expected!r}"
    if path.name.startswith("02"):
        assert json.loads((out / "outputs" / "lr_finder.json").read_text())["batch_size"] == 32
    print(f"{path.name}: {time.perf_counter() - t0:.0f} s")


def test_07_never_trains_or_touches_another_notebooks_run(quick_run):
    """Pointed at a run that is not there, 07 stops with the runs it could explain; 03's files stay as they were."""
    import papermill as pm

    out = quick_run["dir"]
    checkpoints = out / "outputs" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()}
    assert "resnet18_onecycle_last.pt" in before  # from 03's quick run above
    values = dict(QUICK=True, DATA_DIR=str(quick_run["data"]), IMAGES_DIR=str(out / "images"),
                  OUTPUT_DIR=str(out / "outputs"), EXPERIMENT="never_trained")
    with pytest.raises(pm.PapermillExecutionError, match="run notebook 03 first.*one of: .*resnet18_onecycle"):
        pm.execute_notebook(str(ROOT / "notebooks" / "07_gradcam_analysis.ipynb"), str(out / "07_missing.ipynb"),
                            parameters=values, cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False)
    assert {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()} == before
    assert not (out / "outputs" / "archive").exists()
