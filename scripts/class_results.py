"""A class's results from its hand-in zips: python scripts/class_results.py HANDIN_FOLDER [--assignment F] [--out D]

Reads every zip under HANDIN_FOLDER (a folder per student, or all zips in one folder; each written by a notebook's
hand-in cell) and writes class_results.md, class_results.csv and class_results.png into --out (default:
HANDIN_FOLDER): per student and notebook, the runs (settings, epochs, final test accuracy, device, time), the
answers given or missing, and flags: a QUICK run handed in as real work, a run not complete, a results record
edited by hand (its checksum no longer matches: this catches a hand-edited number, not a determined cheat), and
settings that differ from the assignment's. The assignment is each notebook's defaults, changed by --assignment,
a JSON file such as {"03": {"CLASS_BUDGET": true}, "04": {"CLASS_BUDGET": true}}. Nothing is re-run.
"""

import argparse
import ast
import csv
import json
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course.handin import jsonable  # noqa: E402
from course.runs import record_checksum  # noqa: E402

# Parameters that never change a result (display, what is shown): never flagged.
IGNORED = {"INTERACTIVE", "RUN_VGG16", "PHOTO_URL", "TTA", "QUICK", "EXPERIMENT", "GALLERY_SIZES", "N_CAM",
           "N_COMPARE", "ALPHA"}


def notebook_spec(notebook, folder=None):
    """A course notebook's parameters (name: default) and exercise ids, read from its file in the checkout."""
    path = Path(folder or ROOT / "notebooks") / f"{notebook}.ipynb"
    cells = json.loads(path.read_text())["cells"]
    source = lambda c: "".join(c["source"]) if isinstance(c["source"], list) else c["source"]  # noqa: E731
    params = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assigns = [t for t in ast.parse(source(params)).body if isinstance(t, ast.Assign) and len(t.targets) == 1
               and isinstance(t.targets[0], ast.Name)]
    exercises = [f"{a}.{b}" for c in cells if c["cell_type"] == "code"
                 for a, b in re.findall(r"^ANSWER_(\d\d)_(\d+)\s*=", source(c), re.M)]
    return {"parameters": {t.targets[0].id: jsonable(ast.literal_eval(t.value)) for t in assigns},
            "exercises": exercises}
COLUMNS = ["student", "notebook", "run", "model", "epochs", "batch", "lr", "scheduler", "final test acc %",
           "test acc at best val %", "device", "wall time min", "answers", "self-checks", "flags"]


def _settings(config):
    """Model, batch, LR and scheduler of a run, from its record's settings."""
    model = config.get("model")
    model = f"{model.get('name')} {model.get('norm')}" if isinstance(model, dict) else str(model or "-")
    scheduler = config.get("scheduler") or {}
    scheduler = scheduler if isinstance(scheduler, dict) else {"name": scheduler}
    lr = scheduler.get("max_lr", (config.get("optimizer") or {}).get("lr"))
    return model, config.get("batch_size", "-"), "-" if lr is None else f"{lr:.3g}", scheduler.get("name") or "-"


def settings_differences(manifest, assignment, notebooks):
    """'NAME value (assignment value)' for every result-changing parameter that differs from the assignment."""
    try:
        expected = notebook_spec(manifest["notebook"], notebooks)["parameters"]
    except (OSError, KeyError, StopIteration, ValueError):
        return [f"unknown notebook {manifest.get('notebook')!r}"]
    expected = {**expected, **assignment.get(manifest["notebook"][:2], {})}
    got = manifest.get("parameters", {})
    return [f"{k} {got.get(k)!r} (assignment {v!r})" for k, v in expected.items()
            if k not in IGNORED and k in got and got[k] != jsonable(v)]


