"""A class's results from its hand-in zips: python scripts/class_results.py HANDIN_FOLDER [--assignment F] [--out D]
[--verify [--data DATA_DIR] [--device auto|cpu|cuda]]

Reads every zip under HANDIN_FOLDER (a folder per student, or all zips in one folder; each written by a notebook's
hand-in cell) and writes class_results.md, class_results.csv and class_results.png (more than 40 rows or 30 runs:
class_results_2.png, ...) into --out (default: HANDIN_FOLDER). A row per run of each hand-in (or one per hand-in
without runs), keyed by its file (folder and name) and showing the student's name: the run's settings, epochs,
final test accuracy, device, time and run id, the answers given or missing, the self-checks with their tries, and
flags. Nothing is re-run, extracted to disk or unpickled (but see --verify). The assignment is each notebook's
defaults changed by --assignment, a JSON file such as {"03": {"CLASS_BUDGET": true}}; CLASS_BUDGET true means what
the notebook's own `elif CLASS_BUDGET:` branch sets (read from its start cell). A typo in it (bad JSON, an unknown
notebook or parameter, a value the notebook refuses) stops the script before any zip is read, naming the key (exit
code 2).

One student's file never costs the class its table: each file is read on its own within limits (a zip of at most
500 MiB and 500 members; manifest.json at most 5 MiB and results files 50 MiB once inflated, read streaming and refused
past the limit; JSON nested at most 50 levels). A file that cannot be read is a flagged row saying why (encrypted,
a compression Python cannot read, too large, not JSON, a manifest that is not an object...); anything that is not
a regular file (a FIFO, a broken symlink, a symlink loop) is a row saying it was skipped. Symlinked folders are read.

--verify evaluates again the weights a hand-in carries (weights/<run>.pt: the run's best weights, those of the epoch
chosen on the validation split or, without one, of the last epoch, as a plain state dict in half precision; 03's
hand-in cell adds them) and shows the accuracy in the column "verified test acc %" ("no weights" where a run has
none). Each file is read into memory only (never extracted), refused past 200 MB, and loaded with torch.load(...,
weights_only=True), which builds plain containers and tensors and runs no code (torch 2.6 or newer: --verify refuses
to run on older); anything but a dict of tensors is refused. The model is rebuilt with helpers.make_model from the
record's config["model"] (name, norm, num_classes, last_stride, with the course's values only), the weights are cast
to float32 and loaded strictly, and the run's own test images are evaluated with the course's code (load_test_split,
make_loader, predict, accuracy): all 10,000 of --data (default: the checkout's data/), or for a SUBSET run the
class-balanced split load_test_split gives with the run's SUBSET and seed. --verify without CIFAR-10 in --data stops
before any zip is read (exit code 2). Without --verify no weights are read at all.

How long it takes, measured on this project's machine (a 2-core Intel Xeon CPU shared with other work, torch 2.14,
--device cpu, 2026-11-29): 103 s for one ResNet18 run on all 10,000 test images (the whole command 109 s, 1.8 GB of
memory). 03 hands in 3 runs at its defaults (N_SEEDS), 1 at the class budget: about 5 minutes a student, or under 2,
on such a CPU; a GPU (--device cuda) is much faster (not measured here). The script prints the times it took.

What each flag proves, and what it does not:

QUICK run / QUICK-sized data: the manifest, the record or its config says QUICK, or the record trained on less than
90% of CIFAR-10's 50,000 training images (validation included) while the manifest's SUBSET says all of them. It
proves the numbers are not a full-size run's; a run on a SUBSET the assignment asked for is not flagged.

settings differ: a result-changing parameter in the manifest is not the assignment's. It proves the student ran
other settings, or handed in a manifest that says so; it does not prove the run used them (see the next flag).

manifest and record disagree: epochs, batch size, LR or QUICK read from the record's own config (what the objects
were built with) are not what the manifest's parameters say, or the record trained on fewer images than its SUBSET.
It proves one of the two files does not describe the run; a student who edits both consistently is not caught.

record edited by hand / record has no checksum: the record's checksum (course.runs.record_checksum) does not match
its content. It catches a number edited by hand, not a determined cheat, who can recompute the checksum.

final test acc differs from its history / wall time shorter than its epochs / epochs run disagree with its
history: a summary number contradicts the per-epoch history it was computed from. It proves an edit (or a damaged
file); a history edited to agree is not caught. impossible accuracy: NaN, infinite or outside 0-100: shown as "-".

data: a copy of CIFAR-10 that is not the official files: the record says its batch files were not the official
ones (torchvision's md5, course.system.data_files). Its accuracy may differ from runs on the official files (a
re-encoded copy loses detail; README, Benchmarks). It proves nothing about the work. Older records, without the
field, are not flagged.

run not complete / results file missing / run missing / no training run handed in: the run did not finish, a run
the manifest lists has no results file in the zip, or a training notebook (03-06) came with no run at all.

same run as <student>: two students' hand-ins hold a run with one run id, or one identical history (test accuracy
and epoch times). It proves a copied results file (flagged on both rows: who copied whom is for the teacher); runs
trained again from the same code are not identical, and a copy with its history changed is not caught.

two hand-ins of NN / folder and manifest disagree / no student name: one student's folder holds two zips of one
notebook (both shown), the folder's name is not the manifest's student, or the manifest names no one. They say
which row to read with care; they prove nothing about the work.

verified accuracy X% differs from the claimed Y% (--verify): the weights in the zip do not give the accuracy its
record claims for them (test_acc_at_best_val; final_test_acc for a run without a validation split) by more than 0.3
points or 3 images, whichever is more (TOLERANCE). It proves that the weights handed in are not the ones the record
describes. It does not prove that the student trained them: the flag below catches identical weights; a friend's
other run (other weights, with its own honest record) is not caught, nor are weights trained on from a friend's.
The tolerance, measured here (2026-11-29) on a ResNet18 trained for 4 epochs to 40%, so that many images lie near
a decision boundary, on the first 5,000 test images of ../shared/data's JPEG copy of CIFAR-10: the weights rounded
to half precision changed no prediction; a record's claim made in mixed precision (autocast, here emulated on the
CPU) changed 31 predictions, and the number right by 3, in bf16 (A100, L4), and 3 and 2 in fp16 (T4). 0.3 points
is 30 of 10,000 images, five times the largest of these scaled to 10,000; a claim raised by less is not caught.

weights refused / weights not verified (--verify): the file is too large, not a torch file, refused by torch's safe
loader, not a dict of tensors, or does not fit the record's model; or the record names no course model, claims no
accuracy for its best weights, or was tested on images this data folder does not hold (a SUBSET that does not give
its number of test images; a folder with fewer than its 10,000). They say the claim could not be checked.

same weights as <student> (--verify): two students' hand-ins hold identical weights (sha256 over the state dict,
keys sorted, in float32: a copy saved again in another precision is caught too). Like "same run as", it proves a
copy, flagged on both rows; weights changed by a single training step are other weights.

self-checks: each checked exercise, right or wrong, with its tries. A fixed answer (a hash in
course.handin.ANSWER_CHECKS) is checked again here ("60%" and "3x" read as 60 and 3): "self-check claim does not
match the answer" proves the manifest was edited; "changed after the check" means the answer handed in is not the
one checked. Checks that need the student's run (the others) are shown as the manifest reports them.
"""

