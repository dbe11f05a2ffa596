"""Generate the Python gRPC stubs next to each ``.proto`` (``python -m proto.build``).

Runs ``grpc_tools.protoc`` with the repository root as the include path, so generated imports
are package-qualified (``from proto.icecache.v1 import cache_service_pb2``). A stub newer than
its ``.proto`` and this script is up to date and left alone; generation writes to a temporary
directory and moves the files into place, so concurrent builds never see half a file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
"""The directory that holds the ``proto`` package (the include root)."""


def outputs(proto: Path) -> list[Path]:
    """The stubs generated from one ``.proto`` (messages, their type stubs, the service)."""
    stem = proto.with_suffix("")
    return [
        stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    ]


def is_stale(proto: Path) -> bool:
    """Whether a stub of ``proto`` is missing or older than it (or than this script)."""
    newest_input = max(proto.stat().st_mtime, Path(__file__).stat().st_mtime)
    return any(not out.exists() or out.stat().st_mtime < newest_input for out in outputs(proto))


def generate(proto: Path) -> None:
    """Run protoc for one file, then move its stubs into place."""
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    relative = proto.relative_to(ROOT)
    with tempfile.TemporaryDirectory(dir=proto.parent) as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {relative}; see the messages above")
        for out in outputs(proto):
            os.replace(Path(tmp) / out.relative_to(ROOT), out)
    log.info("generated stubs for %s", relative)


def build(force: bool = False) -> list[Path]:
    """Generate stale stubs under ``proto/``; returns the ``.proto`` files regenerated."""
    done = []
    for proto in sorted((ROOT / "proto").rglob("*.proto")):
        if force or is_stale(proto):
            generate(proto)
            done.append(proto)
    return done


def ensure_generated() -> None:
    """Generate missing or stale stubs (called when the ``proto`` packages are imported)."""
    build()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proto.build", description=__doc__)
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    done = build(force=args.force)
    if not done:
        log.info("gRPC stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
