"""Commands the UI runs in the background: `loratune train`, `eval` and `export` as subprocesses.

A job is the CLI's own command line (`python -m loratune.cli ...`), started in the workspace root in a
session of its own, its output going to a log file. Its record (`.loratune-ui/jobs/ID/job.json`: command,
pid, the run folder it writes, its exit code once known) lives in the workspace, so the jobs are found
again after a page reload or a restart of the UI, and a job outlives both. Stopping a job sends SIGTERM,
on which `loratune train` saves a checkpoint before it exits; `resume` starts the same config again with
`train.resume=auto`, which continues from that checkpoint.

A job is running while its pid is alive *and* that process's environment holds the job's id (a pid reused
by another process after a restart is not taken for the job).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loratune.ui.paths import Workspace, WorkspaceError

LOG_TAIL_CHARS = 12_000
JOB_VARIABLE = "LORATUNE_UI_JOB"


@dataclass
class Job:
    id: str
    kind: str  # train | eval | export
    argv: list[str]
    target: str  # the folder it writes, relative to the workspace
    pid: int
    started: float
    returncode: int | None = None


def _alive(job: Job) -> bool:
    try:
        os.kill(job.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        environ = Path(f"/proc/{job.pid}/environ").read_bytes().split(b"\0")
        stat = Path(f"/proc/{job.pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]  # Z: exited, not yet reaped
    return f"{JOB_VARIABLE}={job.id}".encode() in environ and state != "Z"


class Jobs:
    """The jobs of one workspace: start, list, stop, read their logs."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._lock = threading.Lock()

    def _folder(self, job_id: str) -> Path:
        return self.ws.ui_dir("jobs", job_id)

    def _save(self, job: Job) -> None:
        folder = self._folder(job.id)
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(asdict(job), indent=1), encoding="utf-8")
        tmp.replace(folder / "job.json")

    def new_id(self, kind: str, target: str) -> str:
        stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in target)[-40:].strip("-") or kind
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{stem}-{os.getpid() % 1000}{int(time.time() * 1000) % 1000:03d}"

    def config_path(self, job_id: str) -> Path:
        return self._folder(job_id) / "config.yaml"

    def start(self, kind: str, args: list[str], target: Path, job_id: str | None = None) -> Job:
        """Run `loratune ARGS` in the workspace root; `target` is the folder it writes (inside the workspace)."""
        job_id = job_id or self.new_id(kind, self.ws.relative(target))
        folder = self._folder(job_id)
        argv = [sys.executable, "-m", "loratune.cli", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", JOB_VARIABLE: job_id}
        with open(folder / "log.txt", "ab") as log:
            proc = subprocess.Popen(argv, cwd=self.ws.root, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        job = Job(job_id, kind, argv, self.ws.relative(target), proc.pid, time.time())
        with self._lock:
            self._save(job)
        threading.Thread(target=self._reap, args=(job, proc), daemon=True).start()
        return job

    def _reap(self, job: Job, proc: subprocess.Popen) -> None:
        job.returncode = proc.wait()
        with self._lock:
            self._save(job)

    def all(self) -> list[Job]:
        """Every job of the workspace, newest first."""
        jobs = []
        root = self.ws.root / ".loratune-ui" / "jobs"
        if root.is_dir():
            for rec in root.glob("*/job.json"):
                try:
                    jobs.append(Job(**json.loads(rec.read_text(encoding="utf-8"))))
                except (ValueError, TypeError):
                    continue
        return sorted(jobs, key=lambda j: j.started, reverse=True)

    def get(self, job_id: str) -> Job:
        for job in self.all():
            if job.id == job_id:
                return job
        raise WorkspaceError(f"no job {job_id!r} in this workspace")

    def latest_for(self, target: str, kind: str = "train") -> Job | None:
        return next((j for j in self.all() if j.target == target and j.kind == kind), None)

    def status(self, job: Job) -> str:
        """running, finished, stopped (SIGTERM/SIGINT: a checkpoint was saved), failed (exit code N), ended."""
        if _alive(job):
            return "running"
        if job.returncode is None:
            return "ended"
        if job.returncode == 0:
            return "finished"
        if job.returncode in (130, 143, -signal.SIGTERM, -signal.SIGINT):
            return "stopped"
        return f"failed (exit code {job.returncode})"

    def stop(self, job: Job) -> bool:
        """SIGTERM to a running job (training saves a checkpoint, then exits); False when it was not running."""
        if not _alive(job):
            return False
        os.kill(job.pid, signal.SIGTERM)
        return True

    def log(self, job: Job, chars: int = LOG_TAIL_CHARS) -> str:
        path = self._folder(job.id) / "log.txt"
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - chars))
            return f.read().decode("utf-8", errors="replace")
