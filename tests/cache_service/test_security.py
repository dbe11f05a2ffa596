"""Token auth and TLS of the cache service, over real gRPC with certificates made here."""

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cache_service import codec, settings
from cache_service.__main__ import parse_config
from cache_service.config import CacheServiceConfig
from cache_service.security import SecurityConfig, make_channel, security_from_env
from cache_service.server import serve
from cache_service.types import SequenceSpec
from proto.icecache.v1 import cache_service_pb2 as pb
from proto.icecache.v1 import cache_service_pb2_grpc as pb_grpc
from tests.cache_service.test_server_process import _free_port, _wait_serving
from worker.kv.remote import RemoteKVClient
from worker.kv.socket_stream import LocalDecodeStream

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"
SPEC = SequenceSpec(2, 2, 4, 64, policy="quest", budget=64, dense_layers=1)


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 and its key (PEM files)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    return make_cert(directory, "server"), make_cert(directory, "stranger")


def _config(security):
    return CacheServiceConfig(port=0, max_memory=8 * 2**20, workers=2, security=security)


@pytest.fixture(scope="module")
def token_service():
    server = serve(_config(SecurityConfig(auth_token=TOKEN)))
    yield server
    server.stop(0)


def _use(client, seq="s"):
    """A short real workload; returns the pages of the last selection's data."""
    rng = np.random.default_rng(0)
    client.create(seq, SPEC)
    for layer in range(2):
        kv = rng.standard_normal((2, 80, 2, 64), np.float32)
        client.append(seq, layer, kv[0], kv[1], np.arange(80))
    queries = rng.standard_normal((1, 4, 64), np.float32)
    kv = rng.standard_normal((2, 1, 2, 64), np.float32)
    sel = client.decode(1, [seq], kv[0], kv[1], np.array([80]), queries)[0]
    data = client.read_pages(sel.pages)
    client.release(seq)
    return data