import argparse
import ast
import csv
import difflib
import json
import math
import os
import re
import stat
import sys
import time
import unicodedata
import zipfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import helpers as H  # noqa: E402 -- course.handin imports it (and torch) already
from course.checks import RULES, problem  # noqa: E402
from course.handin import ANSWER_CHECKS, answer_hash, blank, jsonable  # noqa: E402
from course.runs import record_checksum  # noqa: E402
from course.system import OFFICIAL_DATA  # noqa: E402

# Parameters that never change a result (display, what is shown): never flagged.
IGNORED = {"INTERACTIVE", "RUN_VGG16", "PHOTO_URL", "TTA", "QUICK", "EXPERIMENT", "GALLERY_SIZES", "N_CAM",
           "N_COMPARE", "ALPHA"}
LIMITS = {"zip": 500 << 20, "directory": 10 << 20, "members": 500, "manifest": 5 << 20, "record": 50 << 20,
          "depth": 50, "weights": 200 << 20}  # bytes (MiB), members, levels; weights: a ResNet50 in fp16 is 47 MB
TRAINS = ("03", "04", "05", "06")  # the notebooks that train: a hand-in of one without a run is flagged
FULL = 50_000  # CIFAR-10's training images (45,000 + 5,000 for validation in 03); QUICK uses a few hundred
WIDTH = 60  # characters of a name in the table and the CSV (30 in the figure)
FIGURE_ROWS, FIGURE_COLUMNS, FIGURE_PAGES = 40, 30, 50
COLUMNS = ["student", "notebook", "run", "run id", "model", "epochs", "batch", "lr", "scheduler", "final test acc %",
           "test acc at best val %", "verified test acc %", "device", "wall time min", "answers", "self-checks",
           "flags", "file"]
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}


class AssignmentError(ValueError):
    """The teacher's assignment names a notebook or parameter that does not exist, or a value a notebook refuses."""


class Unreadable(Exception):
    """A file or member that cannot be read: the message says why."""


def _source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _assignments(statements):
    """{NAME: value} of the literal assignments among statements (`A = 1`, `A, B = 1, 2`)."""
    out = {}
    for node in statements:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        pairs = [(target, value)]
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            pairs = list(zip(target.elts, value.elts))
        for name, expr in pairs:
            if isinstance(name, ast.Name):
                try:
                    out[name.id] = jsonable(ast.literal_eval(expr))
                except ValueError:
                    pass
    return out


def notebook_spec(notebook, folder=None):
    """A course notebook's parameters (name: default), exercise ids, and what its `elif CLASS_BUDGET:` branch sets
    (class_budget), read from its file in the checkout."""
    path = Path(folder or ROOT / "notebooks") / f"{notebook}.ipynb"
    cells = json.loads(path.read_text())["cells"]
    params = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    exercises = [f"{a}.{b}" for c in cells if c["cell_type"] == "code"
                 for a, b in re.findall(r"^ANSWER_(\d\d)_(\d+)\s*=", _source(c), re.M)]
    start = next((_source(c) for c in cells if c["cell_type"] == "code" and "course.start(globals())" in _source(c)),
                 "")
    budget = {}
    for node in ast.walk(ast.parse(start)):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "CLASS_BUDGET":
            budget = _assignments(node.body)
    return {"parameters": _assignments(ast.parse(_source(params)).body), "exercises": exercises,
            "class_budget": budget}


# ---- text that cannot break a file ------------------------------------------------------------------------------

_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def text(value, width=WIDTH):
    """value as one line of at most width characters: control and invisible characters become spaces; None: '-'."""
    if value is None:
        return "-"
    if not isinstance(value, str):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = str(value) if number else json.dumps(value, default=str)
    value = value[:20 * width]
    value = "".join(" " if unicodedata.category(c) in _INVISIBLE else c for c in value)
    value = " ".join(value.split())
    return value if len(value) <= width else value[:width - 1] + "…"


def spreadsheet_safe(value):
    """A CSV cell a spreadsheet shows as text: a cell starting with = + - @ (a formula) gets a leading '."""
    value = str(value)
    if value and value[0] in "=+-@\t\r" and value != "-" and not re.fullmatch(r"-?\d+(\.\d+)?", value):
        return "'" + value
    return value


def _kind(value):
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _number(value):
    """value if it is a real, finite number (not a bool), else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def _whole(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _mb(n):
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1e3:.0f} kB"


def _plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---- reading one file, within limits ----------------------------------------------------------------------------

_STRING = re.compile(rb'(?s)"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)')  # always matches from a quote: linear time
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def too_deep(data, limit=LIMITS["depth"]):
    """True if the JSON text data nests arrays and objects deeper than limit (strings skipped), in C-speed steps."""
    import numpy as np

    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = 0
    for start in range(0, len(brackets), 1 << 20):
        chunk = np.frombuffer(brackets, np.uint8, count=min(1 << 20, len(brackets) - start), offset=start)
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int64)
        running = depth + np.cumsum(steps)
        if running.max() > limit:
            return True
        depth = int(running[-1])
    return False


def parse_json(data, what):
    """The JSON value of data (bytes), or Unreadable saying why: not UTF-8, nested too deep, not JSON."""
    try:
        value = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Unreadable(f"{what} is not UTF-8 text") from None
    if too_deep(data):
        raise Unreadable(f"{what} is nested deeper than {LIMITS['depth']} levels")
    try:
        return json.loads(value)
    except RecursionError:
        raise Unreadable(f"{what} is nested too deep") from None
    except ValueError as err:
        raise Unreadable(f"{what} is not valid JSON ({text(str(err), 80)})") from None


def read_member(z, info, limit, what):
    """A zip member's JSON, inflated by streaming and refused past limit bytes (whatever its header claims)."""
    return parse_json(read_bytes(z, info, limit, what), what)


def read_bytes(z, info, limit, what):
    """A zip member's bytes, inflated by streaming into memory (never to disk) and refused past limit bytes."""
    if info.flag_bits & 0x1:
        raise Unreadable(f"{what} is password-protected (encrypted)")
    if info.file_size > limit:
        raise Unreadable(f"{what} is too large ({_mb(info.file_size)} inflated; the limit is {_mb(limit)})")
    try:
        with z.open(info) as f:
            data = f.read(limit + 1)
    except NotImplementedError:
        raise Unreadable(f"{what} is compressed with method {info.compress_type}, which Python cannot read") from None
    except RuntimeError as err:  # zipfile: "... is encrypted, password required for extraction"
        raise Unreadable(f"{what} cannot be read ({text(str(err), 80)})") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise Unreadable(f"{what} is damaged ({text(str(err) or type(err).__name__, 80)})") from None
    if len(data) > limit:
        raise Unreadable(f"{what} is too large (more than {_mb(limit)} inflated)")
    return data


