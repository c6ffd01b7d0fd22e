"""A notebook's workspace: where its work goes (Google Drive on Colab), QUICK's sandbox, and the start call.

What it keeps safe: work on Colab goes to Google Drive, which survives a runtime reset, and every notebook finds
the others' work there; a QUICK run writes only into quick/, which no real run reads; a folder that cannot be
written is refused before anything is spent; the workspace's size is always one call away.
"""

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt

import helpers as H

from . import checks, handin
from .files import atomic_write, folder_bytes, load_checkpoint, mb, write_json
from .handin import jsonable
from .runs import Run, load_results
from .system import device_name, versions

CHECKOUT = Path(__file__).resolve().parents[1]  # the course's checkout, when it runs from one
CONTENT = Path(os.environ.get("COURSE_CONTENT", "/content"))  # Colab's disk (the tests point it elsewhere)
EXPECTED = Path(__file__).with_name("expected.json")  # what the course's own runs reached (scripts/update_readme.py)


def on_colab():
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def start(variables, drive_folder="resnet-cifar10-course", data_dir=None, device="auto", start_over=False,
          outputs=None, images=None):
    """Open a notebook's workspace and check its parameters; every notebook calls it after its parameters cell.

    variables: the notebook's globals(); every parameter found there is checked (course/checks.py RULES).
    drive_folder: on Colab, the course folder in your Google Drive (a name, or a path under /content/drive/MyDrive);
        None keeps the work in the runtime, which a reset loses. Off Colab the checkout's outputs/ and images/.
    data_dir: where CIFAR-10 is (or is fetched to): Colab's /content/data, else the checkout's data/.
    device: "auto" (cuda, then mps, then cpu) or a name.
    start_over: move the files of every run this notebook opens to archive/ and train it from epoch 0 (then remove
        it, or every Run all starts over again). outputs, images: other folders than the workspace's (tests, scripts).
    """
    params = {k: v for k, v in variables.items() if k in checks.RULES}
    checks.check_parameters(params)
    if not isinstance(start_over, bool):
        raise ValueError(f"start_over must be True or False, got {start_over!r}")
    quick = bool(params.get("QUICK"))
    root = _drive_root(drive_folder) if on_colab() and drive_folder is not None else None
    if on_colab() and root is None:
        print("drive_folder=None: outputs and figures stay in this runtime; a reset or disconnect loses them")
    base = root or (CONTENT if on_colab() else CHECKOUT)
    ws = Workspace(home=Path(outputs or base / "outputs"), home_images=Path(images or base / "images"),
                   data_dir=Path(data_dir or (CONTENT if on_colab() else CHECKOUT) / "data"),
                   device=H.get_device(device), quick=quick, start_over=start_over, parameters=params)
    if quick:
        print(f"QUICK = True: a sandbox. Everything goes to {ws.shown(ws.outputs)} and {ws.shown(ws.images)}; no real "
              f"run reads them")
    for folder in (ws.outputs, ws.images):
        _check_writable(folder)
    ws.self_checks.update(_saved_checks(ws.outputs / "self_checks.json"))  # a restart does not reset the tries
    print(f"device: {ws.device} ({device_name(ws.device)}) | torch {versions()['torch']} | work in "
          f"{ws.shown(ws.outputs)}")
    H.seed_everything(params.get("SEED", 0))
    return ws


def _saved_checks(path):
    """The self-checks of earlier sessions, whose tries go on counting; an unreadable file starts them again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # AttributeError: JSON that is not an object
        saved = json.loads(Path(path).read_text())
        return {k: v for k, v in saved.items() if isinstance(v, dict) and isinstance(v.get("tries"), int)}
    return {}


def _drive_root(drive_folder):
    """drive_folder as a folder on the mounted Google Drive; a name is a folder in MyDrive."""
    drive = CONTENT / "drive"
    mydrive = drive / "MyDrive"
    if not isinstance(drive_folder, (str, Path)) or not str(drive_folder).strip():
        raise ValueError(f"drive_folder must be a folder name or path on Google Drive (or None), got {drive_folder!r}")
    folder = Path(drive_folder)
    if not folder.is_absolute():
        folder = mydrive / folder
    folder = Path(os.path.normpath(folder))
    if mydrive not in folder.parents:
        raise ValueError(f"drive_folder must be a folder inside {mydrive} (e.g. 'resnet-cifar10-course'), got "
                         f"{str(drive_folder)!r}: a folder elsewhere is lost when the runtime resets, and one in "
                         f"Drive's bin is emptied. drive_folder=None keeps the work in the runtime on purpose.")
    if not mydrive.exists():
        from google.colab import drive as colab_drive

        colab_drive.mount(str(drive))  # asks once for permission
    print(f"workspace on Google Drive: MyDrive/{folder.relative_to(mydrive)} (checkpoints, results and figures "
          f"survive a runtime reset)")
    return folder


def _check_writable(folder):
    """Create folder if needed and prove it can be written, or say why not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot use {folder} as a folder: it, or a folder above it, is a file. Rename or move that "
                         f"file, or choose another folder") from None
    except OSError as err:
        raise ValueError(f"cannot write to {folder} ({err.strerror or err}). Choose a folder you can write to (on "
                         f"Colab: check that Google Drive is mounted and has free space)") from None


