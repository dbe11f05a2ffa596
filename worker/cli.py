"""``icecache``: the command line. Subcommands register themselves here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from cache_service import settings
from cache_service.security import SecurityConfig
from worker.engine import EngineConfig
from worker.factory import LoadConfig, build_engine
from worker.sampling import add_flags as add_sampling_flags
from worker.sampling import from_flags as sampling_flags
from worker.serving.detokenizer import StopText, TextStream

log = logging.getLogger(__name__)

SERVER_CHOOSES = ("policy", "budget")
"""Engine flags that, left out with ``--server``, are the worker's own (given, the request's)."""
CLIENT_SECURITY = ("auth_token", "tls_ca")
"""The auth/TLS settings ``generate --server`` takes as flags (the client's; ``worker.client``
reads the rest from the environment)."""


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags of every command that runs the model: the settings of ``LoadConfig`` and
    ``EngineConfig``, and where the KV store is."""
    settings.add_arguments(parser, LoadConfig)
    settings.add_arguments(parser, EngineConfig)
    parser.add_argument("--cache-service", help="address of a cache service (default: in-process)")
    parser.set_defaults(**dict.fromkeys(SERVER_CHOOSES))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine flags; ``--policy`` and ``--budget`` left out are ``EngineConfig``'s."""
    unset = [name for name in SERVER_CHOOSES if getattr(args, name) is None]
    return settings.from_args(EngineConfig, args, skip=unset)


def _generate(args: argparse.Namespace) -> int:
    if args.server:
        from worker.client import generate_remote

        return generate_remote(args)
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SystemExit(
                f"error: cannot read --prompt-file {args.prompt_file}: {err}"
            ) from None
    else:
        prompt = args.prompt
    sampling = sampling_flags(args).seeded()  # checked before the model loads
    stop = StopText(tuple(args.stop or ()))
    source = settings.from_args(LoadConfig, args)
    engine, tokenizer = build_engine(engine_config(args), source, args.cache_service)
    ids = tokenizer.chat_prompt_ids(prompt) if args.chat else tokenizer.encode(prompt)
    started = time.perf_counter()
    text = TextStream(tokenizer, tokenizer.eos_token_ids)
    out: list[int] = []
    pieces: list[str] = []
    tokens = engine.stream(ids, args.max_new_tokens, tokenizer.eos_token_ids, sampling)
    for token in tokens:  # written as they come, as with --server
        out.append(token)
        piece = stop.push(text.push(token))
        pieces.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
        if stop.stopped:
            tokens.close()  # ends the sequence: no token after the stop string is decoded
            break
    total_s = time.perf_counter() - started
    whole = "".join(pieces)
    if not stop.stopped:  # the text held back for a stop string that never came
        whole = tokenizer.decode([t for t in out if t not in tokenizer.eos_token_ids])
    if args.json:
        print(
            json.dumps(
                {
                    "text": whole,
                    "token_ids": out,
                    "seed": None if sampling.greedy else sampling.seed,
                    "prompt_tokens": len(ids),
                    "policy": engine.config.policy,
                    "budget": None if engine.config.policy == "full" else engine.config.budget,
                    "dense_layers": engine.config.dense_layers,
                    "prefill_s": engine.timings.prefill,
                    "generate_s": total_s,
                    "decode_ms_per_token": engine.timings.decode_ms_per_step,
                    "page_cache": vars(engine.cache.stats),  # zeros when read in place
                    "pages_in_place": engine.in_place is not None,
                }
            )
        )
    else:
        print(whole[len("".join(pieces)) :])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icecache", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a continuation of a prompt")
    add_engine_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="read the prompt from a UTF-8 file")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="no chat template")
    gen.add_argument("--json", action="store_true", help="print a JSON object")
    add_sampling_flags(gen)
    gen.add_argument(
        "--stop", action="append", metavar="TEXT", help="end the text before TEXT (repeatable)"
    )
    gen.add_argument(
        "--server",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="generate through a running worker service instead of in this process (its "
        "engine settings, but for --policy and --budget when given); with several, a stream "
        "that breaks is resumed on the next",
    )
    server_side = [f.name for f in fields(SecurityConfig) if f.name not in CLIENT_SECURITY]
    settings.add_arguments(gen, SecurityConfig, os.environ, skip=server_side)
    gen.set_defaults(func=_generate)
    argv = sys.argv[1:] if argv is None else argv
    if _subcommand(argv) == "eval":  # the offline harness loads only when it is asked for
        from evaluation.command import register as register_eval

        register_eval(sub)
    else:
        sub.add_parser("eval", help="accuracy of the policies against full KV (offline)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _subcommand(argv: list[str]) -> str | None:
    """The first argument that is not an option (the subcommand), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


if __name__ == "__main__":
    sys.exit(main())
