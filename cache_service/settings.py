"""Settings dataclasses and the command lines generated from them.

A setting is declared once, as a dataclass field made by ``setting(default, help, ...)``:
its type, default and help (in the field's ``metadata``) are the flag's, the
``ICECACHE_<NAME>`` environment variable's and the ``--help`` text's. A field made by
``nested(cls)`` (``WorkerConfig.engine: EngineConfig``) adds that class's settings under
their own names (``--policy``, not ``--engine-policy``). Other fields are no flags; their
values are given to ``from_args``.

``add_arguments`` puts the flags on a parser (with the environment, if given, over the
defaults); ``from_args`` builds the dataclass back from what the parser returned;
``markdown_table`` writes the same settings as the README's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "ICECACHE_"


def setting(
    default: T,
    help: str,
    *,
    flags: Sequence[str] = (),
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
) -> T:
    """A dataclass field with its help, and how a command line reads it.

    ``flags``: instead of ``--<name>``; ``parse``: text -> value, instead of the type's
    own; ``choices`` and ``metavar`` as in ``argparse``.
    """
    metadata: dict[str, Any] = {"help": help, "flags": tuple(flags), "parse": parse}
    metadata.update(choices=choices, metavar=metavar)
    return dataclasses.field(default=default, metadata=metadata)


def nested(cls: Callable[[], T]) -> T:
    """A field holding a settings dataclass, whose settings become flags of their own."""
    return dataclasses.field(default_factory=cls, metadata={"nested": True})


def same_as(cls: type, name: str) -> Any:
    """A field declared as ``cls``'s field ``name`` is (its default and help), for a
    dataclass that takes a few of another's settings."""
    (f,) = (f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def parse_bool(text: str) -> bool:
    """``true``/``yes``/``on``/``1`` or ``false``/``no``/``off``/``0``."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def env_name(name: str) -> str:
    """The environment variable of setting ``name``."""
    return ENV_PREFIX + name.upper()


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    env: Mapping[str, str] | None = None,
    skip: Collection[str] = (),
    dest_prefix: str = "",
) -> None:
    """A flag for every setting of ``cls`` but those in ``skip``; with ``env``, its
    ``ICECACHE_<NAME>`` variable, if set, is the default (the flag still wins).
    ``dest_prefix``: parsed into ``args.<prefix><name>``, apart from another class's
    settings of the same name on the same parser (give ``from_args`` the same)."""
    for f, hint in _leaves(cls, skip):
        convert = _parser_of(f, hint)
        default = _default(f)
        variable = env_name(f.name)
        if env is not None and variable in env:
            try:
                default = convert(env[variable])
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise SystemExit(f"error: {variable}={env[variable]!r}: {err}") from None
        where = f"env {variable}; " if env is not None else ""
        keywords: dict[str, Any] = {"choices": f.metadata["choices"]}
        if hint is bool:
            keywords.update(nargs="?", const=True, metavar="BOOL")
        if f.metadata["metavar"]:
            keywords["metavar"] = f.metadata["metavar"]
        elif dest_prefix:  # the prefix is no part of the flag's name
            keywords.setdefault("metavar", f.name.upper())
        parser.add_argument(
            *_flags(f),
            dest=dest_prefix + f.name,
            type=convert,
            default=default,
            help=f"{f.metadata['help']} [{where}default {_shown(_default(f))}]",
            **keywords,
        )


def from_args(
    cls: type[T],
    args: argparse.Namespace,
    skip: Collection[str] = (),
    given: Mapping[str, Any] | None = None,
    dest_prefix: str = "",
) -> T:
    """``cls`` from parsed flags and the ``given`` values of fields that are no settings
    (settings in ``skip``, and fields neither given nor settings, keep their defaults)."""
    values: dict[str, Any] = dict(given or {})
    for f, hint in _fields(cls):
        if f.metadata.get("nested"):
            values[f.name] = from_args(hint, args, skip, dest_prefix=dest_prefix)
        elif "help" in f.metadata and f.name not in skip:
            values[f.name] = getattr(args, dest_prefix + f.name)
    return cls(**values)


def markdown_table(cls: type, skip: Collection[str] = ()) -> str:
    """The settings of ``cls`` as a Markdown table (flag, variable, default, help)."""
    rows = ["| flag | env | default | meaning |", "| --- | --- | --- | --- |"]
    for f, _ in _leaves(cls, skip):
        flags = ", ".join(f"`{flag}`" for flag in _flags(f))
        meaning = f.metadata["help"].replace("|", "\\|")
        if f.metadata["choices"]:
            meaning += f" One of {', '.join(map(str, f.metadata['choices']))}."
        rows.append(f"| {flags} | `{env_name(f.name)}` | {_shown(_default(f))} | {meaning} |")
    return "\n".join(rows) + "\n"


# ---- reading the dataclasses -----------------------------------------------------------------
def _fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f, hints[f.name]


def _leaves(cls: type, skip: Collection[str]) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    """The settings of ``cls`` and of the settings dataclasses inside it, in order."""
    for f, hint in _fields(cls):
        if f.metadata.get("nested"):
            yield from _leaves(hint, skip)
        elif "help" in f.metadata and f.name not in skip:
            yield f, hint


def _flags(f: dataclasses.Field[Any]) -> Sequence[str]:
    return f.metadata["flags"] or ["--" + f.name.replace("_", "-")]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None or value == "" else str(value)


def _parser_of(f: dataclasses.Field[Any], hint: Any) -> Callable[[str], Any]:
    """Text -> value of a setting: its own ``parse``, else by its type."""
    optional = type(None) in typing.get_args(hint) and typing.get_origin(hint) in (
        typing.Union,
        types.UnionType,
    )
    if optional:
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    by_type: dict[Any, Callable[[str], Any]] = {bool: parse_bool, int: int, float: float, str: str}
    convert = f.metadata["parse"] or by_type.get(hint)
    if convert is None:
        raise TypeError(f"setting {f.name!r} of type {hint} needs parse=")
    return _or_none(convert) if optional else convert


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert``, with the empty text (``ICECACHE_MODEL=``) meaning ``None``."""

    def read(text: str) -> Any:
        return None if text == "" else convert(text)

    read.__name__ = getattr(convert, "__name__", "value")  # argparse names it in its errors
    return read