def _status(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_calls_without_the_right_token_are_unauthenticated(token_service):
    address = f"127.0.0.1:{token_service.port}"
    create = pb.CreateRequest(seq_id="x", spec=codec.spec_to_proto(SPEC))
    wrong = [("authorization", "Bearer not-the-token")]
    bare = [("authorization", TOKEN)]  # no "Bearer "
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        for metadata, reason in ((None, "missing"), (wrong, "wrong token"), (bare, "wrong")):
            for call in (
                lambda m=metadata: stub.Info(pb.InfoRequest(), metadata=m),
                lambda m=metadata: stub.Create(create, metadata=m),
            ):
                code, details = _status(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED
                assert reason in details and "ICECACHE_AUTH_TOKEN" in details
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        code, _ = _status(lambda: next(reflect.ServerReflectionInfo(iter([request]))))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # the health check stays open for probes, and says only SERVING
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="icecache.v1.CacheService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # a local stream's ticket comes only with the token
        code, _ = _status(lambda: stub.OpenLocalStream(pb.OpenLocalStreamRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # nothing a refused call asked for happened
        authed = [("authorization", f"Bearer {TOKEN}")]
        assert stub.Stats(pb.StatsRequest(), metadata=authed).sequences == 0


def test_the_right_token_works_and_clients_without_it_are_told_what_to_set(token_service):
    address = f"127.0.0.1:{token_service.port}"
    with RemoteKVClient.connect(address, auth=SecurityConfig(auth_token=TOKEN)) as client:
        assert client.transport == "shm"
        assert _use(client).shape[1:] == (2, 16, 64)
        assert isinstance(client._stream, LocalDecodeStream)  # its ticket came with the token
        assert client.stats().sequences == 0
    with pytest.raises(PermissionError, match="ICECACHE_AUTH_TOKEN"):
        RemoteKVClient.connect(address, auth=SecurityConfig())
    with pytest.raises(PermissionError, match="wrong token"):
        RemoteKVClient.connect(address, auth=SecurityConfig(auth_token="guess"))


def test_tls_with_a_self_signed_certificate(certs, tmp_path):
    (cert, key), (stranger, _) = certs
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = serve(
        _config(
            SecurityConfig(auth_token_file=str(token_file), tls_cert=str(cert), tls_key=str(key))
        )
    )
    address = f"127.0.0.1:{server.port}"
    try:
        trusted = SecurityConfig(auth_token=TOKEN, tls_ca=str(cert))
        with RemoteKVClient.connect(address, auth=trusted) as client:
            reference = server.store.pool
            data = _use(client, "tls")
            assert data.dtype == reference.data.dtype and data.shape[0] > 0
        # the name in the certificate is checked: "localhost" is in it, "example.org" is not
        named = SecurityConfig(auth_token=TOKEN, tls_ca=str(cert), tls_server_name="localhost")
        RemoteKVClient.connect(address, auth=named).close()
        refused = [
            SecurityConfig(auth_token=TOKEN),  # plaintext to a TLS port
            SecurityConfig(auth_token=TOKEN, tls_ca=str(stranger)),  # another CA
            SecurityConfig(auth_token=TOKEN, tls_ca=str(cert), tls_server_name="example.org"),
        ]
        for auth in refused:
            with pytest.raises(ConnectionError, match="TLS"):
                RemoteKVClient.connect(address, auth=auth, connect_timeout=1.0)
        with pytest.raises(PermissionError):  # TLS alone is not the token
            RemoteKVClient.connect(address, auth=SecurityConfig(tls_ca=str(cert)))
    finally:
        server.stop(0)


def test_flags_and_env_configure_auth_and_tls(certs, tmp_path):
    (cert, key), _ = certs
    env = {"ICECACHE_AUTH_TOKEN": TOKEN, "ICECACHE_TLS_CERT": str(cert)}
    config = parse_config(["--tls-key", str(key)], env)
    assert config.security == SecurityConfig(auth_token=TOKEN, tls_cert=str(cert), tls_key=str(key))
    assert security_from_env({"ICECACHE_TLS_CA": str(cert)}).client_tls
    assert security_from_env({}) == SecurityConfig()
    missing = str(tmp_path / "nope.pem")
    for flag, value, message in (
        ("--tls-cert", str(cert), "both --tls-cert and --tls-key"),
        ("--tls-ca", missing, "--tls-ca"),
        ("--auth-token-file", missing, "--auth-token-file"),
    ):
        with pytest.raises(ValueError, match=message):
            SecurityConfig(**{flag[2:].replace("-", "_"): value})
        with pytest.raises(SystemExit):
            parse_config([flag, value], {})


def test_the_auth_and_tls_flags_help_and_table_rows_are_the_fields(
    certs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps (and splits --flag-names) otherwise
    with pytest.raises(SystemExit):
        parse_config(["--help"], {"ICECACHE_AUTH_TOKEN": TOKEN})
    shown = " ".join(capsys.readouterr().out.split())
    table = settings.markdown_table(CacheServiceConfig)
    names = ("auth-token", "auth-token-file", "tls-cert", "tls-key", "tls-ca", "tls-server-name")
    for f, name in zip(fields(SecurityConfig), names, strict=True):
        flag, variable, text = f"--{name}", f"ICECACHE_{f.name.upper()}", f.metadata["help"]
        assert f"{flag} {f.name.upper()} {text} [env {variable}; default none]" in shown
        assert f"| `{flag}` | `{variable}` | none | {text} |" in table
    assert TOKEN not in shown  # --help shows the default, never the secret
    (_, key), _ = certs
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(SystemExit):
        parse_config([], {"ICECACHE_TLS_CERT": missing, "ICECACHE_TLS_KEY": str(key)})
    assert f"--tls-cert {missing!r} is not a readable file; fix the path" in capsys.readouterr().err


def test_a_service_process_with_tls_and_token_from_env_serves_a_client(certs):
    (cert, key), _ = certs
    port = _free_port()
    env = {
        **os.environ,
        "ICECACHE_AUTH_TOKEN": TOKEN,
        "ICECACHE_TLS_CERT": str(cert),
        "ICECACHE_TLS_KEY": str(key),
        "ICECACHE_MAX_MEMORY": "16M",
    }
    command = [sys.executable, "-m", "cache_service", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"
    try:
        client_auth = security_from_env(
            {"ICECACHE_AUTH_TOKEN": TOKEN, "ICECACHE_TLS_CA": str(cert)}
        )
        _wait_serving(proc, address, channel=make_channel(address, client_auth))
        with RemoteKVClient.connect(address, auth=client_auth) as client:
            assert _use(client, "proc").shape[0] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
