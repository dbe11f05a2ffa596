"""docker-compose.yml as the launcher reads it, the worker's config, and the Kubernetes
manifests checked against the compose file (same commands, ports, env and health probes)."""

from pathlib import Path

import pytest
import yaml

from worker.__main__ import parse_config
from worker.launcher import (
    ROOT,
    interpolate,
    load_compose,
    localize,
    parse_duration,
    select,
)

K8S = ROOT / "deploy" / "k8s"
CACHE_PORT, WORKER_PORT = 50061, 50051


@pytest.fixture(scope="module")
def compose():
    return load_compose(overrides={})  # defaults (the environment has no ICECACHE_*_PORT)


def _k8s(name):
    return {d["kind"]: d for d in yaml.safe_load_all((K8S / name).read_text())}


def _container(workload):
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


# ---- the launcher's reading of compose --------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "env", "out"),
    [
        ("${A:-1}", {}, "1"),
        ("${A:-1}", {"A": ""}, "1"),
        ("${A-1}", {"A": ""}, ""),
        ("${A}:${B:-x}", {"A": "h", "B": "p"}, "h:p"),
        ("$$A $A", {"A": "v"}, "$A v"),
    ],
)
def test_interpolation_follows_compose(text, env, out):
    assert interpolate(text, env) == out


def test_an_unset_variable_without_default_is_an_error():
    with pytest.raises(ValueError, match=r"\$\{NOPE\} is not set"):
        interpolate("${NOPE}", {})


def test_durations():
    assert [parse_duration(t) for t in ("10s", "1m30s", "500ms", 3)] == [10, 90, 0.5, 3]
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")


def test_default_services_start_caches_before_the_worker_and_skip_the_gpu_profile(compose):
    assert [s.name for s in select(compose)] == ["cache-0", "cache-1", "worker"]
    gpu = [s.name for s in select(compose, profiles=("gpu",))]
    assert gpu == ["cache-0", "cache-1", "worker", "worker-gpu"]
    assert [s.name for s in select(compose, ["worker"])] == ["cache-0", "cache-1", "worker"]
    assert dict(compose["worker"].depends_on) == {
        "cache-0": "service_healthy",
        "cache-1": "service_healthy",
    }


def test_ports_and_probes_agree_within_the_compose_file(compose):
    for spec in compose.values():
        port = int(spec.command[spec.command.index("--port") + 1])
        assert spec.ports[0] == (port, port)
        assert spec.healthcheck.test[:5] == (
            "python",
            "-m",
            "worker.client",
            "health",
            f"127.0.0.1:{port}",
        )
        metrics = int(spec.environment["ICECACHE_METRICS_PORT"])
        assert spec.ports[1] == (metrics, metrics)
        if "ICECACHE_HTTP_PORT" in spec.environment:  # a worker's OpenAI-compatible API
            http = int(spec.environment["ICECACHE_HTTP_PORT"])
            assert spec.ports[2:] == ((http, http),)
    caches = [f"{n}:{compose[n].ports[0][1]}" for n in ("cache-0", "cache-1")]
    assert compose["worker"].environment["ICECACHE_CACHE_SERVICES"] == ",".join(caches)