def _file_kind(mode):
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_regular(path):
    """path opened for reading if it is a regular file of at most LIMITS['zip'] bytes (a FIFO is never waited on)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise Unreadable(f"skipped: cannot be read ({text(err.strerror or str(err), 80)})") from None
    if not stat.S_ISREG(mode):
        raise Unreadable(f"skipped: not a regular file ({_file_kind(mode)})")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise Unreadable(f"skipped: cannot be read ({text(err.strerror or str(err), 80)})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > LIMITS["zip"]:
        os.close(fd)
        why = "not a regular file" if not stat.S_ISREG(info.st_mode) else \
            f"too large ({_mb(info.st_size)}; the limit is {_mb(LIMITS['zip'])})"
        raise Unreadable(f"skipped: {why}")
    return os.fdopen(fd, "rb")


def _check_directory(f):
    """Refuse a zip whose directory lists more than LIMITS['members'] members before zipfile reads it all."""
    end, at_count, at_size = (getattr(zipfile, n, None) for n in ("_EndRecData", "_ECD_ENTRIES_TOTAL", "_ECD_SIZE"))
    record = end(f) if end and at_count is not None and at_size is not None else None  # private: checked if there
    if not record:
        return
    count, size = record[at_count], record[at_size]
    if count > LIMITS["members"]:
        raise Unreadable(f"unreadable hand-in: too many members ({count}; the limit is {LIMITS['members']})")
    if size > LIMITS["directory"]:
        raise Unreadable(f"unreadable hand-in: its directory is too large ({_mb(size)})")


def _open_zip(f):
    try:
        _check_directory(f)
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError):
        raise Unreadable("not a hand-in zip (not a zip file)") from None


def read_handin(path):
    """(manifest, [(member, record or None, why unreadable)], problems, [weights members]) of one hand-in zip;
    Unreadable if the zip or its manifest cannot be read. The weights are only named here, never read."""
    with open_regular(path) as f, _open_zip(f) as z:
        infos = z.infolist()
        if len(infos) > LIMITS["members"]:
            raise Unreadable(f"unreadable hand-in: too many members ({len(infos)}; the limit is "
                             f"{LIMITS['members']})")
        manifests = [i for i in infos if i.filename == "manifest.json"]
        if not manifests:
            raise Unreadable("not a hand-in zip (no manifest.json)")
        problems = ["the zip holds manifest.json twice"] if len(manifests) > 1 else []
        try:
            manifest = read_member(z, manifests[-1], LIMITS["manifest"], "manifest.json")
        except Unreadable as err:
            raise Unreadable(f"unreadable hand-in: {err}") from None
        if not isinstance(manifest, dict):
            raise Unreadable(f"unreadable hand-in: the manifest is {_kind(manifest)}, not a JSON object")
        records = []
        for info in infos:
            if info.filename.startswith("results/") and info.filename.endswith(".json") and not info.is_dir():
                try:
                    records.append((info.filename, read_member(z, info, LIMITS["record"], info.filename), None))
                except Unreadable as err:
                    records.append((info.filename, None, str(err)))
        weights = [i.filename for i in infos if re.fullmatch(r"weights/[^/]+\.pt", i.filename)]
    return manifest, records, problems, weights


def read_weights(path, member):
    """The bytes of one weights member of a hand-in zip, read into memory within LIMITS['weights']."""
    with open_regular(path) as f, _open_zip(f) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise Unreadable(f"{member} is not in the zip") from None
        return read_bytes(z, info, LIMITS["weights"], member)


_FIELDS = {"notebook": str, "student": str, "quick": bool, "parameters": dict, "answers": dict, "unanswered": list,
           "missing_answers": list, "self_checks": dict, "runs": list, "missing_runs": list}


def clean_manifest(manifest):
    """The manifest with every field of the expected type (a wrong one becomes empty) and the problems found."""
    out, problems = dict(manifest), []
    for key, kind in _FIELDS.items():
        if key not in manifest:
            out[key] = kind()
            continue
        value = manifest[key]
        if not isinstance(value, kind):
            problems.append(f"manifest field '{key}' is {_kind(value)}, not {_kind(kind())}")
            out[key] = kind()
        elif kind is list and not all(isinstance(v, str) for v in value):
            problems.append(f"manifest field '{key}' holds {_kind(next(v for v in value if not isinstance(v, str)))}"
                            f", not only text")
            out[key] = [v for v in value if isinstance(v, str)]
    return out, problems


# ---- finding the files -----------------------------------------------------------------------------------------


def find_handins(root, max_depth=8):
    """([(path, relative path, why skipped or None)], macOS metadata files skipped): every *.zip under root, and
    everything that looks like a hand-in but is skipped (a broken symlink, a symlink loop, a folder too deep)."""
    found, seen, macos = [], set(), [0]

    def walk(folder, rel, depth):
        real = os.path.realpath(folder)
        if real in seen:
            found.append((folder, rel, "skipped: a symlink loop (this folder is read already)"))
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            found.append((folder, rel, f"skipped: the folder cannot be listed ({text(err.strerror or '', 60)})"))
            return
        for entry in entries:
            path, name = Path(entry.path), rel / entry.name
            if entry.name == "__MACOSX" or entry.name.startswith("._"):
                macos[0] += 1
                continue
            try:
                is_dir = entry.is_dir()  # follows a symlink: a symlinked student folder is read
            except OSError:
                is_dir = False
            if entry.is_symlink() and not os.path.exists(path):
                found.append((path, name, "skipped: a broken symlink"))
            elif is_dir:
                if depth >= max_depth:
                    found.append((path, name, f"skipped: a folder more than {max_depth} levels deep"))
                else:
                    walk(path, name, depth + 1)
            elif entry.name.lower().endswith(".zip"):
                found.append((path, name, None))

    walk(Path(root), PurePosixPath(), 0)
    return found, macos[0]


# ---- the assignment ---------------------------------------------------------------------------------------------


class Notebooks:
    """The course's notebooks (by number) and their specs, read once."""

    def __init__(self, folder=None):
        self.folder = Path(folder or ROOT / "notebooks")
        self.stems = {p.stem[:2]: p.stem for p in sorted(self.folder.glob("[0-9][0-9]_*.ipynb"))}
        self._specs = {}

    def spec(self, number):
        if number not in self._specs:
            self._specs[number] = notebook_spec(self.stems[number], self.folder)
        return self._specs[number]

    def number(self, name):
        """'03' for '03' or '03_resnet18_onecycle', None for anything else."""
        if not isinstance(name, str):
            return None
        number = name[:2]
        return number if number in self.stems and name in (number, self.stems[number]) else None

    def expected(self, number, assignment):
        """The parameters the assignment asks for: defaults, the assignment's values, then what the notebook's
        `elif CLASS_BUDGET:` branch sets when CLASS_BUDGET is true (as the notebook itself does)."""
        spec = self.spec(number)
        expected = {**spec["parameters"], **assignment.get(number, {})}
        if expected.get("CLASS_BUDGET") is True and not expected.get("QUICK"):
            expected.update(spec["class_budget"])
        return expected


