"""Flags, environment variables and help generated from settings dataclasses."""

import argparse
from dataclasses import dataclass, field

import pytest

from cache_service import settings
from cache_service.settings import nested, same_as, setting


@dataclass(frozen=True)
class Inner:
    budget: int | None = setting(256, "Tokens a step.", parse=settings.positive_int)
    policy: str = setting("a", "Which one.", choices=("a", "b"))


@dataclass(frozen=True)
class Outer:
    port: int = setting(7, "The port.")
    ratio: float = setting(0.5, "A ratio.")
    shared: bool = setting(True, "Share it.")
    peers: tuple[str, ...] = setting(
        ("x:1",), "Peers.", flags=("--peer", "--peers"), parse=lambda t: tuple(t.split(","))
    )
    inner: Inner = nested(Inner)
    note: str = "not a setting"
    extra: list[int] = field(default_factory=list)


def _parse(argv, env=None, skip=()):
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, Outer, env, skip)
    return parser, parser.parse_args(argv)


def test_every_setting_is_a_flag_named_after_its_field_nested_ones_flattened():
    parser, args = _parse([])
    assert vars(args) == {
        "port": 7,
        "ratio": 0.5,
        "shared": True,
        "peers": ("x:1",),
        "budget": 256,
        "policy": "a",
    }
    assert settings.from_args(Outer, args) == Outer()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert flags == {"-h", "--help", "--port", "--ratio", "--shared", "--peer", "--peers"} | {
        "--budget",
        "--policy",
    }


def test_flag_over_environment_over_default():
    env = {"ICECACHE_PORT": "8", "ICECACHE_BUDGET": "64", "ICECACHE_SHARED": "off"}
    _, args = _parse(["--port", "9"], env)
    config = settings.from_args(Outer, args)
    assert (config.port, config.inner.budget, config.shared) == (9, 64, False)
    assert settings.env_name("max_memory") == "ICECACHE_MAX_MEMORY"


def test_values_are_read_by_type_or_by_their_own_parser():
    _, args = _parse(["--ratio", "2", "--peers", "a:1,b:2", "--shared", "--policy", "b"])
    config = settings.from_args(Outer, args)
    assert (config.ratio, config.peers, config.shared, config.inner.policy) == (
        2.0,
        ("a:1", "b:2"),
        True,
        "b",
    )
    _, args = _parse(["--shared", "false", "--budget", ""])
    assert (args.shared, args.budget) == (False, None)  # empty: None for an optional setting


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--budget", "0"], "must be a positive integer, got 0"),
        (["--policy", "c"], "invalid choice: 'c'"),
        (["--shared", "maybe"], "expected true or false, got 'maybe'"),
        (["--port", "x"], "invalid int value: 'x'"),
    ],
)
def test_bad_values_are_refused_with_what_was_wrong(argv, error, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert error in capsys.readouterr().err


def test_a_bad_environment_variable_is_refused_by_name():
    with pytest.raises(SystemExit, match="ICECACHE_PORT='x'"):
        _parse([], {"ICECACHE_PORT": "x"})


def test_help_is_the_fields_with_its_variable_and_default():
    parser, _ = _parse([], env={})
    (budget,) = (a for a in parser._actions if a.dest == "budget")
    assert budget.help == "Tokens a step. [env ICECACHE_BUDGET; default 256]"
    parser, _ = _parse([])  # no environment: a command line of its own
    (peers,) = (a for a in parser._actions if a.dest == "peers")
    assert peers.help == "Peers. [default x:1]"


def test_skipped_settings_are_no_flags_and_keep_their_defaults():
    parser, args = _parse([], skip=("budget",))
    assert "budget" not in vars(args)
    assert settings.from_args(Outer, args, skip=("budget",)).inner.budget == 256


def test_fields_that_are_no_settings_are_given():
    _, args = _parse([])
    config = settings.from_args(Outer, args, given={"note": "given", "extra": [1]})
    assert (config.note, config.extra) == ("given", [1])


def test_same_as_takes_another_dataclass_s_default_and_help():
    @dataclass(frozen=True)
    class Few:
        budget: int | None = same_as(Inner, "budget")

    assert Few().budget == 256
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, Few)
    (budget,) = (a for a in parser._actions if a.dest == "budget")
    assert budget.help == "Tokens a step. [default 256]"


def test_the_worker_and_generate_offer_the_engine_settings_with_one_help():
    from worker import cli
    from worker.__main__ import parse_config
    from worker.engine import EngineConfig

    generate = argparse.ArgumentParser()
    cli.add_engine_args(generate)
    worker = argparse.ArgumentParser()
    settings.add_arguments(worker, EngineConfig, env={})
    for name in ("policy", "budget", "dense_layers", "device_cache_mb", "seed"):
        (mine,) = (a for a in generate._actions if a.dest == name)
        (theirs,) = (a for a in worker._actions if a.dest == name)
        assert theirs.help.startswith(mine.help.rsplit(" [", 1)[0])
    config = parse_config(["--cache-service", "c:1", "--budget", "64", "--sink-tokens", "32"], {})
    assert config.engine == EngineConfig(budget=64, sink_tokens=32)
    with pytest.raises(SystemExit):  # an offline setting, no worker flag
        parse_config(["--cache-service", "c:1", "--allow-extrapolation"], {})


def test_the_readme_table_is_generated_from_the_same_fields():
    assert settings.markdown_table(Outer, skip=("ratio",)).splitlines() == [
        "| flag | env | default | meaning |",
        "| --- | --- | --- | --- |",
        "| `--port` | `ICECACHE_PORT` | 7 | The port. |",
        "| `--shared` | `ICECACHE_SHARED` | true | Share it. |",
        "| `--peer`, `--peers` | `ICECACHE_PEERS` | x:1 | Peers. |",
        "| `--budget` | `ICECACHE_BUDGET` | 256 | Tokens a step. |",
        "| `--policy` | `ICECACHE_POLICY` | a | Which one. One of a, b. |",
    ]


def test_both_servers_tables_end_with_the_auth_and_tls_rows_and_generate_takes_two(
    monkeypatch, capsys
):
    from cache_service.config import CacheServiceConfig
    from worker import cli
    from worker.serving.config import OFFLINE_SETTINGS, WorkerConfig

    security = ["--auth-token", "--auth-token-file", "--tls-cert", "--tls-key", "--tls-ca"]
    security.append("--tls-server-name")
    for table in (
        settings.markdown_table(CacheServiceConfig),
        settings.markdown_table(WorkerConfig, skip=OFFLINE_SETTINGS),
    ):
        flags = [row.split("`")[1] for row in table.splitlines()[2:]]
        assert flags[-6:] == security
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    shown = capsys.readouterr().out
    assert [flag for flag in security if f" {flag} " in shown] == ["--auth-token", "--tls-ca"]


def test_the_readme_tables_are_the_generated_ones():
    """Help lives in the fields; the README shows exactly what they generate."""
    from pathlib import Path

    from cache_service.config import CacheServiceConfig
    from worker.serving.config import OFFLINE_SETTINGS, WorkerConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert settings.markdown_table(CacheServiceConfig) in readme
    assert settings.markdown_table(WorkerConfig, skip=OFFLINE_SETTINGS) in readme
