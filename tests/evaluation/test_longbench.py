"""Reading LongBench JSONL files the test writes, and building the official prompts."""

import json

import pytest

from evaluation.longbench import (
    MAX_NEW_TOKENS,
    PROMPTS,
    LongBenchError,
    available_datasets,
    prompt_ids,
    read_dataset,
    truncate_middle,
)


def _line(**fields) -> str:
    base = {
        "input": "Who?",
        "context": "Alice met Bob.",
        "answers": ["Alice"],
        "all_classes": None,
        "length": 3,
        "_id": "x1",
    }
    return json.dumps({**base, **fields})


def test_reads_samples_and_skips_blank_lines(tmp_path):
    (tmp_path / "hotpotqa.jsonl").write_text(_line() + "\n\n" + _line(_id="x2") + "\n")
    samples = read_dataset(tmp_path, "hotpotqa")
    assert [s.sample_id for s in samples] == ["x1", "x2"]
    assert [s.line for s in samples] == [1, 3]
    assert samples[0].answers == ("Alice",) and samples[0].all_classes == ()
    assert available_datasets(tmp_path) == ["hotpotqa"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "trec.jsonl"
    path.write_text(_line() + "\n" + '{"input": "broken"\n')
    with pytest.raises(LongBenchError, match=r"trec\.jsonl:2: not valid JSON"):
        read_dataset(tmp_path, "trec")


def test_wrong_field_type_names_file_line_and_field(tmp_path):
    (tmp_path / "qasper.jsonl").write_text(_line() + "\n" + _line(answers="Alice") + "\n")
    with pytest.raises(LongBenchError, match=r"qasper\.jsonl:2: field 'answers'"):
        read_dataset(tmp_path, "qasper")


def test_unknown_dataset_and_empty_dir_are_errors(tmp_path):
    with pytest.raises(LongBenchError, match="unknown LongBench dataset 'nope'"):
        read_dataset(tmp_path, "nope")
    with pytest.raises(LongBenchError, match="no LongBench files"):
        available_datasets(tmp_path)


def test_official_tables_cover_every_dataset():
    assert set(PROMPTS) == set(MAX_NEW_TOKENS)
    assert len(PROMPTS) == 21
    assert MAX_NEW_TOKENS["gov_report"] == 512 and MAX_NEW_TOKENS["hotpotqa"] == 32


def test_prompt_uses_template_and_chat_except_fewshot(tmp_path, smollm):
    tok = smollm[1]
    (tmp_path / "hotpotqa.jsonl").write_text(_line() + "\n")
    (tmp_path / "trec.jsonl").write_text(_line() + "\n")
    qa = tok.decode(prompt_ids(tok, read_dataset(tmp_path, "hotpotqa")[0], 1024))
    assert "<|im_start|>user" in qa and "Question: Who?\nAnswer:" in qa
    fewshot = tok.decode(prompt_ids(tok, read_dataset(tmp_path, "trec")[0], 1024))
    assert "<|im_start|>" not in fewshot
    assert fewshot.endswith("Alice met Bob.\nWho?")


def test_long_prompt_is_truncated_in_the_middle_to_fit(tmp_path, smollm):
    tok = smollm[1]
    context = "START " + "filler words here. " * 2000 + " END"
    (tmp_path / "hotpotqa.jsonl").write_text(_line(context=context) + "\n")
    ids = prompt_ids(tok, read_dataset(tmp_path, "hotpotqa")[0], 1024)
    assert len(ids) <= 1024 - MAX_NEW_TOKENS["hotpotqa"]
    text = tok.decode(ids)
    assert "Answer the question based on the given passages" in text  # the head survives
    assert "Question: Who?\nAnswer:" in text  # and the tail
    assert len(tok.encode(truncate_middle(tok, context, 100))) <= 102
