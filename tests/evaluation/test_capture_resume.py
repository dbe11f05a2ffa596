"""Prefill captures on disk, resumable runs, and the opt-in past the trained context."""

import json

import numpy as np
import pytest
import torch

from evaluation.capture import PrefillStore, model_digest
from evaluation.command import extrapolation_note
from evaluation.corpus import Corpus, default_text
from evaluation.journal import Journal
from evaluation.runner import EvalPlan, Resume, run_plan
from evaluation.session import Session, SessionConfig
from evaluation.tasks import TaskOptions, make_task
from worker.engine import Engine, EngineConfig
from worker.factory import open_local
from worker.loader import load_model


# ---- the capture store alone ----------------------------------------------------------
def _arrays(layers=3, tokens=5, heads=2, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    keys = [rng.standard_normal((tokens, heads, dim)).astype(np.float32) for _ in range(layers)]
    values = [rng.standard_normal((tokens, heads, dim)).astype(np.float32) for _ in range(layers)]
    return keys, values, rng.standard_normal(7).astype(np.float32)


def test_a_capture_round_trips_in_float16(tmp_path):
    store = PrefillStore(tmp_path, "model-a")
    ids = [5, 6, 7, 8, 9]
    keys, values, logits = _arrays()
    assert store.load(ids) is None
    saved = store.save(ids, keys, values, logits)
    loaded = store.load(ids)
    for got in (saved, loaded):
        assert got.keys.dtype == np.float16 and got.keys.shape == (3, 5, 2, 4)
        np.testing.assert_array_equal(got.keys, np.stack(keys).astype(np.float16))
        np.testing.assert_array_equal(got.values, np.stack(values).astype(np.float16))
        np.testing.assert_array_equal(got.logits, logits)
    assert [p.name for p in tmp_path.iterdir()] == [store.directory(ids).name]  # no temp left


def test_captures_are_keyed_by_model_and_ids(tmp_path):
    keys, values, logits = _arrays()
    PrefillStore(tmp_path, "model-a").save([1, 2, 3, 4, 5], keys, values, logits)
    assert PrefillStore(tmp_path, "model-b").load([1, 2, 3, 4, 5]) is None
    assert PrefillStore(tmp_path, "model-a").load([1, 2, 3, 4, 6]) is None
    assert PrefillStore(tmp_path, "model-a").load([1, 2, 3, 4, 5]) is not None


def test_extras_live_beside_their_capture(tmp_path):
    store = PrefillStore(tmp_path, "m")
    ids = [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="no prefill capture"):
        store.save_extra(ids, "probes", {"q": np.zeros(2)})
    store.save(ids, *_arrays())
    assert store.load_extra(ids, "probes") == {}
    store.save_extra(ids, "probes", {"q": np.arange(6.0).reshape(2, 3)})
    np.testing.assert_array_equal(
        store.load_extra(ids, "probes")["q"], np.arange(6.0).reshape(2, 3)
    )


def test_a_capture_must_cover_every_token(tmp_path):
    keys, values, logits = _arrays(tokens=5)
    with pytest.raises(ValueError, match="every token"):
        PrefillStore(tmp_path, "m").save([1, 2, 3], keys, values, logits)


def test_the_model_digest_sees_one_changed_weight(smollm):
    model, _ = smollm
    before = model_digest(model, model.config)
    assert model_digest(model, model.config) == before
    with torch.no_grad():
        model.norm.weight[0] += 1.0
        try:
            assert model_digest(model, model.config) != before
        finally:
            model.norm.weight[0] -= 1.0


# ---- sessions over captures -------------------------------------------------------------
def _session(smollm, tmp_path=None):
    model, tokenizer = smollm
    session = Session(model, tokenizer, open_local(model), SessionConfig())
    if tmp_path is not None:
        session.prefills = PrefillStore(tmp_path, "smollm")
    return session


def _first_steps(session, ids, policy="streaming"):
    engine = session.engine(policy, 64, 256)
    seq, logits = session.start(engine, ids)
    steps = [engine.decode_step([seq], [t])[0] for t in ids[:3]]
    engine.finish(seq)
    return logits, torch.stack(steps), engine


def test_a_later_session_replays_the_capture_without_a_prefill(smollm, tmp_path):
    ids = smollm[1].encode(default_text())[:200]
    first = _session(smollm, tmp_path)
    logits, steps, _ = _first_steps(first, ids)
    assert first.prefills_computed == 1
    capture = first.prefills.load(ids)
    assert capture is not None and capture.tokens == 200

    later = _session(smollm, tmp_path)
    got_logits, got_steps, engine = _first_steps(later, ids)
    assert later.prefills_computed == 0 and engine.timings.prefill_tokens == 0
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(got_steps, steps, rtol=0, atol=0)  # same float16 K/V in both


def test_every_policy_decodes_over_the_same_rounded_prefill(smollm, tmp_path):
    ids = smollm[1].encode(default_text())[1000:1200]
    plain = _session(smollm)
    _first_steps(plain, ids)
    exact = plain.prefill_keys(ids)
    captured = _session(smollm, tmp_path)
    _first_steps(captured, ids, "full")  # the first start computes, stores and replays
    rounded = captured.prefill_keys(ids)
    for want, got in zip(exact, rounded, strict=True):
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))


