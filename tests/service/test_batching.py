"""Per-image determinism, dynamic batching, admission control and deadlines, at the core and over HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import generate_latest

from service.batching import Scheduler
from service.core import InferenceCore, RequestContext
from service.errors import DeadlineExceeded, Overloaded
from service.metrics import Metrics
from service.repository import ModelRepository
from service.settings import Settings
from tests.service.conftest import error_of, make_client, metric_value


def _calls(core: InferenceCore, op: str) -> tuple[float, float]:
    """(rows, engine calls) of `op` so far, from the rows-per-call histogram."""
    rows = core.metrics.batch_rows.labels(op)
    return rows._sum.get(), sum(b.get() for b in rows._buckets)


def make_core(models_dir, start: bool = True, **overrides) -> InferenceCore:
    settings = Settings(models_dir=models_dir, intra_op_threads=1, **overrides)
    metrics = Metrics()
    repo = ModelRepository(settings)
    repo.scan()
    scheduler = Scheduler(settings, metrics)
    if start:
        scheduler.start()
    return InferenceCore(settings, repo, scheduler, metrics)


@pytest.mark.parametrize("engine", ["onnxruntime", "auto"])
def test_an_images_score_depends_only_on_itself(models_dir, test_images, engine):
    """Alone, duplicated, at several positions, and batched with other requests: the same numbers, exactly."""
    core = make_core(models_dir, engine=engine, engine_memory_mb=8)  # small calls: chunks and images split
    mv = core.model(None, None)
    x = test_images.reshape(len(test_images), -1).astype(np.int64)
    target = x[7]

    async def run() -> list:
        ctx = RequestContext.start(core.settings, None)
        alone = await core.score(mv, target[None], 1300, 4, "nll_bpd", None, ctx)
        dup = await core.score(mv, np.stack([target, x[1], target, target]), 1300, 4, "nll_bpd", None, ctx)
        mixed = await core.score(mv, np.concatenate([x[:20], target[None], x[20:30]]), 1300, 4, "nll_bpd", None, ctx)
        concurrent = await asyncio.gather(
            *[core.score(mv, np.stack([x[i], target]), 1300, 4, "nll_bpd", None, ctx) for i in range(12)]
        )
        return [alone.log_likelihood[0], *dup.log_likelihood[[0, 2, 3]], mixed.log_likelihood[20]] + [
            c.log_likelihood[1] for c in concurrent
        ]

    values = asyncio.run(run())
    assert len(set(values)) == 1, values
    core.scheduler.stop()
    text = core.metrics.batch_rows.labels("score")._sum.get()
    assert text > 0


def test_concurrent_requests_share_engine_calls(models_dir, test_images):
    core = make_core(models_dir, engine="onnxruntime")
    mv = core.model(None, None)
    x = test_images.reshape(len(test_images), -1).astype(np.int64)

    async def run() -> None:
        ctx = RequestContext.start(core.settings, None)
        await asyncio.gather(*[core.encode(mv, x[i : i + 1], ctx) for i in range(200)])

    asyncio.run(run())
    core.scheduler.stop()
    rows, calls = _calls(core, "encode")
    assert rows == 200 and calls < 200  # 200 images in fewer calls than requests


@pytest.mark.parametrize("op", ["encode", "decode", "score"])
def test_max_wait_holds_a_call_back_for_requests_still_to_come(models_dir, test_images, op):
    """batch_max_wait_ms: a lone request waits for the next one (up to the wait), and both share one call."""
    core = make_core(models_dir, engine="onnxruntime", batch_max_wait_ms=400)
    mv = core.model(None, None)
    x = test_images.reshape(len(test_images), -1).astype(np.int64)
    z = np.zeros((2, mv.latent_dim), dtype=np.float32)

    def request(i: int, ctx: RequestContext):
        if op == "encode":
            return core.encode(mv, x[i : i + 1], ctx)
        if op == "decode":
            return core.decode(mv, z[i : i + 1], "mean", 0, ctx)
        return core.score(mv, x[i : i + 1], 100, 0, None, None, ctx)

    async def run() -> float:
        ctx = RequestContext.start(core.settings, None)
        t0 = time.monotonic()
        first = asyncio.ensure_future(request(0, ctx))
        await asyncio.sleep(0.1)  # the first is queued, held back: nothing has been computed yet
        assert not first.done() and _calls(core, op)[1] == 0
        await asyncio.gather(first, request(1, ctx))
        return time.monotonic() - t0

    elapsed = asyncio.run(run())
    core.scheduler.stop()
    rows = 200 if op == "score" else 2  # score: 2 images x K=100 rows
    assert _calls(core, op) == (rows, 1)  # both requests in one engine call
    assert elapsed < 5  # held for the wait (0.4 s), not longer


@pytest.mark.parametrize("overrides", [{"batch_max_rows": 4}, {"batching": False}])
def test_max_wait_does_not_hold_a_full_call_or_a_request_when_batching_is_off(models_dir, test_images, overrides):
    x = test_images.reshape(len(test_images), -1).astype(np.int64)
    core = make_core(models_dir, engine="onnxruntime", batch_max_wait_ms=1000, **overrides)
    mv = core.model(None, None)

    async def run() -> float:
        ctx = RequestContext.start(core.settings, None)
        t0 = time.monotonic()
        await core.encode(mv, x[:4], ctx)  # four rows fill a call of batch_max_rows=4; off, no call waits
        return time.monotonic() - t0

    elapsed = asyncio.run(run())
    core.scheduler.stop()
    assert elapsed < 0.5, elapsed
    assert _calls(core, "encode") == (4, 1)


def test_admission_control_refuses_past_the_queue_budget(models_dir, test_images):
    core = make_core(models_dir, start=False, max_queued_samples=5000, max_request_samples=5000)
    mv = core.model(None, None)
    x = test_images.reshape(len(test_images), -1).astype(np.int64)

    async def run() -> None:
        ctx = RequestContext.start(core.settings, 5.0)
        first = asyncio.ensure_future(core.score(mv, x[:4], 1000, 0, None, None, ctx))
        await asyncio.sleep(0.05)  # queued: no worker runs
        with pytest.raises(Overloaded) as exc:
            await core.score(mv, x[:2], 1000, 0, None, None, ctx)
        assert exc.value.retry_after >= 1
        assert core.scheduler.queued_work == 4000
        core.scheduler.start()
        assert len((await first).log_likelihood) == 4
        assert core.scheduler.queued_work == 0

    asyncio.run(run())
    core.scheduler.stop()


def test_admission_refuses_work_that_would_not_be_done_within_its_share_of_the_deadline(models_dir, test_images):
    """At a known cost a unit of work (set here: 1 ms an importance sample, so no clock decides the outcome),
    a request is refused when it would be done later than queue_deadline_fraction (0.3) of its deadline.
    Score calls serve the request with the least work left first, so a small request is done after the
    queued ones no larger; onto an empty queue anything is admitted, and an operation with no cost known
    only meets the samples bound. Costs start from the version's load-time figures; engine calls then
    refine them."""
    core = make_core(models_dir, start=False, engine="onnxruntime", queue_deadline_fraction=0.3)
    mv = core.model(None, None)
    assert all(mv.unit_seconds[op] > 0 for op in ("encode", "decode", "score"))  # timed at load
    x = test_images.reshape(len(test_images), -1).astype(np.int64)
    sched = core.scheduler
    mv.unit_seconds["score"] = 1e-3
    del mv.unit_seconds["encode"]

    async def run() -> None:
        short, long = RequestContext.start(core.settings, 10.0), RequestContext.start(core.settings, 30.0)
        rejected = core.metrics.rejected.labels("score")._value

        async def refused(images: np.ndarray, k: int, ctx: RequestContext) -> Overloaded:
            with pytest.raises(Overloaded) as exc:
                await core.score(mv, images, k, 0, None, None, ctx)
            return exc.value

        # L: 4 s of work, share 9 s
        large = asyncio.ensure_future(core.score(mv, x[:4], 1000, 0, None, None, long))
        await asyncio.sleep(0.05)
        assert sched.queued_work == 4000 and sched.drain_seconds() == pytest.approx(4.0)
        # S: 1 s, share 3 s: less work left than L, so served first: done in 1 s (in arrival order 5 s); L then 5 s
        small = asyncio.ensure_future(core.score(mv, x[4:5], 1000, 0, None, None, short))
        await asyncio.sleep(0.05)
        assert sched.queued_work == 5000
        # 8 s of its own: 4 + 1 + 8 = 13 s against a share of 3 s, which it cannot fit even alone: retry
        # once the queue (5 s) has drained
        err = await refused(x[:8], 1000, short)
        assert "would be done in ~13.0 s" in str(err) and err.retry_after == 5
        assert rejected.get() == 1
        # M: 3 s, share 9 s: served after S (1 s) and before L: done in 4 s, L then in 8 s (within 2 x 9 s)
        middle = asyncio.ensure_future(core.score(mv, x[5:8], 1000, 0, None, None, long))
        await asyncio.sleep(0.05)
        assert sched.drain_seconds() == pytest.approx(8.0)
        # decode at 0.1 s a latent: 8 latents, 0.8 s, behind 8 s of score work, but calls alternate
        # between the two queues, so its estimate is twice its own 0.8 s, inside 0.3 x 10 s
        mv.unit_seconds["decode"] = 0.1
        assert sched.finish_seconds((mv.key, mv.digest, "decode"), 0.8) == pytest.approx(1.6)
        decoded = asyncio.ensure_future(core.decode(mv, np.zeros((8, mv.latent_dim), np.float32), "mean", 0, short))
        await asyncio.sleep(0.05)
        assert sched.drain_seconds() == pytest.approx(8.8)
        # and at 2 s its own, 5.6 s with the turns: refused, to retry once that much more has drained
        with pytest.raises(Overloaded) as exc:
            await core.decode(mv, np.zeros((20, mv.latent_dim), np.float32), "mean", 0, short)
        assert exc.value.retry_after == 3  # (0.8 + 2 s) x 2 = 5.6 s against a share of 3 s
        # encode has no cost known: only the samples bound applies
        encoded = asyncio.ensure_future(core.encode(mv, x[:8], short))
        await asyncio.sleep(0.05)
        assert sched.queued_work == 8016 and sched.drain_seconds() == pytest.approx(8.8)
        assert "vae_queued_seconds 8.8" in generate_latest(core.metrics.registry).decode()
        sched.start()
        results = await asyncio.gather(large, small, middle)
        assert [len(r.log_likelihood) for r in results] == [4, 1, 3]
        assert (await encoded).mu.shape[0] == 8 and (await decoded).images.shape[0] == 8
        assert sched.queued_work == 0 and sched.drain_seconds() == 0.0
        # the calls taught the scheduler what a unit of each operation costs
        assert mv.unit_seconds["encode"] > 0
        assert mv.unit_seconds["score"] < 1e-3  # digits score far below 1 ms a sample

    asyncio.run(run())
    sched.stop()


def test_a_zero_deadline_fraction_leaves_only_the_samples_bound(models_dir, test_images):
    core = make_core(models_dir, start=False, engine="onnxruntime", queue_deadline_fraction=0)
    mv = core.model(None, None)
    x = test_images.reshape(len(test_images), -1).astype(np.int64)
    mv.unit_seconds["score"] = 1.0  # an hour of work queued below

    async def run() -> None:
        ctx = RequestContext.start(core.settings, 1.0)
        jobs = [asyncio.ensure_future(core.score(mv, x[i : i + 1], 1000, 0, None, None, ctx)) for i in range(4)]
        await asyncio.sleep(0.05)
        assert core.scheduler.queued_work == 4000 and all(not j.done() for j in jobs)
        for j in jobs:
            j.cancel()

    asyncio.run(run())
    core.scheduler.stop()


@pytest.mark.parametrize("engine", ["onnxruntime", "auto"])
def test_images_below_the_chunk_size_share_calls_by_rows(models_dir, test_images, engine):
    """K=100 is a tenth of the chunk: ten times as many images fit a call as at K=1000, on either engine."""
    core = make_core(models_dir, engine=engine)
    mv = core.model(None, None)
    x = test_images.reshape(len(test_images), -1).astype(np.int64)[:40]
    per_call_rows = mv.score_images_per_call * mv.chunk  # 1 x 1000 on onnxruntime, 10 x 1000 on OpenVINO

    async def run() -> None:
        await core.score(mv, x, 100, 0, None, None, RequestContext.start(core.settings, None))

    asyncio.run(run())
    core.scheduler.stop()
    rows, calls = _calls(core, "score")
    assert rows == 40 * 100
    assert calls == -(-40 * 100 // per_call_rows)  # as few calls as the rows a call takes allow


def test_a_small_score_request_is_not_held_up_behind_a_large_one(models_dir, test_images):
    """onnxruntime at K=1000 scores one image a call: calls serve the request with the least work left
    first, so one image sent after sixteen is done after one call, not seventeen."""
    core = make_core(models_dir, start=False, engine="onnxruntime")
    mv = core.model(None, None)
    assert mv.score_images_per_call == 1
    x = test_images.reshape(len(test_images), -1).astype(np.int64)

    async def run() -> list[str]:
        ctx = RequestContext.start(core.settings, None)
        order: list[str] = []

        async def score(name: str, images: np.ndarray) -> None:
            await core.score(mv, images, 1000, 0, None, None, ctx)
            order.append(name)

        large = asyncio.ensure_future(score("large", x[:16]))
        await asyncio.sleep(0.02)
        small = asyncio.ensure_future(score("small", x[16:17]))
        await asyncio.sleep(0.02)
        core.scheduler.start()
        await asyncio.gather(large, small)
        return order

    assert asyncio.run(run()) == ["small", "large"]
    core.scheduler.stop()
    assert _calls(core, "score") == (17 * 1000, 17)


def test_score_calls_serve_the_request_with_the_least_work_left_first(models_dir, test_images):
    """Shortest remaining work first, driven call by call (no clock, no worker thread): the one-image request
    goes first although it came last, then the two three-image requests one after the other in arrival
    order, each to its end, rather than taking turns so that both finish only at the end."""
    core = make_core(models_dir, start=False, engine="onnxruntime")
    mv = core.model(None, None)
    assert mv.score_images_per_call == 1
    x = test_images.reshape(len(test_images), -1).astype(np.int64)
    sched = core.scheduler

    async def run() -> list[str]:
        ctx = RequestContext.start(core.settings, None)
        names: dict[int, str] = {}
        futures = []
        for name, images in (("a", x[:3]), ("b", x[3:6]), ("c", x[6:7])):
            futures.append(asyncio.ensure_future(core.score(mv, images, 1000, 0, None, None, ctx)))
            await asyncio.sleep(0)
            names[id(next(j for j in sched._queues[(mv.key, mv.digest, "score")] if id(j) not in names))] = name
        served = []
        while True:
            with sched._cond:
                taken = sched._take()
            if taken is None:
                break
            op, picked = taken
            served.append("".join(names[id(job)] for job, _ in picked))
            sched._run_score(picked)
        results = await asyncio.gather(*futures)
        assert [len(r.log_likelihood) for r in results] == [3, 3, 1]
        return served

    assert asyncio.run(run()) == ["c", "a", "a", "a", "b", "b", "b"]


def test_smaller_work_may_not_push_a_queued_request_past_twice_its_share(models_dir, test_images):
    """Smaller requests are served first, so admission also keeps each queued larger request done within
    2 x queue_deadline_fraction of its time left: at 1 ms a sample, L (4 s of work, deadline 8 s: 0.7 x 8
    = 5.6 s allowed) takes one 1 s request in front of it, not two; work no smaller than L goes after it
    and is judged by its own share only."""
    core = make_core(models_dir, start=False, engine="onnxruntime", queue_deadline_fraction=0.35)
    mv = core.model(None, None)
    x = test_images.reshape(len(test_images), -1).astype(np.int64)
    sched = core.scheduler
    mv.unit_seconds["score"] = 1e-3

    async def run() -> None:
        eight, long = RequestContext.start(core.settings, 8.0), RequestContext.start(core.settings, 30.0)
        large = asyncio.ensure_future(core.score(mv, x[:4], 1000, 0, None, None, eight))  # alone: admitted
        await asyncio.sleep(0.02)
        first = asyncio.ensure_future(core.score(mv, x[4:5], 1000, 0, None, None, long))  # L done at 5 s
        await asyncio.sleep(0.02)
        assert sched.queued_work == 5000
        with pytest.raises(Overloaded) as exc:  # L would be done at 6 s, past its 5.6 s
            await core.score(mv, x[5:6], 1000, 0, None, None, long)
        assert "delay it past 0.7 of its time left" in str(exc.value)
        assert exc.value.retry_after in (5, 6)  # once L is done
        # as large as L: served after it, done at 5 + 4 = 9 s, within 0.35 x 30 s
        same = asyncio.ensure_future(core.score(mv, x[6:10], 1000, 0, None, None, long))
        await asyncio.sleep(0.02)
        assert sched.queued_work == 9000
        sched.start()
        results = await asyncio.gather(large, first, same)
        assert [len(r.log_likelihood) for r in results] == [4, 1, 4]

    asyncio.run(run())
    sched.stop()


def test_a_deadline_stops_the_work(models_dir, test_images):
    core = make_core(models_dir, engine="onnxruntime", engine_memory_mb=8)
    mv = core.model(None, None)
    x = test_images.reshape(len(test_images), -1).astype(np.int64)[:64]

    async def run() -> float:
        ctx = RequestContext.start(core.settings, 0.2)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await core.score(mv, x, 10000, 0, None, None, ctx)
        return time.monotonic() - t0

    took = asyncio.run(run())
    assert took < 1.0
    for _ in range(100):  # the worker drops the job within one engine call
        if core.scheduler.queued_work == 0 and core.scheduler.busy_workers == 0:
            break
        time.sleep(0.02)
    assert core.scheduler.queued_work == 0
    core.scheduler.stop()


def test_a_deadline_the_worker_sees_first_is_still_a_deadline(models_dir, test_images, monkeypatch):
    """The worker may drop a job at its deadline (and cancel its future) before the request's own deadline
    timer runs, here because the event loop is held up across the deadline; the request must still end
    in DeadlineExceeded (it once surfaced as a bare CancelledError, a 500)."""
    from service.batching import Scheduler as RealScheduler

    dropped: list[str] = []
    real_fail = RealScheduler._fail

    def recording_fail(self, job, error):
        dropped.append(type(error).__name__)
        real_fail(self, job, error)

    monkeypatch.setattr(RealScheduler, "_fail", recording_fail)
    core = make_core(models_dir, engine="onnxruntime", engine_memory_mb=8)
    mv = core.model(None, None)
    x = test_images.reshape(len(test_images), -1).astype(np.int64)[:64]

    async def run() -> None:
        ctx = RequestContext.start(core.settings, 0.1)
        asyncio.get_running_loop().call_later(0.02, time.sleep, 0.4)  # an event loop running late
        with pytest.raises(DeadlineExceeded):
            await core.score(mv, x, 10000, 0, None, None, ctx)

    asyncio.run(run())
    core.scheduler.stop()
    assert dropped == ["DeadlineExceeded"]  # the worker saw the deadline first


def _queued_samples(c) -> float:
    return metric_value(c.get("/metrics").text, "vae_queued_samples")


def _beside_a_large_score(c, img: list, body: dict) -> tuple:
    """(response to `body`, response to the large request) for `body` sent while a /score of 64 images at
    K=5000 (320,000 samples, over a second of fp32 scoring on any machine we know) is queued or running."""
    results = {}

    def big() -> None:
        results["big"] = c.post("/score", json={"images": [img] * 64, "num_samples": 5000})

    t = threading.Thread(target=big)
    t.start()
    for _ in range(200):
        if _queued_samples(c) > 0:
            break
        time.sleep(0.005)
    r = c.post("/score", json=body)
    t.join()
    return r, results["big"]


def test_work_that_cannot_drain_in_time_is_503_over_http(models_dir, test_images):
    """A queue the measured engine cost says takes longer to drain than a request's share of its deadline
    refuses it with 503 and Retry-After, instead of a 504 when the deadline passes; the queued work finishes.

    Scores serve the request with the least work left first, so only queued requests no larger than the new
    one are ahead of it: 24 of the same size (16 images at K=1000, 384,000 samples in all, ~1 s here) queue
    before it. The new one alone (16,000 samples) would fit in its 0.25 s share of 1 s on a machine up to
    ~5x slower than ours; the queue ahead of it (at least 288,000 samples) would not on one ~3x faster.
    The server's deadline is 120 s, so that the 24 queue within their own share (30 s) on a slow machine too:
    under the default 30 s (a 7.5 s share), the one-thread engine of a full run on a 2-core EPYC refused three
    of them at admission once (for same-sized work, only the queue's drain estimate refuses)."""
    img, n, size = test_images[0].tolist(), 24, 16
    body = {"images": [img] * size, "num_samples": 1000}
    with make_client(models_dir, engine="onnxruntime", request_timeout_s=120.0) as c:
        assert c.post("/score", json=body).status_code == 200  # cost learned
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/score", json=body))) for _ in range(n)]
        for t in threads:
            t.start()
        for _ in range(1000):
            if _queued_samples(c) >= 0.75 * n * size * 1000:
                break
            time.sleep(0.002)
        r = c.post("/score", json={**body, "timeout_s": 1})
        for t in threads:
            t.join()
        err = error_of(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1 and "would be done in" in err["message"]
        assert [q.status_code for q in results] == [200] * n
        metrics = c.get("/metrics").text
        assert 'vae_rejected_total{op="score"} 1.0' in metrics and "vae_queued_seconds 0.0" in metrics


def test_overload_over_http_is_503_with_retry_after(models_dir, test_images):
    img = test_images[0].tolist()
    with make_client(models_dir, max_queued_samples=330_000, max_request_samples=330_000, engine="onnxruntime") as c:
        r, big = _beside_a_large_score(c, img, {"images": [img] * 64, "num_samples": 1000})
        err = error_of(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1 and "capacity" in err["message"]
        assert big.status_code == 200
        assert 'vae_rejected_total{op="score"} 1.0' in c.get("/metrics").text


def test_deadline_over_http_is_504(models_dir):
    # a request may ask for 1 s or more (timeout_s); the server's own deadline setting can be shorter
    with make_client(models_dir, engine="onnxruntime", request_timeout_s=0.05) as c:
        r = c.post("/score", json={"images": [[[0] * 8] * 8] * 64, "num_samples": 5000})
        err = error_of(r, 504, "deadline_exceeded")
        assert "0.05" in err["message"] or "deadline" in err["message"]


def test_batching_off_still_answers(models_dir, test_images):
    with make_client(models_dir, batching=False) as c:
        r = c.post("/score", json={"images": test_images[:3].tolist(), "num_samples": 100})
        assert r.status_code == 200
        with make_client(models_dir) as on:
            assert on.post("/score", json={"images": test_images[:3].tolist(), "num_samples": 100}).json() == r.json()
