"""The project's own processes on this machine, by name: `recstream` workers and the API as
subprocesses configured by one Settings object, with their logs, liveness and shutdown. Used by the
integration tests and the benchmarks (bench/harness.py), so both start processes the same way."""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cli.services import REPO_ROOT as REPO
from recstream.settings import PREFIX, Settings

RECSTREAM = REPO / ".venv" / "bin" / "recstream"


def settings_env(s: Settings) -> dict[str, str]:
    """os.environ without its RECSTREAM_* variables, plus every field of `s` as one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    for f in dataclasses.fields(Settings):
        env[PREFIX + f.name.upper()] = str(getattr(s, f.name))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Processes:
    """Named subprocesses with their logs; `stop_all` ends every one still running (SIGTERM, then SIGKILL)."""
    s: Settings
    logs: Path
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _files: list = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, name: str) -> list[str]:
        if name == "api":
            return [str(RECSTREAM), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        return [str(RECSTREAM), "worker", name]

    def start(self, name: str, role: str | None = None, **overrides) -> subprocess.Popen:
        """Start `name`, running `role` (the process kind: a worker role or "api"; by default the name
        itself), so several processes of one kind can run side by side ("features", "features-2"),
        with the deployment's settings less `overrides` (a retrieval shard: retrieval_shard=1)."""
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is running"
        log = open(self.logs / f"{name}.log", "ab")
        self._files.append(log)
        env = settings_env(dataclasses.replace(self.s, **overrides))
        proc = subprocess.Popen(self.command(role or name), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL: no goodbye to the consumer group, no flush."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def tail(self, name: str, n: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def check_alive(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            assert self.alive(name), f"{name} exited with {self.procs[name].poll()}:\n{self.tail(name)}"

    def stop_all(self, timeout_s: float = 20) -> None:
        running = [p for p in self.procs.values() if p.poll() is None]
        for p in running:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in running:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for f in self._files:
            f.close()
        self._files.clear()
