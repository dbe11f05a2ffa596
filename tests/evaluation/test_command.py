"""``icecache eval``: argument errors, the session's prefill replay, and one real run."""

import argparse
import json

import pytest
import torch

from evaluation import command
from evaluation.corpus import Corpus, default_text
from evaluation.longbench_metrics import qa_f1_score
from evaluation.session import Session, SessionConfig
from evaluation.tasks import TaskOptions, make_task
from evaluation.tasks.passkey import score_passkey
from worker.factory import open_local


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    return parser.parse_args(["eval", *argv])


BASE = ("--context-len", "512", "--budget", "64", "--samples", "1")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--task", "sudoku", *BASE), "unknown task 'sudoku'"),
        (("--task", "passkey", "--policy", "full,magic", *BASE), "unknown policy 'magic'"),
        (
            ("--task", "passkey", "--text-file", "/nonexistent/x.txt", *BASE),
            "cannot read --text-file /nonexistent/x.txt",
        ),
        (("--task", "passkey", "--context-len", "512", "--samples", "0"), "--samples"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        command.validate(_args(*argv))


def test_bad_numbers_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _args("--task", "passkey", "--context-len", "2k")
    assert "comma-separated integers" in capsys.readouterr().err


def test_empty_text_file_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        command.validate(_args("--task", "ppl", "--text-file", str(tmp_path / "empty.txt"), *BASE))


@pytest.fixture(scope="module")
def session(smollm):
    model, tokenizer = smollm
    return Session(model, tokenizer, open_local(model), SessionConfig())


def test_replayed_prefill_decodes_like_a_real_one(session):
    ids = session.tokenizer.encode(default_text())[:200]
    engine = session.engine("streaming", 64, 256)
    want_seq, want_logits = engine.start(ids)
    want = engine.decode_step([want_seq], [ids[0]])
    engine.finish(want_seq)
    session.forget()
    for _ in range(2):  # the first start records the prefill, the second replays it
        seq, logits = session.start(engine, ids)
        got = engine.decode_step([seq], [ids[0]])
        engine.finish(seq)
        assert torch.equal(logits, want_logits)
        assert torch.allclose(got, want, atol=1e-5)
    session.forget()


def test_recall_is_complete_for_full_and_partial_for_streaming(session):
    corpus = Corpus(default_text(), session.tokenizer)
    task = make_task("recall", corpus, TaskOptions(samples=1, probes=2))
    prompt = task.prompts("selection", 300)[0]
    full = task.run(session, session.engine("full", None, 300), prompt, None)
    stream = task.run(session, session.engine("streaming", 64, 300), prompt, full)
    session.forget()
    assert full.detail.mass == pytest.approx((1.0,) * 30)
    assert full.detail.hit == pytest.approx((1.0,) * 30)
    assert stream.detail.mass[:2] == pytest.approx((1.0, 1.0))  # dense layers
    assert 0.0 < stream.score < 1.0
    assert all(h < 1.0 for h in stream.detail.hit[2:])


def test_eval_runs_end_to_end_on_the_embedded_model(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = _args(
        "--task",
        "passkey",
        "--context-len",
        "512",
        "--budget",
        "64",
        "--policy",
        "streaming",
        "--samples",
        "1",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert command.run_command(args) == 0
    table = capsys.readouterr().out
    assert "passkey / single" in table and "streaming" in table
    doc = json.loads(out.read_text())
    assert [(r["measure"], r["policy"], r["budget"]) for r in doc["summary"]] == [
        ("accuracy", "full", None),
        ("conditional accuracy", "full", None),
        ("accuracy", "streaming", 64),
        ("conditional accuracy", "streaming", 64),
    ]
    assert all(r["samples"] <= 1 and r["paired"] is None for r in doc["summary"])
    sample = doc["samples"][0]
    assert sample["prompt_tokens"] > 500 and len(sample["outcomes"]) == 2
    for outcome in sample["outcomes"]:
        assert outcome["score"] == score_passkey(outcome["output"], sample["answers"][0])
    assert png.stat().st_size > 1000


def test_fidelity_runs_end_to_end_with_bootstrap_intervals(tmp_path, capsys):
    out = tmp_path / "f.json"
    args = _args(
        "--task",
        "fidelity",
        "--context-len",
        "128",
        "--steps",
        "4",
        "--budget",
        "64",
        "--policy",
        "streaming",
        "--samples",
        "2",
        "--json",
        str(out),
    )
    assert command.run_command(args) == 0
    table = capsys.readouterr().out
    assert "fidelity / teacher-forced — KL(full||policy) (lower is better), 128 tokens" in table
    assert "0.000 [0.000, 0.000] n=2 (ref)" in table and "95% bootstrap intervals" in table
    doc = json.loads(out.read_text())
    rows = {(r["measure"], r["policy"]): r for r in doc["summary"]}
    assert set(rows) == {
        (m, p)
        for m in ("top-1 agreement", "KL(full||policy)", "hidden rel. L2")
        for p in ("full", "streaming")
    }
    kl = rows[("KL(full||policy)", "streaming")]
    assert kl["samples"] == 2 and kl["ratio_to_full"] is None and kl["budget"] == 64
    assert kl["interval"]["method"] == "bootstrap"
    assert kl["interval"]["low"] <= kl["score"] <= kl["interval"]["high"]
    details = [s["outcomes"][1]["detail"] for s in doc["samples"]]
    assert kl["score"] == pytest.approx(sum(d["kl"] for d in details) / 2)
    assert all(d["steps"] == 4 and d["kl"] > 0 for d in details)
    assert doc["samples"][0]["outcomes"][0]["detail"] == {
        "steps": 4,
        "top1": 1.0,
        "kl": 0.0,
        "l2": 0.0,
    }


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="--steps"):
        command.validate(_args("--task", "fidelity", "--steps", "0", *BASE))


def test_longbench_runs_on_user_files(tmp_path, capsys):
    data = tmp_path / "lb"
    data.mkdir()
    line = {
        "input": "Who met Bob?",
        "context": "Alice met Bob in Paris. " * 20,
        "answers": ["Alice"],
        "all_classes": None,
        "length": 100,
        "_id": "a",
    }
    (data / "hotpotqa.jsonl").write_text(json.dumps(line) + "\n")
    out = tmp_path / "lb.json"
    args = _args(
        "--task",
        "longbench",
        "--data-dir",
        str(data),
        "--context-len",
        "400",
        "--budget",
        "64",
        "--policy",
        "streaming",
        "--json",
        str(out),
    )
    assert command.run_command(args) == 0
    doc = json.loads(out.read_text())
    assert {r["variant"] for r in doc["summary"]} == {"hotpotqa"}
    assert doc["summary"][0]["measure"] == "LongBench score"
    sample = doc["samples"][0]
    assert sample["description"].startswith("hotpotqa.jsonl line 1")
    for outcome in sample["outcomes"]:  # the official F1 of the output, times 100 in the row
        assert outcome["score"] == qa_f1_score(outcome["output"], "Alice")
    assert doc["summary"][0]["score"] == 100 * sample["outcomes"][0]["score"]


def test_longbench_without_data_dir_is_an_error():
    with pytest.raises(ValueError, match="--data-dir"):
        make_task("longbench", None, TaskOptions())  # type: ignore[arg-type]
