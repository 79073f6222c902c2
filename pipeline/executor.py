"""Where build tasks run: in this process, in a local process pool, or on a Dask cluster.

Every executor offers the same two calls, so the build driver does not care which one it has:
    * ``map(fn, items)`` → results in item order (used to probe durations);
    * ``as_completed(fn, items)`` → ``(item, result)`` pairs as tasks finish (used for shards).
Tasks are plain module-level functions with picklable arguments.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from flexast.pipeline.errors import ConfigError
from flexast.pipeline.shard_task import DECODE_AHEAD


class InlineExecutor:
    """Runs tasks one after another in this process (``workers=1``: no start-up cost, easiest to debug)."""

    description = "in-process"

    def map(self, fn: Callable, items: list) -> list:
        return [fn(x) for x in items]

    def as_completed(self, fn: Callable, items: Iterable) -> Iterator:
        for x in items:
            yield x, fn(x)

    def close(self) -> None:
        pass


WATCH_INTERVAL_S = 0.5  # how often a pool worker checks that the build driver is still alive
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def driver_alive(pid: int) -> bool:
    """False once process ``pid`` has exited (a zombie awaiting its parent's wait counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (macOS): kill(0) is all there is
        return True


def _watch(pid: int) -> None:
    while driver_alive(pid):
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)  # the driver is gone: nobody will collect this shard; its temp file is cleaned by a rerun


def die_with_driver(driver_pid: int) -> None:
    """Pool initializer: end this worker when the build driver dies, even by SIGKILL (as the OOM killer sends).

    Without it, workers whose driver was killed go on writing shards nobody collects, then wait forever: they
    hold both ends of their task queue, and the fork server waits for them. On Linux the parent-death signal
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) ends a worker with its parent, the fork server; everywhere a daemon
    thread watches the driver's pid and exits within :data:`WATCH_INTERVAL_S`. Once the workers are gone, the
    fork server (at EOF on its pipe from the driver) and multiprocessing's resource tracker exit too.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog alone
            pass
    threading.Thread(target=_watch, args=(driver_pid,), name="flexast-driver-watch", daemon=True).start()


class ProcessExecutor:
    """A local pool of ``workers`` processes.

    Workers are forked from a fresh fork server that has imported :mod:`pipeline.worker_preload` once (torch,
    the task module, the compiled numba kernel), so they start fast and never inherit this process's threads
    (forking a process with live torch thread pools can deadlock). Where fork servers do not exist (Windows,
    macOS defaults), workers are spawned. Workers exit when the driver dies (:func:`die_with_driver`).
    """

    def __init__(self, workers: int):
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self.description = f"{workers} local processes"
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["flexast.pipeline.worker_preload"])
        else:
            ctx = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=die_with_driver, initargs=(os.getpid(),)
        )

    def map(self, fn: Callable, items: list) -> list:
        return list(self.pool.map(fn, items))

    def as_completed(self, fn: Callable, items: Iterable) -> Iterator:
        from concurrent.futures import as_completed

        futures = {self.pool.submit(fn, x): x for x in items}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """A Dask cluster: ``tcp://host:port`` (an existing scheduler) or ``local:N`` (a new ``LocalCluster``).

    ``local:N`` starts N worker processes with one thread each; the cluster is closed with the executor.
    """

    def __init__(self, address: str):
        from distributed import Client

        self.cluster = None
        if address.startswith("local"):
            _, _, n = address.partition(":")
            try:
                n_workers = int(n) if n else (os.cpu_count() or 1)
            except ValueError as exc:
                raise ConfigError(f"--dask {address!r}: expected 'local:N' with N an integer") from exc
            self.cluster = _local_cluster(n_workers)
            self.client = Client(self.cluster)
        else:
            self.client = Client(address)
        self.description = f"Dask {address} ({len(self.client.scheduler_info()['workers'])} workers)"

    def map(self, fn: Callable, items: list) -> list:
        futures = self.client.map(fn, items, pure=False)
        return self.client.gather(futures)

    def as_completed(self, fn: Callable, items: Iterable) -> Iterator:
        from distributed import as_completed

        items = list(items)
        futures = self.client.map(fn, items, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in as_completed(futures):
            yield items[index[fut.key]], fut.result()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def timed_call(fn_and_item: tuple[Callable, object]) -> tuple[object, float, int]:
    """``(fn(item), CPU seconds it took in the worker process, worker pid)``: for benchmarks and diagnostics."""
    fn, item = fn_and_item
    start = time.process_time()
    result = fn(item)
    return result, time.process_time() - start, os.getpid()


def _local_cluster(n_workers: int):
    """A LocalCluster of ``n_workers`` single-threaded processes, forked from a fork server that has imported
    distributed and :mod:`pipeline.worker_preload` once, where fork servers exist; spawned otherwise."""
    import dask
    from distributed import LocalCluster

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context().set_forkserver_preload(["distributed", "flexast.pipeline.worker_preload"])
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)


def default_decode_ahead(executor) -> int:
    """Clips a shard task decodes ahead (and writes behind) on background threads: 2 where a core is free for
    them or reads wait on storage (in-process, Dask), 0 where local workers already fill every core (measured
    slower there)."""
    workers = getattr(executor, "workers", None)
    return 0 if workers is not None and workers >= (os.cpu_count() or 1) else DECODE_AHEAD


def make_executor(workers: int | None = None, dask: str | None = None):
    """Executor for ``dask`` if given, else ``workers`` local processes (default: CPU count; 1 runs inline)."""
    if dask:
        return DaskExecutor(dask)
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"workers={workers} must be >= 1")
    return InlineExecutor() if workers == 1 else ProcessExecutor(workers)
