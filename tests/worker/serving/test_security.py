"""Token auth and TLS on the worker service, and on its calls to the cache service.

Real gRPC servers on loopback: a worker with a token and a certificate this test makes with
``openssl``, over an in-process store; then a TLS + token cache service that the worker must
reach with the same token and the certificate as its CA.
"""

import json
import subprocess

import grpc
import pytest

from cache_service.config import CacheServiceConfig
from cache_service.security import SecurityConfig
from cache_service.server import serve as serve_cache
from worker.__main__ import parse_config
from worker.cli import main as icecache
from worker.client import WorkerClient, check_health
from worker.engine import EngineConfig
from worker.kv_client import LocalKVClient
from worker.serving.config import WorkerConfig
from worker.serving.server import serve

TOKEN = "worker-test-token"
POLICY, BUDGET = "icecache", 64
PROMPT = "Say hi."


def _cert(directory):
    """A self-signed certificate for localhost and 127.0.0.1, and its key (PEM)."""
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return _cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secure_worker(smollm, cert):
    auth = SecurityConfig(auth_token=TOKEN, tls_cert=cert[0], tls_key=cert[1])
    config = WorkerConfig(
        cache_services=("in-process:0",),
        port=0,
        engine=EngineConfig(policy=POLICY, budget=BUDGET),
        security=auth,
    )
    kv = LocalKVClient.with_capacity(2**26, 16, smollm[0].config.head_dim)
    running = serve(config, loaded=smollm, kv=kv)
    yield f"127.0.0.1:{running.port}"
    running.stop(0)


def _code(address, auth):
    with WorkerClient(address, timeout=10, auth=auth) as client:
        try:
            client.complete(PROMPT, 2)
        except grpc.RpcError as err:
            return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_calls_without_the_right_token_are_unauthenticated(secure_worker, cert):
    ca = cert[0]
    missing = _code(secure_worker, SecurityConfig(tls_ca=ca))
    wrong = _code(secure_worker, SecurityConfig(tls_ca=ca, auth_token="not-it"))
    assert missing[0] == wrong[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "missing authorization" in missing[1] and "wrong token" in wrong[1]
    assert "ICECACHE_AUTH_TOKEN" in missing[1]  # says what to set
    assert _code(secure_worker, SecurityConfig(tls_ca=ca, auth_token=TOKEN))[0] == (
        grpc.StatusCode.OK
    )


def test_tls_is_required_and_health_stays_open(secure_worker, cert):
    plain = _code(secure_worker, SecurityConfig(auth_token=TOKEN))
    assert plain[0] == grpc.StatusCode.UNAVAILABLE  # a plaintext client cannot talk TLS
    assert check_health(secure_worker, auth=SecurityConfig(tls_ca=cert[0]))  # no token needed
    assert not check_health(secure_worker)


def test_icecache_generate_server_takes_the_token_and_ca(secure_worker, cert, capsys):
    argv = ["generate", "--server", secure_worker, "--prompt", PROMPT, "--max-new-tokens", "2",
            "--json", "--tls-ca", cert[0]]  # fmt: skip
    assert icecache(argv + ["--auth-token", TOKEN]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 2
    assert icecache(argv + ["--auth-token", "not-it"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_the_worker_reaches_a_tls_cache_service_with_its_token(smollm, cert):
    server_side = SecurityConfig(auth_token=TOKEN, tls_cert=cert[0], tls_key=cert[1])
    cache = serve_cache(CacheServiceConfig(port=0, max_memory=2**26, security=server_side))
    address = f"127.0.0.1:{cache.port}"
    try:
        client_side = SecurityConfig(auth_token=TOKEN, tls_ca=cert[0])
        config = WorkerConfig(
            cache_services=(address,), port=0, engine=EngineConfig(policy=POLICY, budget=BUDGET),
            security=client_side,
        )  # fmt: skip
        worker = serve(config, loaded=smollm)
        try:
            plain = SecurityConfig(auth_token=TOKEN)  # the worker itself listens without TLS
            with WorkerClient(f"127.0.0.1:{worker.port}", auth=plain) as client:
                result = client.complete(PROMPT, 2)
            assert result.stats.replica == address and len(result.token_ids) == 2
            assert worker.scheduler.engine.kv.health.healthy() == {address}  # TLS health
        finally:
            worker.stop(0)
        no_token = WorkerConfig(
            cache_services=(address,), port=0, security=SecurityConfig(tls_ca=cert[0])
        )
        with pytest.raises(PermissionError, match="ICECACHE_AUTH_TOKEN"):
            serve(no_token, loaded=smollm)
    finally:
        cache.stop(0)


def test_flags_and_env_configure_the_workers_auth_and_tls(cert):
    env = {"ICECACHE_AUTH_TOKEN": TOKEN, "ICECACHE_CACHE_SERVICES": "a:1"}
    config = parse_config(["--tls-cert", cert[0], "--tls-key", cert[1], "--tls-ca", cert[0]], env)
    assert config.security == SecurityConfig(
        auth_token=TOKEN, tls_cert=cert[0], tls_key=cert[1], tls_ca=cert[0]
    )
    with pytest.raises(SystemExit):
        parse_config(["--tls-cert", cert[0]], env)  # a certificate without its key
