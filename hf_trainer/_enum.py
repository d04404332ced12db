"""Adding a member to an existing `str` Enum (`transformers`' `OptimizerNames`).

The standard library has no public way to extend an Enum after its class is built. This
module performs the same steps `enum` performs for a member declared in the class body
(Python 3.10 to 3.13), so that value lookup, iteration, `__members__`, attribute access,
pickling and `copy` all treat the new member like the original ones.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = ["add_str_enum_member"]


def add_str_enum_member(enum_cls: type[Enum], name: str, value: str) -> Enum:
    """Add `name = value` to `enum_cls` and return the member; return it if it exists.

    Args:
        enum_cls: An Enum whose members are `str` (`class E(str, Enum)`) and that
            defines no `__new__` of its own.
        name: The member's name (`E.NAME`).
        value: The member's value (`E("value")`).

    Raises:
        TypeError: `enum_cls` is not a plain `str` Enum.
        ValueError: `name` or `value` is already taken by a different member.
    """
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        if existing.name != name:
            raise ValueError(
                f"{enum_cls.__name__} already has value {value!r} under the name {existing.name!r}"
            )
        return existing
    if name in enum_cls._member_map_:
        raise ValueError(f"{enum_cls.__name__} already has a member named {name!r}")
    if getattr(enum_cls, "_member_type_", None) is not str:
        raise TypeError(f"{enum_cls.__name__} is not a str Enum; cannot add {name}={value!r}")

    # Enum internals are untyped: the member is built as enum's own machinery builds it.
    member: Any = str.__new__(enum_cls, value)  # type: ignore[type-var]
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)  # read by Python >= 3.11 only

    # The class attribute first: EnumType.__setattr__ refuses names already in _member_map_.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    return member