def test_the_gpu_worker_reserves_a_gpu_and_the_default_one_does_not():
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    (device,) = raw["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "deploy" not in raw["worker"]
    assert raw["worker-gpu"]["environment"]["ICECACHE_DEVICE"] == "cuda"


def test_localize_puts_everything_on_loopback_with_this_interpreter(compose):
    import sys

    worker = localize(compose["worker"], list(compose))
    assert worker.command[0] == sys.executable
    assert worker.command[worker.command.index("--host") + 1] == "127.0.0.1"
    assert worker.environment["ICECACHE_CACHE_SERVICES"] == "127.0.0.1:50061,127.0.0.1:50062"
    assert worker.healthcheck.test[0] == sys.executable


def test_port_overrides_reach_commands_ports_probes_and_the_replica_list():
    services = load_compose(overrides={"ICECACHE_CACHE1_PORT": "7001"})
    cache = services["cache-1"]
    assert cache.command[-2:] == ("--port", "7001") and cache.ports[0] == (7001, 7001)
    assert cache.healthcheck.test[4] == "127.0.0.1:7001"
    assert services["worker"].environment["ICECACHE_CACHE_SERVICES"].endswith("cache-1:7001")


def test_the_worker_reads_the_compose_environment(compose):
    env = dict(localize(compose["worker"], list(compose)).environment)
    config = parse_config(["--port", "0"], env)
    assert config.cache_services == ("127.0.0.1:50061", "127.0.0.1:50062")
    assert (config.engine.policy, config.engine.budget, config.metrics_port, config.port) == (
        "icecache-tokens",
        256,
        9100,
        0,
    )
    assert config.http_port == 8000


def test_worker_flags_override_env_and_bad_ones_are_refused(capsys):
    env = {"ICECACHE_CACHE_SERVICES": "a:1, b:2", "ICECACHE_MAX_BATCH": "8"}
    config = parse_config(["--cache-service", "c:3"], env)
    assert (config.cache_services, config.max_batch) == (("c:3",), 8)
    for argv in (["--cache-service", "nohost"], ["--policy", "magic"], []):
        with pytest.raises(SystemExit):
            parse_config(argv, {} if not argv else env)
    assert "error:" in capsys.readouterr().err


# ---- Kubernetes against compose ---------------------------------------------------------------
def test_cache_statefulset_runs_the_compose_cache_service(compose):
    docs = _k8s("cache-service.yaml")
    sts, svc = docs["StatefulSet"], docs["Service"]
    container = _container(sts)
    cache = compose["cache-0"]  # the template replica: k8s pods all listen on its port
    assert tuple(container["command"]) == cache.command
    assert {e["name"]: e["value"] for e in container["env"]} == dict(cache.environment)
    assert [p["containerPort"] for p in container["ports"]] == [c for _, c in cache.ports]
    _check_probes(container, cache.healthcheck)
    # cache-1 is the same service on its own port
    other = compose["cache-1"]
    assert other.command[:-1] == cache.command[:-1]
    assert set(other.environment) == set(cache.environment)
    # a headless service that names the pods
    assert svc["spec"]["clusterIP"] == "None" or svc["spec"]["clusterIP"] is None
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {
        p["name"] for p in container["ports"]
    }


def test_worker_deployment_runs_the_compose_worker_over_the_statefulset(compose):
    docs = _k8s("worker.yaml")
    container = _container(docs["Deployment"])
    worker = compose["worker"]
    assert tuple(container["command"]) == worker.command
    assert [p["containerPort"] for p in container["ports"]] == [c for _, c in worker.ports]
    _check_probes(container, worker.healthcheck, live_without_service=True)
    env = {e["name"]: e["value"] for e in container["env"]}
    replicas = env.pop("ICECACHE_CACHE_SERVICES").split(",")
    assert env == {k: v for k, v in worker.environment.items() if k != "ICECACHE_CACHE_SERVICES"}
    sts = _k8s("cache-service.yaml")["StatefulSet"]
    name, count = sts["metadata"]["name"], sts["spec"]["replicas"]
    assert replicas == [
        f"{name}-{i}.{sts['spec']['serviceName']}:{CACHE_PORT}" for i in range(count)
    ]
    selector = docs["Service"]["spec"]["selector"]
    assert selector.items() <= docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def _check_probes(container, check, live_without_service=False):
    """Readiness = the compose healthcheck; startup gives the same start period."""
    ready, startup = container["readinessProbe"], container["startupProbe"]
    assert tuple(ready["exec"]["command"]) == check.test
    assert tuple(startup["exec"]["command"]) == check.test
    assert (ready["periodSeconds"], ready["timeoutSeconds"], ready["failureThreshold"]) == (
        check.interval_s,
        check.timeout_s,
        check.retries,
    )
    assert startup["periodSeconds"] == check.start_interval_s
    assert startup["periodSeconds"] * startup["failureThreshold"] == check.start_period_s
    live = tuple(container["livenessProbe"]["exec"]["command"])
    assert live == (check.test[:5] if live_without_service else check.test)


def test_every_manifest_parses_and_uses_the_compose_image():
    image = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-image"]["image"]
    files = sorted(Path(K8S).glob("*.yaml"))
    assert [f.name for f in files] == ["cache-service.yaml", "worker.yaml"]
    for file in files:
        for doc in yaml.safe_load_all(file.read_text()):
            if doc["kind"] in ("Deployment", "StatefulSet"):
                assert _container(doc)["image"] == image
