"""One ``Generate`` call, whatever transport carries it (gRPC or the OpenAI HTTP API).

``Generations.open`` admits a ``pb.GenerateRequest`` (draining, ``--max-requests``), checks
it, and submits it to the scheduler; the ``Generation`` it returns hands out the call's
messages one at a time (a ``pb.GenerateResponse``: a token, then the final ``done``) and
raises what the request failed with. Transports only translate: messages to their own
format, exceptions through ``Generations.refuse`` to a status code.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np

from cache_service.types import SequenceSpec, check_policy, kv_bytes
from proto.icecache.v1 import worker_pb2 as pb
from worker.sampling import SamplingParams
from worker.scheduler import (
    DoneEvent,
    Event,
    Request,
    Resume,
    Scheduler,
    StartedEvent,
    TokenEvent,
)
from worker.serving.config import WorkerConfig
from worker.serving.detokenizer import StopText, TextStream
from worker.serving.errors import Draining, TooBusy, status_of
from worker.serving.metrics import WorkerMetrics
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

POLL_S = 1.0
"""How often a waiting call checks that its client is still there."""


class Generations:
    """Admission, checks and bookkeeping shared by every transport's ``Generate``."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        metrics: WorkerMetrics,
        config: WorkerConfig | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.metrics = metrics
        engine = scheduler.engine
        c = engine.model.config
        self.max_context = c.max_position_embeddings
        self.vocab = c.vocab_size
        stored = engine.kv.read_pages(np.empty(0, np.int64))  # [0, 2, page, dim], as stored
        self.kv_token_bytes = kv_bytes(
            1, c.head_dim, stored.dtype.itemsize, heads=c.num_layers * c.num_kv_heads
        )
        self.page_bytes = engine.cache.page_bytes
        self.max_requests = config.max_requests if config else 1 << 30
        self.max_new_tokens = config.max_new_tokens if config else self.max_context
        self.inflight = 0
        """Calls being served now (decoding or waiting), over every transport."""
        self.draining = threading.Event()
        """Set on shutdown: in-flight calls finish, new ones are refused (``Draining``)."""
        self._lock = threading.Lock()

    def open(self, request: pb.GenerateRequest, deadline: float | None = None) -> Generation:
        """Admit, check and submit ``request``; ``deadline`` is a ``time.perf_counter()``.

        Raises ``Draining``, ``TooBusy``, ``ValueError`` (says what to fix) or the scheduler's
        refusal; the caller must ``close()`` the generation it gets.
        """
        if self.draining.is_set():
            raise Draining()
        with self._lock:
            if self.inflight >= self.max_requests:
                raise TooBusy(self.max_requests)
            self.inflight += 1
        try:
            job = self._request(request, deadline)
            stop = StopText(tuple(request.stop))
            self.scheduler.submit(job)
        except BaseException:
            self._release()
            raise
        return Generation(self, job, stop)

    def refuse(self, err: BaseException) -> grpc.StatusCode:
        """Count a call that failed with ``err`` and return the status it goes out as."""
        code = status_of(err)
        self.metrics.requests.labels(code.name).inc()
        if code == grpc.StatusCode.INTERNAL:
            log.error("request failed: %r", err)
        return code

    def encode(self, prompt: str, chat: bool) -> list[int]:
        return self.tokenizer.chat_prompt_ids(prompt) if chat else self.tokenizer.encode(prompt)

    def _release(self) -> None:
        with self._lock:
            self.inflight -= 1

    # ---- checks --------------------------------------------------------------------------
    def _request(self, request: pb.GenerateRequest, deadline: float | None) -> Request:
        """The scheduler's request for a call; ``ValueError`` says what to fix."""
        ids = self._prompt_ids(request)
        wanted = request.max_new_tokens
        if wanted < 0:
            raise ValueError(f"max_new_tokens (max_tokens over HTTP) must be >= 0, got {wanted}")
        if wanted > self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens (max_tokens over HTTP) is {wanted} but this worker allows at "
                f"most {self.max_new_tokens} (--max-new-tokens); ask for fewer"
            )
        if len(ids) + wanted > self.max_context:
            raise ValueError(
                f"the prompt ({len(ids)} tokens) plus max_new_tokens ({wanted}; max_tokens over "
                f"HTTP) exceeds the model's context of {self.max_context} tokens; ask for at "
                f"most {self.max_context - len(ids)} or shorten the prompt"
            )
        extra = frozenset(request.stop_token_ids)
        if extra and (min(extra) < 0 or max(extra) >= self.vocab):
            raise ValueError(f"stop_token_ids must be in 0..{self.vocab - 1}")
        stop = extra if request.ignore_eos else extra | self.tokenizer.eos_token_ids
        spec = self._spec(request)
        return Request(
            ids,
            wanted,
            stop,
            request.request_id,
            sampling=SamplingParams.from_message(request),
            spec=spec,
            deadline=deadline,
            resume=self._resume(request) if request.HasField("resume") else None,
            announce=request.resumable,
            reuse_prefix=request.reuse_prefix if request.HasField("reuse_prefix") else None,
        )

    def _resume(self, request: pb.GenerateRequest) -> Resume:
        """The broken generation to continue, checked; ``ValueError`` says what to fix."""
        r = request.resume
        tokens = tuple(r.tokens)
        if tokens and (min(tokens) < 0 or max(tokens) >= self.vocab):
            raise ValueError(f"resume.tokens must be in 0..{self.vocab - 1}")
        if len(tokens) > request.max_new_tokens:
            raise ValueError(
                f"resume.tokens holds {len(tokens)} tokens, more than max_new_tokens "
                f"({request.max_new_tokens}); send the original request's max_new_tokens"
            )
        if (
            tokens
            and not SamplingParams.from_message(request).greedy
            and not request.HasField("seed")
        ):
            raise ValueError(
                "resuming a sampled generation needs its seed: set `seed` to Started.seed"
            )
        return Resume(r.seq_id, r.replica, r.epoch, tokens)

    def _spec(self, request: pb.GenerateRequest) -> SequenceSpec | None:
        """The request's own policy and budget, checked; ``None``: the worker's."""
        if not request.HasField("policy") and not request.HasField("budget"):
            return None
        engine = self.scheduler.engine
        policy = request.policy if request.HasField("policy") else engine.config.policy
        check_policy(policy)
        budget = request.budget if request.HasField("budget") else engine.config.budget
        if budget is not None and budget <= 0:
            raise ValueError(f"budget must be a positive number of tokens, got {budget}")
        config = dataclasses.replace(engine.config, policy=policy, budget=budget)
        spec = config.spec(engine.model)
        spec.validate(engine.kv.page_size)
        return spec

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        """Validated prompt ids; ``ValueError`` says what to fix."""
        which = request.WhichOneof("input")
        if which is None:
            raise ValueError("give a prompt: set `prompt` (text) or `prompt_ids`")
        if which == "prompt":
            ids = self.encode(request.prompt, request.chat)
        else:
            ids = list(request.prompt_ids.ids)
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_context:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the model supports {self.max_context}; "
                "shorten it"
            )
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise ValueError(f"prompt ids must be in 0..{self.vocab - 1}")
        return ids


