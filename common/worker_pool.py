"""Pools of worker processes for work spread over the cores (face preparation, ``facefl anonymize``).

Workers are forked from multiprocessing's fork server, a fresh single-threaded interpreter that imports the modules
named in ``preload`` (and so torch) once: forking a process that has imported torch and may run its threads is
unsafe, and "spawn" imports torch again in every worker of every pool. Time to a 2-worker pool's first dlib chips on
2 quiet cores: "spawn" 2.4 s every time (+0.7 s to shut down), "forkserver" 2.7 s for the first pool, then 0.55 s.

Each worker takes the parent's environment of now (the fork server holds the one it started with), runs torch on one
thread, leaves Ctrl-C to the parent (which cancels the work and stops it), and exits by itself when the parent is
killed outright.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

START_METHOD = "forkserver"


def available_cores() -> int:
    """Cores this process may use: 1 in a daemonic process (which may not start children), the CPUs a Ray task or
    actor holds inside one, else every core of its affinity mask."""
    if multiprocessing.current_process().daemon:
        return 1
    held = _ray_cpus()
    if held is not None:
        return held
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _ray_cpus() -> int | None:
    """The CPUs a Ray task or actor running this code holds (at least 1); None outside Ray's workers."""
    ray = sys.modules.get("ray")
    if ray is None:
        return None
    try:
        if not ray.is_initialized():
            return None
        context = ray.get_runtime_context()
        if context.worker.mode != ray.WORKER_MODE:  # the driver: every core is its own
            return None
        return max(1, int(context.get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001  (an unexpected Ray version: be conservative)
        return 1


def pool_context(preload: Sequence[str] = ()):
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":  # no effect once this process's fork server runs
        context.set_forkserver_preload(["__main__", __name__, *preload])
    return context


def start_pool(workers: int, *, preload: Sequence[str] = (), initializer: Callable | None = None,
               initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes (started lazily, on the first task); ``initializer(*initargs)`` runs in each
    after the common set-up (:func:`worker_init`)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=pool_context(preload), initializer=worker_init,
                               initargs=(os.getpid(), dict(os.environ), initializer, initargs))


def worker_init(parent_pid: int, environ: dict[str, str], initializer: Callable | None = None,
                initargs: tuple = ()) -> None:
    """Start a worker: the parent's environment of now, one thread for torch, Ctrl-C left to the parent, exit when
    the parent is gone; then ``initializer(*initargs)``."""
    import torch

    os.environ.clear()
    os.environ.update(environ)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cancels the work and stops the workers
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent_pid, os.getppid()), daemon=True,
                     name="facefl-parent-watch").start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(parent_pid: int, ppid: int) -> None:
    """A killed parent (SIGKILL, SIGTERM) cannot stop its workers: they stop themselves once it is gone."""
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(1)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except OSError:
            pass


def stop_pool(executor: ProcessPoolExecutor) -> None:
    """Cancel the pending tasks and end the workers now (tasks in flight are abandoned), leaving no process behind."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)
