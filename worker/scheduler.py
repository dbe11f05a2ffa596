"""Continuous batching: one thread owns the engine and interleaves many requests.

Each iteration of the loop:

1. **admits** waiting requests while there is room (``max_batch``), at most
   ``prefills_per_step`` of them: each is prefilled on its own (prefill is *not* batched
   across sequences) and its first token is chosen from the prefill's logits;
2. **emits** each live sequence's pending token to its request, and finishes the sequences
   that hit a stop token, their ``max_new_tokens`` or a cancel (their KV is released);
3. runs **one** ``engine.decode_step`` over all live sequences (decode *is* batched: one
   forward pass, and per layer one retrieval RPC per cache-service replica, for the batch).

Each token is chosen by ``worker.sampling.choose`` (greedy by default): its noise is a
function of the request's seed and the token's position, so a request's tokens equal
``engine.generate`` on its prompt alone, in any batch.
Requests talk to the loop only through thread-safe queues.

**Recovery.** When the replica holding a sequence fails (``KVClient.take_lost``), the
sequence is rebuilt on another replica: its prompt is prefilled again under a new id and the
tokens it already sent are *replayed*, fed one per decode step as part of the running batch
(teacher forcing) without being sent again. Prefill and decode are deterministic, so the
rebuilt KV, index and selections are the ones the sequence had, and the tokens after the
replay are the ones it would have produced without the fault (each replayed step checks that
the model still chooses the next known token; a mismatch is counted in ``diverged``). A
sampled sequence's noise depends only on (seed, step), so its replay chooses the same tokens.
A replica that fails during a prefill sends the request to the next healthy one: the
placement retry (``SchedulerConfig.placement_backoff``) is the one hand-written retry loop of
the KV path, and each of its tries places the sequence anew; calls to a replica are retried
only by its gRPC channel (``worker.kv``).

**Resume.** A request may continue a generation whose stream broke after ``k`` tokens, on
this or another worker (``Request.resume``: the broken sequence's identity and the ``k``
tokens the client has). When the cache service still holds that sequence with exactly the
prompt and the first ``k - 1`` tokens in every layer (the ``k``-th was chosen but not fed yet),
the worker *adopts* it (``Engine.adopt``: its lease takes the sequence over, no prefill) and
feeds the ``k``-th token; otherwise (``k`` = 0, the sequence released, layers of different
lengths because the worker died in the middle of a step) it *rebuilds* it by prefill and
replay, as above. Either way the tokens after the ``k`` are the ones an unbroken run gives;
``RequestStats.resumed`` says which way, and a ``StartedEvent`` (sent when a sequence is
placed, adopted or rebuilt) gives the client the identity to resume from.

**Deadlines.** A request past its deadline is not prefilled, and a running one is stopped and
released, both with ``DeadlineExceeded``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cache_service.types import AdoptionConflict, AdoptionRefused, SequenceSpec
from worker.engine import Engine, Sequence
from worker.retry import Backoff, retry
from worker.sampling import GREEDY, SamplingParams, choose

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the batching loop."""

    max_batch: int = 16
    """Sequences decoded together at most; more requests wait in the queue."""
    max_queue: int = 256
    """Requests waiting for admission at most; beyond it ``submit`` raises ``QueueFull``."""
    prefills_per_step: int = 1
    """Prompts prefilled between two decode steps (bounds the stall of running sequences)."""
    idle_wait_s: float = 0.05
    """How long the idle loop sleeps on the queue before checking for a stop."""
    placement_backoff: Backoff = Backoff(attempts=5, base_s=0.1, cap_s=2.0)
    """Retries of a prefill whose replica failed (each try places the sequence anew)."""


class QueueFull(RuntimeError):
    """Too many requests are waiting; retry later."""


class SchedulerStopped(RuntimeError):
    """The scheduler is stopping and takes no new requests."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before it finished."""


@dataclass
class TokenEvent:
    """One generated token."""

    token_id: int
    index: int


