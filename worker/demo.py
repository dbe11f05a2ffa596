"""``make demo``: a pass key hidden in ~3k tokens of real text, looked for by every policy.

The embedded SmolLM2-135M-Instruct reads Python's own ``pydoc_data`` documentation with a
5-digit pass key hidden in it. The prompt is prefilled once (dense, identical for every
policy); each policy then decodes the answer from the same K/V at a budget of 256 tokens
per layer and KV head. Printed: each policy's answer, whether it is right, and its decode
time per token (the first step includes building the policy's index). For accuracy over
many samples, use ``icecache eval`` (see the README).
"""

from __future__ import annotations

import argparse
import logging
import sys

from cache_service.types import POLICIES
from evaluation.corpus import Corpus, default_text
from evaluation.session import Session, SessionConfig
from evaluation.tasks.passkey import MAX_NEW_TOKENS, make_passkey_prompt, score_passkey
from worker.factory import open_local, pick_device
from worker.loader import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context-len", type=int, default=3000)
    parser.add_argument("--depth", type=float, default=0.4, help="0 = start, 1 = end")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = pick_device()
    print(f"Loading the embedded SmolLM2-135M-Instruct on {device} ...", flush=True)
    model, tokenizer = load_model(device=device)
    session = Session(model, tokenizer, open_local(model), SessionConfig(dense_layers=2))
    prompt = make_passkey_prompt(
        Corpus(default_text(), tokenizer), args.context_len, args.depth, args.seed
    )
    print(
        f"Prompt: {len(prompt.ids)} tokens, pass key {prompt.key} at depth {prompt.depth:.0%}; "
        f"budget {args.budget} tokens per layer and KV head; first 2 layers dense.\n"
        "Dense prefill once (about a minute on 2 CPU cores) ...\n",
        flush=True,
    )
    print(f"{'policy':<15} {'answer':<26} {'correct':<8} {'decode ms/token':>16}")
    max_len = len(prompt.ids) + MAX_NEW_TOKENS
    for policy in POLICIES:
        engine = session.engine(policy, args.budget, max_len)
        out = session.greedy(engine, list(prompt.ids), MAX_NEW_TOKENS, tokenizer.eos_token_ids)
        answer = " ".join(tokenizer.decode(out, skip_special_tokens=True).split())
        ok = "yes" if score_passkey(answer, prompt.key) else "no"
        ms = engine.timings.decode_ms_per_step
        print(f"{policy:<15} {answer[:26]:<26} {ok:<8} {ms:>16.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
