"""course: what keeps the course running. Nobody needs to read it to learn the course; helpers.py teaches.

Every notebook calls `ws = course.start(globals())` after its parameters cell: it checks the parameters and opens
the workspace (Google Drive on Colab; QUICK's sandbox). Training notebooks pass `run=ws.run(name)` to `H.fit`.
Each file says what it keeps safe:

    workspace.py  where the work goes, the start call, figures, the LR file, the space used
    checks.py     parameter checks, before any time is spent
    runs.py       a run's lock, checkpoints, resume, settings and results record
    files.py      writes that are whole or absent, the lock file, damaged files set aside
    handin.py     self-checks and the hand-in zip
    system.py     hardware, versions and data files for the records
"""

from .files import RunBusy, WriteFailed, set_aside
from .runs import Run, StaleRun, load_results, record_checksum, results_table
from .workspace import Workspace, start

__all__ = ["Run", "RunBusy", "StaleRun", "Workspace", "WriteFailed", "load_results", "record_checksum",
           "results_table", "set_aside", "start"]