@dataclass
class StartedEvent:
    """The request's sequence is placed (or adopted, or rebuilt): what resuming it needs."""

    seq_id: str
    replica: str
    epoch: int
    """The epoch of this worker's lease on ``replica`` (``KVClient.holder_epoch``)."""


@dataclass(frozen=True)
class Resume:
    """Where a broken generation stood: its sequence and the tokens its client received."""

    seq_id: str
    replica: str
    epoch: int
    tokens: tuple[int, ...]


@dataclass
class RequestStats:
    """Timings and traffic of one finished request (seconds since its arrival)."""

    finish_reason: str = ""
    seq_id: str = ""
    replica: str = ""
    queue_s: float = 0.0
    prefill_s: float = 0.0
    first_token_s: float = 0.0
    total_s: float = 0.0
    decode_steps: int = 0
    batch_sum: int = 0
    recoveries: int = 0
    replayed_tokens: int = 0
    prefill_tokens: int = 0
    """Prompt tokens this worker prefilled for the request (0 after an adoption)."""
    reused_tokens: int = 0
    """Prompt tokens taken from blocks the cache service kept (prefix reuse)."""
    resumed: str = ""
    """``adopted`` or ``rebuilt`` for a resumed request, else ''."""
    pages_selected: int = 0
    pages_read: int = 0

    @property
    def decode_s(self) -> float:
        return max(0.0, self.total_s - self.first_token_s)

    @property
    def mean_batch(self) -> float:
        return self.batch_sum / self.decode_steps if self.decode_steps else 0.0


@dataclass
class DoneEvent:
    """The request finished: all its tokens and its stats."""

    token_ids: list[int]
    stats: RequestStats


@dataclass
class ErrorEvent:
    """The request failed; ``error`` is what the engine or a cache service raised."""

    error: BaseException


Event = TokenEvent | DoneEvent | ErrorEvent | StartedEvent


@dataclass
class Request:
    """A generation request: what to generate and where its events go."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    request_id: str = ""
    sampling: SamplingParams = GREEDY
    """How tokens are chosen; ``submit`` gives a sampled request without a seed a fresh one."""
    spec: SequenceSpec | None = None
    """How the sequence's KV is kept and selected; ``None``: the engine's config."""
    deadline: float | None = None
    """``time.perf_counter()`` by which the request must be done; ``None``: no deadline."""
    resume: Resume | None = None
    """Continue a broken generation (see the module docstring)."""
    announce: bool = False
    """Put a ``StartedEvent`` on ``events`` whenever the sequence is placed anew."""
    reuse_prefix: bool | None = None
    """Start from prompt blocks the cache service keeps; ``None``: the engine's config."""
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Ask the loop to finish this request at its next step (its KV is released)."""
        self.cancelled.set()

    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


@dataclass
class _Running:
    """A live sequence of the loop and its request."""

    request: Request
    seq: Sequence
    next_token: int
    output: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    replay: deque[int] = field(default_factory=deque)
    """Tokens already sent, to feed again before decoding goes on (after a rebuild)."""
    base_id: str = ""
    """The sequence's first id; a rebuild is ``<base_id>.r<n>``."""


