"""The engine loop in a process of its own, as vLLM V1 runs its engine core: what `servebench-serve` runs.

In one process the engine thread and the event loop share the GIL: at saturation the event loop turns
hundreds of updates a step into SSE chunks (~20 us of Python each), and the engine's launches wait behind
them (benchmarks/RESULTS.md, "Server at saturation"). Here the engine's process steps and detokenizes;
the server's process parses, tokenizes and streams. Commands go down one pipe, each pass of the engine loop's
StepReport (new tokens and text only) comes up the other, read by a thread that hands it to the event loop.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from servebench.engine.config import EngineArgs
from servebench.engine.lora import LoRARequest
from servebench.engine.server.async_engine import EngineLoop

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # for the engine process to finish its step and exit before it is killed


class _Ready(NamedTuple):
    """What the server's side needs of the engine, sent once it is built."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int
    clock: tuple[float, float]  # LLMEngine.now() and time.perf_counter() read at one moment


class EngineProcess:
    """Builds an LLMEngine(args) in a new process (`spawn`), with `loras` added; raises ValueError with the
    engine's own message if it cannot be built. Then start / submit / stop as an EngineThread."""

    def __init__(self, args: EngineArgs, loras: list[LoRARequest] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        commands_in, self._commands = ctx.Pipe(duplex=False)
        self._reports, reports_out = ctx.Pipe(duplex=False)
        # Not a daemon: the engine may start tensor-parallel workers of its own. It exits when told to, or
        # when this process's end of the command pipe closes.
        self.process = ctx.Process(target=_engine_main, args=(args, loras or [], commands_in, reports_out),
                                   name="engine-core")
        self.process.start()
        commands_in.close()
        reports_out.close()
        try:
            ready = self._reports.recv()
        except EOFError:
            self.process.join()
            ready = f"the engine process exited with code {self.process.exitcode} before it was ready"
        if isinstance(ready, str):
            self.process.join(STOP_TIMEOUT_S)
            raise ValueError(ready)
        self.tokenizer, self.max_model_len, self.vocab_size = ready.tokenizer, ready.max_model_len, \
            ready.vocab_size
        self._now0, self._perf0 = ready.clock
        self._reader: threading.Thread | None = None
        self._stopping = False

    def now(self) -> float:
        """The engine's clock (LLMEngine.now): perf_counter is the same monotonic clock in both processes."""
        return self._now0 + (time.perf_counter() - self._perf0)

    def start(self, deliver: Callable[[Any], None]) -> None:
        """Hand each report to `deliver` (in a reader thread); if the engine process dies, a RuntimeError."""
        def read() -> None:
            while True:
                try:
                    report = self._reports.recv()
                except (EOFError, OSError):
                    if not self._stopping:
                        self.process.join(STOP_TIMEOUT_S)
                        deliver(RuntimeError(f"the engine process died (exit code {self.process.exitcode})"))
                    return
                deliver(report)
                if isinstance(report, Exception):  # the engine loop died and said why: nothing follows
                    return

        self._reader = threading.Thread(target=read, name="engine-reports", daemon=True)
        self._reader.start()

    def submit(self, cmd: tuple | None) -> None:
        try:
            self._commands.send(cmd)
        except (BrokenPipeError, OSError):  # the engine process is gone; the reader says so
            pass

    def stop(self) -> None:
        self._stopping = True
        self.submit(None)
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            logger.warning("the engine process did not stop within %.0f s: killed", STOP_TIMEOUT_S)
            self.process.kill()
            self.process.join()
        self._commands.close()


def _engine_main(args: EngineArgs, loras: list[LoRARequest], commands: Connection,
                 reports: Connection) -> None:
    """The engine process: build the engine, say it is ready (or why not), then run its loop."""
    from servebench.engine.llm_engine import LLMEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then stops this process
    logging.basicConfig(level=logging.INFO)
    try:
        engine = LLMEngine(args)
        for lora in loras:  # checked now, loaded when a request first needs it
            engine.add_lora(lora)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        reports.send(str(e))
        return
    except Exception as e:
        logger.exception("the engine could not be built")
        reports.send(f"the engine could not be built: {e!r}")
        return
    reports.send(_Ready(engine.tokenizer, engine.max_model_len, engine.vocab_size,
                        (engine.now(), time.perf_counter())))

    def receive(block: bool) -> Any:
        if not block and not commands.poll():
            raise queue.Empty
        try:
            return commands.recv()
        except EOFError:  # the server is gone
            return None

    EngineLoop(engine, receive, reports.send).run()
