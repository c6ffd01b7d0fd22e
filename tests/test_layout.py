"""helpers.py reads top-down in the course's order: teaching sections first, the machinery last and marked; every
public name says which notebook uses it."""

import ast
import re

from conftest import ROOT

SOURCE = (ROOT / "helpers.py").read_text()


def test_sections_follow_the_course_and_the_machinery_comes_last():
    banners = re.findall(r"^# =+\n# (.+)\n# =+$", SOURCE, re.M)
    order = ["Setup", "Data", "Models", "LR finder", "Training", "Evaluation", "Plots", "Grad-CAM"]
    assert [next(o for o in order if b.startswith(o)) for b in banners] == order
    machinery = SOURCE.index("# Machinery no notebook teaches")
    assert machinery > SOURCE.index("# Grad-CAM and Grad-CAM++") and "# =====" not in SOURCE[machinery:]
    teaching = SOURCE[:machinery]
    for name in ("_Run", "_RunLock", "_atomic_write", "PARAMETER_RULES", "_CifarUnpickler", "run_settings"):
        assert f"def {name}" not in teaching and f"class {name}" not in teaching and f"\n{name} =" not in teaching


def test_every_public_name_says_which_notebook_uses_it():
    missing = []
    for node in ast.parse(SOURCE).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node) or ""
            if not re.search(r"\((0\d|every notebook)|notebooks? 0\d|every notebook", doc):
                missing.append(node.name)
    assert missing == []


def test_fit_is_the_loop_of_notebook_03_with_its_bookkeeping_delegated():
    fit = next(n for n in ast.parse(SOURCE).body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    body = ast.get_source_segment(SOURCE, fit)
    for step in ("train_one_epoch(", "evaluate(", "scheduler.step()", "set_epoch(", "with _Run("):
        assert step in body
    assert fit.end_lineno - fit.lineno < 60
