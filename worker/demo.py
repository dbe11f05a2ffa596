"""``make demo``: pass keys hidden in ~3k tokens of real text, looked for by every policy.

The embedded SmolLM2-135M-Instruct reads Python's own ``pydoc_data`` documentation with a
5-digit pass key hidden at a few depths, prefilled once per prompt; then every policy
decodes the answer from the same K/V at a budget of 256 tokens per layer and KV head. It is
``icecache eval --task passkey`` on a small plan: the per-sample lines show each policy's
hit or miss, the table at the end each policy's accuracy next to ``full``'s.
"""

from __future__ import annotations

import argparse
import logging
import sys

from worker.cli import main as icecache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context-len", default="3000")
    parser.add_argument("--samples", default="3")
    parser.add_argument("--budget", default="256")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("worker.eval.runner").setLevel(logging.INFO)
    print(
        f"IceCache demo: pass key retrieval at {args.context_len} tokens, budget "
        f"{args.budget}, {args.samples} samples, every policy (first 2 layers dense).\n"
        "Loading the embedded SmolLM2-135M-Instruct; each prompt is prefilled once "
        "(about a minute on 2 CPU cores).\n",
        flush=True,
    )
    return icecache(
        [
            "eval",
            "--task",
            "passkey",
            "--context-len",
            args.context_len,
            "--budget",
            args.budget,
            "--samples",
            args.samples,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
