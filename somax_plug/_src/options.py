"""Declared options: names, types, defaults and ranges, checked at compose time.

Every component option is an :class:`Option`. A component class declares its
options once, as its attrs fields (the annotation gives the type, :func:`option`
adds a range, choices or a docstring); a plugin that registers a
:class:`~somax_plug.ComponentSpec` by hand passes ``options=[Option(...)]`` or, for
the simplest case, ``defaults={...}`` (types are then inferred from the defaults).
The planner checks what a user passes with :meth:`Option.check` before anything is
built or traced, and an error names the component, the option, the value and what
is allowed.

Type rules (``type``):

======== ===================================================================
``int``   an ``int`` (not a ``bool``, not ``2.5``, not ``"3"``), within int32
``float`` an ``int`` or ``float`` (not a ``bool``), finite unless ``allow_inf``
``bool``  ``True`` or ``False`` only (``"no"`` is refused, not truthy)
``str``   a ``str``; with ``choices``, one of them
``None``  anything (callables, mappings): the component checks it itself
======== ===================================================================

``optional=True`` also accepts ``None``.

Example:
    >>> from somax_plug import Option
    >>> Option("n", 50, type=int, ge=1).check("solver 'cg'", 10)
    10
    >>> Option("n", 50, type=int, ge=1).check("solver 'cg'", "ten")
    Traceback (most recent call last):
    ...
    somax_plug.OptionError: solver 'cg': option 'n' = 'ten' is not allowed: expected an int >= 1
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from somax_plug._src.errors import OptionError

OPTION_KEY = "somax_plug.option"
"""Key of the :class:`Option` in an attrs field's ``metadata``."""

INT32_MAX = 2**31 - 1
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_NAMES = {int: "an int", float: "a number", bool: "a bool (true or false)", str: "a string"}


def _type(value: Any) -> type | None:
    if value is None or isinstance(value, type):
        return value
    raise TypeError(f"Option type must be int, float, bool, str or None, got {value!r}")


