"""scripts/set_repo_url.py on a copy of the checkout: the address and tag in every notebook, badge and README. The
setup cell's messages are in test_setup_cell.py, the Drive workspace's rules in test_course_workspace.py."""

import shutil
import subprocess
import sys

import nbformat
import pytest
from conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"


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
