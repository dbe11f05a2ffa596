"""Session fixtures shared by every test package: the embedded SmolLM2, tiny random models."""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cache_service.types import POLICIES
from worker.engine import Engine, EngineConfig
from worker.kv_client import LocalKVClient
from worker.loader import embedded_checkpoint_dir, load_model
from worker.model import LlamaModel
from worker.tokenizer import Tokenizer

TINY_ARCH: dict[str, Any] = {
    "vocab_size": 49152,  # SmolLM2's tokenizer, so real text can be fed to tiny models
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """HF checkpoint directory of the embedded SmolLM2-135M-Instruct (converted on first use)."""
    return embedded_checkpoint_dir()


@pytest.fixture(scope="session")
def smollm(smollm_dir: Path) -> tuple[LlamaModel, Tokenizer]:
    """The embedded SmolLM2-135M-Instruct in float32 on CPU, with its tokenizer."""
    return load_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Callable[..., Path]:
    """Factory of random-weight HF checkpoint directories of tiny models (2 layers, hidden 64).

    ``tiny_checkpoint(model_type="llama", seed=0, max_shard_size=None, **config)`` saves a
    transformers model (``model_type`` in llama / mistral / qwen2; ``config`` overrides
    ``TINY_ARCH``) with every weight random (biases and norms too), plus SmolLM2's
    tokenizer files, and returns the directory.
    """

    def make(
        model_type: str = "llama",
        seed: int = 0,
        max_shard_size: str | None = None,
        **config: Any,
    ) -> Path:
        path = tmp_path_factory.mktemp(f"tiny-{model_type}")
        model = _random_hf_model(model_type, seed, {**TINY_ARCH, **config})
        model.save_pretrained(
            path, **({"max_shard_size": max_shard_size} if max_shard_size else {})
        )
        for name in _TOKENIZER_FILES:
            shutil.copy(smollm_dir / name, path / name)
        return path

    return make


def _random_hf_model(model_type: str, seed: int, config: dict[str, Any]) -> Any:
    """A transformers causal LM with N(0, 0.15) weights (norm weights around 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model


# ---- long prompts of real text, and each one's tokens alone (the determinism tests) --------
DOC_BUDGET, DOC_NEW_TOKENS = 64, 10
DOC_PROMPT_TOKENS = (470, 380, 500)  # ~30 pages per (layer, KV head), far over the budget
DOC_UNBOUNDED_MB = 256  # holds every page of these sequences: never evicts


def doc_store() -> LocalKVClient:
    """An in-process store for the doc prompts (1 GiB pool; the OS backs only pages written)."""
    return LocalKVClient.with_capacity(2**30, 16, 64)


def doc_engine(
    smollm: tuple[LlamaModel, Tokenizer], policy: str, cache_mb: int, kv: Any = None
) -> Engine:
    """An engine over ``kv`` (a new store by default) with a ``cache_mb`` device page cache
    that every layer goes through (no contiguous copy of the dense layers and no pages read
    in place: the paged path a GPU takes, under pressure here)."""
    config = EngineConfig(
        policy=policy,
        budget=DOC_BUDGET,
        device_cache_mb=cache_mb,
        dense_copy=False,
        pages_in_place=False,
    )
    return Engine(smollm[0], kv or doc_store(), config)


@pytest.fixture(scope="session")
def doc_prompts(smollm: tuple[LlamaModel, Tokenizer]) -> list[list[int]]:
    """Three prompts of real text (Python's docs), each from another part of them."""
    topics = pydoc_data.topics.topics
    names = sorted(topics)
    out = []
    for i, tokens in enumerate(DOC_PROMPT_TOKENS):
        text = " ".join(topics[k] for k in names[26 * i : 26 * i + 26])
        out.append(smollm[1].encode(text)[:tokens])
    return out


@pytest.fixture(scope="session")
def doc_outputs(
    smollm: tuple[LlamaModel, Tokenizer], doc_prompts: list[list[int]]
) -> dict[str, list[list[int]]]:
    """policy -> each doc prompt's greedy tokens alone, in an engine that never evicts.

    Over a minute of CPU, mostly the interpreter's (a second thread gains ~10%): where a core
    is spare (one torch thread per core, as ``make test`` runs), another Python process
    computes the policies after the first four (the same engine code, weights and prompts,
    with this process's number of torch threads) while this one computes those four; loading
    the model there takes about what a policy takes here.
    """
    policies = list(POLICIES)
    here = policies[:4] if _core_to_spare() else policies
    child = _DocOutputsProcess(doc_prompts, policies[len(here) :]) if here != policies else None
    try:
        out = _doc_outputs(smollm, doc_prompts, here)
        if child is not None:
            out.update(child.result())
    finally:
        if child is not None:
            child.close()
    return {policy: out[policy] for policy in POLICIES}


def _doc_outputs(
    smollm: tuple[LlamaModel, Tokenizer], prompts: list[list[int]], policies: list[str]
) -> dict[str, list[list[int]]]:
    out = {}
    for policy in policies:
        engine = doc_engine(smollm, policy, DOC_UNBOUNDED_MB)
        out[policy] = [engine.generate(p, DOC_NEW_TOKENS) for p in prompts]
        assert engine.cache.stats.hits > 0  # resident pages were reused, never evicted
        assert engine.cache.filled < engine.cache.capacity
    return out


def _core_to_spare() -> bool:
    return len(os.sched_getaffinity(0)) >= 2 * torch.get_num_threads()


class _DocOutputsProcess:
    """``_doc_outputs`` of ``policies`` in a new ``python`` process (see ``doc_outputs``)."""

    def __init__(self, prompts: list[list[int]], policies: list[str]) -> None:
        job = {"prompts": prompts, "policies": policies, "threads": torch.get_num_threads()}
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from tests.conftest import _doc_outputs_main as m; m()",
                json.dumps(job),
            ],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )

    def result(self) -> dict[str, list[list[int]]]:
        out, _ = self.process.communicate(timeout=900)
        if self.process.returncode != 0:
            self.stderr.seek(0)
            raise AssertionError(self.stderr.read().decode(errors="replace"))
        return dict(json.loads(out.decode().splitlines()[-1]))  # the last line: see below

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


def _doc_outputs_main() -> None:
    """The other process's end: the job as JSON in argv, the outputs as JSON on stdout."""
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["threads"])
    out = _doc_outputs(load_model(), job["prompts"], job["policies"])
    sys.stdout.write("\n" + json.dumps(out) + "\n")  # on a line of its own, after any print
