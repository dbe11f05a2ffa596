"""A benchmark at two revisions, interleaved in one run: is the new code slower than the old?

    .venv/bin/python -m bench.revisions --old a553aad --new HEAD [--rounds 2]

Each revision is checked out into its own git worktree (its gRPC stubs built there) and run
with ``PYTHONPATH`` pointing at it, so its servers and clients import that revision's code.
Then ``bench.offload`` and ``bench.load`` run old, new, old, new, ... (``--rounds`` times),
each writing its Markdown report to a scratch file; a noisy machine slows both alike. From
each report the headline numbers are read back (offload: decode ms/token per store and
context; load: tokens/s per client count, calls/s per replica count), and
``bench/results/revisions.md`` gives per number the median of each revision over the rounds
and new / old.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "revisions.md"

BENCHES: dict[str, list[str]] = {
    "offload": ["-m", "bench.offload", "--contexts", "2048", "--new-tokens", "8"],
    "load-worker": ["-m", "bench.load", "--mode", "worker", "--clients", "2", "--requests", "2"],
    "load-retrieval": [
        "-m",
        "bench.load",
        "--mode",
        "retrieval",
        "--replicas",
        "1,2",
        "--calls",
        "100",
    ],
}
"""Each bench's command after ``python`` (``--out FILE`` is added); sized to minutes."""

HEADLINE = {
    "offload": ("store", "decode ms/token (median)", False),
    "load-worker": ("clients", "tokens/s", True),
    "load-retrieval": ("replicas", "calls/s", True),
}
"""Per bench: the row key column, the number read, and whether higher is better."""
SPLIT_BY = {"load-worker": ("API", "gRPC")}
"""Per bench: a column that splits its rows where a report has it, and the value a report
without the column means (the load test measured only gRPC before it measured HTTP too)."""


def worktree(rev: str, where: Path) -> Path:
    """``rev`` checked out at ``where`` with its stubs built; returns ``where``."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), rev], check=True
    )
    subprocess.run([sys.executable, "-m", "proto.build"], cwd=where, env=_env(where), check=True)
    return where


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}


def run(bench: str, tree: Path, out: Path, policy: str) -> float:
    """One run of ``bench`` with ``tree``'s code and ``policy``; its report goes to ``out``;
    seconds."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, *BENCHES[bench], "--policy", policy, "--out", str(out)],
        cwd=tree,
        env=_env(tree),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def headline(bench: str, report: str) -> dict[str, float]:
    """``{row label: number}`` from every Markdown table of ``report`` with the columns
    (the median where several rows have one label: rounds inside one report). A label is
    the section's title up to a colon (titles grow subtitles), the key and ``SPLIT_BY``."""
    key_col, value_col, _ = HEADLINE[bench]
    found: dict[str, list[float]] = {}
    section = ""
    header: list[str] | None = None
    for line in report.splitlines():
        if line.startswith("## "):
            section = line[3:].split(":")[0].strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if set(line) <= set("|-: "):
            continue
        if key_col in header and value_col in header:
            label = f"{section}: {cells[header.index(key_col)]}" if section else cells[0]
            if bench in SPLIT_BY:
                column, absent = SPLIT_BY[bench]
                label += f" ({cells[header.index(column)] if column in header else absent})"
            number = re.match(r"[-0-9.]+", cells[header.index(value_col)])
            if number:
                found.setdefault(label, []).append(float(number.group()))
    return {label: statistics.median(values) for label, values in found.items()}


def markdown(
    results: dict[str, dict[str, list[dict[str, float]]]], args: argparse.Namespace
) -> str:
    lines = [
        "# Old and new code side by side",
        "",
        f"`python -m bench.revisions --old {args.old} --new {args.new} --rounds {args.rounds}"
        f" --benches {args.benches} --policy {args.policy}`"
        f" on {platform.machine()}, {os.cpu_count()} cores, written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each bench ran old, new, old,"
        " new, ... in one process; other jobs shared the cores, so only the ratios mean"
        " something. Medians over the rounds.",
        "",
    ]
    for bench, by_rev in results.items():
        _, value_col, higher = HEADLINE[bench]
        better = "higher" if higher else "lower"
        lines += [
            f"## {bench}: {value_col} ({better} is better)",
            "",
            "| row | old | new | new / old |",
            "| --- | ---: | ---: | ---: |",
        ]
        labels = list(dict.fromkeys(k for run in by_rev["old"] + by_rev["new"] for k in run))
        for label in labels:
            old = [r[label] for r in by_rev["old"] if label in r]
            new = [r[label] for r in by_rev["new"] if label in r]
            if not old or not new:
                continue
            o, n = statistics.median(old), statistics.median(new)
            lines.append(f"| {label} | {o:.1f} | {n:.1f} | {n / o:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", required=True, help="git revision of the old code")
    p.add_argument("--new", default="HEAD", help="git revision of the new code")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--benches", default=",".join(BENCHES))
    p.add_argument(
        "--policy",
        default="icecache",
        help="the policy every bench runs (streaming: the code around the index only)",
    )
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="revisions-"))
    trees = {"old": scratch / "old", "new": scratch / "new"}
    try:
        worktree(args.old, trees["old"])
        worktree(args.new, trees["new"])
        results: dict[str, dict[str, list[dict[str, float]]]] = {}
        for bench in args.benches.split(","):
            results[bench] = {"old": [], "new": []}
            for round_ in range(args.rounds):
                for rev, tree in trees.items():
                    out = scratch / f"{bench}-{rev}-{round_}.md"
                    seconds = run(bench, tree, out, args.policy)
                    results[bench][rev].append(headline(bench, out.read_text()))
                    print(f"{bench} {rev} round {round_}: {seconds:.0f} s", flush=True)
        args.out.write_text(markdown(results, args), encoding="utf-8")
        print(args.out.read_text())
    finally:
        for tree in trees.values():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
