"""Files that survive a kill, a full disk and a second tab: every write is whole or absent, one writer per run.

What it keeps safe: a checkpoint or results file is written through a temporary file private to its process and
renamed into place, so it is never half-written; a failed write (a full Drive) says where and how much is free; a
run's lock refuses a second process training the same run; a damaged file is set aside, never deleted.
"""

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import torch


class WriteFailed(OSError):
    """A file could not be written (a full disk, a quota); nothing half-written was left."""


class RunBusy(RuntimeError):
    """Another process is training the same run right now."""


def mb(n):
    """Bytes as MB or GB, for messages."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def folder_bytes(path):
    """Bytes under path (a file or a folder; 0 if absent)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _is_write_error(err):
    if isinstance(err, WriteFailed):
        return False
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("inline_container", "PytorchStreamWriter", "write failed", "unexpected pos")))


def atomic_write(path, write, keep_previous=None):
    """write(tmp) into a temporary file of this process, then rename it to path (keep_previous: move path there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)  # a kill right here leaves the previous epoch to resume from
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not _is_write_error(err):
            raise
        free = "an unknown amount of"
        with contextlib.suppress(OSError):
            free = mb(shutil.disk_usage(path.parent).free)
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise WriteFailed(f"could not write {path} ({type(err).__name__}: {reason}); {path.parent} has {free} free "
                          f"space. Nothing half-written was left and the file from before is intact. Free some space "
                          f"(ws.free_space() shows what the workspace holds), then run the cell again: a run resumes "
                          f"from its last saved epoch.") from None
    return path


def write_json(path, content):
    """A JSON file, written whole or not at all."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=1)))


def save_checkpoint(path, keep_previous=None, **state):
    """torch.save through a private temporary file: never half a checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp), keep_previous)


def load_checkpoint(path, model=None):
    """A checkpoint (weights_only: no code runs), and its weights into model if given; clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run the training notebook first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        fix = ("restore it (e.g. from Drive's bin), or start over with course.start(globals(), start_over=True)"
               if path.name.endswith("_best.pt") else f"run course.set_aside('{path}') and run the training cell "
               f"again; it resumes from the epoch before (_prev.pt) if that is intact, else starts over")
        raise ValueError(f"{path} is damaged ({path.stat().st_size:,} bytes; {type(err).__name__}: {reason}). To go "
                         f"on: {fix}.") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by the course (it has no 'model' entry)")
    if model is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            from .runs import describe_model  # (runs imports this module)

            raise ValueError(f"{path} holds a {ckpt.get('arch') or 'model of another shape'}, not a "
                             f"{describe_model(model)} like this one ({str(err).splitlines()[-1].strip()[:160]}); "
                             f"build the model it holds, or load another checkpoint") from None
    return ckpt


def set_aside(path):
    """Rename a damaged file to <name>.damaged-<time>; nothing is deleted."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d_%H%M%S')}")
    os.replace(path, dest)
    print(f"moved {path} to {dest}")
    return dest


def move_to_archive(files, archive, name):
    """Move a run's files into archive/<name>_<time>/ (start_over=True, or a run that broke down)."""
    files = [Path(p) for p in files if Path(p).exists()]
    if files:
        dest = Path(archive) / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
        dest.mkdir(parents=True, exist_ok=True)
        for path in files:
            os.replace(path, dest / path.name)
        print(f"moved '{name}' ({len(files)} files) to {dest}")


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return isinstance(pid, int)
    return True


class RunLock:
    """<name>.lock beside a run's checkpoints: who trains it (host, process, start), refreshed every 30 s.

    A second writer is refused. A lock is abandoned when its process is gone (same machine) or its heartbeat is
    older than STALE_S (another machine, e.g. a second Colab runtime on the same Drive).
    """

    STALE_S, BEAT_S = 120, 30

    def __init__(self, path, name):
        self.path, self.name = Path(path), name
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop, self._thread = threading.Event(), None

    def _read(self):
        """The lock's content; for an unreadable lock only its age (a writer may be writing it), None if none."""
        try:
            other = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"heartbeat": self.path.stat().st_mtime} if self.path.exists() else None
        return other if isinstance(other, dict) else {}

    def _abandoned(self, other):
        if other.get("host") == self.me["host"]:
            return other.get("pid") == os.getpid() or not _pid_alive(other.get("pid"))
        beat = other.get("heartbeat")
        return not isinstance(beat, (int, float)) or time.time() - beat > self.STALE_S

    def acquire(self):
        """Take the lock atomically (an exclusive create: of two processes, one wins) or raise RunBusy naming its
        holder; an abandoned lock is moved aside first (a rename: again, one process wins). Then keep it fresh."""
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is None:  # it vanished meanwhile, or is not ours to read yet: try again
                    time.sleep(0.05)
                    continue
                if not self._abandoned(other):
                    self._refuse(other)
                stale = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.stale")
                with contextlib.suppress(OSError):  # the abandoned lock of a gone process: one mover wins
                    os.replace(self.path, stale)
                    stale.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({**self.me, "heartbeat": time.time()}))
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return
        raise RunBusy(f"could not take the lock {self.path} after 5 tries (other processes keep taking it); run the "
                      f"cell again in a minute")

    def _refuse(self, other):
        beat = other.get("heartbeat")
        seen = f", last seen {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
        who = (f"host {other.get('host')}, PID {other.get('pid')}, started {other.get('started')}{seen}"
               if "host" in other else f"its lock file is being written or damaged{seen}")
        raise RunBusy(f"'{self.name}' is being trained by another process right now ({who}). This one stops before "
                      f"writing anything. Stop or finish the other, or give this run another EXPERIMENT name; if the "
                      f"other is gone (a closed tab, a reset runtime), run this cell again in {self.STALE_S // 60} "
                      f"minutes.")

    def _beat(self):
        while not self._stop.wait(self.BEAT_S):
            with contextlib.suppress(OSError):
                write_json(self.path, {**self.me, "heartbeat": time.time()})

    def release(self):
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        other = self._read()
        if other and other.get("token") == self.me["token"]:
            with contextlib.suppress(OSError):
                self.path.unlink()
