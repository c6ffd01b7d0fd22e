"""The course on Colab: the setup cell's three failure messages and scripts/set_repo_url.py on a copy of the
checkout. Colab is faked; /content and Drive are temporary folders. The Drive workspace's rules are in
test_course_workspace.py."""

import shutil
import subprocess
import sys

import nbformat
import pytest
from conftest import ROOT
from nbclient.exceptions import CellExecutionError
from student import fake_colab

NOTEBOOKS = ROOT / "notebooks"


def setup_cell_alone(tmp_path, env, **lines):
    """Run only the setup cell of a notebook copied where no course code is (a download, or Colab's fresh runtime)."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / "01_data_exploration.ipynb", as_version=4)
    setup = next(c for c in nb.cells if c.cell_type == "code")
    for old, new in lines.items():
        assert old in setup.source
        setup.source = setup.source.replace(old, new)
    nb.cells = [setup]
    lone = tmp_path / "downloads"
    lone.mkdir(exist_ok=True)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(lone)}})
    with pytest.raises(CellExecutionError) as err:
        client.execute(env=env)
    assert err.value.ename == "SystemExit", err.value  # one message, no cascade of NameErrors
    return err.value.evalue  # the message alone, not the cell's source


def test_on_a_laptop_without_the_course_the_setup_cell_says_how_to_get_it(tmp_path):
    message = setup_cell_alone(tmp_path, {**fake_colab(tmp_path)[0], "PYTHONPATH": ""})  # no google.colab
    assert "git clone the course's repository" in message and "pip install -r requirements.txt" in message
    assert "notebooks/ folder" in message and "Teacher" not in message


def test_on_colab_with_the_placeholder_address_the_setup_cell_names_the_teachers_step(tmp_path):
    env, content = fake_colab(tmp_path)
    message = setup_cell_alone(tmp_path, env)
    assert "Teacher: run scripts/set_repo_url.py" in message and "Student: open the notebook from the link" in message
    assert not (content / "course").exists()  # nothing cloned


@pytest.mark.parametrize("case", ["no such repository", "no such tag"])
def test_on_colab_a_failed_clone_quotes_git(tmp_path, case):
    env, content = fake_colab(tmp_path)
    repo = tmp_path / "remote.git"
    if case == "no such tag":  # a real repository without the tag asked for
        subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
        work = tmp_path / "work"
        subprocess.run(["git", "clone", "-q", str(repo), str(work)], check=True, capture_output=True)
        (work / "README.md").write_text("course\n")
        for args in (["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"],
                     ["push", "-q", "origin", "HEAD"]):
            subprocess.run(["git", "-C", str(work), *args], check=True, capture_output=True)
    url = f"file://{repo}"
    message = setup_cell_alone(tmp_path, env, **{
        '"https://github.com/YOUR-ORG/resnet-cifar10-gradcam", "main"': f'"{url}", "v9.9"'})
    assert f"Could not fetch the course ({url} at v9.9); git said: fatal: " in message
    assert ("does not appear to be a git repository" in message or "does not exist" in message) if case == \
        "no such repository" else "v9.9 not found" in message
    assert "Teacher: check the address and the tag" in message and "internet" in message


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
        assert "YOUR-ORG/" not in readme
    bad = subprocess.run([*script, "https://gitlab.com/x/y", "--root", str(copy)], capture_output=True, text=True)
    assert bad.returncode != 0 and "not a GitHub repository address" in bad.stderr


@pytest.mark.parametrize("ref", ["v1; touch X #", 'main" + str(__import__("os").system("id")) + "', "-v1", "a..b",
                                 "v1.lock", "a b", ""])
def test_set_repo_url_refuses_a_ref_git_would_refuse(tmp_path, ref):
    """The ref lands in Python source and in git's arguments: only git's ref names may get there."""
    copy = tmp_path / "course"
    shutil.copytree(NOTEBOOKS, copy / "notebooks")
    shutil.copy(ROOT / "README.md", copy / "README.md")
    before = {p.name: p.read_bytes() for p in (copy / "notebooks").iterdir()}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "set_repo_url.py"),
                           "https://github.com/my-school/course", f"--ref={ref}", "--root", str(copy)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "not a branch or tag name" in done.stderr
    assert {p.name: p.read_bytes() for p in (copy / "notebooks").iterdir()} == before
