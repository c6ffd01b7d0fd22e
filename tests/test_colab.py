"""The course as Colab runs it: google.colab faked, Drive replaced by a temporary folder; the setup cell's message;
scripts/set_repo_url.py on a copy of the checkout."""

import shutil
import subprocess
import sys

import nbformat
import papermill as pm
import pytest
from conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture
def fake_colab(tmp_path, monkeypatch):
    """Kernels started from here see a google.colab module (imported at start-up, as on Colab) whose
    drive.mount only records the call."""
    fake = tmp_path / "fake_colab"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "colab" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "drive.py").write_text("def mount(path, **kw):\n    print('[fake] mounted', path)\n")
    (fake / "sitecustomize.py").write_text("import google.colab  # noqa: F401\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    return fake


def run(name, out, **parameters):
    pm.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, cwd=str(NOTEBOOKS),
                        kernel_name="python3", progress_bar=False, request_save_on_cell_execute=False)
    nb = nbformat.read(out, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebooks_share_one_workspace_on_drive_and_resume_from_it(fake_colab, tmp_path, data_dir):
    drive = tmp_path / "MyDrive" / "course"
    common = dict(QUICK=True, DATA_DIR=str(data_dir), DRIVE_FOLDER=str(drive))
    first = run("03_resnet18_onecycle.ipynb", tmp_path / "03a.ipynb", **common)
    assert "[fake] mounted /content/drive" in first and f"workspace on Google Drive: {drive}" in first
    assert (drive / "outputs" / "checkpoints" / "resnet18_onecycle_last.pt").exists()
    assert (drive / "outputs" / "results" / "resnet18_onecycle.json").exists()
    assert (drive / "images" / "03_history.png").exists()
    assert not (ROOT / "outputs" / "checkpoints" / "resnet18_onecycle_last.pt").exists()  # nothing local
    explained = run("07_gradcam_analysis.ipynb", tmp_path / "07.ipynb", **common)  # another kernel, 03's model
    assert f"loaded {drive / 'outputs' / 'checkpoints' / 'resnet18_onecycle_best.pt'}" in explained
    assert (drive / "images" / "07_gradcam_layer3.png").exists()
    again = run("03_resnet18_onecycle.ipynb", tmp_path / "03b.ipynb", **common)  # a fresh runtime
    assert "'resnet18_onecycle': loaded epoch 1/1" in again and "epoch   1/1 |" not in again


def test_drive_can_be_turned_off(fake_colab, tmp_path, data_dir):
    text = run("01_data_exploration.ipynb", tmp_path / "01.ipynb", QUICK=True, DATA_DIR=str(data_dir),
               DRIVE_FOLDER=None, IMAGES_DIR=str(tmp_path / "images"))
    assert "DRIVE_FOLDER = None: outputs and figures stay in this runtime; a reset or disconnect loses them" in text
    assert "mounted" not in text


@pytest.mark.parametrize("colab", [False, True], ids=["local", "colab"])
def test_without_the_course_code_the_setup_cell_says_what_to_do(tmp_path, colab, request):
    if colab:
        request.getfixturevalue("fake_colab")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(NOTEBOOKS / "01_data_exploration.ipynb", lone / "01.ipynb")
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(lone / "01.ipynb"), str(lone / "out.ipynb"), cwd=str(lone), kernel_name="python3",
                            progress_bar=False)
    assert "The course code is not here" in str(err.value) and "scripts/set_repo_url.py" in str(err.value)
    assert err.value.ename == "SystemExit"  # one message, no cascade of NameErrors


def test_set_repo_url_rewrites_every_notebook_and_readme(tmp_path):
    copy = tmp_path / "course"
    shutil.copytree(NOTEBOOKS, copy / "notebooks")
    shutil.copy(ROOT / "README.md", copy / "README.md")
    script = [sys.executable, str(ROOT / "scripts" / "set_repo_url.py")]
    for url, ref in (("https://github.com/my-school/resnet-course", "v1.0"),
                     ("https://github.com/other/fork.git", "main")):
        done = subprocess.run([*script, url, "--ref", ref, "--root", str(copy)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        url = url.removesuffix(".git")
        path = url.split("github.com/")[1]
        readme = (copy / "README.md").read_text()
        for nb_path in sorted((copy / "notebooks").glob("*.ipynb")):
            nb = nbformat.read(nb_path, as_version=4)
            setup = next(c.source for c in nb.cells if c.cell_type == "code")
            assert f'REPO_URL, REPO_REF = "{url}", "{ref}"' in setup
            badge = f"colab.research.google.com/github/{path}/blob/{ref}/notebooks/{nb_path.name}"
            assert badge in nb.cells[0].source and badge in readme
            assert "YOUR-ORG" not in setup.replace('"YOUR-ORG" not in REPO_URL', "") + nb.cells[0].source
        assert "YOUR-ORG/" not in readme
    bad = subprocess.run([*script, "https://gitlab.com/x/y", "--root", str(copy)], capture_output=True, text=True)
    assert bad.returncode != 0 and "not a GitHub repository address" in bad.stderr