def read_zip(path, assignment, notebooks, root):
    """The table rows of one hand-in zip."""
    student = path.parent.name if path.parent != root else path.stem
    try:
        with zipfile.ZipFile(path) as z:
            manifest = json.loads(z.read("manifest.json"))
            records = {n: z.read(n) for n in z.namelist() if n.startswith("results/") and n.endswith(".json")}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
        return [{**dict.fromkeys(COLUMNS, "-"), "student": student, "notebook": path.name,
                 "flags": f"not a hand-in zip ({type(err).__name__})"}]
    student = manifest.get("student") or student
    given = [k for k in manifest.get("answers", {}) if " " not in k]
    try:
        missing = [ex for ex in notebook_spec(manifest["notebook"], notebooks)["exercises"] if ex not in given]
    except (OSError, KeyError, StopIteration, ValueError):
        missing = manifest.get("unanswered", [])
    checks = {k: v.get("right") if isinstance(v, dict) else v for k, v in manifest.get("self_checks", {}).items()}
    common = {"student": student, "notebook": manifest.get("notebook", path.stem),
              "answers": f"{len(given)}/{len(given) + len(missing)}" + (f" (missing {', '.join(missing)})"
                                                                         if missing else ""),
              "self-checks": ", ".join(f"{k} {'right' if ok else 'wrong'}" for k, ok in sorted(checks.items())) or "-"}
    differences = settings_differences(manifest, assignment, notebooks)
    flags = (["QUICK run"] if manifest.get("quick") else []) + (
        [f"settings differ: {', '.join(differences)}"] if differences else [])
    rows = []
    for name, raw in sorted(records.items()):
        try:
            record = json.loads(raw)
            run_flags = list(flags)
            if "checksum" not in record:
                run_flags.append("record has no checksum")
            elif record_checksum(record) != record["checksum"]:
                run_flags.append("record edited by hand")
            if record.get("status") != "complete":
                run_flags.append(f"run not complete ({record.get('status')})")
            if record.get("quick") and not manifest.get("quick"):
                run_flags.append("QUICK run")
            config = record.get("config") or {}
            model, batch, lr, scheduler = _settings(config)
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            wall = record.get("wall_time_s")
            rows.append({**common, "run": record.get("experiment", Path(name).stem), "model": model,
                         "epochs": f"{record.get('epochs_run', '-')}/{config.get('epochs', '-')}", "batch": batch,
                         "lr": lr, "scheduler": scheduler, "final test acc %": fmt(record.get("final_test_acc")),
                         "test acc at best val %": fmt(record.get("test_acc_at_best_val")),
                         "device": record.get("device", "-"),
                         "wall time min": "-" if wall is None else f"{wall / 60:.1f}",
                         "flags": "; ".join(run_flags) or "-"})
        except (ValueError, TypeError, AttributeError) as err:
            rows.append({**dict.fromkeys(COLUMNS, "-"), **common, "run": name,
                         "flags": f"unreadable results file ({type(err).__name__})"})
    if not rows:  # 01 and 02 train nothing
        rows.append({**dict.fromkeys(COLUMNS, "-"), **common, "flags": "; ".join(flags) or "-"})
    return rows


def figure(rows):
    """Final test accuracy per student (rows) and run (columns); flagged cells marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    runs = [r for r in rows if r["final test acc %"] not in ("-", None)]
    students = sorted({r["student"] for r in runs})
    label = lambda r: f"{r['notebook'][:2]} {'explains ' if r['notebook'][:2] == '07' else ''}{r['run']}"  # noqa: E731
    columns = sorted({label(r) for r in runs})
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(columns) + 3), max(2.5, 0.5 * len(students) + 2)),
                           layout="constrained")
    if not runs:
        ax.text(0.5, 0.5, "no training runs handed in yet", ha="center", va="center")
        ax.axis("off")
        return fig
    data = np.full((len(students), len(columns)), np.nan)
    notes = np.full(data.shape, "", dtype=object)
    marks = {"QUICK run": "Q", "record edited by hand": "E", "run not complete": "!", "settings differ": "S",
             "no checksum": "?"}
    for r in runs:
        i, j = students.index(r["student"]), columns.index(label(r))
        data[i, j] = float(r["final test acc %"])
        letters = "".join(m for key, m in marks.items() if key in r["flags"])
        notes[i, j] = f"{data[i, j]:.1f}" + (f"\n{letters}" if letters else "")
    sns.heatmap(data, annot=notes, fmt="", cmap="viridis", xticklabels=columns, yticklabels=students, ax=ax,
                cbar_kws={"label": "final test accuracy %"})
    ax.set(xlabel="notebook and run", ylabel="student",
           title="Class results (Q: QUICK run, E: record edited, !: not complete, S: settings differ)")
    ax.tick_params(axis="x", rotation=30)
    return fig


def class_results(folder, assignment=None, out=None, notebooks=None):
    """Build the table, CSV and figure from every hand-in zip under folder; returns the rows."""
    folder = Path(folder)
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for path in sorted(folder.rglob("*.zip")) for row in read_zip(path, assignment or {}, notebooks,
                                                                             folder)]
    with open(out / "class_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "/") for c in COLUMNS) + " |" for r in rows]
    flagged = sum(r["flags"] != "-" for r in rows)
    (out / "class_results.md").write_text(f"# Class results\n\n{len({r['student'] for r in rows})} students, "
                                          f"{len(rows)} rows, {flagged} flagged.\n\n" + "\n".join(lines) + "\n")
    figure(rows).savefig(out / "class_results.png", dpi=120, bbox_inches="tight")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the folder holding the students' hand-in zips")
    ap.add_argument("--assignment", type=Path, help='JSON: settings of the assignment, e.g. {"03": {"EPOCHS": 10}}')
    ap.add_argument("--out", type=Path, help="where to write class_results.* (default: the folder)")
    a = ap.parse_args(argv)
    if not a.folder.is_dir():
        raise SystemExit(f"no such folder: {a.folder}")
    assignment = json.loads(a.assignment.read_text()) if a.assignment else {}
    rows = class_results(a.folder, assignment, a.out)
    out = a.out or a.folder
    print(f"{len(rows)} rows from {len({r['student'] for r in rows})} students: {out / 'class_results.md'}, "
          f"class_results.csv, class_results.png")


if __name__ == "__main__":
    main()
