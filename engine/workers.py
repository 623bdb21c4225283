"""The tensor-parallel ranks 1..N-1 of an engine: one spawned process each, holding its shard of the model.

The engine's process is rank 0: it runs the one scheduler, and its ModelRunner sends every step to the
other ranks through a pipe each (`Workers.send`) before running its own shard; the forward's collectives keep
the ranks in step, and rank 0 alone samples. A rank whose pipe closes (the engine shut down, crashed or was
killed) leaves its loop and exits, so no process outlives the engine; processes are also daemons, ended when
the engine's process exits. Spawned, not forked (CUDA cannot be forked): a script that builds a
tensor-parallel engine needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import traceback
import weakref
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist
from servebench.engine.config import EngineArgs, ModelConfig
from servebench.engine.core.config import CacheConfig, SchedulerConfig
from servebench.engine.model_runner import ModelRunner, ShardStep
from servebench.engine.parallel import TensorParallel, free_port, init_distributed

JOIN_S = 10.0  # how long shutdown waits for a rank to leave before it is terminated


class Workers:
    """Start ranks 1..args.tensor_parallel_size - 1 and join their process group as rank 0 (the group forms
    once each has joined); `stop` (also at garbage collection and exit) ends them."""

    def __init__(self, args: EngineArgs, cfg: ModelConfig, sched: SchedulerConfig, cache: CacheConfig
                 ) -> None:
        if dist.is_initialized():  # torch.distributed has one default group a process
            raise ValueError("this process already runs a tensor-parallel engine: shut it down first "
                             "(LLMEngine.shutdown) or run the other engine in another process")
        size, port = args.tensor_parallel_size, free_port()
        ctx = mp.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs: list[BaseProcess] = []
        # Before any start: ranks already started when a later one fails to are ended too.
        self._stop = weakref.finalize(self, _stop, self._pipes, self._procs)
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, size, port, args, cfg, sched, cache, theirs),
                               name=f"servebench-tp{rank}", daemon=True)
            proc.start()
            theirs.close()  # the rank's end only: its recv fails once ours closes
            self._pipes.append(ours)
            self._procs.append(proc)
        try:
            init_distributed(0, size, port, args.torch_device)
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids, rank 1 first."""
        return [proc.pid for proc in self._procs]

    @property
    def running(self) -> bool:
        return self._stop.alive

    def send(self, step: ShardStep) -> None:
        if not self.running:
            raise RuntimeError("the tensor-parallel ranks are stopped (LLMEngine.shutdown, or a failed "
                               "step): build a new engine")
        for pipe in self._pipes:
            pipe.send(step)

    def failure(self) -> str | None:
        """What a rank that failed sent before it exited (its traceback), if any did."""
        for pipe in self._pipes:
            try:
                if pipe.poll():
                    return pipe.recv()
            except (EOFError, OSError):
                continue
        return None

    def stop(self) -> None:
        self._stop()


def _stop(pipes: list[Connection], procs: list[BaseProcess]) -> None:
    for pipe in pipes:
        with contextlib.suppress(OSError):  # that rank is gone already
            pipe.send(None)
        pipe.close()
    if dist.is_initialized():  # before the joins: a communicator's teardown may wait for its peers'
        dist.destroy_process_group()
    for proc in procs:
        proc.join(JOIN_S)
        if proc.is_alive():
            proc.terminate()
            proc.join(JOIN_S)


def worker_main(rank: int, size: int, port: int, args: EngineArgs, cfg: ModelConfig, sched: SchedulerConfig,
                cache: CacheConfig, pipe: Connection) -> None:
    """Rank `rank`'s process: build its ModelRunner (in step with the others' collectives), then run each
    step rank 0 sends until it sends None or its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle: it then ends the ranks
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))  # the ranks share the host's cores
    try:
        init_distributed(rank, size, port, args.torch_device)
        runner = ModelRunner(args, cfg, sched, cache, TensorParallel(rank, size))
        while (step := _next_step(pipe)) is not None:
            runner.run_shard(step)
    except BaseException:
        with contextlib.suppress(OSError):
            pipe.send(traceback.format_exc())  # for rank 0's error (Workers.failure)
        os._exit(1)
    dist.destroy_process_group()


def _next_step(pipe: Connection) -> ShardStep | None:
    try:
        return pipe.recv()
    except (EOFError, OSError):  # rank 0's process ended: no collective can complete, so no teardown either
        os._exit(0)