def check_assignment(assignment, notebooks):
    """({notebook number: {PARAMETER: value}}, notes) of an assignment; AssignmentError naming the bad key."""
    if not isinstance(assignment, dict):
        raise AssignmentError(f"the assignment must be a JSON object such as {{\"03\": {{\"CLASS_BUDGET\": true}}}}, "
                              f"got {_kind(assignment)}")
    out, notes = {}, []
    for key, values in assignment.items():
        number = notebooks.number(key)
        if number is None:
            raise AssignmentError(f"unknown notebook {text(key)!r}: the notebooks are "
                                  f"{', '.join(sorted(notebooks.stems))} (or their names, e.g. "
                                  f"{notebooks.stems.get('03', '03_...')!r})")
        if number in out:
            raise AssignmentError(f"notebook {number} is named twice ({text(key)!r})")
        if not isinstance(values, dict):
            raise AssignmentError(f"{text(key)!r} must be an object of PARAMETER: value, got {_kind(values)}")
        spec = notebooks.spec(number)
        for name, value in values.items():
            if name not in spec["parameters"]:
                close = difflib.get_close_matches(name, spec["parameters"], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else \
                    f"; its parameters: {', '.join(spec['parameters'])}"
                raise AssignmentError(f"{text(key)!r}: unknown parameter {text(name)!r} for "
                                      f"{notebooks.stems[number]}{hint}")
            try:
                why = problem(name, value) if name in RULES else None
            except Exception:  # noqa: BLE001 -- a value no rule can even read
                why = f"{name} cannot be {text(value, 40)}"
            if why:
                raise AssignmentError(f"{text(key)!r}: {why}")
        out[number] = dict(values)
        expected = notebooks.expected(number, out)
        for name in values:
            if expected[name] != jsonable(values[name]):
                notes.append(f"{number}: {name} {values[name]!r} has no effect: CLASS_BUDGET sets it to "
                             f"{expected[name]!r} in the notebook")
    return out, notes


def read_assignment(path):
    """The assignment file's JSON; AssignmentError saying what is wrong with it."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise AssignmentError(f"cannot read it ({err.strerror or err})") from None
    if len(data) > LIMITS["manifest"]:
        raise AssignmentError("it is too large to be an assignment")
    try:
        return parse_json(data, "it")
    except Unreadable as err:
        raise AssignmentError(str(err)) from None


def settings_differences(parameters, expected):
    """'NAME value (assignment value)' for every result-changing parameter that differs from the assignment."""
    return [f"{k} {parameters.get(k)!r} (assignment {v!r})" for k, v in expected.items()
            if k not in IGNORED and k in parameters and parameters[k] != jsonable(v)]


# ---- a run's row ------------------------------------------------------------------------------------------------


def _lr(config):
    """The LR a run was built with: OneCycle's max LR, else the optimizer's first group's (initial) LR."""
    optimizer = config.get("optimizer") if isinstance(config.get("optimizer"), dict) else {}
    scheduler = config.get("scheduler") if isinstance(config.get("scheduler"), dict) else {}
    groups = optimizer.get("groups")
    group = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
    for value in (group.get("max_lr"), scheduler.get("max_lr"), group.get("initial_lr"), group.get("lr"),
                  optimizer.get("lr")):
        if _number(value) is not None:
            return value
    return None


def _settings(config):
    """Model, epochs, batch, LR and scheduler a run was built with, from its record's config."""
    model = config.get("model")
    model = text(f"{model.get('name', model.get('class'))} {model.get('norm', '')}".strip(), 30) \
        if isinstance(model, dict) else text(model or "-", 30)
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    batch = data.get("batch_size", config.get("batch_size"))
    scheduler = config.get("scheduler")
    scheduler = scheduler.get("name") if isinstance(scheduler, dict) else scheduler
    return {"model": model, "epochs": config.get("epochs"), "batch": batch, "lr": _lr(config),
            "scheduler": text(scheduler or "-", 30), "data": data}


def _accuracy(record, key, flags):
    value = record.get(key)
    if value is None:
        return "-"
    if _number(value) is None or not 0 <= value <= 100:
        flags.append(f"impossible accuracy ({key.replace('_', ' ')} {text(value, 20)})")
        return "-"
    return f"{value:.2f}"


def _matches(value, choices, rel=1e-6):
    return any(_number(c) is not None and _number(value) is not None and math.isclose(value, c, rel_tol=rel)
               for c in choices)


def run_checks(record, manifest, number):
    """Flags of one results record: its checksum, status, QUICK, and what can be re-derived from its own config
    and history compared with its summary and with the manifest's parameters."""
    flags = []
    checksum = record.get("checksum")
    if not isinstance(checksum, str):
        flags.append("record has no checksum")
    elif record_checksum(record) != checksum:
        flags.append("record edited by hand")
    if record.get("status") != "complete":
        flags.append(f"run not complete ({text(record.get('status'), 20)})")
    if record.get("data_files") not in (None, OFFICIAL_DATA):
        flags.append(f"data: {text(record.get('data_files'), 60)}")
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    settings, params = _settings(config), manifest["parameters"]
    claims = {k: v for k, v in (("manifest", manifest.get("quick")), ("record", record.get("quick")),
                                ("config", config.get("quick"))) if isinstance(v, bool)}
    quick = any(claims.values())
    if quick:
        flags.append("QUICK run")
    if len(set(claims.values())) > 1:
        flags.append("manifest and record disagree: quick (" + ", ".join(f"{k} {str(v).lower()}"
                                                                          for k, v in claims.items()) + ")")
    if number in TRAINS:
        train, val = settings["data"].get("train_images"), settings["data"].get("val_images")
        subset = _whole(params.get("SUBSET"))
        if _number(train) is not None:
            total = train + (_number(val) or 0)  # train + validation: SUBSET's images, or all 50,000
            if total < 0.9 * FULL and not quick and subset is None:
                flags.append(f"QUICK-sized data ({train} training images) not marked QUICK")
            if quick and total >= 0.9 * FULL:
                flags.append(f"manifest and record disagree: marked QUICK but trained on {train} images")
            if subset is not None and total < 0.9 * subset:
                flags.append(f"manifest and record disagree: SUBSET {subset} but {train} + {val} images")
        for what, names, value in (("epochs", ("EPOCHS", "FINAL_EPOCHS", "RESNET50_EPOCHS"), settings["epochs"]),
                                   ("batch", ("BATCH_SIZE", "RESNET50_BATCH_SIZE"), settings["batch"]),
                                   ("LR", ("LR", "FINAL_LR", "RESNET50_LR"), settings["lr"])):
            choices = [params[n] for n in names if _number(params.get(n)) is not None]
            if value is not None and choices and _number(params.get(names[0])) is not None \
                    and not _matches(value, choices):
                flags.append(f"manifest and record disagree: {what} {text(value, 20)} in the record, "
                             f"{names[0]} {text(params[names[0]], 20)} in the manifest")
    history = record.get("history") if isinstance(record.get("history"), dict) else {}
    test = history.get("test_acc") if isinstance(history.get("test_acc"), list) else []
    final = _number(record.get("final_test_acc"))
    if final is not None and test and not (_number(test[-1]) is not None and math.isclose(test[-1], final,
                                                                                          abs_tol=1e-9)):
        flags.append(f"final test acc differs from its history ({final:g}; last epoch {text(test[-1], 20)})")
    elif final is not None and not test:
        flags.append("no per-epoch history to check the final test acc against")
    times = history.get("epoch_time") if isinstance(history.get("epoch_time"), list) else []
    spent = sum(t for t in times if _number(t) is not None)
    wall = _number(record.get("wall_time_s"))
    if wall is not None and wall < spent - max(1.0, 0.01 * spent):
        flags.append(f"wall time shorter than its epochs ({wall / 60:.1f} min; the epochs took {spent / 60:.1f})")
    epochs = history.get("epoch") if isinstance(history.get("epoch"), list) else None
    if epochs is not None and _whole(record.get("epochs_run")) is not None and record["epochs_run"] != len(epochs):
        flags.append(f"epochs run disagree with its history ({record['epochs_run']} vs {len(epochs)})")
    return flags, settings


def fingerprints(record):
    """What makes two records one run: its run id, and its history (test accuracies and epoch times)."""
    keys = []
    if isinstance(record.get("run_id"), str) and record["run_id"].strip():
        keys.append(("run id", record["run_id"]))
    history = record.get("history") if isinstance(record.get("history"), dict) else {}
    test, times = history.get("test_acc"), history.get("epoch_time")
    if isinstance(test, list) and isinstance(times, list) and test and times:
        keys.append(("history", json.dumps([test, times], default=str)))
    return keys


# ---- --verify: the weights in a hand-in, evaluated again --------------------------------------------------------

ARCH = {"name": tuple(H.MODELS), "norm": H.NORMS, "num_classes": (10,), "last_stride": (1, 2)}  # make_model's
TOLERANCE = {"points": 0.3, "images": 3}  # a difference above both is flagged (see the module's docstring)
_DTYPES = {"torch.float16", "torch.bfloat16", "torch.float32", "torch.float64", "torch.int64", "torch.int32",
           "torch.uint8", "torch.bool"}  # what a state dict of the course's ResNets holds, in any precision


def tolerance(n):
    """The largest difference (points) between a re-measured and a claimed accuracy on n images that is rounding."""
    return max(TOLERANCE["points"], 100 * TOLERANCE["images"] / n)


def cifar_missing(data_dir):
    """Why --verify cannot use data_dir (a message saying where CIFAR-10 goes), or None if it holds the test split."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    if (folder / "test_batch").is_file():
        return None
    return (f"--verify evaluates the weights on CIFAR-10's test split, and {folder / 'test_batch'} is missing. "
            f"Put CIFAR-10's python-format batches there (the folder 'cifar-10-batches-py' inside {H.CIFAR10_URL}), "
            f"or name the folder that holds 'cifar-10-batches-py' with --data")


def model_arguments(config):
    """make_model's arguments from a record's config['model'], or Unreadable saying why they are not the course's."""
    arch = config.get("model")
    if not isinstance(arch, dict):
        raise Unreadable(f"the record's model is {_kind(arch)}, not a course ResNet's arguments")
    unexpected = [k for k in arch if k not in ARCH]
    if unexpected or "name" not in arch:
        what = f"unexpected keys ({text(', '.join(map(str, unexpected)), 60)})" if unexpected else "no name"
        raise Unreadable(f"the record's model ({text(arch, 60)}) is not a course ResNet: {what}")
    for key, value in arch.items():
        if isinstance(value, bool) or value not in ARCH[key] or type(value) is not type(ARCH[key][0]):
            raise Unreadable(f"the record's model has {key} {text(value, 30)}; the course's are "
                             f"{', '.join(map(str, ARCH[key]))}")
    return dict(arch)


def state_dict_of(data):
    """The state dict in a weights file's bytes, loaded with torch's safe loader (weights_only: plain containers
    and tensors, no code), or Unreadable saying why it is refused."""
    import io
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- an UnpicklingError, a damaged archive, a refused global: all refused
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", str(err), re.S)
        why = f"torch's safe loader refused it: {refused[1]}" if refused else \
            f"{type(err).__name__}: {str(err).split('. ')[0]}"
        raise Unreadable(f"cannot be loaded as weights ({text(why, 100)})") from None
    if not isinstance(state, dict) or not state:
        raise Unreadable(f"is {_kind(state) if not isinstance(state, dict) else 'an empty dict'}, not a state dict")
    for key, value in state.items():
        if not isinstance(key, str):
            raise Unreadable(f"is not a state dict (a key is {_kind(key)})")
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise Unreadable(f"is not a state dict of tensors ({text(key, 40)} holds {_kind(value)})")
        if value.layout != torch.strided or str(value.dtype) not in _DTYPES:
            raise Unreadable(f"is not a state dict of plain tensors ({text(key, 40)} is {value.dtype}, "
                             f"{value.layout})")
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in state.items()}


