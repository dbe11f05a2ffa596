"""Run the services of ``docker-compose.yml`` as local processes, without a docker engine.

``python -m worker.launcher [-f docker-compose.yml] [--profile P] [SERVICE ...]`` reads the
compose file, starts each selected service's ``command`` with its ``environment`` as a child
process, in ``depends_on`` order, waits for each one's ``healthcheck`` (the same command
docker would run), and keeps them running until Ctrl-C or SIGTERM, then stops them all.

What stands in for the container runtime, so that one file serves both:

- ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$`` are interpolated as compose
  does, from the launcher's environment (plus ``overrides``);
- every service runs on this host's loopback: ``0.0.0.0`` becomes ``127.0.0.1``, and a
  service name used as a host (``cache-0:50061``) becomes ``127.0.0.1:50061``, so each
  service must listen on its own port (the compose file gives each one a port variable);
- ``python`` is this interpreter; services run in the repository root with this process's
  environment plus their own ``environment``;
- services in a profile start only when that profile is asked for, as with compose.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
_VAR = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|(?P<bare>\w+))")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


@dataclass(frozen=True)
class Healthcheck:
    """A service's compose ``healthcheck``."""

    test: tuple[str, ...]
    """The probe's command (``CMD`` form); exit status 0 means healthy."""
    interval_s: float = 30.0
    timeout_s: float = 30.0
    retries: int = 3
    start_period_s: float = 0.0
    start_interval_s: float = 5.0


@dataclass(frozen=True)
class ServiceSpec:
    """One compose service, interpolated."""

    name: str
    command: tuple[str, ...]
    environment: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[tuple[int, int], ...] = ()
    """Published ``(host, container)`` ports."""
    healthcheck: Healthcheck | None = None
    depends_on: Mapping[str, str] = field(default_factory=dict)
    """Service name -> condition (``service_started`` or ``service_healthy``)."""
    profiles: tuple[str, ...] = ()


# ---- reading the compose file -----------------------------------------------------------------
def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose-style variable substitution; an unset variable without default is an error."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        value = env.get(name)
        op = match.group("op")
        if op == ":-" and not value or op == "-" and value is None:
            return match.group("default")
        if value is None:
            raise ValueError(f"${{{name}}} is not set and has no default in the compose file")
        return value

    return _VAR.sub(sub, text)


