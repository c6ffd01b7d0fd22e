"""Every notebook: its structure, and a real execution with papermill in the quick configuration."""

import ast
import re
import time

import nbformat
import pytest
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
REQUIRED = {"DATA_DIR", "IMAGES_DIR", "OUTPUT_DIR", "EPOCHS", "SUBSET", "DEVICE", "SEED"}
QUICK = {"EPOCHS": 1, "SUBSET": 200, "DEVICE": "cpu", "SEED": 0, "DOWNLOAD": False, "NUM_WORKERS": 0,
         "BATCH_SIZE": 32, "RESNET50_BATCH_SIZE": 32, "RESNET50_EPOCHS": 1, "N_SEEDS": 1, "NUM_ITER": 20,
         "LINEAR_NUM_ITER": 20, "N_CAM": 6, "N_COMPARE": 4, "GALLERY_SIZES": [4, 8]}
FIGURES = {  # what each notebook must save (more is fine)
    "01": {"01_class_counts.png", "01_samples_per_class.png", "01_augmentations.png"},
    "02": {"02_lr_finder_exp.png", "02_lr_finder_linear.png"},
    "03": {"03_history.png", "03_lr_schedule.png"},
    "04": {"04_history_seed000_steplr_cropflip.png", "04_history_seed000_steplr_cutout.png", "04_compare.png"},
    "05": {"05_history.png", "05_lr_schedule.png"},
    "06": {"06_grid.png", "06_test_curves.png"},
    "07": {"07_misclassified_4.png", "07_misclassified_8.png", "07_gradcam_layer2.png", "07_gradcam_layer3.png",
           "07_gradcam_layers.png", "07_gradcam_vs_plusplus.png", "07_confusion.png",
           "07_confusion_normalized.png", "07_per_class.png"},
}


def load(path):
    return nbformat.read(path, as_version=4)


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    nb = load(path)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "google.colab" in first_code.source and "pip install -q -r requirements.txt" in first_code.source
    assert "H.print_versions()" in first_code.source
    params = parameters(nb)
    assert REQUIRED <= set(params)
    assert params["SUBSET"] is None and params["DEVICE"] == "auto"  # the defaults are the real full run
    for line in parameters_cell(nb).source.splitlines():
        assert "#" in line, f"parameter without a comment: {line}"
    index = nb.cells.index(parameters_cell(nb))
    for i, cell in enumerate(nb.cells[index + 2:], start=index + 2):
        if cell.cell_type == "code":
            assert nb.cells[i - 1].cell_type == "markdown", f"cell {i} has no markdown before it"
    assert nb.cells[-1].cell_type == "markdown" and "Takeaways" in nb.cells[-1].source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in code.replace("def fmt", ""), "helpers belong in helpers.py"
    for name in re.findall(r'save_figure\(fig, IMAGES_DIR, f?"([^"]+)"', code):
        assert name.startswith(path.name[:3]), name


def test_one_repository_url_everywhere():
    urls = {re.search(r'REPO_URL = "([^"]+)"', load(p).cells[1].source).group(1) for p in NOTEBOOKS}
    assert len(urls) == 1
    assert urls.pop() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_hold_no_quick_run_output(path):
    nb = load(path)
    if not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"):
        return  # no outputs at all: fine
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    for cell in injected:
        values = {t.targets[0].id: ast.literal_eval(t.value) for t in ast.parse(cell.source).body}
        assert values.get("SUBSET") is None and values.get("EPOCHS", 99) != 1, "outputs of a quick run"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_dir):
    """A folder shared by the notebooks of one quick run, in order (02 feeds 03-06, 03 feeds 07)."""
    out = tmp_path_factory.mktemp("quick_run")
    return {"dir": out, "data": data_dir}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, quick_run):
    import papermill as pm

    out = quick_run["dir"]
    names = set(parameters(load(path)))
    values = {k: v for k, v in QUICK.items() if k in names}
    values.update(DATA_DIR=str(quick_run["data"]), IMAGES_DIR=str(out / "images"), OUTPUT_DIR=str(out / "outputs"))
    before = set((out / "images").glob("*.png")) if (out / "images").exists() else set()
    t0 = time.perf_counter()
    pm.execute_notebook(str(path), str(out / path.name), parameters=values, cwd=str(ROOT / "notebooks"),
                        kernel_name="python3", progress_bar=False, request_save_on_cell_execute=False)
    written = {p.name for p in set((out / "images").glob("*.png")) - before}
    assert FIGURES[path.name[:2]] <= written, f"missing figures: {FIGURES[path.name[:2]] - written}"
    assert all(name.startswith(path.name[:3]) for name in written)
    print(f"{path.name}: {time.perf_counter() - t0:.0f} s")
