"""CI smoke set of bench/accuracy.py: tiny cells through the real run, journal and report."""

import json

from bench import accuracy
from bench.accuracy import Suite

SMOKE = (
    Suite("fidelity", ("teacher-forced",), (300,)),
    Suite("recall", ("selection",), (300,)),
    Suite("passkey", ("single",), (300,)),
)


def test_the_smoke_set_runs_resumes_and_reports(tmp_path, smollm):
    args = accuracy.parse_args(
        [
            "--out-dir",
            str(tmp_path),
            "--prefill-cache",
            str(tmp_path / "prefills"),
            "--policies",
            "oracle,icecache,streaming",
            "--steps",
            "4",
            "--probes",
            "2",
            "--jobs",
            "1",
        ]
    )
    accuracy.run_group(args, SMOKE, 1)
    journal = tmp_path / "accuracy.jsonl"
    lines = journal.read_text().splitlines()
    assert [json.loads(x)["sample"]["task"] for x in lines] == ["fidelity", "recall", "passkey"]
    assert all(json.loads(x)["meta"]["commit"] for x in lines)
    assert len(list((tmp_path / "prefills").iterdir())) == 3  # one capture per distinct input

    accuracy.run_group(args, SMOKE, 1)  # everything is done: nothing runs, nothing is added
    assert journal.read_text().splitlines() == lines

    accuracy.write_report(args, None)
    report = (tmp_path / "accuracy.md").read_text()
    assert "| pydoc | fidelity | teacher-forced | 300 | 1 | " in report
    assert "icecache's fidelity gap ≤ 1.25× oracle's" in report
    assert "pass key (≥ 30 samples)" in report and "MISS" in report  # n = 1 < 30
    assert "trained to\n  8192 positions" in report
    summary = json.loads((tmp_path / "accuracy.json").read_text())["summary"]["pydoc"]
    fid = {(r["policy"], r["budget"], r["measure"]): r for r in summary if r["task"] == "fidelity"}
    assert fid[("full", None, "KL(full||policy)")]["score"] == 0.0
    assert fid[("full", None, "top-1 agreement")]["score"] == 1.0
    assert (tmp_path / "accuracy-pydoc.png").stat().st_size > 1000
