"""`edge run --workers N`: several gateway processes sharing the listening ports.

One Python process uses one core. With ``--workers N`` a supervisor (this
module) runs N ordinary gateways as child processes and does nothing on the
data path itself:

* it loads and validates the configuration first, so a broken file fails
  exactly as with one process (exit 1, problems on stderr);
* it reserves each listener address with a bound, non-listening
  ``SO_REUSEPORT`` socket (so port 0 still means one concrete port) and hands
  the concrete address to every worker, which binds it with ``SO_REUSEPORT``
  too; the kernel spreads new connections across the workers' sockets;
* it serves ``/metrics``, ``/healthz`` and ``/readyz`` for all of them:
  workers write their samples to prometheus-client's multiprocess directory
  (``PROMETHEUS_MULTIPROC_DIR``, created empty at start, removed at exit) and
  the supervisor's registry reads them with ``edge.metrics.LiveSeriesCollector``
  (``MultiProcessCollector`` without the series no live worker still holds);
* it forwards every worker log line, tagged ``worker=i``, to its own stdout,
  renaming each worker's ``gateway_started`` to ``worker_started`` and
  logging one ``gateway_started`` of its own once all workers are up;
* it restarts a worker that exits unexpectedly (after ``mark_process_dead``
  and a bounded back-off), forwards SIGHUP, and on SIGTERM/SIGINT forwards
  SIGTERM and waits for every worker to drain (``drain_timeout_s`` plus a
  margin, then SIGKILL).

Only the supervisor speaks to systemd (sd_notify, ``edge.sdnotify``): workers
get ``NOTIFY_SOCKET`` removed from their environment; the supervisor sends
READY=1 once every worker is up, RELOADING=1 on SIGHUP and READY=1 again once
every worker has finished that reload (or after ``_RELOAD_WAIT_S``), and
STOPPING=1 at shutdown.

Workers share nothing but the ports: each holds its own policy snapshot and
reloads it by itself (the watcher runs in every worker).

Must never touch a payload byte or a private key: it only starts processes,
reads their logs and reads metric files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from edge.core.config import Config, bind_error
from edge.core.policies import PolicyFolderError, load_policies
from edge.core.snapshot import build_snapshot, policy_folders
from edge.logs import EventLog, LogFormat
from edge.sdnotify import Notifier

__all__ = ["WORKER_ENV", "WORKER_LISTEN_ENV", "cpu_count", "supervise", "supervise_command"]

# Set in a worker's environment: its number, and where each listener binds.
WORKER_ENV = "EDGE_WORKER"
WORKER_LISTEN_ENV = "EDGE_WORKER_LISTEN"

# Margin beyond drain_timeout_s before a worker that did not exit is killed.
_STOP_MARGIN_S = 10.0
# Back-off between restarts of one worker slot: doubles up to this.
_MAX_BACKOFF_S = 30.0
# Longest the supervisor waits for the workers to report a SIGHUP reload.
_RELOAD_WAIT_S = 60.0
# A worker's log events that end its reload (applied or not).
_RELOAD_ENDS = frozenset({"config_reloaded", "config_reload_failed", "reload_failed"})


def cpu_count() -> int:
    """CPUs this process may run on (cgroup/affinity aware where possible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _reserve(host: str, port: int) -> tuple[socket.socket, str, int]:
    """Bind (not listen) an SO_REUSEPORT socket: the concrete address for workers."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()
    return sock, str(bound[0]), int(bound[1])


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class _Slot:
    index: int
    process: trio.Process | None = None
    pid: int | None = None
    ready: bool = False
    restarts: int = 0
    started: list[int] = field(default_factory=list)


class _Supervisor:
    def __init__(
        self, config: Config, config_path: Path, log: EventLog, count: int, metrics_dir: Path
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.log = log
        self.slots = [_Slot(i) for i in range(count)]
        self.metrics_dir = metrics_dir
        self.stopping = False
        self.listen: dict[str, tuple[str, int]] = {}
        self.bound: dict[str, list[str]] = {}
        self.all_ready = trio.Event()
        self.notifier = Notifier()
        # Workers whose SIGHUP reload has not been reported yet.
        self.reloading: set[int] = set()
        self.reloaded = trio.Event()

    # -- metrics ---------------------------------------------------------

    def render(self) -> bytes:
        from prometheus_client import (
            CollectorRegistry,
            PlatformCollector,
            ProcessCollector,
            generate_latest,
        )

        from edge.metrics import LiveSeriesCollector

        registry = CollectorRegistry()
        LiveSeriesCollector(self.metrics_dir, registry)
        ProcessCollector(registry=registry)  # the supervisor's own process
        PlatformCollector(registry=registry)
        return generate_latest(registry)

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        waiting = [s.index for s in self.slots if not s.ready]
        if waiting:
            return False, f"workers not ready: {waiting}"
        return True, "ready"

    # -- workers ---------------------------------------------------------

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "edge.cli", "run", "--config", str(self.config_path)]

    def _env(self, slot: _Slot) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor speaks to systemd
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        env[WORKER_ENV] = str(slot.index)
        env[WORKER_LISTEN_ENV] = json.dumps(self.listen)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def run_slot(self, slot: _Slot) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        from edge.metrics import forget_process

        backoff = 0.5
        while not self.stopping:
            process = await trio.lowlevel.open_process(
                self._command(),
                stdout=subprocess.PIPE,
                env=self._env(slot),
                start_new_session=True,  # our signals, not the terminal's
            )
            slot.process, slot.pid, slot.ready = process, process.pid, False
            slot.started.append(process.pid)
            await self._forward(slot, process)
            code = await process.wait()
            slot.ready = False
            mark_process_dead(process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            forget_process(process.pid, self.metrics_dir)
            self._reload_reported(slot.index)  # a dead worker is not reloading
            if self.stopping:
                self.log.event("worker_stopped", worker=slot.index, pid=process.pid, code=code)
                return
            slot.restarts += 1
            self.log.event(
                "worker_exited",
                worker=slot.index,
                pid=process.pid,
                code=code,
                restart_in_s=backoff,
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _forward(self, slot: _Slot, process: trio.Process) -> None:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._forward_line(slot, line)
        if buffer:
            self._forward_line(slot, buffer)

    def _forward_line(self, slot: _Slot, line: bytes) -> None:
        if not line.strip():
            return
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError:
            record = {"event": "worker_output", "text": line.decode("utf-8", "replace")}
        record["worker"] = slot.index
        if record.get("event") == "gateway_started":
            record["event"] = "worker_started"
            record["pid"] = slot.pid
            slot.ready = True
            if all(s.ready for s in self.slots):
                self.all_ready.set()
        record.setdefault("ts", "")
        self.log.emit(record)
        if record.get("event") in _RELOAD_ENDS:  # after its line: READY=1 comes last
            self._reload_reported(slot.index)

    def begin_reload(self) -> None:
        """SIGHUP: tell systemd, forward it; ``finish_reload`` says READY=1 again."""
        self.notifier.reloading("reloading")
        self.reloaded = trio.Event()
        self.reloading = {
            s.index for s in self.slots if s.process is not None and s.process.returncode is None
        }
        self.signal_workers(signal.SIGHUP)
        if not self.reloading:
            self.reloaded.set()

    def _reload_reported(self, index: int) -> None:
        if index in self.reloading:
            self.reloading.discard(index)
            if not self.reloading:
                self.reloaded.set()

    async def finish_reload(self) -> None:
        with trio.move_on_after(_RELOAD_WAIT_S):
            await self.reloaded.wait()
        if not self.stopping:
            self.notifier.ready("serving")

    def signal_workers(self, signum: int) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    async def stop(self) -> None:
        self.stopping = True
        self.notifier.stopping("draining")
        self.log.event("shutdown_started", why="signal", workers=len(self.slots))
        self.signal_workers(signal.SIGTERM)
        with trio.move_on_after(self.config.limits.drain_timeout_s + _STOP_MARGIN_S):
            for slot in self.slots:
                if slot.process is not None:
                    await slot.process.wait()
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                self.log.event("worker_killed", worker=slot.index, pid=process.pid)
                process.kill()


async def _main(sup: _Supervisor) -> int:
    from edge.metrics import serve_metrics

    reservations: list[socket.socket] = []
    # What is being bound, for the error message: the address and its purpose.
    where: tuple[str, int, str] = ("", 0, "")
    try:
        for listener in sup.config.listeners:
            where = (listener.host, listener.port, f"listener {listener.name}")
            sock, host, port = _reserve(listener.host, listener.port)
            reservations.append(sock)
            sup.listen[listener.name] = (host, port)
            sup.bound[listener.name] = [_address(host, port)]
        metrics_listeners: list[trio.SocketListener] = []
        if sup.config.metrics is not None:
            where = (sup.config.metrics.host, sup.config.metrics.port, "metrics")
            metrics_listeners = await trio.open_tcp_listeners(
                sup.config.metrics.port, host=sup.config.metrics.host
            )
            sup.bound["metrics"] = [
                _address(*s.socket.getsockname()[:2]) for s in metrics_listeners
            ]
    except OSError as exc:
        for sock in reservations:
            sock.close()
        problem = bind_error(*where, exc)
        print(f"edge: {problem}", file=sys.stderr)
        sup.log.event("startup_failed", config=str(sup.config_path), problems=[problem])
        return 1
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            if metrics_listeners:
                nursery.start_soon(serve_metrics, metrics_listeners, sup, sup.readiness)
            async with trio.open_nursery() as workers:
                for slot in sup.slots:
                    workers.start_soon(sup.run_slot, slot)

                async def announce() -> None:
                    await sup.all_ready.wait()
                    sup.log.event(
                        "gateway_started",
                        listeners=sup.bound,
                        workers=[s.pid for s in sup.slots],
                    )
                    sup.notifier.ready("serving")

                announcing = trio.CancelScope()

                async def announce_once() -> None:
                    with announcing:
                        await announce()

                workers.start_soon(announce_once)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        sup.begin_reload()
                        workers.start_soon(sup.finish_reload)
                        continue
                    # Workers drain and exit; their slots return once the
                    # last log line has been forwarded (no cancellation here).
                    await sup.stop()
                    announcing.cancel()
                    break
            nursery.cancel_scope.cancel()
    for sock in reservations:
        sock.close()
    sup.log.event("gateway_stopped")
    return 0


def supervise(config: Config, config_path: Path, log: EventLog, count: int) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; the exit status."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    try:
        if given:
            metrics_dir = Path(given)
            metrics_dir.mkdir(parents=True, exist_ok=True)
            # Values (and live-series lists) of a previous run.
            for stale in [*metrics_dir.glob("*.db"), *metrics_dir.glob("live_series_*.json")]:
                stale.unlink()
        else:
            metrics_dir = Path(tempfile.mkdtemp(prefix="edge-metrics-"))
    except OSError as exc:
        # A read-only root filesystem without a tmpfs: say what to do.
        where = given if given else "a temporary directory"
        problem = (
            f"--workers needs a writable folder for the workers' metrics, and {where} "
            f"cannot be used ({exc.strerror or exc}): mount a tmpfs on /tmp or set "
            "PROMETHEUS_MULTIPROC_DIR to a writable folder"
        )
        print(f"edge: {problem}", file=sys.stderr)
        log.event("startup_failed", config=str(config_path), problems=[problem])
        return 1
    try:
        return trio.run(_main, _Supervisor(config, config_path, log, count, metrics_dir))
    finally:
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def supervise_command(config_path: Path, log_format: LogFormat, count: int) -> int:
    """`edge run --workers N` (N > 1): check once, then supervise; the exit status."""
    from edge.run import load_or_report

    log = EventLog(log_format)
    config = load_or_report(config_path, log)
    if config is None:
        return 1
    # Fail here, once, as each worker would, not in N restarting workers.
    loaded = {}
    problems: list[str] = []
    for folder in policy_folders(config):
        try:
            loaded[folder] = load_policies(folder)
        except PolicyFolderError as exc:
            problems.append(str(exc))
    if not problems:
        problems = list(build_snapshot(config, loaded).problems)
    if problems:
        for problem in problems:
            print(f"edge: {problem}", file=sys.stderr)
        log.event("startup_failed", config=str(config_path), problems=problems)
        return 1
    return supervise(config, config_path, log, count)