# ---- resumable runs -----------------------------------------------------------------------
def _passkey_run(session, journal_path, samples, policies=("full", "streaming")):
    corpus = Corpus(default_text(), session.tokenizer)
    task = make_task("passkey", corpus, TaskOptions(samples=samples))
    plan = EvalPlan(("single",), (300,), policies, (64,))
    return run_plan(session, task, plan, Resume(Journal(journal_path), "pydoc"))


def test_a_rerun_skips_finished_samples_and_runs_only_new_ones(smollm, tmp_path):
    path = tmp_path / "journal.jsonl"
    session = _session(smollm)
    first = _passkey_run(session, path, 1)
    assert len(path.read_text().splitlines()) == 1
    session.prefills_computed = 0

    again = _passkey_run(session, path, 1)
    assert session.prefills_computed == 0  # nothing ran
    assert again.samples == first.samples and again.rows == first.rows

    grown = _passkey_run(session, path, 2)
    assert session.prefills_computed == 1  # only the new sample ran
    assert grown.samples[0] == first.samples[0] and len(grown.samples) == 2
    assert len(path.read_text().splitlines()) == 2


def test_a_torn_last_line_is_skipped_and_the_sample_run_again(smollm, tmp_path):
    path = tmp_path / "journal.jsonl"
    session = _session(smollm)
    _passkey_run(session, path, 1)
    line = path.read_text()
    path.write_text(line + line[: len(line) // 2])  # a run killed mid-write
    assert len(Journal(path)) == 1
    path.write_text(line[: len(line) // 2])
    assert len(Journal(path)) == 0


def test_a_sample_missing_a_requested_policy_is_not_done(smollm, tmp_path):
    path = tmp_path / "journal.jsonl"
    session = _session(smollm)
    record = _passkey_run(session, path, 1).samples[0]
    journal = Journal(path)
    pairs = [("full", None), ("streaming", 64)]
    assert journal.get("pydoc", "passkey", "single", 300, record.seed, pairs) == record
    assert (
        journal.get("pydoc", "passkey", "single", 300, record.seed, [*pairs, ("quest", 64)]) is None
    )
    assert journal.get("other-corpus", "passkey", "single", 300, record.seed, pairs) is None
    saved = json.loads(path.read_text())
    assert saved["signature"] == "pydoc" and saved["sample"]["task"] == "passkey"


def test_a_sample_missing_a_policy_runs_it_and_full_again_and_keeps_the_rest(smollm, tmp_path):
    path = tmp_path / "journal.jsonl"
    session = _session(smollm)
    first = _passkey_run(session, path, 1).samples[0]
    grown = _passkey_run(session, path, 1, ("full", "streaming", "quest")).samples[0]
    assert [(o.policy, o.budget) for o in grown.outcomes] == [
        ("full", None),
        ("streaming", 64),
        ("quest", 64),
    ]
    assert grown.outcomes[1] == first.outcomes[1]  # kept: the same run time, not run again
    again = grown.outcomes[0]  # full ran again, as the reference, with the same answer
    assert (again.output, again.score) == (first.outcomes[0].output, first.outcomes[0].score)
    assert again.seconds != first.outcomes[0].seconds
    pairs = [("full", None), ("streaming", 64), ("quest", 64)]
    assert Journal(path).get("pydoc", "passkey", "single", 300, first.seed, pairs) == grown


# ---- past the trained context ---------------------------------------------------------------
@pytest.fixture(scope="module")
def short_model(tiny_checkpoint):
    """A tiny random model trained (configured) to 64 positions."""
    return load_model(tiny_checkpoint(max_position_embeddings=64))


def test_prompts_past_the_trained_context_need_the_opt_in(short_model):
    model, _ = short_model
    ids = list(range(5, 105))  # 100 tokens, trained to 64
    refusing = Engine(model, open_local(model), EngineConfig(policy="full"))
    with pytest.raises(ValueError, match="supports 64"):
        refusing.start(ids)
    allowed = Engine(
        model, open_local(model), EngineConfig(policy="full", allow_extrapolation=True)
    )
    seq, logits = allowed.start(ids)
    allowed.finish(seq)
    reference = model.dense_forward(torch.tensor(ids))[-1]
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_the_eval_plan_refuses_long_contexts_unless_allowed(short_model):
    model, tokenizer = short_model
    corpus = Corpus(default_text(), tokenizer)
    task = make_task("recall", corpus, TaskOptions(samples=1, probes=2))
    plan = EvalPlan(("selection",), (100,), ("full", "streaming"), (32,))
    refusing = Session(model, tokenizer, open_local(model), SessionConfig())
    with pytest.raises(ValueError, match="--allow-extrapolation"):
        run_plan(refusing, task, plan)
    assert extrapolation_note(refusing, (32, 48)) is None
    note = extrapolation_note(refusing, (48, 100))
    assert note is not None and "trained to 64 positions" in note and "100" in note

    allowed = Session(model, tokenizer, open_local(model), SessionConfig(allow_extrapolation=True))
    result = run_plan(allowed, task, plan)
    full = [r for r in result.rows if r.policy == "full" and r.measure.startswith("attention")]
    assert full[0].score == pytest.approx(1.0)
