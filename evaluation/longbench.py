"""LongBench (v1) data: the official JSONL files, prompt templates and generation lengths.

Users bring the data (nothing is downloaded): a directory with ``{dataset}.jsonl`` files as
published (fields ``input``, ``context``, ``answers``, ``all_classes``, optionally
``length`` and ``_id``); LongBench-E files (``{dataset}_e.jsonl``) work the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from worker.tokenizer import Tokenizer

PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",  # noqa: E501
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",  # noqa: E501
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",  # noqa: E501
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",  # noqa: E501
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',  # noqa: E501
    "passage_retrieval_zh": '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
"""The official ``config/dataset2prompt.json``."""

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}
"""The official ``config/dataset2maxlen.json`` (tokens generated per dataset)."""

NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
"""Few-shot and code datasets are prompted without the chat template (as ``pred.py``)."""

DATASETS = tuple(PROMPTS)


class LongBenchError(ValueError):
    """A LongBench file or line that cannot be used; the message names where."""


@dataclass(frozen=True)
class LongBenchSample:
    """One line of a LongBench file."""

    dataset: str
    line: int
    input: str
    context: str
    answers: tuple[str, ...]
    all_classes: tuple[str, ...]
    length: int | None
    sample_id: str


def base_dataset(name: str) -> str:
    """``hotpotqa_e`` -> ``hotpotqa``; raises for names LongBench does not have."""
    base = name[:-2] if name.endswith("_e") else name
    if base not in PROMPTS:
        raise LongBenchError(
            f"unknown LongBench dataset {name!r}; known: {', '.join(DATASETS)} (or NAME_e)"
        )
    return base


def available_datasets(data_dir: Path) -> list[str]:
    """Datasets with a file in ``data_dir``, in LongBench's order."""
    if not data_dir.is_dir():
        raise LongBenchError(f"--data-dir {data_dir} is not a directory")
    names = [p.stem for p in sorted(data_dir.glob("*.jsonl"))]
    known = [n for n in names if (n[:-2] if n.endswith("_e") else n) in PROMPTS]
    if not known:
        raise LongBenchError(
            f"no LongBench files in {data_dir}: expected files like hotpotqa.jsonl"
        )
    return known


def read_dataset(data_dir: Path, name: str) -> list[LongBenchSample]:
    """Every sample of ``{data_dir}/{name}.jsonl``; a bad line raises naming file and line."""
    base_dataset(name)
    path = data_dir / f"{name}.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LongBenchError(f"cannot read {path}: {err}") from None
    samples = [_parse(path, i, name, line) for i, line in enumerate(lines, start=1) if line.strip()]
    if not samples:
        raise LongBenchError(f"{path} has no samples")
    return samples


def _parse(path: Path, line_no: int, name: str, line: str) -> LongBenchSample:
    where = f"{path}:{line_no}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise LongBenchError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise LongBenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("input", "context"):
        if not isinstance(obj.get(key), str):
            raise LongBenchError(f"{where}: field {key!r} must be a string")
    answers = obj.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise LongBenchError(f"{where}: field 'answers' must be a list of strings")
    classes = obj.get("all_classes") or []
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise LongBenchError(f"{where}: field 'all_classes' must be null or a list of strings")
    length = obj.get("length")
    return LongBenchSample(
        dataset=name,
        line=line_no,
        input=obj["input"],
        context=obj["context"],
        answers=tuple(answers),
        all_classes=tuple(classes),
        length=length if isinstance(length, int) else None,
        sample_id=str(obj.get("_id", line_no)),
    )


def truncate_middle(tokenizer: Tokenizer, prompt: str, max_tokens: int) -> str:
    """``pred.py``'s truncation: keep the first and last ``max_tokens // 2`` tokens."""
    ids = tokenizer.encode(prompt)
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
        ids[-half:], skip_special_tokens=True
    )


def prompt_ids(tokenizer: Tokenizer, sample: LongBenchSample, context_len: int) -> list[int]:
    """The official prompt, truncated in the middle so prompt + generation fit ``context_len``.

    The template is filled, the text cut to ``context_len - max_new_tokens - template
    overhead`` tokens, then wrapped in the chat template except for the datasets that
    ``pred.py`` prompts raw.
    """
    dataset = base_dataset(sample.dataset)
    text = PROMPTS[dataset].format(input=sample.input, context=sample.context)
    chat = dataset not in NO_CHAT_TEMPLATE
    overhead = len(tokenizer.chat_prompt_ids("")) if chat else 2
    room = context_len - MAX_NEW_TOKENS[dataset] - overhead
    if room < 64:
        raise LongBenchError(
            f"context length {context_len} leaves {room} prompt tokens for {dataset}; raise it"
        )
    text = truncate_middle(tokenizer, text, room)
    if chat:
        return tokenizer.chat_prompt_ids(text)
    return tokenizer.encode(text, add_special_tokens=True)
