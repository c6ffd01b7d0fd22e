"""Execute a notebook with papermill and write it as a student can re-run it:
python scripts/execute_notebook.py notebooks/03_resnet18_onecycle.ipynb [-p NAME VALUE ...] [--out PATH]

Papermill records the parameters it was given in an extra "injected-parameters" cell, which a student's *Run all*
would run too, silently replacing the defaults. So after the run this script removes that cell and says how the
notebook was run in a markdown banner at the top instead (the settings that differ from the defaults, the
hardware, the date, the time it took). It also drops widget outputs (tqdm bars saved without their state render
as empty 0% bars). Without --out the notebook is rewritten in place, and only when the run succeeds: papermill writes
to a temporary file beside it, so a failed or interrupted run leaves the notebook as it was (an injected cell left
by an older interrupted run is removed before the run). A -p name that is not in the parameters cell is refused.
"""

import argparse
import ast
import os
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIDGET = "application/vnd.jupyter.widget-view+json"
BANNER = "run-banner"


def literal(text):
    """A -p value as Python reads it (5, 0.1, None, True, "name"); anything else stays text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def banner(parameters, hardware, seconds, date):
    """The markdown that says how an executed notebook was run."""
    changed = ", ".join(f"`{k} = {v!r}`" for k, v in parameters.items()) or "none (the defaults)"
    return (f"> **How this copy was run.** Executed on {date} on {hardware}, in {seconds / 60:.1f} min. Settings "
            f"changed from the parameters cell's defaults: {changed}. The outputs below are that run's; the code "
            f"cells are the course's own, so *Run all* runs the defaults of the parameters cell.")


def finish(nb, parameters, hardware, seconds, date):
    """Remove papermill's injected cell and widget outputs; put the banner right after the title cell."""
    nb.cells = [c for c in nb.cells if not {"injected-parameters", BANNER} & set(c.metadata.get("tags", []))]
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET not in o.get("data", {})]
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(banner(parameters, hardware, seconds, date),
                                                     metadata={"tags": [BANNER]}))
    return nb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook", type=Path)
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a parameter to change, as Python source (e.g. -p EPOCHS 5)")
    ap.add_argument("--out", type=Path, help="where to write the executed notebook (default: in place)")
    a = ap.parse_args(argv)
    import papermill as pm

    from course.system import device_name

    source = nbformat.read(a.notebook, as_version=4)
    source.cells = [c for c in source.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    defaults = defaults_of(source)
    unknown = [name for name, _ in a.p if name not in defaults]
    if unknown:
        raise SystemExit(f"{', '.join(unknown)}: not in the parameters cell of {a.notebook} (it has "
                         f"{', '.join(defaults)}); nothing was run")
    parameters = {name: literal(value) for name, value in a.p if literal(value) != defaults[name]}
    out = a.out or a.notebook
    running = out.with_name(f".{out.stem}.running.ipynb")  # the run's own file, beside the notebook
    nbformat.write(source, running)
    t0 = time.perf_counter()
    pm.execute_notebook(str(running), str(running), parameters=parameters, cwd=str(a.notebook.parent),
                        kernel_name="python3", progress_bar=False)  # a failure stops here: out is untouched
    nb = nbformat.read(running, as_version=4)
    nbformat.write(finish(nb, parameters, device_name("auto"), time.perf_counter() - t0,
                          time.strftime("%Y-%m-%d")), running)
    os.replace(running, out)
    print(f"wrote {out}: no injected cell, banner added ({', '.join(parameters) or 'the defaults'})")


def defaults_of(nb):
    """{NAME: value} of the parameters cell (the cell tagged "parameters"): what papermill's -p may change."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {t.id: literal(ast.unparse(node.value)) for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


if __name__ == "__main__":
    main()