@attrs.frozen
class Option:
    """One declared option of a component.

    Attributes:
        name: the option's name (the keyword the factory takes).
        default: its default value (checked too, at declaration).
        type: ``int``, ``float``, ``bool``, ``str`` or None (anything).
        ge, gt, le, lt: bounds for numbers.
        choices: the allowed values.
        optional: ``None`` is allowed as well.
        allow_inf: a float may be infinite.
        doc: one line for ``somax-plug show`` and the docs tables.
        required: it has no default; a composition must give it.
    """

    name: str
    default: Any = None
    type: type | None = attrs.field(default=None, converter=_type)
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = attrs.field(
        default=None, converter=lambda c: None if c is None else tuple(c)
    )
    optional: bool = False
    allow_inf: bool = False
    doc: str = ""
    required: bool = False

    def allowed(self) -> str:
        """What is allowed, in words (``an int >= 1``, ``one of 'guard', 'none'``)."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.type is None:
            text = "any value"
        else:
            text = _NAMES[self.type]
            bounds = [
                f"{op} {_num(v)}"
                for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                if v is not None
            ]
            if self.type is float and not self.allow_inf:
                text = "a finite number"
            if bounds:
                text += " " + " and ".join(bounds)
        return text + (" or None" if self.optional else "")

    def describe(self) -> str:
        """``name: allowed (default: value)`` for listings."""
        default = "required" if self.required else f"default {self.default!r}"
        return f"{self.name}: {self.allowed()} ({default})"

    def check(self, owner: str, value: Any) -> Any:
        """``value`` if allowed (an int given for a float becomes a float).

        Raises:
            OptionError: naming ``owner``, the option, the value and what is allowed.
        """
        problem = self._problem(value)
        if problem is not None:
            raise OptionError(
                f"{owner}: option {self.name!r} = {value!r} is not allowed: expected "
                f"{self.allowed()}" + (f" ({problem})" if problem else "")
            )
        if self.type is float and value is not None:
            return float(value)
        return value

    def _problem(self, value: Any) -> str | None:
        """None when allowed, else a reason ('' when the expectation says it all)."""
        if value is None:
            return None if self.optional or (self.type is None and self.choices is None) else ""
        if self.choices is not None:
            return None if any(_same(value, c) for c in self.choices) else ""
        kind = self.type
        if kind is None:
            return None
        if kind is bool:
            return None if isinstance(value, bool) else ""
        if kind is str:
            return None if isinstance(value, str) else ""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return ""
        if kind is int:
            if not isinstance(value, int):
                return "not an integer"
            if abs(value) > INT32_MAX:
                return f"outside the int32 range, |value| <= {INT32_MAX}"
        if isinstance(value, float) and math.isnan(value):
            return "NaN"
        if isinstance(value, float) and math.isinf(value) and not self.allow_inf:
            return "infinite"
        for bound, ok in (
            (self.ge, lambda b: value >= b),
            (self.gt, lambda b: value > b),
            (self.le, lambda b: value <= b),
            (self.lt, lambda b: value < b),
        ):
            if bound is not None and not ok(bound):
                return "out of range"
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (``somax-plug show --json``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "default": _jsonable(self.default),
            "type": None if self.type is None else self.type.__name__,
            "allowed": self.allowed(),
            "required": self.required,
        }
        if self.doc:
            out["doc"] = self.doc
        return out

    def wrong_value(self) -> Any:
        """A wrongly typed value this option must refuse (the conformance kit's probe).

        For an untyped option with a typed default (``Option("maxiter", 10)``) it is
        a value of another type, which such an option accepts: the kit reports it,
        since a user's ``maxiter="ten"`` would then fail only inside tracing. None
        when no wrong type is known (an untyped option whose default is None).
        """
        if self.choices is not None:
            return "__not_a_choice__"
        kind = self.type
        if kind is None and self.default is not None:
            kind = next((t for t in (bool, int, float, str) if isinstance(self.default, t)), None)
        return {int: "ten", float: "0.1", bool: "no", str: 3}.get(kind)


def _same(a: Any, b: Any) -> bool:
    """``a == b`` without ``True == 1`` or ``"1" == 1`` style coincidences."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    numbers = isinstance(a, int | float) and isinstance(b, int | float)
    return (numbers or type(a) is type(b)) and a == b


def _num(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def option(
    default: Any = None,
    *,
    required: bool = False,
    alias: str | None = None,
    converter: Any = None,
    type: type | None = None,  # noqa: A002 - the option's type, as in Option
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
    optional: bool | None = None,
    allow_inf: bool = False,
    doc: str = "",
) -> Any:
    """An attrs field that declares a component option (range, choices, doc).

    The type defaults to the field's annotation (``int``, ``float``, ``bool``,
    ``str``; ``X | None`` makes it optional). Building the class directly checks the
    value too (``CG(maxiter="ten")`` raises :class:`~somax_plug.OptionError`).
    ``required=True`` declares an option without a default; ``alias`` is the
    keyword name when it differs from the field's; ``converter`` runs after the check.

    Example:
        >>> import attrs
        >>> from somax_plug import Solver, option
        >>> @attrs.frozen
        ... class MySolver(Solver):
        ...     maxiter: int = option(20, ge=1, doc="at most this many iterations")
        ...     def solve(self, op, rhs, lam, precond, stats, state): ...
    """
    info = {
        "type": type,
        "ge": ge,
        "gt": gt,
        "le": le,
        "lt": lt,
        "choices": choices,
        "optional": optional,
        "allow_inf": allow_inf,
        "doc": doc,
    }

    def convert(value: Any) -> Any:
        return value if converter is None else converter(value)

    kwargs: dict[str, Any] = {"metadata": {OPTION_KEY: info}}
    if not required:
        kwargs["default"] = default
    if alias is not None:
        kwargs["alias"] = alias
    if converter is not None:
        # attrs runs converters before validators; the planner checks such options
        kwargs["converter"] = convert
    else:
        kwargs["validator"] = _validate
    return attrs.field(**kwargs)


def _validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    owner = f"{base_kind_name(instance)} {type_name(instance)!r}"
    field_option(attribute).check(owner, value)


def base_kind_name(instance: Any) -> str:
    from somax_plug._src.kinds import kind_of

    kind = kind_of(type(instance))
    return kind.value if kind is not None else "component"


def type_name(instance: Any) -> str:
    declared = getattr(type(instance), "__somax_spec__", None)
    return declared.name if declared is not None else type(instance).__name__


def field_option(field: attrs.Attribute) -> Option:
    """The :class:`Option` an attrs field declares (annotation + :func:`option` metadata)."""
    info = dict(field.metadata.get(OPTION_KEY, {}))
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    parts = [p.strip() for p in str(annotation or "").split("|")]
    optional = "None" in parts
    named = [p for p in parts if p != "None"]
    inferred = _TYPES.get(named[0]) if len(named) == 1 else None
    kind = info.get("type") or inferred
    if info.get("optional") is None:
        info["optional"] = optional
    required = field.default is attrs.NOTHING
    default = None if required else field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = None
    return Option(
        name=field.alias or field.name,
        default=default,
        type=kind,
        ge=info.get("ge"),
        gt=info.get("gt"),
        le=info.get("le"),
        lt=info.get("lt"),
        choices=info.get("choices"),
        optional=bool(info.get("optional")),
        allow_inf=bool(info.get("allow_inf")),
        doc=info.get("doc", ""),
        required=required,
    )


def class_options(cls: type) -> tuple[Option, ...]:
    """The options an attrs class declares (its public init fields), in order."""
    if not attrs.has(cls):
        return ()
    return tuple(
        field_option(f) for f in attrs.fields(cls) if f.init and not f.name.startswith("_")
    )


def options_from_defaults(defaults: Mapping[str, Any]) -> tuple[Option, ...]:
    """Options whose type is inferred from the default value (``defaults={...}`` specs)."""
    out = []
    for name, value in defaults.items():
        kind = next((t for t in (bool, int, float, str) if isinstance(value, t)), None)
        out.append(Option(str(name), value, type=kind, optional=value is None))
    return tuple(out)


def check_options(owner: str, declared: tuple[Option, ...], given: Mapping[str, Any]) -> dict:
    """Check ``given`` against ``declared``; return the checked values.

    Raises:
        OptionError: an unknown option (with suggestions and the declared list), a
            value that is not allowed, or a required option that is missing.
    """
    by_name = {o.name: o for o in declared}
    missing = [o for o in declared if o.required and o.name not in given]
    if missing:
        raise OptionError(
            f"{owner} needs option " + ", ".join(f"{o.name!r} ({o.allowed()})" for o in missing)
            + (f": {missing[0].doc}" if missing[0].doc else "")
        )
    out = {}
    for name, value in given.items():
        opt = by_name.get(name)
        if opt is None:
            close = difflib.get_close_matches(name, list(by_name), n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            listing = "; ".join(o.describe() for o in declared) or "none"
            raise OptionError(f"{owner} has no option {name!r}{hint}; its options: {listing}")
        out[name] = opt.check(owner, value)
    return out