def _deep_interpolate(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_deep_interpolate(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _deep_interpolate(v, env) for k, v in node.items()}
    return node


def parse_duration(text: str | int | float) -> float:
    """``"1m30s"``, ``"500ms"``, ``"10s"`` -> seconds."""
    if isinstance(text, int | float):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text.replace(" ", ""):
        raise ValueError(f"cannot read {text!r} as a duration; write e.g. 10s, 1m30s or 500ms")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def _healthcheck(raw: Mapping[str, Any] | None) -> Healthcheck | None:
    if not raw or raw.get("disable"):
        return None
    test = raw["test"]
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if test[0] == "CMD-SHELL":
        test = ["CMD", "sh", "-c", " ".join(test[1:])]
    if test[0] != "CMD":
        raise ValueError(f"healthcheck test must start with CMD or CMD-SHELL, got {test[0]!r}")
    durations = {
        f"{key}_s": parse_duration(raw[key])
        for key in ("interval", "timeout", "start_period", "start_interval")
        if key in raw
    }
    return Healthcheck(tuple(test[1:]), retries=int(raw.get("retries", 3)), **durations)


def _environment(raw: Any) -> dict[str, str]:
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {k: "" if v is None else str(v) for k, v in (raw or {}).items()}


def _ports(raw: list[Any]) -> tuple[tuple[int, int], ...]:
    out = []
    for item in raw:
        parts = str(item).split("/")[0].split(":")
        host, container = (parts[-1], parts[-1]) if len(parts) == 1 else (parts[-2], parts[-1])
        out.append((int(host), int(container)))
    return tuple(out)


def _depends(raw: Any) -> dict[str, str]:
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {k: (v or {}).get("condition", "service_started") for k, v in (raw or {}).items()}


def load_compose(
    path: str | Path = COMPOSE_FILE, overrides: Mapping[str, str] | None = None
) -> dict[str, ServiceSpec]:
    """The services of a compose file, interpolated from the environment and ``overrides``."""
    raw = yaml.safe_load(Path(path).read_text())
    env = {**os.environ, **(overrides or {})}
    services = {}
    for name, body in raw["services"].items():
        body = _deep_interpolate(body, env)
        command = body.get("command")
        if command is None:
            raise ValueError(f"service {name} has no command; the launcher needs one")
        services[name] = ServiceSpec(
            name=name,
            command=tuple(shlex.split(command) if isinstance(command, str) else command),
            environment=_environment(body.get("environment")),
            ports=_ports(body.get("ports", [])),
            healthcheck=_healthcheck(body.get("healthcheck")),
            depends_on=_depends(body.get("depends_on")),
            profiles=tuple(body.get("profiles", ())),
        )
    return services


def select(
    services: Mapping[str, ServiceSpec],
    names: list[str] | None = None,
    profiles: tuple[str, ...] = (),
) -> list[ServiceSpec]:
    """The services to run, dependencies first: ``names`` (and what they depend on) or every
    service whose profiles are active (none: only services without a profile)."""
    wanted = list(names) if names else [
        n for n, s in services.items() if not s.profiles or set(s.profiles) & set(profiles)
    ]  # fmt: skip
    order: list[ServiceSpec] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"depends_on cycle: {' -> '.join((*path, name))}")
        if name not in services:
            raise ValueError(f"no service {name!r} in the compose file")
        if any(s.name == name for s in order):
            return
        for dep in services[name].depends_on:
            visit(dep, (*path, name))
        order.append(services[name])

    for name in wanted:
        visit(name, ())
    return order


def localize(spec: ServiceSpec, service_names: list[str]) -> ServiceSpec:
    """The service as a loopback process: hosts -> 127.0.0.1, ``python`` -> this interpreter."""
    hosts = re.compile(
        r"(?<![\w.-])(?:0\.0\.0\.0|"
        + "|".join(re.escape(n) for n in sorted(service_names, key=len, reverse=True))
        + r")(?=:\d)"
    )

    def fix(text: str) -> str:
        return "127.0.0.1" if text == "0.0.0.0" else hosts.sub("127.0.0.1", text)

    def command(args: tuple[str, ...]) -> tuple[str, ...]:
        args = tuple(fix(a) for a in args)
        return (sys.executable, *args[1:]) if args and args[0] in ("python", "python3") else args

    check = spec.healthcheck
    return replace(
        spec,
        command=command(spec.command),
        environment={k: fix(v) for k, v in spec.environment.items()},
        healthcheck=replace(check, test=command(check.test)) if check else None,
    )


# ---- running ----------------------------------------------------------------------------------
class ServiceFailed(RuntimeError):
    """A service exited or did not become healthy in time."""


