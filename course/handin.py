"""Self-checks and the hand-in zip.

What it keeps safe: a self-check says right or not without showing the answer, and counts its tries; the hand-in
zip (answers, figures, the results files of the notebook's runs, a manifest) is written whole or not at all, and
its result is reported for the answer handed in, not for an earlier one.
"""

import hashlib
import io
import json
import math
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

import helpers as H

from .files import atomic_write, mb
from .system import device_name, versions


def _close(answer, value, abs_tol=0.0, rel_tol=0.0):
    """The answer, read as the number it plainly is (60, "60%", "3x", "1,234"), is close to value."""
    number = float(answer_key(answer))
    return math.isfinite(number) and math.isclose(number, value, abs_tol=abs_tol, rel_tol=rel_tol)


ANSWER_CHECKS = {  # exercise: a hash of the fixed answer, or a function of the answer and the student's own run
    "01.2": lambda answer, std: _close(answer, std[0] / 0.2023, abs_tol=0.01),
    "01.3": lambda answer: _close(answer, -H.CIFAR10_MEAN[0] / H.CIFAR10_STD[0], abs_tol=0.01),
    "02.1": lambda answer, result: _close(answer, result.suggestions["minimum"] / result.suggestions["valley"],
                                          rel_tol=0.1),
    "03.1": "sha256:fbe20eb9ecce5095",  # the share of the parameters in layer4
    "03.2": lambda answer, scheduler: int(answer[0]) == scheduler.total_steps  # and the step where the LR peaks:
    and abs(int(answer[1]) - scheduler._schedule_phases[0]["end_step"]) <= 1,
    "04.1": lambda answer, record: _close(answer, max(record["history"]["test_acc"])
                                          - record["history"]["test_acc"][-1], abs_tol=0.01),
    "05.1": "sha256:d7e4f49c1e1f6dda",  # how much more layer4 computes at stride 1
    "05.2": lambda answer, record: sorted(int(a) for a in answer) == H.lr_drops(record["history"]),
    "06.1": "sha256:9fbcb7dd9db1a149",  # the parameters of a norm layer
    "06.2": lambda answer, row: str(answer).strip().lower() == max(row, key=row.get),
    "07.1": lambda answer, cm: tuple(str(a).strip().lower() for a in answer) == H.most_confused(cm, 1)[0][:2],
    "07.2": "sha256:26be318a824e400d",  # the channel weights at layer2
}


def answer_key(answer):
    """An answer in one canonical spelling: '11,173,962' and 11173962.0 read alike, (8, 8) reads '8x8', '60%' '60'."""
    if isinstance(answer, (bool, np.bool_)):
        raise TypeError("True/False is not an answer to this exercise")
    if isinstance(answer, (list, tuple)):
        return "x".join(answer_key(a) for a in answer)
    if isinstance(answer, (int, np.integer)):
        return str(int(answer))
    if isinstance(answer, (float, np.floating)):
        return str(int(answer)) if float(answer).is_integer() else f"{float(answer):g}"
    text = re.sub(r"[\s,_%]", "", str(answer).lower())
    text = re.sub(r"(?<=\d)[x×]$", "", text)  # "3x" is 3
    return str(int(float(text))) if re.fullmatch(r"-?\d+(\.0*)?", text) else text


def answer_hash(exercise, answer):
    """The hash a fixed answer is checked by (teacher/answers holds the answers themselves)."""
    return "sha256:" + hashlib.sha256(f"{exercise}:{answer_key(answer)}".encode()).hexdigest()[:16]


def blank(answer):
    """True for an answer not given yet."""
    return answer is None or (isinstance(answer, str) and not answer.strip())