@dataclass
class Workspace:
    """Where a notebook's work goes, and the calls that read and write it (course.start makes one)."""

    home: Path  # outputs/ of real runs; QUICK's sandbox is its quick/ folder
    home_images: Path
    data_dir: Path
    device: object
    quick: bool = False
    start_over: bool = False
    parameters: dict = field(default_factory=dict)
    self_checks: dict = field(default_factory=dict)

    @property
    def outputs(self):
        """Where this notebook's runs, results and hand-ins go: outputs/, or outputs/quick/ for a QUICK run."""
        return self.home / "quick" if self.quick else self.home

    @property
    def images(self):
        """Where this notebook's figures go: images/, or images/quick/ for a QUICK run."""
        return self.home_images / "quick" if self.quick else self.home_images

    @property
    def root(self):
        """The workspace's top folder: the course folder on Drive, or the checkout."""
        return self.home.parent

    def shown(self, path):
        """A path as a student finds it: inside the workspace, or MyDrive/..., never the machine's full path."""
        path = Path(path)
        for base, label in ((CONTENT / "drive" / "MyDrive", "MyDrive"), (self.root, ""), (CONTENT, "/content")):
            if path == base or base in path.parents:
                return str(Path(label) / path.relative_to(base)) if label else str(path.relative_to(base))
        return str(path)

    # -- runs

    def run(self, name, config=None):
        """A run for H.fit(..., run=ws.run(name)): checkpoints, resume and a results file in this workspace."""
        return Run(self.outputs, name, quick=self.quick, start_over=self.start_over, config=config, shown=self.shown,
                   data_dir=self.data_dir)

    def results(self):
        """Every run's results record in this workspace, by name."""
        return load_results(self.outputs / "results")

    def expected(self, names):
        """Print what the course's own finished runs of these experiments reached, and the others it ships."""
        shipped = json.loads(EXPECTED.read_text()) if EXPECTED.exists() else {}
        for name in names:
            print(f"{name}: {shipped.get(name, 'the course ships no finished run of it yet')}")
        for name in [n for n in shipped if n not in names]:
            print(f"shipped with the course: {name}: {shipped[name]}")

    def load_trained(self, name):
        """A trained run's best weights in the model they came from: (model, checkpoint); never trains (07)."""
        path = self.outputs / "checkpoints" / f"{name}_best.pt"
        if not path.exists():
            runs = sorted(p.name.removesuffix("_best.pt") for p in path.parent.glob("*_best.pt"))
            raise FileNotFoundError(f"no checkpoint {self.shown(path)}: run notebook 03 first (or the notebook that "
                                    f"trains '{name}'), or set EXPERIMENT to one of: {', '.join(runs) or 'none yet'}")
        arch = load_checkpoint(path).get("arch") or {}
        if "name" not in arch:
            raise ValueError(f"{path} does not record a course ResNet's architecture ({arch}); load it by hand")
        model = H.make_model(**arch)
        ckpt = load_checkpoint(path, model)
        return model.to(self.device).eval(), ckpt

    # -- the LR that notebook 02 finds and 03 uses

    def save_lr(self, result, rule="minimum", batch_size=512, for_03=True, **settings):
        """Write the range test's chosen LR and the run's settings for notebook 03 (lr_finder.json), or, for an
        exercise's variant (for_03=False), beside it (lr_finder_variant.json), leaving 03's LR alone (02)."""
        if rule not in result.suggestions:
            raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(result.suggestions)}")
        lr = checks.check_lr(result.suggestions[rule], f"the '{rule}' suggestion",
                             "Choose another RULE, or narrow START_LR and END_LR, and run the test again")
        path = self.outputs / ("lr_finder.json" if for_03 else "lr_finder_variant.json")
        record = {"lr": lr, "rule": rule, "batch_size": batch_size, "suggestions": result.suggestions,
                  "diverged": result.diverged, "when": time.strftime("%Y-%m-%d %H:%M"), **settings}
        write_json(path, jsonable(record))
        print(f"wrote {self.shown(path)}: LR {lr:.3g} ('{rule}') at batch {batch_size}" +
              ("; notebook 03 reads it" if for_03 else "; notebook 03 does not read it (USE_IN_03 = False)"))
        return path

    def lr(self, lr=None, batch_size=512, default=0.1):
        """(LR, why): lr if given, else 02's LR scaled linearly to batch_size, else default (03)."""
        if lr is not None:
            return checks.check_lr(lr), f"LR {lr:g} (set in the parameters cell)"
        path = self.outputs / "lr_finder.json"
        if not path.is_file():
            return checks.check_lr(default, "DEFAULT_LR"), (
                f"LR {default:g}: the stated default (no LR range test result at {self.shown(path)}: run notebook 02 "
                f"with QUICK = {self.quick}; a QUICK run's LR stays in its sandbox, where only QUICK runs read it)")
        found = _read_lr_choice(path)
        scaled = checks.check_lr(found["lr"] * batch_size / found["batch_size"],
                                 f"the LR in {path} ({found['lr']:g} at batch {found['batch_size']}) scaled to batch "
                                 f"{batch_size}")
        run = ", ".join(f"{k} {found[k]}" for k in ("when", "subset", "label_smoothing", "num_iter") if k in found)
        return scaled, (f"LR {scaled:.3g}: the LR range test's '{found['rule']}' suggestion {found['lr']:.3g} at "
                        f"batch {found['batch_size']}, scaled linearly to batch {batch_size} (notebook 02's run: "
                        f"{run or 'settings not recorded'}; {self.shown(path)})")

    # -- figures, self-checks, the hand-in, the space used

    def savefig(self, fig, name, dpi=120):
        """Save a figure as images/<name> (PNG, written whole or not at all) and return its path."""
        return atomic_write(self.images / name, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight",
                                                                        format="png"))

    def show(self, fig, name):
        """Save a figure (savefig), then show it."""
        self.savefig(fig, name)
        plt.show()

    def check(self, exercise, answer, **your_run):
        """Say at once whether an answer is right, without showing the right one; the tries are kept (the exercises)."""
        right = handin.check_answer(self.self_checks, exercise, answer, **your_run)
        if right is not None:  # a try was counted
            write_json(self.outputs / "self_checks.json", self.self_checks)
        return right

    def hand_in(self, notebook, variables, student="", runs=(), files=(), weights=False):
        """Write notebook's hand-in zip (answers, figures, its runs' results; weights=True: their best weights in
        half precision, for the teacher to verify) and say what to submit (every notebook's last cell)."""
        return handin.hand_in(self, notebook, variables, student=student, runs=runs, files=files, weights=weights)

    def size(self):
        """Bytes the workspace uses by part: checkpoints, results, archive, hand-ins, QUICK's sandbox, figures."""
        out, images = self.home, self.home_images
        parts = {"checkpoints": out / "checkpoints", "results": out / "results", "archive": out / "archive",
                 "hand-ins": out / "handin", "quick sandbox": [out / "quick", images / "quick"], "figures": images}
        sizes = {k: sum(folder_bytes(p) for p in (v if isinstance(v, list) else [v])) for k, v in parts.items()}
        sizes["figures"] -= folder_bytes(images / "quick")
        sizes["other"] = folder_bytes(out) - sum(folder_bytes(p) for p in (out / "checkpoints", out / "results",
                                                                             out / "archive", out / "handin",
                                                                             out / "quick"))
        return sizes

    def usage(self):
        """What the workspace holds, by part, in one line."""
        sizes = self.size()
        return ", ".join(f"{k} {mb(v)}" for k, v in sizes.items() if v) + \
            f" (total {mb(sum(sizes.values()))} of a free Drive's 15 GB)"

    def free_space(self, archive=False, quick=False):
        """Print what the workspace holds; delete, if asked, runs moved to archive/ and QUICK's sandbox."""
        doomed = ([self.home / "archive"] if archive else []) + \
            ([self.home / "quick", self.home_images / "quick"] if quick else [])
        freed = sum(folder_bytes(f) for f in doomed)
        for folder in doomed:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"workspace: {self.usage()}")
        if doomed:
            print(f"deleted {', '.join(self.shown(f) for f in doomed)}: {mb(freed)} freed")
        return freed


def _read_lr_choice(path):
    """lr_finder.json's content, if its LR and batch size are usable numbers."""
    try:
        found = json.loads(Path(path).read_text())
        lr, batch = found["lr"], found["batch_size"]
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); run notebook 02 again, or delete it and "
                         f"set LR in the parameters cell") from None
    checks.check_lr(lr, f"the LR in {path}")
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        raise ValueError(f"{path} holds batch_size {batch!r}; it must be a whole number from 1 up: run notebook 02 "
                         f"again, or delete it and set LR in the parameters cell")
    return {"rule": "?", **found}