@dataclass
class Running:
    spec: ServiceSpec
    process: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class LocalCluster:
    """Compose services as child processes; a context manager that stops them on exit."""

    def __init__(
        self,
        services: list[ServiceSpec],
        cwd: Path = ROOT,
        log_dir: Path | None = None,
        all_names: list[str] | None = None,
    ) -> None:
        names = all_names or [s.name for s in services]
        self.services = [localize(s, names) for s in services]
        self.cwd = cwd
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="icecache-cluster-"))
        self.running: dict[str, Running] = {}

    @classmethod
    def from_compose(
        cls,
        path: str | Path = COMPOSE_FILE,
        overrides: Mapping[str, str] | None = None,
        names: list[str] | None = None,
        profiles: tuple[str, ...] = (),
        log_dir: Path | None = None,
    ) -> LocalCluster:
        services = load_compose(path, overrides)
        chosen = select(services, names, profiles)
        return cls(chosen, Path(path).resolve().parent, log_dir, list(services))

    def address(self, name: str) -> str:
        """``127.0.0.1:<first published port>`` of a service."""
        spec = next(s for s in self.services if s.name == name)
        return f"127.0.0.1:{spec.ports[0][0]}"

    def start(self, timeout: float = 300.0) -> LocalCluster:
        """Start every service in order, each after its dependencies are up (or healthy)."""
        deadline = time.monotonic() + timeout
        try:
            for spec in self.services:
                for dep, condition in spec.depends_on.items():
                    if condition == "service_healthy":
                        self.wait_healthy(dep, deadline)
                self._spawn(spec)
            for spec in self.services:
                self.wait_healthy(spec.name, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, spec: ServiceSpec) -> None:
        log_path = self.log_dir / f"{spec.name}.log"
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                spec.command,
                cwd=self.cwd,
                env={**os.environ, **spec.environment},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running[spec.name] = Running(spec, process, log_path)
        log.info("started %s (pid %d): %s", spec.name, process.pid, shlex.join(spec.command))

    def wait_healthy(self, name: str, deadline: float) -> None:
        """Run the service's healthcheck until it passes; ``ServiceFailed`` otherwise."""
        run = self.running[name]
        check = run.spec.healthcheck
        if check is None:
            return
        while True:
            if run.process.poll() is not None:
                raise ServiceFailed(
                    f"{name} exited with status {run.process.returncode}:\n{run.tail()}"
                )
            if self._probe(check):
                log.info("%s is healthy", name)
                return
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{name} is not healthy in time:\n{run.tail()}")
            time.sleep(check.start_interval_s)

    def _probe(self, check: Healthcheck) -> bool:
        try:
            probe = subprocess.run(
                check.test, cwd=self.cwd, capture_output=True, timeout=check.timeout_s
            )
        except subprocess.TimeoutExpired:
            return False
        return probe.returncode == 0

    def kill(self, name: str) -> int:
        """SIGKILL one service (no cleanup: what a crash looks like); returns its status."""
        process = self.running[name].process
        process.kill()
        code = process.wait()
        log.info("killed %s (pid %d)", name, process.pid)
        return code

    def restart(self, name: str, timeout: float = 120.0) -> None:
        """Start a service that exited (or was killed) again and wait until it is healthy."""
        run = self.running[name]
        if run.process.poll() is None:
            raise ServiceFailed(f"{name} is still running; stop or kill it first")
        self._spawn(run.spec)
        self.wait_healthy(name, time.monotonic() + timeout)

    def pid(self, name: str) -> int:
        return self.running[name].process.pid

    def stop(self, grace: float = 20.0) -> dict[str, int]:
        """SIGTERM every service (dependents first), SIGKILL after ``grace`` s; exit codes."""
        codes = {}
        for name in reversed(list(self.running)):
            process = self.running[name].process
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                codes[name] = process.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %g s; killing it", name, grace)
                process.kill()
                codes[name] = process.wait()
        self.running.clear()
        return codes

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.launcher", description=__doc__)
    parser.add_argument("-f", "--file", default=str(COMPOSE_FILE), help="compose file")
    parser.add_argument("--profile", action="append", default=[], help="activate a profile")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to become healthy")
    parser.add_argument("services", nargs="*", help="services to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher: %(message)s")
    cluster = LocalCluster.from_compose(args.file, None, args.services, tuple(args.profile))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    with cluster.start(args.timeout):
        for spec in cluster.services:
            log.info("%s: %s (logs %s)", spec.name, cluster.address(spec.name),
                     cluster.running[spec.name].log_path)  # fmt: skip
        while not stopping.wait(1.0):
            for name, run in cluster.running.items():
                if run.process.poll() is not None:
                    log.error("%s exited (%d):\n%s", name, run.process.returncode, run.tail())
                    return 1
        log.info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
