"""Translates ``icecache.v1.Worker`` calls into scheduler requests and back.

The engine's KV store is seen here only through the ``KVClient`` contract (``replicas``).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from cache_service.types import SequenceSpec, check_policy, kv_bytes
from proto.icecache.v1 import worker_pb2 as pb
from proto.icecache.v1 import worker_pb2_grpc as pb_grpc
from worker.sampling import SamplingParams
from worker.scheduler import DoneEvent, Event, Request, Scheduler, TokenEvent
from worker.serving.config import WorkerConfig
from worker.serving.detokenizer import StopText, TextStream
from worker.serving.errors import Draining, TooBusy, status_of
from worker.serving.metrics import WorkerMetrics
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class WorkerServicer(pb_grpc.WorkerServicer):
    """Translates ``icecache.v1.Worker`` calls into scheduler requests and back."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        metrics: WorkerMetrics,
        info: pb.WorkerInfoResponse,
        config: WorkerConfig | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.info = info
        self.config = config
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
        """``Generate`` calls being served now."""
        self.draining = threading.Event()
        """Set on shutdown: in-flight calls finish, new ones are refused with UNAVAILABLE."""
        self._lock = threading.Lock()

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        if self.draining.is_set():
            self._abort(context, Draining())
        with self._lock:
            full = self.inflight >= self.max_requests
            if not full:
                self.inflight += 1
        if full:
            self._abort(context, TooBusy(self.max_requests))
        try:
            yield from self._generate(request, context)
        finally:
            with self._lock:
                self.inflight -= 1

    def _generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        try:
            job = self._request(request, context)
            stop = StopText(tuple(request.stop))
            self.scheduler.submit(job)
        except Exception as err:
            self._abort(context, err)
        context.add_callback(job.cancel)
        text = TextStream(self.tokenizer, self._hidden(job))
        sent: list[str] = []
        kept: int | None = None  # tokens up to the one that completed a stop string
        while True:
            event = self._next_event(job, context)
            if isinstance(event, TokenEvent):
                if kept is not None:
                    continue  # decoded before the loop saw the cancel
                piece = stop.push(text.push(event.token_id))
                sent.append(piece)
                yield pb.GenerateResponse(
                    token=pb.Token(id=event.token_id, text=piece, index=event.index)
                )
                if stop.stopped:
                    kept = event.index + 1
                    job.cancel()
            elif isinstance(event, DoneEvent):
                if kept is not None:
                    event.token_ids = event.token_ids[:kept]
                    event.stats.finish_reason = "stop"
                prompt_tokens = len(job.prompt_ids)
                self.metrics.observe_done(prompt_tokens, len(event.token_ids), event.stats)
                yield pb.GenerateResponse(done=self._done(job, event, "".join(sent), kept))
                return
            else:
                self._abort(context, event.error)

    def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.ServicerContext
    ) -> pb.CountTokensResponse:
        ids = self._encode(request.prompt, request.chat)
        return pb.CountTokensResponse(tokens=len(ids), ids=ids, max_context=self.max_context)

    def Info(
        self, request: pb.WorkerInfoRequest, context: grpc.ServicerContext
    ) -> pb.WorkerInfoResponse:
        info = pb.WorkerInfoResponse()
        info.CopyFrom(self.info)
        info.recovered_sequences = self.scheduler.recovered
        info.draining = self.draining.is_set()
        for replica in self.scheduler.engine.kv.replicas():
            info.replicas.add(
                address=replica.address,
                healthy=replica.healthy,
                sequences=replica.sequences,
                placed_total=replica.placed_total,
            )
        return info

    # ---- helpers -------------------------------------------------------------------------
    def _encode(self, prompt: str, chat: bool) -> list[int]:
        return self.tokenizer.chat_prompt_ids(prompt) if chat else self.tokenizer.encode(prompt)

    def _request(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Request:
        """The scheduler's request for a call; ``ValueError`` says what to fix."""
        ids = self._prompt_ids(request)
        wanted = request.max_new_tokens
        if wanted < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {wanted}")
        if wanted > self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens is {wanted} but this worker allows at most "
                f"{self.max_new_tokens} (--max-new-tokens); ask for fewer"
            )
        if len(ids) + wanted > self.max_context:
            raise ValueError(
                f"the prompt ({len(ids)} tokens) plus max_new_tokens ({wanted}) exceeds the "
                f"model's context of {self.max_context} tokens; lower max_new_tokens to at "
                f"most {self.max_context - len(ids)} or shorten the prompt"
            )
        extra = frozenset(request.stop_token_ids)
        if extra and (min(extra) < 0 or max(extra) >= self.vocab):
            raise ValueError(f"stop_token_ids must be in 0..{self.vocab - 1}")
        stop = extra if request.ignore_eos else extra | self.tokenizer.eos_token_ids
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.perf_counter() + remaining
        spec = self._spec(request)
        sampling = _sampling(request)
        return Request(
            ids, wanted, stop, request.request_id, sampling=sampling, spec=spec, deadline=deadline
        )

    def _hidden(self, job: Request) -> frozenset[int]:
        """Tokens left out of the text: the model's end tokens and the request's stop ids."""
        return self.tokenizer.eos_token_ids | job.stop_ids

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
            ids = self._encode(request.prompt, request.chat)
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

    def _next_event(self, job: Request, context: grpc.ServicerContext) -> Event:
        while True:
            try:
                return job.events.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    job.cancel()

    def _done(self, job: Request, event: DoneEvent, sent: str, kept: int | None) -> pb.GenerateDone:
        """The final message; ``sent``: the text streamed, ``kept``: set when a stop string
        ended the text (then ``sent`` is the whole text)."""
        s, out = event.stats, event.token_ids
        prompt_tokens = len(job.prompt_ids)
        config = self.scheduler.engine.config
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
            bytes_moved=s.pages_read * self.page_bytes,
            kv_bytes_stored=(prompt_tokens + s.decode_steps) * self.kv_token_bytes,
            queue_s=s.queue_s,
            prefill_s=s.prefill_s,
            first_token_s=s.first_token_s,
            decode_s=s.decode_s,
            total_s=s.total_s,
            decode_steps=s.decode_steps,
            mean_batch=s.mean_batch,
            recoveries=s.recoveries,
            replayed_tokens=s.replayed_tokens,
        )
        if policy != "full" and budget is not None:
            stats.budget = budget
        if kept is None:
            hidden = self._hidden(job)
            text = self.tokenizer.decode([t for t in out if t not in hidden])
        else:
            text = sent
        held = text[len(sent) :] if text.startswith(sent) else ""
        usage = pb.Usage(prompt_tokens=prompt_tokens, output_tokens=len(out))
        done = pb.GenerateDone(usage=usage, stats=stats, text=text, token_ids=out, held_text=held)
        if not job.sampling.greedy:
            assert job.sampling.seed is not None  # the scheduler seeds every request
            done.seed = job.sampling.seed
        return done

    def _abort(self, context: grpc.ServicerContext, err: BaseException) -> None:
        code = status_of(err)
        self.metrics.requests.labels(code.name).inc()
        if code == grpc.StatusCode.INTERNAL:
            log.error("request failed: %r", err)
        context.abort(code, str(err))


def _sampling(request: pb.GenerateRequest) -> SamplingParams:
    """The request's sampling parameters (unset: greedy); ``ValueError`` says what to fix."""
    return SamplingParams(
        temperature=request.temperature if request.HasField("temperature") else 0.0,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k if request.HasField("top_k") else 0,
        seed=request.seed if request.HasField("seed") else None,
    )
