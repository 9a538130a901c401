"""Registry behaviour: lookup, qualified names, conflicts, suggestions, rollback."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from somax_plug._src.errors import (
    AmbiguousComponentError,
    ConflictError,
    RegistryError,
    UnknownComponentError,
)
from somax_plug._src.kinds import Kind
from somax_plug._src.registry import Registry
from somax_plug._src.spec import ComponentSpec, Requires


def _spec(kind="solver", name="cg", **kw):
    return ComponentSpec(kind=kind, name=name, factory=dict, **kw)


def test_qualified_and_short_lookup():
    reg = Registry()
    with reg.transaction("alpha") as register:
        register(
            _spec(name="cg", provides={"x"}, requires=Requires(tags={"psd"}), defaults={"a": 0})
        )
    assert reg.get("solver", "cg").qualified_name == "alpha:cg"
    assert reg.get(Kind.SOLVER, "alpha:cg").plugin == "alpha"
    assert reg.get("solver", "cg").requires.tags == frozenset({"psd"})
    assert reg.create("solver", "cg", a=1) == {"a": 1}


def test_unknown_name_suggests_close_matches_and_lists_candidates():
    reg = Registry()
    with reg.transaction("builtin") as register:
        register(_spec(name="minres"))
        register(_spec(name="cg"))
    with pytest.raises(UnknownComponentError) as info:
        reg.get("solver", "minre")
    msg = str(info.value)
    assert "did you mean 'minres'" in msg
    assert "builtin:cg" in msg and "builtin:minres" in msg


def test_wrong_kind_is_named():
    reg = Registry()
    with reg.transaction("builtin") as register:
        register(_spec(kind="curvature", name="ggn"))
    with pytest.raises(UnknownComponentError, match="exists as a curvature"):
        reg.get("solver", "ggn")


def test_same_short_name_in_two_plugins_is_ambiguous_until_overridden():
    reg = Registry()
    with reg.transaction("a") as register:
        register(_spec(name="cg"))
    with reg.transaction("b") as register:
        register(_spec(name="cg"))
    assert [c.resolution for c in reg.conflicts] == ["ambiguous"]
    with pytest.raises(AmbiguousComponentError, match="a:cg, b:cg"):
        reg.get("solver", "cg")
    assert reg.get("solver", "b:cg").plugin == "b"
    with reg.transaction("c") as register:
        register(_spec(name="cg"), override=True)
    assert reg.get("solver", "cg").plugin == "c"
    assert reg.conflicts[0].resolution == "overridden by c:cg"


def test_same_plugin_registering_twice_is_a_conflict():
    reg = Registry()
    with pytest.raises(ConflictError, match="twice"):
        with reg.transaction("a") as register:
            register(_spec(name="cg"))
            register(_spec(name="cg"))
    # rolled back: nothing of plugin a remains
    assert reg.list() == []


def test_transaction_rolls_back_half_registration():
    reg = Registry()
    with reg.transaction("good") as register:
        register(_spec(name="keep"))
    with pytest.raises(RuntimeError):
        with reg.transaction("bad") as register:
            register(_spec(name="half"))
            register.preset("p", {"curvature": "ggn"})
            raise RuntimeError("boom")
    assert [s.qualified_name for s in reg.list()] == ["good:keep"]
    assert reg.presets() == []


def test_invalid_records_are_refused_with_reason():
    with pytest.raises(ValueError, match="unknown component kind 'solverz'"):
        ComponentSpec(kind="solverz", name="x", factory=dict)
    with pytest.raises(ValueError, match="invalid component name"):
        ComponentSpec(kind="solver", name="a:b", factory=dict)
    with pytest.raises(ValueError, match="every_k"):
        ComponentSpec(kind="solver", name="a", factory=dict, every_k=0)
    with pytest.raises(ValueError, match="unknown requirement keys"):
        ComponentSpec(kind="solver", name="a", factory=dict, requires={"tagz": ["psd"]})
    reg = Registry()
    with pytest.raises(ValueError, match="has no factory"):
        with reg.transaction("p") as register:
            register(kind="solver", name="nofactory")
    with pytest.raises(TypeError, match="takes a declared class or a ComponentSpec"):
        with reg.transaction("p") as register:
            register({"kind": "solver"})


def test_list_filters_and_fingerprint_changes_with_content():
    reg = Registry()
    fp0 = reg.fingerprint()
    with reg.transaction("p") as register:
        register(_spec(kind="curvature", name="ggn", provides={"psd", "symmetric"}))
        register(_spec(kind="curvature", name="hessian", provides={"symmetric"}))
        register(_spec(kind="solver", name="cg"))
    assert [s.name for s in reg.list(kind="curvature", tag="psd")] == ["ggn"]
    assert [s.name for s in reg.list(plugin="p", kind="solver")] == ["cg"]
    assert reg.providers_of("curvature", "symmetric") == ["p:ggn", "p:hessian"]
    fp1 = reg.fingerprint()
    assert fp0 != fp1 and len(fp1) == 16
    assert Registry().fingerprint() == fp0  # deterministic


def test_lazy_string_factory_and_errors():
    spec = ComponentSpec(
        kind="solver", name="x", factory="collections:OrderedDict", plugin="p", defaults={"a": 0}
    )
    assert spec.create(a=1)["a"] == 1
    bad = ComponentSpec(kind="solver", name="x", factory="collections", plugin="p")
    with pytest.raises(ValueError, match="module:attribute"):
        bad.create()


_names = st.sampled_from(["cg", "minres", "ggn", "lm", "diag"])
_kinds = st.sampled_from([k.value for k in Kind])
_plugins = st.sampled_from(["a", "b", "c"])


@given(st.lists(st.tuples(_plugins, _kinds, _names, st.booleans()), max_size=25))
def test_any_registration_sequence_is_consistent_or_an_explicit_conflict(ops):
    """Invariant: each registration either lands or raises ConflictError; afterwards
    every qualified name finds its spec, and every short name resolves to one of its
    owners or raises AmbiguousComponentError listing them."""
    reg = Registry()
    landed: dict[tuple[str, str], str] = {}
    claimed: set[tuple[str, str]] = set()
    for plugin, kind, name, override in ops:
        try:
            with reg.transaction(plugin) as register:
                register(_spec(kind=kind, name=name), override=override)
        except ConflictError:
            twice = (kind, f"{plugin}:{name}") in landed
            assert twice or (override and (kind, name) in claimed)
            continue
        landed[(kind, f"{plugin}:{name}")] = plugin
        if override:
            claimed.add((kind, name))
    for (kind, qname), plugin in landed.items():
        spec = reg.get(kind, qname)
        assert spec.qualified_name == qname and spec.plugin == plugin
        owners = sorted(q for (k, q) in landed if k == kind and q.endswith(":" + spec.name))
        try:
            resolved = reg.get(kind, spec.name).qualified_name
        except AmbiguousComponentError as exc:
            assert len(owners) > 1 and (kind, spec.name) not in claimed
            assert all(o in str(exc) for o in owners)
        else:
            assert resolved in owners
            assert len(owners) == 1 or (kind, spec.name) in claimed
    assert len(reg.list()) == len(landed)
    with pytest.raises(RegistryError):
        reg.get("solver", "zzz-not-there")
