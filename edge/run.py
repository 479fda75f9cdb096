"""`edge run` with one process: load, start, serve until a signal, drain.

Owns the command's life in one process: loading the configuration (problems
on stderr and as ``startup_failed``, exit 1), starting the ``Gateway``,
turning SIGHUP into a reload and SIGTERM/SIGINT into a drain, and the exit
status. ``--workers N`` is chosen by the CLI (``edge.cli`` runs
``edge.workers.supervise``, whose workers each run this).

Must never: import ``edge.workers`` (the supervisor is the CLI's choice), or
exit before the drain finished.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import trio

from edge.core.config import Config, ConfigError, load_config
from edge.gateway import Gateway, StartupError
from edge.logs import EventLog, LogFormat
from edge.metrics import Metrics

__all__ = ["load_or_report", "run_command"]


def load_or_report(config_path: Path, log: EventLog) -> Config | None:
    """The configuration, or None after reporting why it cannot be used."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"edge: {problem}", file=sys.stderr)
        log.event("startup_failed", config=str(config_path), problems=list(exc.problems))
    except OSError as exc:
        print(f"edge: {config_path}: {exc.strerror or exc}", file=sys.stderr)
        log.event("startup_failed", config=str(config_path), problems=[str(exc)])
    return None


def _startup_failed(log: EventLog, config_path: Path, problem: str) -> int:
    print(f"edge: {problem}", file=sys.stderr)
    log.event("startup_failed", config=str(config_path), problems=[problem])
    return 1


def run_command(
    config_path: Path,
    log_format: LogFormat = "json",
    worker_listen: dict[str, tuple[str, int]] | None = None,
) -> int:
    """Load, start, serve until SIGTERM/SIGINT, drain; the exit status.

    ``worker_listen``: set in a ``--workers`` worker (where each listener
    binds, with SO_REUSEPORT); its log is JSON for the supervisor to read.
    """
    if worker_listen is not None:
        log_format = "json"
    log = EventLog(log_format)
    config = load_or_report(config_path, log)
    if config is None:
        return 1
    gateway = Gateway(config, log, Metrics())
    gateway.worker_listen = worker_listen
    try:
        gateway.load_policies()
    except StartupError as exc:
        return _startup_failed(log, config_path, str(exc))

    async def main() -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(gateway.run)
                except StartupError as exc:
                    return _startup_failed(log, config_path, str(exc))
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        gateway.request_reload()
                        continue
                    gateway.request_shutdown(signal.Signals(signum).name)
                    break
        return 0

    return trio.run(main)
