"""A real PostgreSQL on loopback, for the prediction log's tests and benchmarks/bench_monitor.py.

Debian's `postgresql` package (installed by .ci/run): `initdb` makes a throw-away cluster in a fresh folder, `pg_ctl`
starts it on a free port (no fsync: the folder is thrown away) and stops it. PostgreSQL refuses to run as root, so
as root the cluster belongs to the package's `postgres` user.
"""

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.pacs import free_port


def postgres_bin():
    """The folder of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    return Path(folders[-1]) if folders else None


class Postgres:
    """A PostgreSQL cluster of its own: `url` (database `postgres`, user `cxr`, no password), `stop()`, `start()`
    and `remove()`."""

    def __init__(self):
        self.bin = postgres_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="cxr-postgres-"))
        self.port = free_port()
        self.url = f"postgresql://cxr@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:  # initdb refuses root: the cluster is the postgres user's
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.folder / "data"), "-U", "cxr", "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        self.start()

    def _run(self, program, *args):
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{program} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self):
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-o", options, "-w",
                  "-t", "60", "start")

    def stop(self):
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")

    def remove(self):
        try:
            self.stop()
        except RuntimeError:  # already stopped
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
