"""The gRPC stubs are build output: ``make proto`` writes them, importing never does."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import proto.build

ROOT = proto.build.ROOT
GRPC_TOOLS_PIN = re.compile(r"grpcio-tools==([\w.]+)")


def _copy_protos_without_stubs(dest: Path) -> Path:
    shutil.copytree(
        ROOT / "proto", dest / "proto", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__")
    )
    return dest / "proto" / "icecache" / "v1"


def test_import_without_stubs_fails_and_says_to_run_make_proto(tmp_path):
    package = _copy_protos_without_stubs(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", "from proto.icecache.v1 import cache_service_pb2"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "make proto" in result.stderr
    assert not list(package.glob("*_pb2*")), "the import generated stubs"


def test_build_writes_every_stub_of_every_proto(tmp_path):
    package = _copy_protos_without_stubs(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "proto.build"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in package.glob("*_pb2*")) == [
        "cache_service_pb2.py",
        "cache_service_pb2.pyi",
        "cache_service_pb2_grpc.py",
        "worker_pb2.py",
        "worker_pb2.pyi",
        "worker_pb2_grpc.py",
    ]


def test_the_built_stubs_import_without_grpcio_tools():
    blocked = "import sys; sys.modules['grpc_tools'] = None; "  # any import of it now fails
    result = subprocess.run(
        [sys.executable, "-c", blocked + "from proto.icecache.v1 import worker_pb2_grpc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_grpcio_tools_is_a_dev_dependency_pinned_alike_in_the_dockerfile():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(GRPC_TOOLS_PIN.match(dep) for dep in project["dependencies"])
    dev_pins = [
        m[1] for dep in project["optional-dependencies"]["dev"] if (m := GRPC_TOOLS_PIN.match(dep))
    ]
    docker_pins = GRPC_TOOLS_PIN.findall((ROOT / "Dockerfile").read_text())
    assert len(dev_pins) == 1
    assert docker_pins == dev_pins
