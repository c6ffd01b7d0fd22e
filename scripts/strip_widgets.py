"""Drop widget outputs and state from executed notebooks: papermill saves tqdm bars without their state, which
GitHub and Colab render as empty 0% bars. Usage: python scripts/strip_widgets.py NOTEBOOK [...]"""

import sys

import nbformat

WIDGET = "application/vnd.jupyter.widget-view+json"

if __name__ == "__main__":
    for path in sys.argv[1:]:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if WIDGET not in o.get("data", {})]
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)
        print(f"stripped widget outputs from {path}")
