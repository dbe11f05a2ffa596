"""One-shot check of the worker's engine on a CUDA device against the same engine on the CPU.

Run from the repository root on a machine with a CUDA GPU, torch, CuPy and faiss-cpu (no
model download: the model is a small random Llama, built here from a seed)::

    python bench/gpu_engine_check.py [--out bench/results/gpu-engine.md]

For each policy, on the same prompt and the same forced continuation (the CPU's greedy
tokens), it compares the last-token logits of every step on CUDA with those on the CPU, and
on CUDA with a device page cache of one megabyte (evicting at every step) against one that
holds everything: those must be equal bit for bit, since a sequence's output must not depend
on cache sizes. Decoded in a batch beside a longer sequence, every step's argmax must equal
the one decoded alone (the linear layers' GEMMs may sum a batch of two in another order than
one row, on either device, so the bits may differ there; the attention kernel's sums do not
depend on the batch). It also times a decode step on each device. Exit status 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from worker.engine import Engine, EngineConfig  # noqa: E402
from worker.kv_client import LocalKVClient  # noqa: E402
from worker.model import LlamaModel, ModelConfig  # noqa: E402

POLICIES = ("full", "icecache-tokens", "icecache", "quest")
PROMPT, NEW, BUDGET = 900, 24, 64


def tiny_model(seed: int = 0) -> LlamaModel:
    """8 layers, 8 query heads over 2 KV heads of 64 dims; N(0, 0.08) weights."""
    config = ModelConfig(
        model_type="llama",
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1024,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=4096,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.08 * noise)
    return model.eval()


def run(
    model: LlamaModel, policy: str, cache_mb: int, prompt: list[int], forced: list[int]
) -> tuple[list[torch.Tensor], float]:
    """Logits of the prompt's last token and of each forced token; seconds per decode step."""
    kv = LocalKVClient.with_capacity(512 << 20, 16, model.config.head_dim)
    config = EngineConfig(policy=policy, budget=BUDGET, device_cache_mb=cache_mb)
    engine = Engine(model, kv, config)
    with torch.no_grad():
        seq, logits = engine.start(prompt)
        out = [logits.float().cpu()]
        start = time.perf_counter()
        for token in forced:
            out.append(engine.decode_step([seq], [token])[0].float().cpu())
        step = (time.perf_counter() - start) / max(1, len(forced))
        engine.finish(seq)
    return out, step


def run_beside(
    model: LlamaModel, policy: str, prompt: list[int], forced: list[int], other: list[int]
) -> list[torch.Tensor]:
    """``run``'s logits of ``prompt``, decoded in a batch beside the prompt ``other`` (which
    is fed its own first tokens as its continuation)."""
    kv = LocalKVClient.with_capacity(512 << 20, 16, model.config.head_dim)
    config = EngineConfig(policy=policy, budget=BUDGET, device_cache_mb=256)
    engine = Engine(model, kv, config)
    with torch.no_grad():
        seq, logits = engine.start(prompt)
        beside, _ = engine.start(other)
        out = [logits.float().cpu()]
        for step, token in enumerate(forced):
            out.append(engine.decode_step([seq, beside], [token, other[step]])[0].float().cpu())
        engine.finish(seq)
        engine.finish(beside)
    return out


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[int, float]:
    """Steps whose argmax agree, and the largest logit difference of any step."""
    same = sum(int(x.argmax() == y.argmax()) for x, y in zip(a, b, strict=True))
    return same, max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu-engine.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_engine_check: no CUDA device visible to torch; run this on a GPU machine")
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    cpu_model = tiny_model()
    gpu_model = tiny_model().cuda()
    ids = torch.randint(0, 2048, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    other = torch.randint(0, 2048, (3 * PROMPT,), generator=torch.Generator().manual_seed(2))
    run(gpu_model, "full", 256, ids[:64], ids[64:66])  # compiles the CUDA kernels, untimed
    lines = [
        "# The engine on a GPU against the engine on the CPU",
        "",
        f"- device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}",
        f"- model: a random Llama (8 layers, 8 query / 2 KV heads of 64 dims), float32; "
        f"prompt {PROMPT} tokens, {NEW} forced tokens (the CPU's greedy ones), budget {BUDGET}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}; command: "
        "`python bench/gpu_engine_check.py`",
        "",
        "| policy | argmax equal (CUDA vs CPU) | max abs logit diff | CUDA 1 MB cache == "
        "CUDA 256 MB, bit for bit | CUDA batched vs alone: argmax equal, max abs diff | "
        "CPU ms/step | CUDA ms/step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    ok = True
    for policy in POLICIES:
        try:
            # the CPU's greedy continuation, then every run forced along it
            cpu_run = Engine(
                cpu_model,
                LocalKVClient.with_capacity(512 << 20, 16, cpu_model.config.head_dim),
                EngineConfig(policy=policy, budget=BUDGET, device_cache_mb=256),
            )
            forced = cpu_run.generate(ids, NEW)[:-1]
            cpu, cpu_step = run(cpu_model, policy, 256, ids, forced)
            gpu, gpu_step = run(gpu_model, policy, 256, ids, forced)
            tight, _ = run(gpu_model, policy, 1, ids, forced)
            paired = run_beside(gpu_model, policy, ids, forced, other.tolist())
            agree, diff = agreement(cpu, gpu)
            same = all(torch.equal(a, b) for a, b in zip(gpu, tight, strict=True))
            beside, spread = agreement(gpu, paired)
            ok &= same and agree == len(cpu) and beside == len(cpu)
            lines.append(
                f"| {policy} | {agree} / {len(cpu)} | {diff:.2e} | {'yes' if same else 'NO'} | "
                f"{beside} / {len(cpu)}, {spread:.1e} | {1e3 * cpu_step:.1f} | "
                f"{1e3 * gpu_step:.1f} |"
            )
        except Exception as exc:  # report and go on with the next policy
            ok = False
            lines.append(f"| {policy} | error: {type(exc).__name__}: {exc} | | | | | |")
        print(lines[-1], flush=True)
    lines += ["", f"**{'PASS' if ok else 'FAIL'}**", ""]
    text = "\n".join(lines)
    paths = [args.out] + (
        [Path(os.environ["OUT"]) / "gpu-engine.md"] if "OUT" in os.environ else []
    )
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
