"""``icecache generate`` in process: the text is written as the tokens come, stop strings end
the generation, ``--json`` prints one object with the engine's tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

from worker import cli
from worker.engine import EngineConfig
from worker.factory import build_engine
from worker.sampling import GREEDY, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Once upon a time, in a small village by the sea, there lived"
ARGS = ["generate", "--prompt", PROMPT, "--no-chat", "--policy", "icecache", "--budget", "64"]


def _engine_tokens(smollm, n, sampling=GREEDY):
    model, tokenizer = smollm
    engine, _ = build_engine(EngineConfig(policy="icecache", budget=64), loaded=(model, tokenizer))
    return engine.generate(tokenizer.encode(PROMPT), n, tokenizer.eos_token_ids, sampling)


def _text(tokenizer, ids):
    return tokenizer.decode([t for t in ids if t not in tokenizer.eos_token_ids])


def test_the_text_is_written_while_the_model_still_decodes(smollm):
    tokenizer = smollm[1]
    want = _text(tokenizer, _engine_tokens(smollm, 32))
    command = [sys.executable, "-m", "worker.cli", *ARGS, "--max-new-tokens", "32"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        first = os.read(proc.stdout.fileno(), 1 << 16)  # blocks until the first piece
        still_running = proc.poll() is None
        rest = proc.stdout.read()
        assert proc.wait(timeout=300) == 0
    assert first and still_running  # text came out before the last token was decoded
    assert (first + rest).decode() == want + "\n"


def test_json_and_stop_strings_in_process(smollm, capsys):
    tokenizer = smollm[1]
    sampled = SamplingParams(temperature=0.8, top_k=40, seed=5)
    want = _engine_tokens(smollm, 12, sampled)
    flags = ["--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "40"]
    assert cli.main([*ARGS, *flags, "--sample-seed", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["token_ids"], printed["seed"]) == (want, 5)
    assert printed["text"] == _text(tokenizer, want)
    assert printed["pages_in_place"] and printed["page_cache"]["loads"] == 0  # CPU, in process
    text = printed["text"]
    stop = text[4:7]
    assert cli.main([*ARGS, *flags, "--sample-seed", "5", "--stop", stop, "--json"]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["text"] == text[: text.index(stop)]
    # the generation ended at the token that completed the stop string
    kept = next(i for i in range(1, len(want) + 1) if stop in _text(tokenizer, want[:i]))
    assert cut["token_ids"] == want[:kept]
    assert cli.main([*ARGS, *flags, "--sample-seed", "5", "--stop", stop]) == 0
    assert capsys.readouterr().out == text[: text.index(stop)] + "\n"
