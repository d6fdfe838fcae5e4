"""A throwaway PostgreSQL server from Debian's binaries (store tests, replica tests and
benchmarks). Tests use BMI_TEST_POSTGRES_URL instead when it is set.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bmi_server.devenv.stack import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL binaries not found (Debian package postgresql)")
    return found[-1]


def _as_postgres(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class PostgresInstance:
    def __init__(self, settings: dict[str, str] | None = None) -> None:
        """``settings``: extra server settings (``-c name=value``)."""
        self.dir = Path(tempfile.mkdtemp(prefix="bmi-pg-"))
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.settings = settings or {}

    def start(self) -> None:
        data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(
            _as_postgres([_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
            check=True, capture_output=True,
        )
        self.resume()

    def resume(self) -> None:
        """Start the server on the data directory (again, after ``halt``)."""
        data = self.dir / "data"
        subprocess.run(
            _as_postgres([
                _bin("pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "start",
                "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
                + "".join(f" -c {k}={v}" for k, v in self.settings.items()),
            ]),
            check=True, capture_output=True,
        )
        deadline = time.monotonic() + 30
        while subprocess.run([_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not become ready")
            time.sleep(0.2)

    def halt(self) -> None:
        """Stop the server, keeping its data (the database is gone until ``resume``)."""
        subprocess.run(
            _as_postgres([_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w",
                          "stop"]),
            check=True, capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(self.dir, ignore_errors=True)

    def new_database(self) -> str:
        """The URL of a new, empty database on this server."""
        import uuid

        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        name = f"bmi_{uuid.uuid4().hex[:12]}"
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        engine.dispose()
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def __enter__(self) -> PostgresInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