class Scheduler:
    """Owns an engine; ``submit`` from any thread, events come back on the request's queue."""

    def __init__(
        self, engine: Engine, config: SchedulerConfig | None = None, id_prefix: str = "req"
    ) -> None:
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.id_prefix = id_prefix
        """Sequence ids are ``<id_prefix>-<n>``; unique per worker, as replicas are shared."""
        self.waiting: queue.Queue[Request] = queue.Queue(self.config.max_queue)
        self.running: list[_Running] = []
        self.started = 0
        """Sequences started so far; the next one is ``<id_prefix>-<started>``."""
        self.recovered = 0
        """Sequences rebuilt after their replica failed, since start."""
        self.diverged = 0
        """Replayed steps whose prediction differed from the token sent (should stay 0)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_step: list[Callable[[int, float], None]] = []
        """Callbacks ``f(batch_size, seconds)`` after each decode step (metrics)."""

    # ---- public ----------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, fail the waiting and running ones, join."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> Request:
        """Queue a request; raises ``QueueFull`` or ``SchedulerStopped``."""
        if self._stop.is_set():
            raise SchedulerStopped("the worker is stopping; send the request elsewhere")
        if request.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {request.max_new_tokens}")
        request.sampling = request.sampling.seeded()
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(
                f"{self.config.max_queue} requests are already waiting; retry later"
            ) from None
        return request

    @property
    def active(self) -> int:
        """Sequences being decoded now."""
        return len(self.running)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        return not self.running and self.waiting.empty()

    # ---- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        log.info("scheduler running (max batch %d)", self.config.max_batch)
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as err:  # a bug here must not hang every waiting client
                log.exception("scheduler step failed; failing the running requests")
                failed, self.running = self.running, []
                for run in failed:
                    self._fail(run, err)
        self._shutdown()

    def _step(self) -> None:
        self._admit()
        self._emit()
        if self.running:
            self._decode()

    def _admit(self) -> None:
        room = self.config.max_batch - len(self.running)
        for _ in range(min(room, self.config.prefills_per_step)):
            request = self._next_request(block=not self.running)
            if request is None:
                return
            self._prefill(request)

    def _next_request(self, block: bool) -> Request | None:
        try:
            if block:
                return self.waiting.get(timeout=self.config.idle_wait_s)
            return self.waiting.get_nowait()
        except queue.Empty:
            return None

    def _prefill(self, request: Request) -> None:
        stats = RequestStats(queue_s=time.perf_counter() - request.arrived)
        if request.cancelled.is_set():
            stats.finish_reason = "cancelled"
            request.events.put(DoneEvent([], stats))
            return
        if request.expired():
            request.events.put(ErrorEvent(_deadline(request, "waiting for admission")))
            return
        started = time.perf_counter()
        seq_id = f"{self.id_prefix}-{self.started}"
        self.started += 1
        if request.resume is not None:
            if self._already_done(request, stats):
                return
            try:
                adopted = self._adopt(request, stats)
            except AdoptionConflict as err:
                log.warning("resume of %s refused: %s", request.resume.seq_id, err)
                request.events.put(ErrorEvent(err))
                return
            if adopted is not None:
                self._admitted(adopted)
                return
        try:
            seq, logits = self._start(request, seq_id)
        except Exception as err:  # the request fails, the loop goes on
            log.warning("prefill of %s failed: %s", request.request_id or seq_id, err)
            request.events.put(ErrorEvent(err))
            return
        stats.prefill_s = time.perf_counter() - started
        stats.prefill_tokens = len(request.prompt_ids) - seq.reused_tokens
        stats.reused_tokens = seq.reused_tokens
        first = choose(logits, request.sampling, step=0)
        run = _Running(request, seq, first, stats=stats, base_id=seq_id)
        if request.resume is not None:  # rebuilt: replay what the client has
            run.output = list(request.resume.tokens)
            run.replay = deque(request.resume.tokens)
            stats.resumed, stats.replayed_tokens = "rebuilt", len(run.replay)
            self._check_replay(run, first)
        self._admitted(run)

    def _admitted(self, run: _Running) -> None:
        """``run`` joins the batch; its client learns where the sequence is."""
        seq_id = run.seq.seq_id
        run.stats.seq_id, run.stats.replica = seq_id, self._replica(seq_id)
        self._announce(run)
        self.running.append(run)

    def _announce(self, run: _Running) -> None:
        if run.request.announce:
            seq_id = run.seq.seq_id
            epoch = self.engine.kv.holder_epoch(seq_id)
            run.request.events.put(StartedEvent(seq_id, run.stats.replica, epoch))

    def _already_done(self, request: Request, stats: RequestStats) -> bool:
        """A resumed request whose client already has its last token: finish it now."""
        assert request.resume is not None
        tokens = list(request.resume.tokens)
        if tokens and tokens[-1] in request.stop_ids:
            stats.finish_reason = "stop"
        elif len(tokens) >= request.max_new_tokens:
            stats.finish_reason = "length"
        else:
            return False
        stats.resumed = "finished"
        stats.total_s = time.perf_counter() - request.arrived
        request.events.put(DoneEvent(tokens, stats))
        return True

    def _adopt(self, request: Request, stats: RequestStats) -> _Running | None:
        """The resumed sequence taken over where it is; ``None``: rebuild it instead.
        Raises ``AdoptionConflict`` when another worker took it over first."""
        resume = request.resume
        assert resume is not None
        if not resume.tokens or not resume.seq_id:
            return None  # no token chosen yet: nothing to continue from but the prompt
        *fed, last = resume.tokens
        try:
            seq = self.engine.adopt(
                resume.seq_id, resume.replica, resume.epoch, request.prompt_ids, fed,
                request.spec,
            )  # fmt: skip
        except (AdoptionRefused, ConnectionError) as err:
            log.info("cannot adopt %s (%s); rebuilding it", resume.seq_id, err)
            return None
        stats.resumed = "adopted"
        log.info("adopted %s on %s after %d tokens", resume.seq_id, resume.replica,
                 len(resume.tokens), extra={"seq_id": resume.seq_id})  # fmt: skip
        # the last token the client got was chosen but not fed: feed it, without sending it
        return _Running(request, seq, last, list(resume.tokens), stats, deque([last]),
                        resume.seq_id)  # fmt: skip

    def _start(self, request: Request, seq_id: str) -> tuple[Sequence, torch.Tensor]:
        """Create the sequence and prefill its prompt (``Engine.start``); a replica that fails
        meanwhile is given up and the next try places the sequence elsewhere (as
        ``<seq_id>.p<n>``)."""
        tries = itertools.count()

        def attempt() -> tuple[Sequence, torch.Tensor]:
            n = next(tries)
            name = seq_id if n == 0 else f"{seq_id}.p{n}"
            return self.engine.start(
                request.prompt_ids, name, spec=request.spec, reuse_prefix=request.reuse_prefix
            )

        backoff = self.config.placement_backoff
        return retry(attempt, backoff, (ConnectionError,), f"prefill of {seq_id}")

    def _emit(self) -> None:
        still: list[_Running] = []
        for run in self.running:
            request = run.request
            if request.cancelled.is_set():
                self._finish(run, "cancelled")
                continue
            if request.expired():
                self._fail(run, _deadline(request, "generating"))
                continue
            if run.replay:  # being rebuilt: its tokens were sent already
                still.append(run)
                continue
            if len(run.output) >= request.max_new_tokens:  # max_new_tokens == 0
                self._finish(run, "length")
                continue
            run.output.append(run.next_token)
            if len(run.output) == 1:
                run.stats.first_token_s = time.perf_counter() - request.arrived
            request.events.put(TokenEvent(run.next_token, len(run.output) - 1))
            if run.next_token in request.stop_ids:
                self._finish(run, "stop")
            elif len(run.output) == request.max_new_tokens:
                self._finish(run, "length")
            else:
                still.append(run)
        self.running = still

    def _decode(self) -> None:
        started = time.perf_counter()
        batch = self.running
        fed = [r.replay.popleft() if r.replay else r.next_token for r in batch]
        try:
            logits = self.engine.decode_step([r.seq for r in batch], fed)
        except Exception as err:  # every sequence of the step fails
            log.error("decode step of %d sequences failed: %s", len(batch), err)
            self.running = []
            for run in batch:
                self._fail(run, err)
            return
        lost = self._take_lost()
        survivors = []
        for run, row in zip(batch, logits, strict=True):  # row: [vocab]
            if run.seq.seq_id in lost:
                if self._recover(run):
                    survivors.append(run)
                continue
            survivors.append(run)
            token = choose(row, run.request.sampling, step=_step_of(run))
            if run.replay:
                self._check_replay(run, token)
                continue
            run.next_token = token
            run.stats.decode_steps += 1
            run.stats.batch_sum += len(batch)
        self.running = survivors
        elapsed = time.perf_counter() - started
        for callback in self.on_step:
            callback(len(batch), elapsed)

    def _recover(self, run: _Running) -> bool:
        """Rebuild a lost sequence on another replica; ``False`` if that failed too."""
        old = run.seq.seq_id
        self._collect_traffic(run)
        self._release(run.seq)
        run.stats.recoveries += 1
        name = f"{run.base_id}.r{run.stats.recoveries}"
        try:
            run.seq, logits = self._start(run.request, name)
        except Exception as err:
            log.error("could not rebuild %s: %s", old, err)
            run.request.events.put(ErrorEvent(err))
            return False
        run.replay = deque(run.output)
        run.stats.replayed_tokens += len(run.output)
        run.stats.prefill_tokens += len(run.request.prompt_ids) - run.seq.reused_tokens
        run.stats.reused_tokens += run.seq.reused_tokens
        run.stats.seq_id, run.stats.replica = run.seq.seq_id, self._replica(run.seq.seq_id)
        self._announce(run)
        self._check_replay(run, choose(logits, run.request.sampling, step=0))
        self.recovered += 1
        log.warning(
            "rebuilt %s as %s on %s; replaying %d tokens",
            old, run.seq.seq_id, run.stats.replica, len(run.replay),
            extra={"seq_id": run.seq.seq_id, "replica": run.stats.replica},
        )  # fmt: skip
        return True

    def _check_replay(self, run: _Running, predicted: int) -> None:
        """A replayed step chooses the next token already sent, as the original step did."""
        if run.replay and predicted != run.replay[0]:
            self.diverged += 1
            log.error(
                "rebuilt %s diverged: predicted %d where %d was sent",
                run.seq.seq_id, predicted, run.replay[0],
            )  # fmt: skip

    def _finish(self, run: _Running, reason: str) -> None:
        stats = run.stats
        stats.finish_reason = reason
        self._collect_traffic(run)
        self._release(run.seq)
        stats.total_s = time.perf_counter() - run.request.arrived
        run.request.events.put(DoneEvent(run.output, stats))

    def _fail(self, run: _Running, err: BaseException) -> None:
        self._release(run.seq)
        run.request.events.put(ErrorEvent(err))

    def _release(self, seq: Sequence) -> None:
        try:
            self.engine.finish(seq)
        except Exception as err:  # the output stands; the KV may leak
            log.warning("releasing %s failed: %s", seq.seq_id, err)

    def _shutdown(self) -> None:
        for run in self.running:
            self._fail(run, SchedulerStopped("the worker stopped before this request finished"))
        self.running = []
        while True:
            request = self._next_request(block=False)
            if request is None:
                break
            request.events.put(ErrorEvent(SchedulerStopped("the worker stopped")))
        log.info("scheduler stopped")

    # ---- helpers ---------------------------------------------------------------------------
    def _replica(self, seq_id: str) -> str:
        return self.engine.kv.replica_of(seq_id)

    def _take_lost(self) -> set[str]:
        return self.engine.kv.take_lost()

    def _collect_traffic(self, run: _Running) -> None:
        traffic = self.engine.kv.take_traffic(run.seq.seq_id)
        run.stats.pages_selected += traffic.pages_selected
        run.stats.pages_read += traffic.pages_read


def _step_of(run: _Running) -> int:
    """Output position of the token a decode step chooses for ``run`` (the tokens not yet
    replayed come after it)."""
    return len(run.output) - len(run.replay)


def _deadline(request: Request, doing: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the request's deadline passed while {doing}; give it a longer deadline "
        "(or fewer max_new_tokens)"
    )


__all__ = [
    "DeadlineExceeded",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "QueueFull",
    "Request",
    "RequestStats",
    "Scheduler",
    "SchedulerConfig",
    "Resume",
    "SchedulerStopped",
    "StartedEvent",
    "TokenEvent",
]
