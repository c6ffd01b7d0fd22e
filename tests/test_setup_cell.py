"""The setup cell, the same in every notebook: in a checkout it imports the course; anywhere else (Colab, a notebook
on its own) it installs the class's copy with pip, and when that fails it says why (git's own words) and what to do.
Colab is faked; nothing is installed into the test environment."""

import os
import re
import subprocess
import sys

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from student import fake_colab

SETUP = next(c for c in nbformat.read(ROOT / "notebooks" / "01_data_exploration.ipynb", as_version=4).cells
             if c.cell_type == "code").source
PLACEHOLDER = '"https://github.com/YOUR-ORG/resnet-cifar10-gradcam", "main"'


def run_setup_alone(tmp_path, env, **replace):
    """Run only the setup cell, from a folder with no course code around it; returns the SystemExit message."""
    source = SETUP
    for old, new in replace.items():
        assert old in source
        source = source.replace(old, new)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    lone = tmp_path / "downloads"
    lone.mkdir(exist_ok=True)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(lone)}})
    with pytest.raises(CellExecutionError) as err:
        client.execute(env={**env, "GIT_TERMINAL_PROMPT": "0"})
    assert err.value.ename == "SystemExit", err.value  # one message, no cascade of errors
    return err.value.evalue


def bare_repo(tmp_path, tag=None):
    """A local git repository (file:// address) with one commit, and the tag if given."""
    repo, work = tmp_path / "remote.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    subprocess.run(["git", "clone", "-q", str(repo), str(work)], check=True, capture_output=True)
    (work / "README.md").write_text("course\n")
    for args in (["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"],
                 ["push", "-q", "origin", "HEAD"], *([["tag", tag], ["push", "-q", "origin", tag]] if tag else [])):
        subprocess.run(["git", "-C", str(work), *args], check=True, capture_output=True)
    return f"file://{repo}"


def test_the_setup_cell_is_at_most_8_code_lines():
    lines = [line for line in SETUP.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= 8 and all(len(line) <= 120 for line in lines)


@pytest.mark.slow
def test_a_notebook_on_its_own_with_the_placeholder_address_says_what_teacher_and_student_do(tmp_path):
    env, _ = fake_colab(tmp_path)
    message = run_setup_alone(tmp_path, {**env, "PYTHONPATH": ""})  # not Colab: a laptop with a lone notebook
    assert "Could not install https://github.com/YOUR-ORG/resnet-cifar10-gradcam at main" in message
    assert "teacher, run scripts/set_repo_url.py" in message and "git clone the course" in message


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no such repository", "no such tag"])
def test_on_colab_a_failed_install_quotes_git_and_names_the_way_on(tmp_path, case):
    env, content = fake_colab(tmp_path)
    url = bare_repo(tmp_path) if case == "no such tag" else f"file://{tmp_path / 'missing.git'}"
    message = run_setup_alone(tmp_path, env, **{PLACEHOLDER: f'"{url}", "v9.9"'})
    assert f"Could not install {url} at v9.9: teacher, run scripts/set_repo_url.py" in message
    said = ("does not appear to be a git repository", "does not exist") if case == "no such repository" else \
        ("v9.9", "did not match")
    assert any(s in message for s in said), message  # git's own words
    assert not (content / "course").exists()


@pytest.mark.slow
def test_the_class_tag_installs_the_course_as_the_setup_cell_does(tmp_path):
    """The setup cell's own pip command, pointed at a tagged clone of this repository (into a folder, not into the
    test environment): helpers.py, the course package and its data file install, and import from there."""
    clone, site = tmp_path / "class.git", tmp_path / "site"
    subprocess.run(["git", "clone", "-q", "--bare", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "tag", "v1.0", "HEAD"], check=True)
    command = re.search(r"subprocess\.run\((\[.*?\])", SETUP)[1]
    assert command == '[sys.executable, "-m", "pip", "install", f"git+{REPO_URL}@{REPO_REF}"]'
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           f"git+file://{clone}@v1.0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    check = ("import sys; sys.path.insert(0, sys.argv[1]); import course, helpers; "
             "print(course.__file__, helpers.__file__, course.workspace.EXPECTED.exists())")
    out = subprocess.run([sys.executable, "-c", check, str(site)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    course_file, helpers_file, expected = out.stdout.split()
    assert course_file.startswith(str(site)) and helpers_file.startswith(str(site)) and expected == "True"
