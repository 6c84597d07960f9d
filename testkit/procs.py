"""Run real processes (servers, fake workers) from tests and benchmarks.

Example::

    port = free_port()
    cmd = [sys.executable, "-m", "testkit.fakes.worker", "--port", str(port)]
    with ManagedProcess(cmd, f"http://127.0.0.1:{port}/health") as proc:
        ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

__all__ = ["ManagedProcess", "free_port"]

_TAIL_LINES = 40
_TERM_WAIT_S = 10.0


def system_binary(name: str) -> str:
    """The path of a system program the tests run for real; fails the test, saying how to get it, when missing."""
    import pytest  # only tests call this; loadtest imports this module without pytest's plugins

    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make test` installs it (deploy/scripts/system-packages.sh)")
    return found


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ManagedProcess:
    """A subprocess in its own process group, started and awaited ready on ``__enter__``.

    stdout and stderr go to ``log_path`` (a temporary file, deleted on exit, when not given).
    ``env`` entries are added to (and override) the current environment.
    On exit the whole process group gets SIGTERM, then SIGKILL after 10 s.
    """

    def __init__(
        self,
        cmd: list[str],
        ready_url: str,
        *,
        env: dict[str, str] | None = None,
        timeout_s: float = 60,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Describe the process; nothing starts before ``__enter__`` (or :meth:`start`)."""
        self.cmd = list(cmd)
        self.ready_url = ready_url
        self.env = env
        self.timeout_s = timeout_s
        self.cwd = cwd
        self._own_log = log_path is None
        self.log_path = log_path if log_path is not None else self._temp_log_path()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._final_log: str | None = None

    @staticmethod
    def _temp_log_path() -> Path:
        fd, name = tempfile.mkstemp(prefix="turnout-proc-", suffix=".log")
        os.close(fd)
        return Path(name)

    @property
    def pid(self) -> int:
        """Process id (also the process-group id)."""
        if self._proc is None:
            raise RuntimeError("process not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended, else None."""
        return None if self._proc is None else self._proc.poll()

    def alive(self) -> bool:
        """True while the process is running."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote to stdout/stderr so far."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self) -> str:
        return "\n".join(self.log_text().splitlines()[-_TAIL_LINES:])

    def start(self) -> None:
        """Start the process and wait until ``ready_url`` answers 200; RuntimeError otherwise."""
        if self._proc is not None:
            raise RuntimeError("process already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("wb")
        env = {**os.environ, **self.env} if self.env is not None else None
        self._proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            self._cleanup()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        last_error = "no attempt"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                code = self.returncode
                if code is not None:
                    raise RuntimeError(
                        f"process {self.cmd!r} exited with {code} before {self.ready_url} was ready; "
                        f"last log lines:\n{self._tail()}"
                    )
                try:
                    response = client.get(self.ready_url)
                    if response.status_code == 200:
                        return
                    last_error = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    last_error = repr(exc)
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.ready_url} not ready after {self.timeout_s} s ({last_error}); "
                        f"last log lines:\n{self._tail()}"
                    )
                time.sleep(0.05)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # group already gone / reused: fall back to the process itself
            self._proc.send_signal(sig)

    def stop(self) -> int | None:
        """SIGTERM the process group, wait up to 10 s, then SIGKILL; returns the exit status."""
        if self._proc is None:
            return None
        self._signal_group(signal.SIGTERM)
        try:
            self._proc.wait(timeout=_TERM_WAIT_S)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self._proc.wait()
        return self._proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the process group at once (crash simulation); returns the exit status."""
        if self._proc is None:
            return None
        self._signal_group(signal.SIGKILL)
        return self._proc.wait()

    def _cleanup(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_log and self._final_log is None:
            self._final_log = self.log_text()
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> Self:
        """Start the process and wait until it is ready."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the process (gracefully, then forcibly) and release the log."""
        self.close()

    def close(self) -> None:
        """Stop the process if it still runs (gracefully, then forcibly) and release its log."""
        try:
            self.stop()
        finally:
            self._cleanup()