def jsonable(value):
    """value as JSON would give it back (tuples become lists), or its repr."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def check_answer(self_checks, exercise, answer, **your_run):
    """Print right or not (never the answer); remember the result, the answer checked and the number of tries."""
    check = ANSWER_CHECKS.get(exercise)
    if check is None:
        raise ValueError(f"exercise {exercise!r} has no self-check (open questions are read by your teacher); "
                         f"checkable: {', '.join(sorted(ANSWER_CHECKS))}")
    if blank(answer):
        print(f"Exercise {exercise}: no answer yet. Set ANSWER_{exercise.replace('.', '_')} and run this cell again.")
        return None
    try:
        right = answer_hash(exercise, answer) == check if isinstance(check, str) else bool(check(answer, **your_run))
    except (TypeError, ValueError, KeyError, IndexError) as err:
        print(f"Exercise {exercise}: could not read {answer!r} as an answer ({type(err).__name__}: {err}); "
              f"the exercise says what form the answer takes.")
        right = False
    tries = self_checks.get(exercise, {}).get("tries", 0) + 1
    self_checks[exercise] = {"right": right, "answer": jsonable(answer), "tries": tries}
    print(f"Exercise {exercise}: " + ("right" if right else "not right yet: look again (the answer is not shown)") +
          f" (try {tries}). A self-check is feedback: your teacher reads the answer and its reasons.")
    return right


def hand_in(ws, notebook, variables, student="", runs=(), files=(), weights=False):
    """Zip this notebook's answers, figures and runs' results into outputs/handin/<notebook>.zip; say what to submit.

    weights=True adds each run's best weights in half precision (about 22 MB for a ResNet18), so that a teacher can
    re-evaluate the claimed accuracy (scripts/class_results.py --verify)."""
    pattern = re.compile(rf"ANSWER_({notebook[:2]})_(\d+)((?:_\w+)?)")  # ANSWER_03_1_WHY is "03.1 why"
    answers = {f"{m[1]}.{m[2]}{m[3].replace('_', ' ').lower()}": value for name, value in variables.items()
               if (m := pattern.fullmatch(name))}
    given = {ex: jsonable(a) for ex, a in sorted(answers.items()) if not blank(a)}
    checks = {ex: {**c, "right": c["right"] and c["answer"] == given.get(ex)}  # for the answer handed in
              for ex, c in ws.self_checks.items() if ex[:2] == notebook[:2]}
    run_files = [ws.outputs / "results" / f"{name}.json" for name in runs]
    figures = sorted(ws.images.glob(f"{notebook[:2]}_*.png"))
    extra = [Path(f) for f in files if Path(f).exists()]
    manifest = {"notebook": notebook, "student": str(student).strip(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "quick": ws.quick, "parameters": jsonable(ws.parameters), "answers": given,
                "unanswered": sorted(ex for ex, a in answers.items() if blank(a) and " " not in ex),
                "self_checks": checks,
                "runs": [p.stem for p in run_files if p.exists()],
                "missing_runs": [p.stem for p in run_files if not p.exists()], "figures": [p.name for p in figures],
                "files": [p.name for p in extra], "device": device_name(ws.device), "versions": versions()}
    path = ws.outputs / "handin" / f"{notebook}.zip"
    members = {**{f"results/{p.name}": p for p in run_files if p.exists()}, **{f"figures/{p.name}": p for p in figures},
               **{f"files/{p.name}": p for p in extra}}
    best = [ws.outputs / "checkpoints" / f"{p.stem}_best.pt" for p in run_files if p.exists()] if weights else []
    manifest["weights"] = [p.name.removesuffix("_best.pt") for p in best if p.exists()]
    atomic_write(path, lambda tmp: _write_zip(tmp, manifest, members, [p for p in best if p.exists()]))
    _print_hand_in(ws, path, manifest)
    return path


def _write_zip(tmp, manifest, members, best=()):
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest, indent=1))
        for arcname, source in members.items():
            z.write(source, arcname)
        for path in best:  # weights only (no optimizer, no pickled objects), half precision
            state = torch.load(path, map_location="cpu", weights_only=True)["model"]
            half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            buffer = io.BytesIO()
            torch.save(half, buffer)
            z.writestr(f"weights/{path.name.removesuffix('_best.pt')}.pt", buffer.getvalue(), zipfile.ZIP_STORED)


def _print_hand_in(ws, path, manifest):
    missing = f" (no answer yet: {', '.join(manifest['unanswered'])})" if manifest["unanswered"] else ""
    runs = len(manifest["runs"])
    print(f"hand-in zip: {ws.shown(path)} ({mb(path.stat().st_size)})")
    print(f"  student: {manifest['student'] or '(not set: type your name or ID into STUDENT and run this cell again)'}")
    print(f"  inside: answers to {', '.join(manifest['answers']) or 'none'}{missing}; {len(manifest['figures'])} "
          f"figures; results of {runs} run{'s' * (runs != 1)}"
          f"{' and ' + ', '.join(manifest['files']) if manifest['files'] else ''}"
          f"{'; the best weights of ' + ', '.join(manifest['weights']) if manifest['weights'] else ''}")
    print(f"  workspace: {ws.usage()}")
    if manifest["quick"]:
        print("This is a QUICK run: its numbers mean nothing. Hand in the zip of a run with QUICK = False.")
    else:
        print("To hand in: this zip, and the notebook with its outputs (README: 'Hand in').")
