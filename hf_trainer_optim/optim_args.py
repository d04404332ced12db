"""Typed parsing of `TrainingArguments.optim_args` for `optim="sngm"`.

`optim_args` arrives as one string, `"momentum=0.9,nesterov=true,normalize=layer"`.
Each key is checked against the SNGM keyword arguments the Trainer may set, converted to
its type and checked against its range; anything else is a `ValueError` that names the
key and lists the keys accepted, before any training step runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from sngm_integrations.sngm import FUSED_BACKENDS, NORMALIZE_MODES

__all__ = ["ACCEPTED_OPTIM_ARGS", "check_sngm_options", "parse_sngm_optim_args"]

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _to_float(value: str | float) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _to_momentum(value: str | float) -> float:
    number = _to_float(value)
    if not 0.0 <= number < 1.0:
        raise ValueError("outside [0, 1)")
    return number


def _to_eps(value: str | float) -> float:
    number = _to_float(value)
    if not number > 0.0:
        raise ValueError("not > 0")
    return number


def _to_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean (use one of {_TRUE + _FALSE})")


def _to_normalize_mode(value: str) -> str:
    if value not in NORMALIZE_MODES:
        raise ValueError(f"not one of {NORMALIZE_MODES}")
    return value


def _to_fused_backend(value: str) -> str:
    if value not in FUSED_BACKENDS:
        raise ValueError(f"not one of {FUSED_BACKENDS}")
    return value


class _OptimArg(NamedTuple):
    convert: Callable[[Any], Any]
    kind: str


ACCEPTED_OPTIM_ARGS: dict[str, _OptimArg] = {
    "momentum": _OptimArg(_to_momentum, "float in [0, 1)"),
    "nesterov": _OptimArg(_to_bool, "bool"),
    "normalize": _OptimArg(_to_normalize_mode, "|".join(NORMALIZE_MODES)),
    "eps": _OptimArg(_to_eps, "float > 0"),
    "maximize": _OptimArg(_to_bool, "bool"),
    "foreach": _OptimArg(_to_bool, "bool"),
    "fused": _OptimArg(_to_bool, "bool"),
    "fused_backend": _OptimArg(_to_fused_backend, "|".join(FUSED_BACKENDS)),
}
"""Keys of `optim_args` for SNGM, each with its converter and a description of its range."""

# Keys the Trainer sets from its own arguments; accepting them here would be ignored or
# would contradict the TrainingArguments field.
_SET_BY_TRAINER = {
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
}


def accepted_keys_text() -> str:
    """The accepted keys with their ranges, `"momentum (float in [0, 1)), ..."`."""
    return ", ".join(f"{key} ({arg.kind})" for key, arg in ACCEPTED_OPTIM_ARGS.items())


def _check_key(key: str, source: str) -> _OptimArg:
    if key in _SET_BY_TRAINER:
        field = _SET_BY_TRAINER[key]
        raise ValueError(
            f"{source} key {key!r} is not accepted for optim='sngm': set it with the "
            f"TrainingArguments field {field} (--{field}) instead "
            f"({source} accepts: {accepted_keys_text()})"
        )
    if key not in ACCEPTED_OPTIM_ARGS:
        raise ValueError(
            f"{source} key {key!r} is unknown for optim='sngm' (accepted: {accepted_keys_text()})"
        )
    return ACCEPTED_OPTIM_ARGS[key]


def _convert(key: str, value: Any, source: str) -> Any:
    spec = _check_key(key, source)
    try:
        return spec.convert(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{source} {key}={value!r} is invalid for optim='sngm': expected "
            f"{spec.kind} ({err}); accepted keys: {accepted_keys_text()}"
        ) from None


def _check_combination(options: Mapping[str, Any], source: str) -> None:
    if options.get("nesterov") and options.get("momentum", 0.9) == 0.0:
        raise ValueError(f"{source} nesterov=true needs momentum > 0 for optim='sngm'")


def check_sngm_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check SNGM keyword arguments given as Python values; return them converted.

    Args:
        options: Keyword arguments such as `{"momentum": 0.9, "nesterov": True}`, with the
            keys of `ACCEPTED_OPTIM_ARGS`.

    Raises:
        ValueError: A key is unknown or set by a `TrainingArguments` field, or a value is
            of the wrong type or out of range. The message names it.
    """
    checked = {key: _convert(key, value, "option") for key, value in options.items()}
    _check_combination(checked, "option")
    return checked


def parse_sngm_optim_args(optim_args: str | None) -> dict[str, Any]:
    """Turn `"k=v,k=v"` into SNGM keyword arguments with real types.

    Args:
        optim_args: The `optim_args` string of `TrainingArguments` (`None` or empty
            for none). Spaces around keys and values are ignored.

    Returns:
        A dict such as `{"momentum": 0.9, "nesterov": True, "normalize": "layer"}`.

    Raises:
        ValueError: An item is not `key=value`, a key is unknown, repeated, or set by a
            `TrainingArguments` field, or a value cannot be converted or is out of range.
            The message names the item and lists the accepted keys.
    """
    parsed: dict[str, Any] = {}
    if not optim_args or not optim_args.strip():
        return parsed
    for item in optim_args.split(","):
        key, sep, raw_value = (part.strip() for part in item.partition("="))
        if not sep or not key or not raw_value:
            raise ValueError(
                f"optim_args item {item.strip()!r} is not of the form key=value "
                f"(optim='sngm' accepts: {accepted_keys_text()})"
            )
        if key in parsed:
            raise ValueError(f"optim_args key {key!r} is given twice in {optim_args!r}")
        parsed[key] = _convert(key, raw_value, "optim_args")
    _check_combination(parsed, "optim_args")
    return parsed
