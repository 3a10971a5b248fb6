"""Serving inference from the resident model: one bounded queue, one worker, cancel by request id.

Door-agnostic: a door (MQTT, HTTP) turns a request into an :class:`InferJob` whose ``emit``
delivers :class:`~agent.protocol.InferChunk` s to whoever asked, and :meth:`InferenceServer.submit`
queues it or says the queue is full (the door answers ``busy``). Every door shares the one queue,
the one model and the same counters. A door cancels its own job by setting ``job.cancel`` (a
client that went away) or by request id (:meth:`InferenceServer.cancel`).

Per job: (1) skip it if it was cancelled while queued, (2) take the model lock and load the current
bundle if another one is resident, (3) stream: the first text at once (time to first token), later
text coalesced for ``chunk_interval`` so one message per token does not take CPU from the decode
loop on a 2-core device, (4) a final chunk with ``usage``, or with ``error`` when anything failed.

Invariant: the worker never dies. Whatever a job raises — the runtime, the store, or the door's
``emit`` itself while sending the failure chunk (a broken connection, a refused topic) — is logged
and counted, and the worker takes the next job.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent._counters import Counters
from agent.errors import EdgepackError, StoreError
from agent.protocol import InferChunk, InferRequest, error_code

if TYPE_CHECKING:
    from agent.resident import ResidentModel
    from agent.store import InstalledBundle

log = logging.getLogger("agent.serving")

ChunkSink = Callable[[InferChunk], None]


@dataclass
class InferJob:
    """One inference request and where its chunks go (``emit`` may raise; the server copes).

    Attributes:
        messages: the whole conversation for the chat template (``request.chat`` must be set);
            None: ``request.prompt`` is the one user turn (or the text to complete).
        on_start: told which bundle serves the job, once it is loaded and before the first
            token (a door that names the model in its answer); called on the worker thread.
        deadline: the server's monotonic clock past which nobody waits for the answer (an
            expired MQTT command): the job is then dropped unrun and unanswered, counted
            ``expired``. None: no deadline.
    """

    request: InferRequest
    emit: ChunkSink
    cancel: threading.Event = field(default_factory=threading.Event)
    messages: tuple[dict[str, str], ...] | None = None
    on_start: Callable[[InstalledBundle], None] | None = None
    deadline: float | None = None


class InferenceServer:
    """The inference worker and its bounded queue.

    Args:
        model: the resident model (shared with installs, which swap it between requests).
        current: returns the bundle that should serve now (None: nothing installed).
        queue_size: waiting requests before :meth:`submit` refuses.
        chunk_interval: seconds of text coalesced per chunk after the first; 0 = one per token.
        counters: ``infer_errors``, ``busy`` and ``expired`` are counted here.
        monotonic: the clock job deadlines are on.
    """

    def __init__(self, model: ResidentModel, current: Callable[[], InstalledBundle | None], *,
                 queue_size: int = 4, chunk_interval: float = 0.05,
                 counters: Counters | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self._monotonic = monotonic
        self._current = current
        self.queue_size = queue_size
        self.chunk_interval = chunk_interval
        self.counters = counters or Counters()
        self._queue: queue.Queue[InferJob | None] = queue.Queue(queue_size)
        self._jobs: dict[str, InferJob] = {}  # request_id -> queued or running job
        self._jobs_lock = threading.Lock()
        self._busy = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_usage: dict[str, Any] = {}

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="edgepack-infer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every queued and running job and stop the worker."""
        with self._jobs_lock:
            for job in self._jobs.values():
                job.cancel.set()
        self.model.cancel()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the running one)."""
        return self._queue.qsize()

    # --- requests --------------------------------------------------------------------------------

    def submit(self, job: InferJob) -> bool:
        """Queue a job; False (and ``busy`` counted) when the queue is full."""
        rid = job.request.request_id
        if rid:
            with self._jobs_lock:
                self._jobs[rid] = job
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._forget(job)
            self.counters.incr("busy")
            return False
        return True

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; False if no such request is known."""
        with self._jobs_lock:
            job = self._jobs.get(request_id)
        if job is None:
            return False
        # The serving loop checks this between tokens; a queued job is skipped when its turn comes.
        job.cancel.set()
        return True

    def _forget(self, job: InferJob) -> None:
        rid = job.request.request_id
        if rid:
            with self._jobs_lock:
                if self._jobs.get(rid) is job:
                    del self._jobs[rid]

    # --- the worker ------------------------------------------------------------------------------

    def _worker(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._serve(job)
            except Exception:  # the door could not even deliver the failure: keep serving others
                log.exception("an inference request failed and its answer could not be delivered")
                self.counters.incr("infer_errors")
            finally:
                self._forget(job)

    def _serve(self, job: InferJob) -> None:
        from agent.runtimes import GenerationParams

        req = job.request
        if job.cancel.is_set():
            job.emit(InferChunk(0, "", True, {"finish_reason": "cancelled", "completion_tokens": 0}))
            return
        if job.deadline is not None and self._monotonic() >= job.deadline:
            self.counters.incr("expired")
            log.info("dropped an expired inference request (it waited past its expiry)")
            return
        seq = 0
        self._busy.set()
        try:
            with self.model.lock:
                cur = self._current()
                if cur is None:
                    raise StoreError("no bundle is installed on this device")
                runtime = self.model.ensure(cur)
                if job.on_start is not None:
                    job.on_start(cur)
                params = GenerationParams(
                    max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                    top_k=req.top_k, repeat_penalty=req.repeat_penalty, stop=req.stop, seed=req.seed)
                pending, last_sent = "", 0.0
                prompt = job.messages if job.messages is not None and req.chat else req.prompt
                for chunk in runtime.stream(prompt, params, chat=req.chat):
                    if job.cancel.is_set():
                        runtime.cancel()
                    pending += chunk.text
                    if chunk.done:
                        usage = chunk.usage.to_dict() if chunk.usage else None
                        if usage:
                            self.last_usage = usage
                        job.emit(InferChunk(seq, pending, True, usage))
                        return
                    now = time.monotonic()
                    if pending and (seq == 0 or now - last_sent >= self.chunk_interval):
                        job.emit(InferChunk(seq, pending))
                        seq, pending, last_sent = seq + 1, "", now
        except EdgepackError as e:
            self.counters.incr("infer_errors")
            code = "no_model" if isinstance(e, StoreError) else error_code(e)
            job.emit(InferChunk.failure(seq, code, str(e)))
        except Exception as e:  # a bug in one request must not end serving
            log.exception("inference crashed")
            self.counters.incr("infer_errors")
            job.emit(InferChunk.failure(seq, "internal", f"internal error: {e}"))
        finally:
            self._busy.clear()


__all__ = ["ChunkSink", "InferJob", "InferenceServer"]
