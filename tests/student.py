"""Run a notebook as a student does: edit the parameters cell's source, then execute every cell (Run all) with
nbclient, under a faked Colab whose /content and Google Drive are temporary folders."""

import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def notebook_path(number):
    """notebooks/NN_*.ipynb for a two-digit number."""
    return next(NOTEBOOKS.glob(f"{number}_*.ipynb"))


def fake_colab(root, data=None):
    """Environment of a kernel that believes it is on Colab: google.colab importable (drive.mount makes MyDrive),
    imported at start-up as Colab does, /content being root/content, holding CIFAR-10 in data/ (a link to data,
    where a notebook finds it as on Colab, after its first download). Returns (env, content folder)."""
    root = Path(root)
    package = root / "fake_colab" / "google" / "colab"
    package.mkdir(parents=True, exist_ok=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "drive.py").write_text(
        "import os\n\ndef mount(mountpoint, **kwargs):\n"
        "    os.makedirs(os.path.join(mountpoint, 'MyDrive'), exist_ok=True)\n"
        "    print('[fake] Drive mounted')\n")
    (package.parents[1] / "sitecustomize.py").write_text("import google.colab  # noqa: F401 (Colab imports it)\n")
    content = root / "content"
    content.mkdir(exist_ok=True)
    if data is not None and not (content / "data").exists():
        (content / "data").symlink_to(Path(data).resolve(), target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(package.parents[1]), "COURSE_CONTENT": str(content), "MPLBACKEND": "Agg"}
    return env, content


def edit_parameters(nb, **values):
    """Change lines `NAME = ...` of the parameters cell the way a student types, keeping each comment."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for name, source in values.items():
        pattern = re.compile(rf"^{name} = .*?(  #.*)?$", re.M)
        assert pattern.search(cell.source), f"no parameter {name} in the parameters cell"
        cell.source = pattern.sub(lambda m, n=name, v=source: f"{n} = {v}{m.group(1) or ''}", cell.source, count=1)
    return nb


def type_answers(nb, **answers):
    """Set `NAME = ...` lines outside the parameters cell (ANSWER_03_1, STUDENT) the way a student types them."""
    for name, source in answers.items():
        block = re.compile(rf'^{name} = """.*?"""$()', re.M | re.S)  # an open answer's multi-line text
        line = re.compile(rf"^{name} = .*?(  #.*)?$", re.M)
        cells = [c for c in nb.cells if c.cell_type == "code" and line.search(c.source)]
        pattern = block if cells and block.search(cells[0].source) else line
        assert len(cells) == 1, f"no single cell sets {name}"
        cells[0].source = pattern.sub(lambda m, n=name, v=source: f"{n} = {v}{m.group(1) or ''}", cells[0].source,
                                      count=1)
    return nb


def run_as_student(notebook, env, out=None, cwd=NOTEBOOKS, timeout=1200, answers=None, **values):
    """Execute a notebook (a path or NN) whose parameters cell was edited to values (Python source), and whose answer
    cells hold answers; returns it."""
    path = notebook if isinstance(notebook, Path) else notebook_path(notebook)
    nb = type_answers(edit_parameters(nbformat.read(path, as_version=4), **values), **(answers or {}))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env=env)
    finally:
        if out is not None:
            nbformat.write(nb, out)
    return nb


def printed(nb):
    """Everything the notebook's code cells printed (stdout, stderr), in order."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


if __name__ == "__main__":  # e.g. python tests/student.py /tmp/ws DATA_DIR 01 02 03
    work, data = Path(sys.argv[1]), sys.argv[2]
    environment, _ = fake_colab(work, data)
    for number in sys.argv[3:]:
        executed = run_as_student(number, environment, out=work / f"{number}.ipynb", QUICK="True")
        print(f"--- {number}\n{printed(executed)[-3000:]}")