def weights_hash(state):
    """sha256 over the state dict (float32, keys sorted): equal for one set of weights saved in any precision."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _fit(model, state):
    """Why state does not fit model (missing, unexpected keys, other shapes), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own if k in state
              and state[k].shape != own[k].shape]
    parts = [f"{len(found)} {what} ({text(', '.join(found[:2]), 70)}{', ...' if len(found) > 2 else ''})"
             for what, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
             if found]
    return "; ".join(parts) or None


class Verifier:
    """--verify: each run's weights in a hand-in evaluated again on CIFAR-10's test split with the course's code
    (helpers.load_test_split, make_loader, predict, accuracy), and compared with what its record claims."""

    def __init__(self, data_dir, device="cpu"):
        self.data_dir, self.device = Path(data_dir), H.get_device(device)
        self.loaders, self.times = {}, {}  # (subset, seed): loader; hand-in file: seconds spent verifying it

    def loader(self, subset, seed):
        if (subset, seed) not in self.loaders:
            x, y = H.load_test_split(self.data_dir, subset=subset, seed=seed)
            self.loaders[subset, seed] = H.make_loader(x, y, H.make_transforms(train=False), batch_size=500,
                                                       device=self.device)
        return self.loaders[subset, seed]

    def test_split(self, record, manifest):
        """(subset, seed) of load_test_split that gives the test images this run was evaluated on; Unreadable if
        the record and manifest name none that this data folder holds."""
        config = record.get("config") if isinstance(record.get("config"), dict) else {}
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        params = manifest["parameters"]
        images, subset = _whole(data.get("test_images")), _whole(params.get("SUBSET"))
        seed = next((s for s in (_whole(data.get("seed")), _whole(params.get("SEED"))) if s is not None), 0)
        full, source = len(self.loader(None, 0).dataset), "its SUBSET"
        if subset is None and images is not None and images < full:  # a manifest without SUBSET: the record's
            train, val = _whole(data.get("train_images")), _whole(data.get("val_images")) or 0
            subset, source = (train + val if train is not None else None), "SUBSET = its training images"
        if subset is not None and subset > 0:
            if images is not None and images != max(10, subset // 5):
                raise Unreadable(f"the run was tested on {images:,} images, not the {max(10, subset // 5):,} "
                                 f"{source} {subset:,} gives")
            return subset, seed
        if images is not None and images != full:
            raise Unreadable(f"the run was tested on {images:,} images; {self.data_dir} holds {full:,} test images"
                             f"{' (not all of CIFAR-10)' if full < 10_000 else ''}")
        return None, 0

    def check(self, path, member, record, manifest):
        """(verified accuracy text, flags, hash of the weights or None) of one run's weights."""
        import torch

        try:
            data = read_weights(path, member)
        except Unreadable as err:
            return "-", [f"weights refused: {err}"], None
        try:
            state = state_dict_of(data)
        except Unreadable as err:
            return "-", [f"weights refused: {member} {err}"], None
        del data
        key = weights_hash(state)
        best = record.get("best_epoch")
        field = "final_test_acc" if best is None else "test_acc_at_best_val"  # the weights handed in: see hand_in
        claim = _number(record.get(field))
        try:
            config = record.get("config") if isinstance(record.get("config"), dict) else {}
            model = H.make_model(**model_arguments(config))
            misfit = _fit(model, state)
            if misfit:
                return "-", [f"weights refused: {member} does not fit the record's model "
                             f"({_settings(config)['model']}): {misfit}"], key
            subset, seed = self.test_split(record, manifest)
            loader = self.loader(subset, seed)
            model.load_state_dict(state, strict=True)
            with torch.no_grad():
                acc = H.accuracy(H.predict(model.to(self.device), loader, device=self.device))
        except Unreadable as err:
            return "-", [f"weights not verified: {err}"], key
        except Exception as err:  # noqa: BLE001 -- one run's weights never cost the class its table
            return "-", [f"weights not verified: {type(err).__name__}: {text(str(err), 100)}"], key
        n = len(loader.dataset)
        if claim is None:
            return f"{acc:.2f}", [f"weights not verified: the record claims no {field.replace('_', ' ')}"], key
        if abs(acc - claim) > tolerance(n) + 1e-9:
            return f"{acc:.2f}", [f"verified accuracy {acc:.2f}% differs from the claimed {claim:.2f}% "
                                  f"({field.replace('_', ' ')}, {n:,} test images)"], key
        return f"{acc:.2f}", [], key


def make_verifier(data_dir, device="auto"):
    """A Verifier, or ValueError saying why --verify cannot run here (checked before any hand-in is read)."""
    import torch

    major, minor = (int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    if (major, minor) < (2, 6):
        raise ValueError(f"--verify needs torch 2.6 or newer (torch.load's weights_only check, which keeps a "
                         f"student's file from running code, could be bypassed before: CVE-2025-32434); this is "
                         f"torch {torch.__version__}")
    why = cifar_missing(data_dir)
    if why:
        raise ValueError(why)
    verifier = Verifier(data_dir, device)  # ValueError for a device that is not there
    try:
        verifier.loader(None, 0)
    except (OSError, ValueError) as err:
        raise ValueError(f"--verify cannot read CIFAR-10's test split in {data_dir}: {text(str(err), 200)}") from None
    return verifier


def verify_report(verifier, rows):
    """How long --verify took, per hand-in and in all, on this machine."""
    from course.system import device_name

    times = verifier.times
    if not times:
        return "--verify: no hand-in holds weights; nothing was evaluated"
    total, runs = sum(t for t, _ in times.values()), sum(n for _, n in times.values())
    lines = [f"  {text(rel, 60)}: {_plural(n, 'run')} in {t:.1f} s" for rel, (t, n) in times.items()]
    flagged = sum(any(k in r["flags"] for k in ("differs from the claimed", "weights refused", "weights not verified",
                                                 "same weights as")) for r in rows)
    return "\n".join([f"--verify on {device_name(verifier.device)}: {_plural(runs, 'run')} in "
                      f"{_plural(len(times), 'hand-in')}, {total / 60:.1f} min ({total / len(times):.1f} s a "
                      f"hand-in, {total / runs:.1f} s a run); {_plural(flagged, 'row')} flagged by it", *lines])


# ---- self-checks ------------------------------------------------------------------------------------------------

_UNSET = object()


def _hash_right(exercise, answer):
    try:
        return answer_hash(exercise, answer) == ANSWER_CHECKS[exercise]
    except (TypeError, ValueError, RecursionError):
        return False


def self_checks(manifest):
    """('03.1 right (2 tries), ...', flags): each self-check for the answer handed in; fixed answers checked again."""
    answers, checks = manifest["answers"], manifest["self_checks"]
    fixed = {ex for ex, c in ANSWER_CHECKS.items() if isinstance(c, str)}
    parts, flags = [], []
    for ex in sorted(set(checks) | {e for e in answers if e in fixed and not blank(answers[e])}):
        check, notes = checks.get(ex), []
        claimed, checked = None, _UNSET
        if isinstance(check, bool):  # an older manifest: right or not, for the answer handed in
            claimed = check
        elif isinstance(check, dict):
            claimed = check.get("right") if isinstance(check.get("right"), bool) else None
            tries = _whole(check.get("tries"))
            if tries is not None:
                notes.append(f"{tries} {'try' if tries == 1 else 'tries'}")
            if "answer" in check:
                checked = check["answer"]
        elif check is not None:
            flags.append(f"self-check {text(ex, 10)} is unreadable ({_kind(check)})")
        given = answers.get(ex)
        changed = checked is not _UNSET and checked != given
        if ex in fixed and claimed is True:
            claim_for = given if checked is _UNSET else checked
            if blank(claim_for) or not _hash_right(ex, claim_for):
                flags.append(f"self-check claim does not match the answer ({text(ex, 10)})")
                notes.append("claimed right")
        now = _hash_right(ex, given) if ex in fixed and not blank(given) else None
        if changed:
            state = "changed after the check"
            if now is not None:
                notes.append(f"now {'right' if now else 'wrong'}")
        elif now is not None:
            state = "right" if now else "wrong"
            if check is None:
                notes.append("not self-checked")
        else:
            state = {True: "right", False: "wrong", None: "?"}[claimed]
        parts.append(f"{text(ex, 10)} {state}" + (f" ({', '.join(notes)})" if notes else ""))
    return ", ".join(parts) or "-", flags


# ---- the table --------------------------------------------------------------------------------------------------


def _norm(name):
    return "".join(c for c in unicodedata.normalize("NFKC", name).casefold() if c.isalnum())


def _blank_row(**values):
    return {**dict.fromkeys(COLUMNS, "-"), **values}


def _identity(rel):
    """Who a file belongs to: its folder (a folder per student), or the file itself (all zips in one folder)."""
    return ("folder", rel.parent.as_posix()) if len(rel.parts) > 1 else ("file", rel.as_posix())


def _skipped_row(rel, flags):
    return {**_blank_row(student=text(rel.parent.name if len(rel.parts) > 1 else rel.stem), flags=flags),
            "file": text(rel.as_posix(), 120), "_rel": rel.as_posix(), "_identity": _identity(rel), "_number": None}


def handin_rows(path, rel, assignment, notebooks, verifier=None):
    """The rows of one hand-in zip, with what the class-wide checks need (identity, notebook number, run keys);
    with a Verifier, each run's weights in the zip evaluated again."""
    folder = rel.parent.name if len(rel.parts) > 1 else None
    base = {"file": text(rel.as_posix(), 120), "_rel": rel.as_posix(), "_number": None, "_identity": _identity(rel)}
    fallback = text(folder or rel.stem)
    try:
        manifest, records, problems, weights = read_handin(path)
    except Unreadable as err:
        return [_skipped_row(rel, str(err))]
    manifest, more = clean_manifest(manifest)
    problems += more
    student = manifest["student"].strip()
    if not folder and student:
        base["_identity"] = ("name", _norm(student) or student)
    if manifest["quick"]:
        problems.append("QUICK run")
    if not student:
        problems.append("no student name in the manifest")
    elif folder and not (_norm(folder) and _norm(student) and (_norm(folder) in _norm(student)
                                                               or _norm(student) in _norm(folder))):
        problems.append(f"folder and manifest disagree: folder {text(folder, 30)!r}, student {text(student, 30)!r}")
    if not manifest["notebook"]:
        problems.append("the manifest names no notebook")
    number = notebooks.number(manifest["notebook"] or rel.stem)
    base["_number"] = number
    if number is None:
        problems.append(f"unknown notebook {text(manifest['notebook'], 40)!r}")
        exercises = None
    else:
        exercises = notebooks.spec(number)["exercises"]
        differences = settings_differences(manifest["parameters"], notebooks.expected(number, assignment))
        if differences:
            problems.append(f"settings differ: {', '.join(differences)}")
    given = [k for k in manifest["answers"] if " " not in k]
    missing = [ex for ex in exercises if ex not in given] if exercises is not None else \
        (manifest["unanswered"] or manifest["missing_answers"])
    checks, check_flags = self_checks(manifest)
    common = {**base, "student": text(student or fallback), "notebook": text(manifest["notebook"] or "-", 40),
              "answers": f"{len(given)}/{len(given) + len(missing)}" + (
                  f" (missing {text(', '.join(missing), 80)})" if missing else ""), "self-checks": checks}
    problems += check_flags
    listed = [w for w in manifest.get("weights", []) if isinstance(w, str)] \
        if isinstance(manifest.get("weights"), list) else []
    if verifier:
        results = {PurePosixPath(m).stem for m, _, _ in records}
        orphans = [w for w in weights if PurePosixPath(w).stem not in results]
        if orphans:
            problems.append(f"weights without a results file, not verified: {text(', '.join(orphans), 80)}")
    rows = []
    for member, record, why in sorted(records, key=lambda r: r[0]):
        name = text(PurePosixPath(member).stem, 40)
        if why is not None or not isinstance(record, dict):
            why = why or f"{member} is {_kind(record)}, not a JSON object"
            rows.append({**_blank_row(), **common, "run": name, "_flags": [*problems, f"unreadable results file: "
                                                                                      f"{text(why, 120)}"]})
            continue
        flags, settings = run_checks(record, manifest, number)
        run_flags = [*problems, *flags]
        wall = _number(record.get("wall_time_s"))
        lr = settings["lr"]
        rows.append({**common, "run": text(record.get("experiment") or PurePosixPath(member).stem, 40),
                     "run id": text(record.get("run_id") or "-", 16), "model": settings["model"],
                     "epochs": f"{text(record.get('epochs_run', '-'), 10)}/{text(settings['epochs'] or '-', 10)}",
                     "batch": text(settings["batch"] if settings["batch"] is not None else "-", 10),
                     "lr": "-" if lr is None else f"{lr:.3g}", "scheduler": settings["scheduler"],
                     "final test acc %": _accuracy(record, "final_test_acc", run_flags),
                     "test acc at best val %": _accuracy(record, "test_acc_at_best_val", run_flags),
                     "verified test acc %": "-",
                     "device": text(record.get("device") or "-"),
                     "wall time min": "-" if wall is None else f"{wall / 60:.1f}",
                     "_flags": run_flags, "_keys": fingerprints(record)})
        if verifier:
            stem = PurePosixPath(member).stem
            rows[-1]["verified test acc %"] = "no weights"
            if f"weights/{stem}.pt" in weights:
                start = time.perf_counter()
                verified, flags, key = verifier.check(path, f"weights/{stem}.pt", record, manifest)
                spent = verifier.times.setdefault(rel.as_posix(), [0.0, 0])
                spent[0], spent[1] = spent[0] + time.perf_counter() - start, spent[1] + 1
                rows[-1].update({"verified test acc %": verified, "_weights": key})
                run_flags += flags
            elif stem in listed:
                run_flags.append("weights missing (the manifest lists them)")
    present = {PurePosixPath(m).stem for m, _, _ in records}
    for run in dict.fromkeys(r for r in manifest["runs"] if r not in present):
        rows.append({**_blank_row(), **common, "run": text(run, 40),
                     "_flags": [*problems, "results file missing (the manifest lists this run)"]})
    for run in dict.fromkeys(r for r in manifest["missing_runs"] if r not in present):
        rows.append({**_blank_row(), **common, "run": text(run, 40),
                     "_flags": [*problems, "run missing (no results file when the zip was made)"]})
    if not rows:
        rows.append({**_blank_row(), **common, "_flags": [*problems, *(["no training run handed in"]
                                                                      if number in TRAINS else [])]})
    return rows


def _cross_checks(rows):
    """Flags only the whole class shows: two hand-ins of one notebook by one student; one run under two students."""
    for r in rows:
        if "_flags" not in r:
            r["_flags"] = [] if r["flags"] == "-" else [r["flags"]]
    handins = {}
    for r in rows:
        if r.get("_number"):
            handins.setdefault((r["_identity"], r["_number"]), {})[r["_rel"]] = True
    owners, weights = {}, {}
    for r in rows:
        for key in r.get("_keys", []):  # every hand-in holding the run (03's zip, and 07's that explains it)
            owners.setdefault(key, {}).setdefault(r["_identity"], {})[r["_rel"]] = r
        if r.get("_weights"):
            weights.setdefault(r["_weights"], {}).setdefault(r["_identity"], r)
    for r in rows:
        files = list(handins.get((r["_identity"], r.get("_number")), {}))
        if len(files) > 1:
            others = ", ".join(text(f, 40) for f in files if f != r["_rel"])
            r["_flags"].append(f"{NUMBERS.get(len(files), len(files))} hand-ins of {r['_number']} (also {others})")
        r["_dup"] = files.index(r["_rel"]) if len(files) > 1 else 0
        others = {}
        for key in r.get("_keys", []):
            others.update({i: o for i, o in owners[key].items() if i != r["_identity"]})
        if others:
            named = [f"{next(iter(o.values()))['student']} ({', '.join(text(rel, 40) for rel in o)})"
                     for o in others.values()]
            r["_flags"].append("same run as " + ", ".join(named[:3]) + (f" and {len(named) - 3} more"
                                                                         if len(named) > 3 else ""))
        same = [o for i, o in weights.get(r.get("_weights"), {}).items() if i != r["_identity"]]
        if same:
            named = [f"{o['student']} ({text(o['_rel'], 40)})" for o in same]
            r["_flags"].append("same weights as " + ", ".join(named[:3]) + (f" and {len(named) - 3} more"
                                                                             if len(named) > 3 else ""))
    for r in rows:
        r["flags"] = "; ".join(dict.fromkeys(r.pop("_flags"))) or "-"


def collect(folder, assignment=None, notebooks=None, verifier=None):
    """(rows with their private keys, notes): every hand-in under folder read and checked; nothing written. With a
    Verifier (--verify) each run's weights are evaluated again."""
    books = notebooks if isinstance(notebooks, Notebooks) else Notebooks(notebooks)
    assignment, notes = check_assignment(assignment or {}, books)
    found, macos = find_handins(folder)
    rows = []
    for path, rel, skipped in found:
        if skipped:
            rows.append(_skipped_row(rel, skipped))
            continue
        try:
            rows += handin_rows(path, rel, assignment, books, verifier)
        except Exception as err:  # noqa: BLE001 -- a safety net: one file never costs the class its table
            rows.append(_skipped_row(rel, f"unreadable hand-in: {type(err).__name__}: {text(str(err), 80)}"))
    _cross_checks(rows)
    if macos:
        notes.append(f"skipped {_plural(macos, 'macOS metadata file')} (__MACOSX, ._*)")
    lines = [f"{n}: " + ", ".join(f"{k} {v!r}" for k, v in books.expected(n, assignment).items()
                                  if v != books.spec(n)["parameters"].get(k)) for n in sorted(assignment)]
    return rows, notes, [line for line in lines if not line.endswith(": ")]


# ---- the files --------------------------------------------------------------------------------------------------

MARKS = {"QUICK": "Q", "edited by hand": "E", "no checksum": "E", "run not complete": "!", "settings differ": "S",
         "disagree": "D", "differs from its history": "D", "shorter than its epochs": "D", "same run as": "C",
         "hand-ins of": "2", "impossible accuracy": "X", "self-check claim": "D", "same weights as": "C",
         "differs from the claimed": "V", "weights refused": "W", "weights not verified": "W", "weights missing": "W",
         "weights without a results file": "W", "data: ": "J", "results file missing": "M", "run missing": "M",
         "unreadable results file": "M", "folder and manifest disagree": "N", "no student name": "N",
         "QUICK-sized data": "Q", "no per-epoch history": "D"}


def _label(value, width=30):
    return text(value, width).replace("$", r"\$")


def figures(rows):
    """Final test accuracy per hand-in row (a student, a second hand-in of one notebook) and run: at most
    FIGURE_ROWS x FIGURE_COLUMNS cells a page, flagged cells marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = {}
    for r in rows:
        names.setdefault(r["student"], set()).add(r["_identity"])
    keys, columns = {}, {}
    for r in rows:
        key = (r["_identity"], r.get("_dup", 0))
        label = text(r["student"], 24) + (f" #{key[1] + 1}" if key[1] else "")
        if len(names[r["student"]]) > 1:
            label += f" ({text(r['_identity'][1], 16)})"
        keys.setdefault(key, label)
        if r["run"] != "-":
            nb = r.get("_number") or "??"
            columns.setdefault((nb, r["run"]), f"{nb} {'explains ' if nb == '07' else ''}{r['run']}")
    keys, columns = list(keys.items()), sorted(columns.items())
    if not columns:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.text(0.5, 0.5, "no training runs handed in yet", ha="center", va="center")
        ax.axis("off")
        return [fig]
    cells = {}
    for r in rows:
        if r["run"] == "-":
            continue
        acc = float(r["final test acc %"]) if r["final test acc %"] != "-" else np.nan
        letters = "".join(dict.fromkeys(m for k, m in MARKS.items() if k in r["flags"]))
        cells[(r["_identity"], r.get("_dup", 0)), (r.get("_number") or "??", r["run"])] = (
            acc, ("-" if np.isnan(acc) else f"{acc:.1f}") + (f"\n{letters}" if letters else ""))
    empty = {key for key, _ in keys} - {key for key, _ in cells}
    flagged = {(r["_identity"], r.get("_dup", 0)) for r in rows if r["flags"] != "-"}
    keys = [(key, label + (" (see table)" if key in empty & flagged else "")) for key, label in keys]
    pages = [(keys[i:i + FIGURE_ROWS], columns[j:j + FIGURE_COLUMNS]) for i in range(0, len(keys), FIGURE_ROWS)
             for j in range(0, len(columns), FIGURE_COLUMNS)][:FIGURE_PAGES]
    out = []
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    for n, (page_keys, page_columns) in enumerate(pages, 1):
        data = np.full((len(page_keys), len(page_columns)), np.nan)
        fig, ax = plt.subplots(figsize=(min(3 + 0.9 * len(page_columns), 30), min(1.8 + 0.35 * len(page_keys), 18)),
                               layout="constrained")
        for i, (key, _) in enumerate(page_keys):
            for j, (column, _) in enumerate(page_columns):
                if (key, column) in cells:
                    data[i, j], note = cells[key, column]
                    ax.text(j, i, note, ha="center", va="center", fontsize=6,
                            color="black" if np.isnan(data[i, j]) or data[i, j] > 60 else "white")
        image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=100, aspect="auto",
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, label="final test accuracy %")
        ax.set_xticks(range(len(page_columns)), [_label(c) for _, c in page_columns], rotation=30, ha="right",
                      fontsize=7)
        ax.set_yticks(range(len(page_keys)), [_label(k, 48) for _, k in page_keys], fontsize=7)
        ax.set(xlabel="notebook and run", ylabel="student (hand-in)")
        ax.set_title(f"Class results{f', page {n}/{len(pages)}' if len(pages) > 1 else ''} (Q: QUICK, E: edited, "
                     f"!: not complete, S: settings differ, D: disagrees, C: same run or weights as another "
                     f"student, 2: two hand-ins, X: impossible, V: verified accuracy differs, W: weights not "
                     f"verified, J: not the official CIFAR-10 files, M: results missing, N: name)", fontsize=8,
                     wrap=True)
        out.append(fig)
    return out


def figure(rows):
    """The figure's first page (all of it for a class of up to FIGURE_ROWS hand-in rows)."""
    return figures(rows)[0]


def write_files(rows, out, notes=(), assignment_lines=()):
    """class_results.csv (spreadsheet-safe), class_results.md and the figure's pages."""
    with open(out / "class_results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: spreadsheet_safe(r[c]) for c in COLUMNS} for r in rows)
    cell = lambda v: str(v).replace("|", "/").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    flagged = sum(r["flags"] != "-" for r in rows)
    students = len({r["_identity"] for r in rows})
    head = [f"{students} students, {len(rows)} rows, {flagged} flagged."]
    if assignment_lines:
        head.append("The assignment (what differs from the notebooks' defaults): " + "; ".join(assignment_lines) + ".")
    head += [cell(n) + "." for n in notes]
    for old in out.glob("class_results_*.png"):
        if re.fullmatch(r"class_results_\d+\.png", old.name):
            old.unlink()
    try:
        pages = figures(rows)
        for n, fig in enumerate(pages, 1):
            fig.savefig(out / ("class_results.png" if n == 1 else f"class_results_{n}.png"), dpi=100)
            fig.clf()
        if len(pages) > 1:
            head.append(f"The figure has {len(pages)} pages: class_results.png, class_results_2.png, ...")
    except Exception as err:  # noqa: BLE001 -- the table is written even if the figure cannot be
        head.append(f"The figure could not be drawn ({type(err).__name__}: {text(str(err), 80)}).")
    (out / "class_results.md").write_text("# Class results\n\n" + "\n".join(head) + "\n\n" + "\n".join(lines) + "\n",
                                          encoding="utf-8")


def class_results(folder, assignment=None, out=None, notebooks=None, verifier=None):
    """Build the table, CSV and figure from every hand-in zip under folder; returns the rows (COLUMNS only).
    AssignmentError if the assignment names an unknown notebook or parameter, before anything is read. verifier:
    make_verifier(data_dir) to evaluate the weights in the zips again (--verify)."""
    folder = Path(folder)
    out = Path(out or folder)
    rows, notes, lines = collect(folder, assignment, notebooks, verifier)
    out.mkdir(parents=True, exist_ok=True)
    write_files(rows, out, notes, lines)
    return [{c: r[c] for c in COLUMNS} for r in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the folder holding the students' hand-in zips")
    ap.add_argument("--assignment", type=Path, help='JSON: settings of the assignment, e.g. {"03": {"EPOCHS": 10}}')
    ap.add_argument("--out", type=Path, help="where to write class_results.* (default: the folder)")
    ap.add_argument("--verify", action="store_true", help="evaluate the weights in the zips again on CIFAR-10's test "
                    "split and compare with the accuracy claimed (about 2 min a ResNet18 run on a 2-core CPU)")
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="--verify: the folder holding "
                    "cifar-10-batches-py (default: the checkout's data/, where the notebooks keep it)")
    ap.add_argument("--device", default="auto", help="--verify: auto (cuda, then mps, then cpu), cpu, cuda, ...")
    a = ap.parse_args(argv)
    if not a.folder.is_dir():
        ap.error(f"no such folder: {a.folder}")
    try:
        assignment = read_assignment(a.assignment) if a.assignment else {}
        books = Notebooks()
        check_assignment(assignment, books)
    except AssignmentError as err:
        print(f"class_results: {a.assignment}: {err}. Nothing was read.", file=sys.stderr)
        return 2
    verifier = None
    if a.verify:
        try:
            verifier = make_verifier(a.data, a.device)
        except ValueError as err:
            print(f"class_results: {err}. Nothing was read.", file=sys.stderr)
            return 2
    rows, notes, lines = collect(a.folder, assignment, books, verifier)
    out = a.out or a.folder
    out.mkdir(parents=True, exist_ok=True)
    write_files(rows, out, notes, lines)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{len(rows)} rows from {len({r['_identity'] for r in rows})} students, "
          f"{sum(r['flags'] != '-' for r in rows)} flagged: {out / 'class_results.md'}, class_results.csv, "
          f"class_results.png")
    if verifier:
        print(verify_report(verifier, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
