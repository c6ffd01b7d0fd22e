"""A training run's files: its lock, a checkpoint after every epoch, resume, its settings and its results record.

What it keeps safe: an interrupted run resumes bit-exact from its last epoch; a finished run is loaded, never trained
again; a run asked for with other settings than the saved one stops and names every difference (nothing is moved
until course.start(..., start_over=True) says so); a run that broke down is recorded as stopped, with its last good
checkpoint; a finished run keeps only its best weights (chosen on the validation split) and its results file.
"""

import contextlib
import hashlib
import json
import random
import re
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import helpers as H

from .checks import check_lr, check_name
from .files import RunLock, _pid_alive, load_checkpoint, mb, move_to_archive, save_checkpoint, write_json
from .system import data_files, device_name, versions


class StaleRun(RuntimeError):
    """A saved run was made with other settings than the ones asked for now."""


# ---- what a run is: every setting that changes its numbers, read from the objects --------------------------------

SPEED_KEYS = ("num_workers", "amp", "channels_last", "device")  # never make a saved run stale
_SCHEDULER_STATE = {"optimizer", "last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step",
                    "best", "num_bad_epochs", "cooldown_counter", "mode_worse", "verbose", "base_lrs"}
_OPTIMIZER_FLAGS = ("params", "foreach", "fused", "differentiable", "capturable", "maximize")


def _plain(value):
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def describe_model(model):
    """make_model's arguments, read from a ResNet's structure; other models: their class and size."""
    if isinstance(model, H.ResNet):
        block, blocks = type(model.layer1[0]), tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5))
        name = next((n for n, spec in H.MODELS.items() if spec == (block, blocks)), None)
        norm = model.norm1
        norm = "bn" if isinstance(norm, nn.BatchNorm2d) else "ln" if norm.num_groups == 1 else "gn"
        first = model.layer4[0]
        stride = (first.conv1 if block is H.BasicBlock else first.conv2).stride[0]
        if name:
            return {"name": name, "norm": norm, "num_classes": model.linear.out_features, "last_stride": stride}
    return {"class": type(model).__name__, "params": H.count_params(model)}


def _describe_scheduler(scheduler):
    if scheduler is None:
        return None
    out = {"name": type(scheduler).__name__}
    out.update({k.lstrip("_"): v for k, v in vars(scheduler).items() if k not in _SCHEDULER_STATE and _plain(v)})
    if callable(getattr(scheduler, "anneal_func", None)):  # torch < 2.6 keeps OneCycle's anneal as a method
        out["anneal_func"] = scheduler.anneal_func.__name__
    return out


def _describe_criterion(criterion):
    out = {"name": type(criterion).__name__}
    out.update({k: v for k, v in vars(criterion).items() if not k.startswith("_") and k != "training" and _plain(v)})
    out.update({k: b.tolist() for k, b in criterion.named_buffers()})
    return out


def _describe_optimizer(optimizer):
    groups = [{"params": sum(p.numel() for p in g["params"]),
               **{k: v for k, v in g.items() if k not in _OPTIMIZER_FLAGS and _plain(v)}}
              for g in optimizer.param_groups]
    return {"name": type(optimizer).__name__, "groups": groups}


def _describe_data(data):
    train = data.train.dataset
    transform = getattr(train, "transform", None)
    return {"train_images": len(train), "val_images": len(data.val.dataset) if data.val is not None else 0,
            "test_images": len(data.test.dataset), "batch_size": data.train.batch_size,
            "seed": getattr(train, "seed", None),
            "augment": [repr(t) for t in getattr(transform, "transforms", [])] if transform is not None else None}


def run_settings(model, optimizer, scheduler, criterion, data, epochs, monitor, config=None):
    """Every setting that changes a run's numbers: what the objects say, plus the notebook's config."""
    settings = {**(config or {}), "model": describe_model(model), "epochs": epochs, "monitor": monitor,
                "data": _describe_data(data), "optimizer": _describe_optimizer(optimizer),
                "scheduler": _describe_scheduler(scheduler), "criterion": _describe_criterion(criterion)}
    return json.loads(json.dumps(settings, default=str))  # as the results file will hold it (tuples become lists)


def _flat(settings, prefix=""):
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_settings(what, saved, now):
    """Raise StaleRun naming every setting that differs; speed-only settings never count."""
    saved, now = _flat(saved or {}), _flat(now)
    keys = [k for k in dict.fromkeys([*saved, *now]) if k.split(".")[0] not in SPEED_KEYS
            and saved.get(k) != now.get(k)]
    if keys:
        changes = "; ".join(f"{k}: {saved.get(k, '(none)')!r} -> {now.get(k, '(none)')!r}" for k in keys[:8])
        more = f"; and {len(keys) - 8} more" if len(keys) > 8 else ""
        raise StaleRun(f"{what} was run with other settings ({changes}{more}). Nothing was changed. To keep it: "
                       f"give the new run another name (EXPERIMENT, or RUNS in 04). To start over: course.start("
                       f"globals(), start_over=True) moves the files of every run this notebook opens to archive/.")


