"""The scheduler: a bounded queue of work, dynamic batching, and the inference worker threads.

Requests become jobs; a worker thread takes work from the queues round-robin and runs one engine
call at a time over the next rows of several jobs:
  encode / decode  the next images or latents of queued jobs, up to a call's row limit
  score            the next chunk of importance samples of up to a call's image limit, from the jobs
                   with the least work left first
So concurrent requests share engine calls (dynamic batching), a long /score never blocks encodes for
more than one call, and a cancelled job (client gone, deadline passed) stops within one call.
Admission control counts work in importance samples (an encoded or decoded image counts 1) and in time:
past `max_queued_samples` (the memory bound), or when, at each operation's measured engine cost, the new
work would be done later than `queue_deadline_fraction` of the request's deadline (the latency bound; see
_admit_by_time), submit raises Overloaded (503, Retry-After). Health and metrics never touch these threads.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import Cancelled, DeadlineExceeded, NotReady, Overloaded, ServiceError
from service.metrics import Metrics
from service.repository import ModelVersion
from service.scoring import ImageTask, run_call
from service.settings import Settings

log = logging.getLogger("vae_serve")


class EngineFailure(RuntimeError):
    """An engine call raised; the job fails with a 500 and the error is logged."""


@dataclass(eq=False)
class Job:
    op: str  # "encode", "decode" or "score"
    mv: ModelVersion
    work: int  # importance samples (or images) this job asks for
    deadline: float  # time.monotonic() after which the work stops
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancelled: str | None = None  # "client" or "deadline": set from the event loop, read by workers
    failed: bool = False
    done: bool = False
    remaining_work: int = 0
    key: tuple[str, str, str] = ("", "", "")  # its queue: (model, manifest digest, operation)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        finish_all([(self, result, error)])


def finish_all(finished: list[tuple[Job, Any, BaseException | None]]) -> None:
    """Settle each (job, result, error) with one call into each waiting event loop, not one a job (under
    batching one engine call completes many jobs; each wake-up of the loop is a hand-off between threads)."""
    by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list[tuple[Job, Any, BaseException | None]]]] = {}
    for item in finished:
        item[0].done = True
        by_loop.setdefault(id(item[0].loop), (item[0].loop, []))[1].append(item)

    def settle(items: list[tuple[Job, Any, BaseException | None]]) -> None:
        for job, result, error in items:
            if job.future.done():
                continue
            if job.cancelled:  # nobody waits for it any more: no result, no unretrieved exception
                job.future.cancel()
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    for loop, items in by_loop.values():
        try:
            loop.call_soon_threadsafe(settle, items)
        except RuntimeError:  # the waiters' event loop has closed: nobody is left to tell
            pass


@dataclass(eq=False)
class RowsJob(Job):
    """encode or decode: rows of `inputs` go through one graph, in as many calls as the row limit needs."""

    inputs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dispatched: int = 0
    completed: int = 0
    outputs: list[Any] = field(default_factory=list)
    post: Callable[[tuple[np.ndarray, ...], int], tuple[np.ndarray, ...]] | None = None  # (slice, first row) -> kept

    @property
    def n(self) -> int:
        return len(self.inputs)


@dataclass(eq=False)
class ScoreJob(Job):
    tasks: list[ImageTask] = field(default_factory=list)
    in_flight: set[int] = field(default_factory=set)


@dataclass(eq=False)
class Backlog:
    """The work queued for one queue (an operation of a model version), priced when asked."""

    mv: ModelVersion
    op: str
    work: int = 0

    def seconds(self) -> float:
        """Its engine time at the operation's current cost a unit (timed at load, then over engine calls)."""
        return self.work * self.mv.unit_seconds.get(self.op, 0.0)


#: A worker gives freed heap back to the system once it has had no work for this long. Not after every
#: call: under steady traffic the next call would page the same memory in again (a K=1000 digits score
#: paid ~1 ms of it at concurrency 1, README Performance).
TRIM_AFTER_IDLE_S = 0.5


