"""Click options derived from a config dataclass: each field's name, type, default and `Flag`
metadata (`trainer.config.flag`) become one option, so a flag cannot drift from the field it sets
and every default is written once, in the dataclass."""

from __future__ import annotations

import dataclasses
import functools
import operator
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from trainer.config import FLAG, Flag

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}
Command = TypeVar("Command", bound=Callable[..., Any])  # a click command, or the function it will wrap


class FrozenLayers(click.ParamType):
    """YOLOv5's --freeze: `10` freezes layers 0 to 9 (the backbone of the bundled models), a list
    such as `0,1,2` freezes those layers; `0` freezes nothing."""

    name = "N|LIST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = [int(part) for part in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a layer count or a list of layer indices such as 0,1,2", param, ctx)
        if any(number < 0 for number in numbers):
            self.fail(f"{value!r}: layer indices are 0 or more", param, ctx)
        return tuple(range(numbers[0])) if len(numbers) == 1 else tuple(sorted(set(numbers)))

    @staticmethod
    def flag_text(layers: tuple[int, ...]) -> str:
        """What to pass to --freeze for `layers`: the count when they are the first N, else the list."""
        return str(len(layers)) if layers == tuple(range(len(layers))) else ",".join(map(str, layers))


@dataclass(frozen=True)
class OptionSpec:
    """The click option of one config field: `name` is the key its parsed value comes under."""

    field: str
    name: str
    declarations: tuple[str, ...]
    attributes: Mapping[str, Any]

    def option(self) -> Callable[[Command], Command]:
        return click.option(*self.declarations, **self.attributes)


@functools.cache
def option_specs(config_class: type) -> tuple[OptionSpec, ...]:
    """The options that set `config_class`'s fields, in field order. A field with neither
    `flag(...)` nor `NO_FLAG` metadata is a TypeError, so none is left off the command line unseen."""
    hints = typing.get_type_hints(config_class)
    specs = []
    for item in dataclasses.fields(config_class):
        if FLAG not in item.metadata:
            raise TypeError(f"{config_class.__name__}.{item.name} has no flag: give it metadata=flag(...), "
                            "or NO_FLAG and a comment saying why")
        if item.metadata[FLAG] is not None:
            specs.append(option_spec(item, hints[item.name], item.metadata[FLAG]))
    return tuple(specs)


def option_spec(item: dataclasses.Field, hint: Any, flag: Flag) -> OptionSpec:
    name = flag.name or item.name
    attributes: dict[str, Any] = {"help": flag.help or None, "hidden": flag.hidden}
    if hint is bool:
        attributes["is_flag"] = True
    else:
        attributes["type"] = click_type(hint, flag)
    if flag.flag_value is not None:
        attributes.update(is_flag=False, flag_value=flag.flag_value)
    default = field_default(item)
    if default is dataclasses.MISSING:
        attributes["required"] = True
    elif flag.optional:
        attributes["default"] = None
    else:
        flag_text = getattr(attributes.get("type"), "flag_text", None)
        attributes["default"] = flag_text(default) if flag_text else default
    declarations = (f"--{name.replace('_', '-')}", *flag.aliases, name)
    return OptionSpec(item.name, name, declarations, types.MappingProxyType(attributes))


def field_default(item: dataclasses.Field) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def click_type(hint: Any, flag: Flag) -> Any:
    """The click type of a field annotated `hint` (`X | None` counts as X)."""
    if isinstance(hint, types.UnionType):
        hint = functools.reduce(operator.or_, (arg for arg in typing.get_args(hint) if arg is not type(None)))
    if flag.choices:
        return click.Choice(flag.choices)
    if hint in (int, float) and (flag.low is not None or flag.high is not None):
        return (click.IntRange if hint is int else click.FloatRange)(flag.low, flag.high)
    if hint == tuple[int, ...]:
        return FrozenLayers()
    if hint in (int, float, str):
        return hint
    raise TypeError(f"no command-line type for a field of type {hint}: give it NO_FLAG or a type here")


def config_options(config_class: type) -> Callable[[Command], Command]:
    """A decorator adding the options of `config_class`'s fields to a click command, in field order;
    it goes among the command's @click.option decorators, or above @click.command."""
    specs = option_specs(config_class)

    def decorate(command: Command) -> Command:
        # A built command takes options in order; a function collects them in reverse
        for spec in specs if isinstance(command, click.Command) else reversed(specs):
            command = spec.option()(command)
        return command

    return decorate


def field_values(config_class: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """Parsed options, some or all of `config_class`'s, keyed by the fields they set. A key that is
    no option of it is a TypeError: a command and its config disagree, a bug to fix."""
    fields = {spec.name: spec.field for spec in option_specs(config_class)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"{config_class.__name__} has no option {', '.join(unknown)}; "
                        f"its options are {', '.join(fields)}")
    return {fields[name]: value for name, value in options.items()}


def split_options(config_class: type, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`options` parted into those of `config_class`'s fields and the rest (the command's own)."""
    names = {spec.name for spec in option_specs(config_class)}
    return ({name: value for name, value in options.items() if name in names},
            {name: value for name, value in options.items() if name not in names})