# ---- results records ------------------------------------------------------------------------------------------

RECORD_FIELDS = ("experiment", "run_id", "status", "quick", "config", "params", "epochs_run", "best_epoch",
                 "final_train_acc", "final_test_acc", "best_val_acc", "test_acc_at_best_val", "wall_time_s", "device",
                 "versions", "finished_at", "history")


def record_checksum(record):
    """A checksum over a record but itself: a number edited by hand no longer matches (not proof against a cheat)."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def complete_record(record):
    """A record with every field the code reads; those an older format lacks become None (shown as '-')."""
    history = record.get("history") if isinstance(record.get("history"), dict) else {}
    full = {field: record.get(field) for field in RECORD_FIELDS}
    full.update({k: v for k, v in record.items() if k not in full})
    full["history"] = {**H.empty_history(), **{k: v for k, v in history.items() if k in H.empty_history()}}
    full["config"] = record.get("config") if isinstance(record.get("config"), dict) else {}
    full["status"] = record.get("status") or "unknown"
    full["quick"] = bool(record.get("quick"))
    if full["epochs_run"] is None:
        full["epochs_run"] = len(full["history"]["epoch"])
    return full


def load_results(results_dir):
    """Every readable results file in results_dir, by experiment; bad, old and doubled files are flagged.

    A file that is not a record is skipped with a warning naming it; a record in an older format is shown with '-'
    for what it lacks; two files naming one experiment (Drive's "Copy of ...") keep the one named after it.
    """
    out, where = {}, {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("experiment"), str):
                raise ValueError("not a results record (no experiment name)")
        except (ValueError, OSError, UnicodeDecodeError) as err:
            warnings.warn(f"skipped {path}: {type(err).__name__}: {str(err)[:120]}", stacklevel=2)
            continue
        missing = [f for f in RECORD_FIELDS if f not in record and f not in ("quick", "run_id")]
        if missing:
            warnings.warn(f"{path} is in an older format (it has no {', '.join(missing)}): shown as '-'", stacklevel=2)
        name = record["experiment"]
        if name in out:
            keep, drop = (path, where[name]) if path.stem == name else (where[name], path)
            warnings.warn(f"{where[name]} and {path} both hold experiment '{name}' (Drive's 'Copy of ...' makes such "
                          f"copies): using {keep.name}; rename or delete {drop.name}", stacklevel=2)
            if keep != path:
                continue
        out[name], where[name] = complete_record(record), path
    return out


def results_table(results_dir, include_quick=True):
    """A markdown table of every run in results_dir; unfinished, stopped and QUICK runs say so."""
    lines = ["| experiment | model | scheduler | params | epochs | final train acc % | final test acc % | "
             "test acc at best val % | wall time | device |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f=".2f": "-" if v is None else format(v, f)  # noqa: E731
    for name, rec in load_results(results_dir).items():
        if rec["quick"] and not include_quick:
            continue
        cfg = rec["config"]
        state = {"complete": "", "diverged": " (stopped: diverged)"}.get(rec["status"], f" ({rec['status']})")
        epochs = f"{rec['epochs_run']}/{cfg.get('epochs', '-')}{state}" + (" (QUICK)" if rec["quick"] else "")
        model = cfg.get("model", "-")
        model = f"{model.get('name', model.get('class'))} {model.get('norm', '')}".strip() \
            if isinstance(model, dict) else model
        sched = cfg.get("scheduler")
        sched = sched.get("name") if isinstance(sched, dict) else sched
        wall = "-" if rec["wall_time_s"] is None else f"{rec['wall_time_s'] / 60:.1f} min"
        lines.append(f"| {name} | {model} | {sched or '-'} | {fmt(rec['params'], ',')} | {epochs} | "
                     f"{fmt(rec['final_train_acc'])} | {fmt(rec['final_test_acc'])} | "
                     f"{fmt(rec['test_acc_at_best_val'])} | {wall} | {rec['device'] or '-'} |")
    return "\n".join(lines)


# ---- the random state a bit-exact resume needs ------------------------------------------------------------------


def _rng_state():
    np_state = np.random.get_state()  # noqa: NPY002
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))  # noqa: NPY002


# ---- one run ----------------------------------------------------------------------------------------------------


class Run:
    """One run's files while H.fit trains it; fit calls begin, end_epoch after every epoch, and finish."""

    def __init__(self, outputs, name, quick=False, start_over=False, config=None, shown=str, data_dir=None):
        self.name, self.shown, self.data_dir = check_name(name), shown, data_dir  # shown: a path as the student sees it
        self.outputs, self.quick, self.start_over, self.config = Path(outputs), quick, start_over, config or {}
        d = self.outputs / "checkpoints"
        self.paths = {"dir": d, "last": d / f"{name}_last.pt", "prev": d / f"{name}_prev.pt",
                      "best": d / f"{name}_best.pt", "lock": d / f"{name}.lock",
                      "results": self.outputs / "results" / f"{name}.json"}
        self.lock, self.record, self.done = RunLock(self.paths["lock"], name), None, False

    # -- the hooks H.fit calls

    def begin(self, model, optimizer, scheduler, criterion, data, epochs, scaler=None, monitor="val_acc"):
        """Take the lock, then return the history to go on from: a resumed run's, a finished run's, or an empty one."""
        self.settings = run_settings(model, optimizer, scheduler, criterion, data, epochs, monitor,
                                     {**self.config, "quick": self.quick})
        for group in optimizer.param_groups:  # OneCycle: its peak
            check_lr(group.get("max_lr", group["lr"]), "the learning rate the optimizer and scheduler were built with")
        self.epochs, self.monitor, self.params = epochs, monitor, H.count_params(model)
        self.device, self.t_start, self.spent = device_name(next(model.parameters()).device), time.perf_counter(), 0.0
        self.data_files = data_files(self.data_dir) if self.data_dir else None  # accuracies differ between copies
        self.paths["dir"].mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # before anything is read or written
        self._remove_my_leftovers()
        saved = self._saved_record()
        if saved and saved["status"] == "complete":
            return self._load_finished(model, saved)
        return self._resume(model, optimizer, scheduler, scaler)

    def end_epoch(self, history, model, optimizer, scheduler, scaler):
        """Write _last.pt (the one before becomes _prev.pt), _best.pt if this epoch is the best, and the record."""
        epoch, score = len(history["epoch"]), self._score(history, len(history["epoch"]))
        is_best = score is None or self.best["score"] is None or score > self.best["score"]
        if is_best:
            self.best = {"epoch": epoch, "score": score}
        save_checkpoint(self.paths["last"], keep_previous=self.paths["prev"], model=model.state_dict(),
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict() if scheduler else None,
                        scaler=scaler.state_dict() if scaler is not None else None, history=history, best=self.best,
                        config=self.settings, rng=_rng_state(), wall_time=self._wall(), run_id=self.run_id)
        if is_best:
            self._write_best(model, history)
        self._write_record(history, "complete" if epoch == self.epochs else "running")

    def _score(self, history, epoch):
        """How good an epoch was on the validation split (higher is better); None without one: the last is best."""
        if not history["val_acc"]:
            return None
        return history["val_acc"][epoch - 1] if self.monitor == "val_acc" else -history["val_loss"][epoch - 1]

    def finish(self, model, history):
        """The model gets its best weights; the record says complete; the files only a resume needs are removed."""
        if self.done:
            return self.record
        load_checkpoint(self.paths["best"], model)
        self._write_record(history, "complete")  # before any file is removed
        freed, names = self._free_finished()
        print(f"'{self.name}' finished: the model holds its best weights (epoch {self.best['epoch']}); kept "
              f"{self.paths['best'].name} ({mb(self.paths['best'].stat().st_size)}) and results/{self.name}.json; "
              f"freed {mb(freed)} ({' and '.join(names) or 'nothing'}, which only a resume needs)")
        return self.record

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        try:
            if kind is not None and issubclass(kind, H.Diverged) and hasattr(self, "history"):
                self._write_record(self.history, "diverged", error=str(err))
                raise H.Diverged(f"'{self.name}' stopped: {err}. The LR is probably too high for this model: try a "
                                 f"tenth of it. {self._kept()}; the run is recorded as stopped (diverged) and trains "
                                 f"again from epoch 0 when you run the cell again.") from None
            if kind is KeyboardInterrupt:
                print(f"Interrupted: {self.shown(self.paths['last'])} holds the last finished epoch; run the cell "
                      f"again to resume.")
        finally:
            self.lock.release()
        return False

    # -- inside begin

    def _saved_record(self):
        if self.start_over:
            self._archive()
        saved = load_results(self.paths["results"].parent).get(self.name)
        if saved and saved["status"] == "diverged":
            print(f"'{self.name}' stopped last time ({saved.get('error', 'diverged')}); its files go to archive/ and "
                  f"it trains again from epoch 0")
            self._archive()
            saved = None
        if saved:
            where = f"'{self.name}' in {self.shown(self.outputs)}"
            check_same_settings(where, saved["config"], self.settings)
        return saved

    def _archive(self):
        move_to_archive([self.paths[k] for k in ("results", "last", "prev", "best")], self.outputs / "archive",
                        self.name)

    def _load_finished(self, model, saved):
        best = self.paths["best"]
        if not best.exists():
            raise FileNotFoundError(f"'{self.name}' finished earlier ({saved['epochs_run']} epochs) but "
                                    f"{self.shown(best)} is missing: restore it (e.g. from Drive's bin), or start "
                                    f"over with course.start(globals(), start_over=True)")
        ckpt = load_checkpoint(best, model)
        self._free_finished()
        print(f"'{self.name}': finished earlier ({saved['epochs_run']}/{self.epochs} epochs); loaded its best "
              f"weights (epoch {ckpt['epoch']}) from {self.shown(best)}")
        self.record, self.done, self.history = saved, True, saved["history"]
        self.best = {"epoch": ckpt["epoch"], "score": None}
        return saved["history"]

    def _resume(self, model, optimizer, scheduler, scaler):
        self.run_id, self.history, self.best = uuid.uuid4().hex[:12], H.empty_history(), {"epoch": 0, "score": None}
        path = next((p for p in (self.paths["last"], self.paths["prev"]) if p.exists()), None)
        if path is None:
            return self.history
        ckpt = load_checkpoint(path, model)
        check_same_settings(self.shown(path), ckpt["config"], self.settings)
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        self.history, self.spent, self.best = ckpt["history"], ckpt["wall_time"], ckpt["best"]
        self.run_id = ckpt.get("run_id", self.run_id)
        _set_rng_state(ckpt["rng"])
        self._repair_best(model)
        print(f"'{self.name}': resumed after epoch {len(self.history['epoch'])}/{self.epochs} from {self.shown(path)}")
        return self.history

    def _repair_best(self, model):
        """_best.pt must hold the best epoch. After a kill between _last.pt and _best.pt the best is the last epoch,
        whose weights the model holds now; if _best.pt is lost otherwise, the best is chosen anew from here."""
        epoch = len(self.history["epoch"])
        with contextlib.suppress(Exception):
            if torch.load(self.paths["best"], map_location="cpu", weights_only=True)["epoch"] == self.best["epoch"]:
                return
        if self.best["epoch"] != epoch:
            warnings.warn(f"{self.shown(self.paths['best'])} does not hold the best epoch ({self.best['epoch']}); the "
                          f"best is chosen again from epoch {epoch} on", stacklevel=4)
            self.best = {"epoch": epoch, "score": self._score(self.history, epoch)}
        self._write_best(model, self.history)

    # -- files

    def _write_best(self, model, history):
        save_checkpoint(self.paths["best"], model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                        epoch=self.best["epoch"], arch=self.settings["model"], config=self.settings,
                        experiment=self.name)

    def _write_record(self, history, status, **extra):
        self.history = history
        summary = H.summarize(history, self.monitor)
        best = self.best["epoch"] if history["val_acc"] else None  # the epoch whose weights _best.pt holds
        test = history["test_acc"]
        summary.update(wall_time_s=self._wall(), best_epoch=best,
                       test_acc_at_best_val=test[best - 1] if best and len(test) >= best else None)
        record = {"experiment": self.name, "run_id": self.run_id, "status": status, "quick": self.quick,
                  "config": self.settings, "params": self.params, **extra, **summary, "device": self.device,
                  "data_files": self.data_files, "versions": versions(),
                  "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        record["checksum"] = record_checksum(record)
        write_json(self.paths["results"], record)
        self.record = record

    def _wall(self):
        return self.spent + time.perf_counter() - self.t_start

    def _kept(self):
        n = len(self.history["epoch"])
        return f"The last good checkpoint (epoch {n}) is kept" if n else "No epoch had finished: there is no checkpoint"

    def _remove_my_leftovers(self):
        """Temporary files of this run left by a killed process of this machine (never a live process's)."""
        pattern = re.compile(rf"\.({re.escape(self.name)}_(last|prev|best)\.pt|{re.escape(self.name)}\.json)\."
                             rf"(\d+)-\w+\.tmp")
        for folder in (self.paths["dir"], self.paths["results"].parent):
            for path in folder.glob(".*.tmp") if folder.is_dir() else []:
                m = pattern.fullmatch(path.name)
                if m and not _pid_alive(int(m[3])):
                    with contextlib.suppress(OSError):
                        path.unlink()

    def _free_finished(self):
        freed, names = 0, []
        for key in ("last", "prev"):
            with contextlib.suppress(OSError):
                size = self.paths[key].stat().st_size
                self.paths[key].unlink()
                freed, names = freed + size, [*names, self.paths[key].name]
        return freed, names