def _trim_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise), so RSS returns near idle after load."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Scheduler:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self._queues: dict[tuple[str, str, str], deque[Job]] = {}
        self._order: list[tuple[str, str, str]] = []
        self._next = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        # queue with work -> its work (importance samples, or images), priced at the operation's current
        # engine time a unit when asked: the cost of a unit moves with the load (under overload the event
        # loop's share of the CPU doubled it on 2 cores), and work admitted at the old price drains at the new
        self._backlog: dict[tuple[str, str, str], Backlog] = {}
        self.busy_workers = 0
        # read when /metrics is scraped, not set on every submission and engine call (two locked sets on
        # each request's path, for a value that is only looked at once a scrape)
        metrics.queued_work.set_function(lambda: self._locked(lambda: self.queued_work))
        metrics.queued_seconds.set_function(lambda: self._locked(self.drain_seconds))

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.settings.inference_workers):
            t = threading.Thread(target=self._worker, name=f"vae-infer-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            for dq in self._queues.values():
                for job in dq:
                    self._fail(job, NotReady("the service is shutting down; retry on another replica"))
                dq.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    # --- submission (event loop thread) -------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise Overloaded("the service is shutting down", retry_after=5)
            key = (job.mv.key, job.mv.digest, job.op)
            unit = job.mv.unit_seconds.get(job.op, 0.0)
            limit = self.settings.max_queued_samples
            if self.queued_work + job.work > limit:
                self._refuse(
                    job,
                    f"the server is at capacity ({self.queued_work} of {limit} importance samples queued); "
                    "retry later or send less work per request",
                    self.drain_seconds(),
                )
            if self.settings.queue_deadline_fraction and self._backlog and unit:
                self._admit_by_time(job, key, unit)
            job.key = key
            job.remaining_work = job.work
            if key not in self._backlog:
                self._backlog[key] = Backlog(job.mv, job.op)
            self._backlog[key].work += job.work
            if key not in self._queues:
                self._queues[key] = deque()
                self._order.append(key)
            self._queues[key].append(job)
            self._cond.notify()

    def _admit_by_time(self, job: Job, key: tuple[str, str, str], unit: float) -> None:
        """Refuse (Overloaded) work that would be done later than queue_deadline_fraction of its deadline.

        Score calls serve the queued request with the least work left first (_take_score), so new work of
        w samples is done after the queued requests with at most w left, its own w, and the other queues'
        work: a small request is not refused for a long queue of large ones, and work admitted later, if
        no smaller, does not delay it. Nor may new work delay a queued request with more left than w (served
        after it) past twice the fraction of the time to that request's deadline: smaller work cannot
        starve a large request into its deadline (with the fraction at 0.25, the large one would still
        be done at half its time left, room for the estimate being 2x short). Encode and decode calls take
        the queued rows in order, many requests a call (finish_seconds). The fraction leaves room for the
        cost a unit moving with the load (under overload on 2 cores it doubled)."""
        fraction, workers = self.settings.queue_deadline_fraction, self.settings.inference_workers
        now = time.monotonic()
        budget = fraction * (job.deadline - now)
        cost = job.work * unit / workers

        def late(done: float) -> None:
            if done > budget:  # one that cannot fit even alone waits for an empty queue
                self._refuse(
                    job,
                    f"the server is at capacity (this request would be done in ~{done:.1f} s, ~{cost:.1f} s of it "
                    f"its own work, past {fraction:g} of its deadline); retry later, send less work per request, "
                    "or allow a larger timeout_s",
                    done - budget if cost <= budget else self.drain_seconds(),
                )

        if job.op != "score" or key not in self._backlog:
            late(self.finish_seconds(key, cost))
            return
        own = self._backlog[key]
        other = self.drain_seconds() - own.seconds() / workers
        queued = self._by_work_left(self._queues.get(key, ()))
        ahead = bisect.bisect_right(queued, job.work, key=lambda q: q.remaining_work)  # no larger: served first
        before = sum(j.remaining_work for j in queued[:ahead])
        late((before + job.work) * unit / workers + other)
        slack = min(1.0, 2 * fraction)
        for j in queued[ahead:]:
            before += j.remaining_work  # served after it, each done after the work up to it and the new work
            done = (before + job.work) * unit / workers + other
            if done > slack * (j.deadline - now):
                self._refuse(
                    job,
                    f"the server is at capacity (this request would be served before a queued one that is due in "
                    f"~{done - cost:.1f} s, and delay it past {slack:g} of its time left); retry later",
                    done - cost,
                )

    @staticmethod
    def _by_work_left(jobs: Any) -> list[ScoreJob]:
        """Live score jobs in the order their images are served: least work left first, then by arrival."""
        live = [j for j in jobs if isinstance(j, ScoreJob) and not j.cancelled and not j.failed]
        return sorted(live, key=lambda j: j.remaining_work)  # stable: the queue is in arrival order

    def _refuse(self, job: Job, message: str, wait_s: float) -> None:
        self.metrics.rejected.labels(job.op).inc()
        raise Overloaded(message, retry_after=math.ceil(wait_s))

    @property
    def queued_work(self) -> int:
        """Work (importance samples; an encoded or decoded image counts 1) queued or running."""
        return sum(b.work for b in self._backlog.values())

    def drain_seconds(self) -> float:
        """Estimated time until the queued work is done, at each operation's measured engine cost."""
        return sum(b.seconds() for b in self._backlog.values()) / self.settings.inference_workers

    def finish_seconds(self, key: tuple[str, str, str], cost: float) -> float:
        """Estimated time until new work of `cost` seconds in queue `key` is done: after everything queued,
        or, as the worker takes calls round-robin over the queues with work, after its queue's work with
        the other queues taking turns, whichever is less (an encode does not wait for a long score queue)."""
        own = self._backlog.get(key)
        queues = len(self._backlog) + (own is None)
        own_s = own.seconds() / self.settings.inference_workers if own else 0.0
        return min(self.drain_seconds() + cost, queues * (own_s + cost))

    def _locked(self, read: Callable[[], float]) -> float:
        with self._cond:
            return read()

    # --- the worker ---------------------------------------------------------------------------
    def _live(self, job: Job) -> bool:
        if job.cancelled or job.failed:
            return False
        if time.monotonic() > job.deadline:
            job.cancelled = "deadline"
            return False
        return True

    def _release(self, job: Job, work: int) -> None:
        work = min(work, job.remaining_work)
        job.remaining_work -= work
        backlog = self._backlog.get(job.key)
        if backlog is not None:
            backlog.work -= work
            if backlog.work <= 0:
                del self._backlog[job.key]

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.failed:
            return
        job.failed = True
        self._release(job, job.remaining_work)
        job.finish(error=error)

    def _drop_dead(self, dq: deque[Job]) -> None:
        for job in list(dq):
            if not self._live(job):
                dq.remove(job)
                if job.cancelled == "deadline":
                    err: ServiceError = DeadlineExceeded(
                        "the request's deadline passed before its work was done", "timeout_s"
                    )
                else:
                    err = Cancelled("the client went away")
                self._fail(job, err)

    def _ready_at(self, dq: deque[Job], now: float) -> float:
        """When the queue's next call should run: now, or later while `batch_max_wait_ms` holds back a call
        that is not full for requests still to come (from the arrival of the call's first request)."""
        wait = self.settings.batch_max_wait_ms / 1000.0
        head = dq[0]
        if not wait or not self.settings.batching or head.started is not None or self._stopping:
            return now
        ready = head.enqueued + wait
        if ready <= now:
            return now
        if head.op == "score":
            assert isinstance(head, ScoreJob)
            limit = self._score_call_images(head.mv, head.tasks[0].next_len())
            queued = sum(len(j.tasks) for j in dq if isinstance(j, ScoreJob) and j.started is None)
        else:
            limit = self._rows_call_limit(head)
            queued = sum(j.n - j.dispatched for j in dq if isinstance(j, RowsJob))
        return now if queued >= limit else ready

    def _rows_call_limit(self, job: Job) -> int:
        """Most rows an encode or decode engine call takes."""
        return self.settings.batch_max_rows if job.op == "encode" else job.mv.decode_rows_per_call

    @staticmethod
    def _score_call_images(mv: ModelVersion, length: int) -> int:
        """Most images a scoring call takes at a chunk of `length` samples."""
        return max(1, mv.score_call_rows // length)

    def _take(self) -> tuple[str, Any] | float | None:
        """Under the lock: the next engine call's work, round-robin over the queues with work; or, when
        every queue with work is holding its call back for more requests, the time the first is due."""
        now = time.monotonic()
        due: float | None = None
        for _ in range(len(self._order)):
            key = self._order[self._next % len(self._order)]
            self._next += 1
            dq = self._queues[key]
            self._drop_dead(dq)
            if not dq:
                continue
            ready = self._ready_at(dq, now)
            if ready > now:
                due = ready if due is None else min(due, ready)
                continue
            op = key[2]
            picked: Any
            if op == "score":
                picked = self._take_score(dq)
            else:
                picked = self._take_rows(dq)
            if picked:
                return op, picked
        if due is not None:
            return due
        # forget empty queues of versions no longer queued for
        self._order = [k for k in self._order if self._queues[k]]
        self._queues = {k: self._queues[k] for k in self._order}
        self._next = 0
        return None

    def _take_rows(self, dq: deque[Job]) -> list[tuple[RowsJob, int, int]] | None:
        limit = self._rows_call_limit(dq[0])
        parts: list[tuple[RowsJob, int, int]] = []
        rows = 0
        while dq and rows < limit:
            job = dq[0]
            assert isinstance(job, RowsJob)
            take = min(job.n - job.dispatched, limit - rows)
            parts.append((job, job.dispatched, job.dispatched + take))
            job.dispatched += take
            rows += take
            if job.started is None:
                job.started = time.monotonic()
                self.metrics.child(self.metrics.queue_seconds, job.op).observe(job.started - job.enqueued)
            if job.dispatched == job.n:
                dq.popleft()
            if not self.settings.batching:
                break
        return parts or None

    def _take_score(self, dq: deque[Job]) -> list[tuple[ScoreJob, int]] | None:
        """Images for the next call, from the queued job with the least work left first (shortest remaining
        work first: a small request is not held up behind a large one, requests of one size finish in
        arrival order rather than all together at the end, and one admitted later, if no smaller, does
        not delay those before it), all with the same chunk length, up to the rows the scoring engine
        takes a call (images with K below the chunk size share a call by their rows, not by a count of
        images)."""
        mv = dq[0].mv
        jobs = self._by_work_left(dq)
        if not self.settings.batching:
            jobs = jobs[:1]
        picked: list[tuple[ScoreJob, int]] = []
        call, limit = None, 0  # of the first image not finished nor in flight
        for job in jobs:
            for i, t in enumerate(job.tasks):
                if t.finished or i in job.in_flight:
                    continue
                if call is None:
                    call = t.next_call()
                    limit = self._score_call_images(mv, call[0])
                if t.next_call() == call:
                    picked.append((job, i))
                    if len(picked) == limit:
                        break
            if picked and len(picked) == limit:
                break
        for job, i in picked:
            job.in_flight.add(i)
            if job.started is None:
                job.started = time.monotonic()
                self.metrics.child(self.metrics.queue_seconds, "score").observe(job.started - job.enqueued)
        return picked or None

    def _worker(self) -> None:
        idle_trimmed = True
        last_work = time.monotonic()
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    taken = self._take()
                    if isinstance(taken, float):  # a call held back for more requests: wait until it is due
                        self._cond.wait(max(taken - time.monotonic(), 0.0))
                        continue
                    if taken is not None:
                        break
                    if not idle_trimmed and self.queued_work == 0:
                        wait = last_work + TRIM_AFTER_IDLE_S - time.monotonic()
                        if wait > 0:
                            self._cond.wait(wait)  # woken early by new work, which then comes first
                            continue
                        idle_trimmed = True
                        self._cond.release()
                        try:
                            _trim_memory()
                        finally:
                            self._cond.acquire()
                        continue
                    self._cond.wait()
                self.busy_workers += 1
            idle_trimmed = False
            op, work = taken
            started = time.monotonic()
            rows = 0
            try:
                rows = self._run_score(work) if op == "score" else self._run_rows(op, work)
            finally:
                last_work = time.monotonic()
                with self._cond:
                    self.busy_workers -= 1
                    self._learn_cost(op, work[0][0].mv, rows, last_work - started)

    @staticmethod
    def _learn_cost(op: str, mv: ModelVersion, rows: int, seconds: float) -> None:
        """Fold one engine call (its rows, its time in the worker) into the version's engine time a unit of
        the operation's work: a moving average from the load-time figure (under the scheduler's lock)."""
        if rows <= 0:
            return
        unit = max(seconds, 1e-7) / rows
        known = mv.unit_seconds.get(op)
        mv.unit_seconds[op] = unit if not known else 0.8 * known + 0.2 * unit

    def _run_rows(self, op: str, parts: list[tuple[RowsJob, int, int]]) -> int:
        mv = parts[0][0].mv
        inputs = np.concatenate([job.inputs[a:b] for job, a, b in parts])
        self.metrics.child(self.metrics.batch_rows, op).observe(len(inputs))
        t0 = time.perf_counter()
        try:
            out = mv.ref.encode(inputs) if op == "encode" else mv.ref.decode(inputs)
        except Exception:  # noqa: BLE001
            log.exception("%s engine call failed on %s", op, mv.key)
            with self._cond:
                for job, _, _ in parts:
                    self._fail(job, EngineFailure(f"{op} failed"))
            return 0  # a failed call says nothing about the cost of work
        self.metrics.child(self.metrics.engine_seconds, op, mv.ref.info.label).observe(time.perf_counter() - t0)
        outs = out if isinstance(out, tuple) else (out,)
        pieces = []
        offset = 0
        for job, a, b in parts:  # post-processing runs outside the lock
            piece = tuple(o[offset : offset + b - a] for o in outs)
            offset += b - a
            pieces.append(job.post(piece, a) if job.post else piece)
        finished: list[tuple[Job, Any, BaseException | None]] = []
        with self._cond:
            for (job, a, b), piece in zip(parts, pieces):
                if job.failed:
                    continue
                job.outputs.append(piece)
                job.completed += b - a
                self._release(job, b - a)
                if job.completed == job.n:
                    whole = piece if len(job.outputs) == 1 else tuple(np.concatenate(o) for o in zip(*job.outputs))
                    finished.append((job, whole, None))
            finish_all(finished)
        return len(inputs)

    def _run_score(self, picked: list[tuple[ScoreJob, int]]) -> int:
        mv = picked[0][0].mv
        tasks = [job.tasks[i] for job, i in picked]
        self.metrics.child(self.metrics.batch_rows, "score").observe(len(tasks) * tasks[0].next_len())
        t0 = time.perf_counter()
        try:
            rows = run_call(mv.scoring.engine, tasks, mv.noise_dim, pixel_engine=mv.pixel_engine, llr_engine=mv.ref)
        except Exception:  # noqa: BLE001
            log.exception("score engine call failed on %s", mv.key)
            with self._cond:
                for job, i in picked:
                    job.in_flight.discard(i)
                    self._fail(job, EngineFailure("scoring failed"))
            return 0
        self.metrics.child(self.metrics.engine_seconds, "score", mv.scoring.info.label).observe(
            time.perf_counter() - t0
        )
        with self._cond:
            touched: dict[int, ScoreJob] = {}
            for job, i in picked:
                job.in_flight.discard(i)
                if not job.failed:
                    self._release(job, rows // len(tasks))
                    touched[id(job)] = job
            finished: list[tuple[Job, Any, BaseException | None]] = []
            for job in touched.values():  # settle after every release, so waiters see the queue as it is
                if all(t.finished for t in job.tasks) and not job.done:
                    dq = self._queues.get((mv.key, mv.digest, "score"))
                    if dq is not None and job in dq:
                        dq.remove(job)
                    finished.append((job, job.tasks, None))
            finish_all(finished)
        return rows