class Generation:
    """An admitted call: ``next_message`` until it returns ``None``, then ``close``."""

    def __init__(self, owner: Generations, job: Request, stop: StopText) -> None:
        self.owner = owner
        self.job = job
        self.hidden = owner.tokenizer.eos_token_ids | job.stop_ids
        """Tokens left out of the text: the model's end tokens and the request's stop ids."""
        self.done: pb.GenerateDone | None = None
        self._stop = stop
        self._text = TextStream(owner.tokenizer, self.hidden)
        self._sent: list[str] = []
        self._kept: int | None = None  # tokens up to the one that completed a stop string
        self._closed = False
        self._lock = threading.Lock()
        if job.resume is not None:  # the text the broken stream sent (and held back) so far
            for index, token in enumerate(job.resume.tokens):
                self._sent.append(stop.push(self._text.push(token)))
                if stop.stopped:
                    self._kept = index + 1
                    break

    @property
    def prompt_tokens(self) -> int:
        return len(self.job.prompt_ids)

    def next_message(
        self, is_active: Callable[[], bool] | None = None
    ) -> pb.GenerateResponse | None:
        """The next token, then the final ``done``, then ``None``; raises what the request
        failed with. ``is_active`` (polled while waiting): ``False`` cancels the request."""
        while self.done is None:
            event = self._next_event(is_active)
            if isinstance(event, TokenEvent):
                if self._kept is not None:
                    continue  # decoded before the loop saw the cancel
                piece = self._stop.push(self._text.push(event.token_id))
                self._sent.append(piece)
                if self._stop.stopped:
                    self._kept = event.index + 1
                    self.job.cancel()
                return pb.GenerateResponse(
                    token=pb.Token(id=event.token_id, text=piece, index=event.index)
                )
            if isinstance(event, StartedEvent):
                started = pb.Started(seq_id=event.seq_id, replica=event.replica, epoch=event.epoch)
                if not self.job.sampling.greedy:
                    assert self.job.sampling.seed is not None  # seeded at submission
                    started.seed = self.job.sampling.seed
                return pb.GenerateResponse(started=started)
            if isinstance(event, DoneEvent):
                if self._kept is not None:
                    event.token_ids = event.token_ids[: self._kept]
                    event.stats.finish_reason = "stop"
                self.owner.metrics.observe_done(
                    self.prompt_tokens, len(event.token_ids), event.stats
                )
                self.done = self._done(event)
                return pb.GenerateResponse(done=self.done)
            raise event.error
        return None

    def messages(
        self, is_active: Callable[[], bool] | None = None
    ) -> Iterator[pb.GenerateResponse]:
        while (message := self.next_message(is_active)) is not None:
            yield message

    def cancel(self) -> None:
        """Ask the scheduler to stop the request (safe from any thread)."""
        self.job.cancel()

    def close(self) -> None:
        """Cancel the request unless it is done and give back its admission slot; safe to call
        from any thread, more than once, while another thread waits in ``next_message``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.done is None:
            self.job.cancel()
        self.owner._release()

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_event(self, is_active: Callable[[], bool] | None) -> Event:
        while True:
            try:
                return self.job.events.get(timeout=POLL_S)
            except queue.Empty:
                if is_active is not None and not is_active():
                    self.job.cancel()

    def _done(self, event: DoneEvent) -> pb.GenerateDone:
        """The final message; when a stop string ended the text, the text is what was sent."""
        owner, job = self.owner, self.job
        s, out = event.stats, event.token_ids
        config = owner.scheduler.engine.config
        policy = job.spec.policy if job.spec else config.policy
        budget = job.spec.budget if job.spec else config.budget
        stats = pb.GenerateStats(
            finish_reason=s.finish_reason,
            policy=policy,
            dense_layers=config.dense_layers,
            replica=s.replica,
            seq_id=s.seq_id,
            pages_selected=s.pages_selected,
            pages_moved=s.pages_read,
            bytes_moved=s.pages_read * owner.page_bytes,
            kv_bytes_stored=(self.prompt_tokens + s.decode_steps) * owner.kv_token_bytes,
            queue_s=s.queue_s,
            prefill_s=s.prefill_s,
            first_token_s=s.first_token_s,
            decode_s=s.decode_s,
            total_s=s.total_s,
            decode_steps=s.decode_steps,
            mean_batch=s.mean_batch,
            recoveries=s.recoveries,
            replayed_tokens=s.replayed_tokens,
            prefill_tokens=s.prefill_tokens,
            resumed=s.resumed,
            reused_tokens=s.reused_tokens,
        )
        if policy != "full" and budget is not None:
            stats.budget = budget
        sent = "".join(self._sent)
        if self._kept is None:
            text = owner.tokenizer.decode([t for t in out if t not in self.hidden])
        else:
            text = sent
        held = text[len(sent) :] if text.startswith(sent) else ""
        usage = pb.Usage(prompt_tokens=self.prompt_tokens, output_tokens=len(out))
        done = pb.GenerateDone(usage=usage, stats=stats, text=text, token_ids=out, held_text=held)
        if not job.sampling.greedy:
            assert job.sampling.seed is not None  # the scheduler seeds every request
            done.seed = job.sampling.seed
        return done


def deadline_in(seconds: float | None) -> float | None:
    """The ``time.perf_counter()`` ``seconds`` from now (``None``: no deadline)."""
    return None if seconds is None else time.perf_counter() + seconds
