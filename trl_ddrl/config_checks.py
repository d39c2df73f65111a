# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Type checks of `DDRLConfig` values, run first in its `__post_init__`.

Values from Python, a YAML `--config` file or a dict reach the config unconverted: `num_generations="8"`,
`max_steps: 1.7`, `data_beta: [0.1]` or `data_beta=float("nan")` would otherwise flow into the training loop (a NaN
`data_beta` silently turns the data term off). Each field is checked against its annotation; the error names the field,
the value and the fix.
"""

import math
import os
import types
import typing
from typing import Any

from trl.trainer.base_config import _BaseConfig


# TrainingArguments fields that DDRL relies on, checked like DDRL's own.
_TRAINING_FIELDS: dict[str, Any] = {
    "max_steps": int,
    "seed": int,
    "learning_rate": float,
    "weight_decay": float,
    "max_grad_norm": float,
    "num_train_epochs": float,
}
# Sizes that must be positive when set.
_POSITIVE_WHEN_SET = ("height", "width", "num_frames", "max_sequence_length")


def _expected(annotation: Any) -> tuple[Any, bool] | None:
    """`(type, optional)` for the annotations checked here (`int`, `float`, `bool`, `str`, `list[int|float]`)."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) != 1:
            return None
        annotation = members[0]
    if annotation in (int, float, bool, str):
        return annotation, optional
    if typing.get_origin(annotation) is list and typing.get_args(annotation) in ((int,), (float,)):
        return annotation, optional
    return None


def _number_problem(value: Any, kind: type) -> str | None:
    """Why `value` is not a valid `kind` (int or float), with the fix, or None."""
    noun = "an integer" if kind is int else "a number"
    if isinstance(value, str):
        try:
            fixed = kind(float(value)) if kind is int else float(value)
        except ValueError:
            return f"must be {noun}, not the string {value!r}"
        return f"must be {noun}, not the string {value!r}: write it without quotes ({fixed!r})"
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return f"must be {noun}, not a list: write {value[0]!r} without the brackets"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be {noun}, not a {type(value).__name__}"
    if not math.isfinite(value):
        return "must be a finite number (not NaN or infinity)"
    if kind is int and isinstance(value, float) and not value.is_integer():
        return f"must be a whole number (for example {math.ceil(value)})"
    return None


def _check(name: str, value: Any, kind: Any, optional: bool) -> Any:
    """The value, converted where lossless (`4.0` -> `4` for an int); raise a `ValueError` naming `name` if wrong."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}=None is not allowed: give a value or leave {name} out to use its default.")
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be True or False.")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r} must be a string.")
        return value
    if kind in (int, float):
        problem = _number_problem(value, kind)
        if problem:
            raise ValueError(f"{name}={value!r} {problem}.")
        return int(value) if kind is int else value
    (item_kind,) = typing.get_args(kind)
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{name}={value!r} must be a list of {'integers' if item_kind is int else 'numbers'}, e.g. {name}=[{value!r}]."
        )
    if not value:
        raise ValueError(f"{name}=[] is empty: give at least one value, or leave {name} unset (None) for the default.")
    items = []
    for item in value:
        problem = _number_problem(item, item_kind)
        if problem:
            raise ValueError(f"{name}={list(value)!r}: the item {item!r} {problem}.")
        items.append(int(item) if item_kind is int else item)
    return items


def validate_types(config: Any) -> None:
    """
    Check and normalise the values of `config` (a `DDRLConfig`) against its field annotations, in place.

    Raises:
        `ValueError`: naming the first wrong field, its value and the fix.
    """
    # The class annotations, not `dataclasses.fields(...).type`: transformers' HfArgumentParser rewrites the latter in
    # place (`int | None` becomes `int`).
    own = {}
    for cls in reversed(type(config).__mro__):
        if issubclass(cls, _BaseConfig) and cls is not _BaseConfig:
            own.update(cls.__dict__.get("__annotations__", {}))
    fields = {**_TRAINING_FIELDS, **own}
    for name, annotation in fields.items():
        expected = _expected(annotation)
        if expected is None or not hasattr(config, name):
            continue
        setattr(config, name, _check(name, getattr(config, name), *expected))
    for name in _POSITIVE_WHEN_SET:
        value = getattr(config, name, None)
        if value is not None and value < 1:
            raise ValueError(
                f"{name}={value} must be a positive number of {'frames' if name == 'num_frames' else 'pixels' if name in ('height', 'width') else 'tokens'}, or None for the pipeline's default."
            )


def warmup_warning(warmup_steps: float, max_steps: int, learning_rate: float) -> str | None:
    """
    The warning for a run that ends inside (or mostly inside) its linear warm-up, or None.

    With `warmup_steps >= max_steps / 2` the learning rate spends at least half of the run below its target; with the
    authors' 50-step default and `max_steps=3` it peaks at 4% of `learning_rate`. Only `max_steps > 0` runs are checked
    (the length of an epoch-based run is known only once the dataset is).
    """
    if max_steps <= 0 or warmup_steps < 1 or warmup_steps < max_steps / 2:
        return None
    peak = min(1.0, (max_steps - 1) / warmup_steps) if max_steps > 1 else 0.0
    return (
        f"warmup_steps={warmup_steps:g} is at least half of max_steps={max_steps}: the learning rate rises linearly "
        f"from 0 over {warmup_steps:g} optimizer steps and reaches only {peak:.0%} of learning_rate={learning_rate:g} "
        "by the last step (the default is the authors' 50-step warm-up, for runs of hundreds of steps). Set "
        "warmup_steps=0, or a ratio such as warmup_steps=0.1, for a short run."
    )


def check_output_dir(output_dir: str | None) -> None:
    """
    Raise a `ValueError` when `output_dir` cannot be a folder: it, or a folder above it, is a regular file (else
    `NotADirectoryError` comes from deep inside transformers at the first save).
    """
    if not output_dir:
        return
    path = os.path.abspath(os.path.expanduser(output_dir))
    while True:
        if os.path.isfile(path):
            where = "is" if path == os.path.abspath(os.path.expanduser(output_dir)) else f"is under {path!r}, which is"
            raise ValueError(
                f"output_dir={output_dir!r} {where} a regular file, not a folder. Choose another output_dir, or move "
                "the file away."
            )
        parent = os.path.dirname(path)
        if parent == path or os.path.isdir(path):
            return
        path = parent
