"""Command-line options generated from the settings models (:mod:`flows.settings`).

Each field of a model becomes one option: ``--<field-name>`` (a few keep a shorter name,
:data:`OPTION_NAMES`), its help the field's description, its default the field's default, its
type, choices and arity from the field's annotation. The options are read back into the
models with :func:`model_from_args`, which refuses an invalid value naming its option.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Literal, TypeVar

from pydantic import BaseModel, ValidationError

from flows.checks import UsageError

M = TypeVar("M", bound=BaseModel)
#: Fields whose option is not ``--<field-name>``.
OPTION_NAMES = {"data_format": "--format", "flag_mad_k": "--flag-k"}


def option_name(field: str) -> str:
    """The command-line option of a settings field (``interval_ratio`` → ``--interval-ratio``)."""
    return OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


def _unwrap(annotation: object) -> tuple[object, bool]:
    """The annotation without ``None`` and ``Annotated`` layers, and whether None was allowed."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            if len(args) != 1:
                raise TypeError(f"no command-line form for {annotation!r}")
            annotation = args[0]
        else:
            return annotation, optional


def argument_options(annotation: object) -> dict[str, object]:
    """``add_argument`` keywords (type, choices, nargs or action) of a field's annotation."""
    base, _ = _unwrap(annotation)
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        return {"type": type(choices[0]), "choices": choices}
    if origin in (tuple, list):
        item = typing.get_args(base)[0]
        return {"type": item, "nargs": "+"}
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if base in (int, float, str):
        return {"type": base}
    raise TypeError(f"no command-line form for {annotation!r}")


def add_model_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    exclude: Iterable[str] = (),
    positional: Iterable[str] = (),
) -> None:
    """One option per field of ``model`` (a positional argument for the fields named so).

    Args:
        parser: the (sub)command's parser or one of its argument groups.
        model: the settings model.
        exclude: fields the command sets itself (no option).
        positional: fields given as positional arguments (required ones, in order).
    """
    skipped, positional = set(exclude), list(positional)
    for name in positional:
        info = model.model_fields[name]
        options = argument_options(info.annotation)
        options.pop("action", None)
        parser.add_argument(name, help=info.description, **options)
    for name, info in model.model_fields.items():
        if name in skipped or name in positional:
            continue
        options = argument_options(info.annotation)
        if info.is_required():
            options["required"] = True
        else:
            options["default"] = info.default
        parser.add_argument(option_name(name), dest=name, help=info.description, **options)


def model_from_args(model: type[M], args: argparse.Namespace, **fixed: object) -> M:
    """The ``model`` the options hold (plus ``fixed`` values), validated.

    Raises:
        UsageError: a value the model refuses, named by its option.
    """
    values = {n: getattr(args, n) for n in model.model_fields if hasattr(args, n)}
    values.update(fixed)
    try:
        return model(**values)
    except ValidationError as error:
        raise usage_error(model, error) from None


def usage_error(model: type[BaseModel], error: ValidationError) -> UsageError:
    """The first problem of a validation error, naming its option.

    A field's own problem names that field's option; a problem of the fields together (the
    checks of :class:`musc_core.config.MuscConfig`) names the field its message names first.
    Field names in the message are written as their options.
    """
    first = error.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    message = str(cause) if cause is not None else first["msg"]
    if first["loc"]:
        field = str(first["loc"][0])
    else:
        named = sorted(
            (f for f in model.model_fields if f in message), key=lambda f: message.find(f)
        )
        field = named[0] if named else ""
        message = message.removeprefix(f"{field} ")
    for name in sorted(model.model_fields, key=len, reverse=True):
        message = message.replace(name, option_name(name))
    return UsageError(option_name(field) if field else "", message)
