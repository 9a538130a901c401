"""The lineax solvers through the somax_plug conformance kit, registry and a composed step."""

import jax
import jax.numpy as jnp
import pytest
import somax_plug_lineax

from somax_plug import CompositionError, OptionError, compose
from somax_plug.testing.conformance import check_solver

CONVERGE = {"rtol": 1e-11, "atol": 1e-12, "max_steps": 400}


@pytest.fixture
def lineax_plugin(somax_registry, register_plugin):
    """The plugin registered in a fresh registry through the real loader path."""
    record = register_plugin(somax_plug_lineax, name="lineax")
    assert record.status == "ok", record.error
    return somax_registry


def test_registers_its_solvers_with_attribution(lineax_plugin):
    names = {s.name for s in lineax_plugin.list("solver", plugin="lineax")}
    assert names == {"lineax_gmres", "lineax_bicgstab", "lineax_cg"}
    assert lineax_plugin.get("solver", "lineax_cg").requires.tags == {"psd"}
    gmres = lineax_plugin.get("solver", "lineax_gmres").requires
    assert not gmres.tags and gmres.resources == {"operator"}


@pytest.mark.parametrize("name", ["lineax_gmres", "lineax_bicgstab"])
def test_general_solvers_conform(lineax_plugin, name):
    # no symmetry required: checked on SPD and symmetric indefinite systems alike
    options = {**CONVERGE, "restart": 20} if name == "lineax_gmres" else CONVERGE
    check_solver(name, options=options)


def test_cg_conforms(lineax_plugin):
    # requires psd: checked on SPD systems, with and without an SPD preconditioner
    check_solver("lineax_cg", options=CONVERGE)


def test_cg_is_refused_on_an_indefinite_curvature(lineax_plugin):
    with pytest.raises(CompositionError, match="psd"):
        compose("hessian", "lineax_cg", predict_fn=lambda p, x: x @ p, loss="mse")


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ({"max_steps": "ten"}, "option 'max_steps' = 'ten' is not allowed: expected an int >= 1"),
        ({"max_steps": 2.5}, "option 'max_steps' = 2.5"),
        ({"rtol": -1.0}, "option 'rtol' = -1.0"),
        ({"restart": True}, "option 'restart' = True"),
    ],
)
def test_options_are_checked_at_compose_time(lineax_plugin, options, expect):
    with pytest.raises(OptionError, match="solver 'lineax:lineax_gmres'") as info:
        compose("ggn", {"name": "lineax_gmres", **options}, predict_fn=lambda p, x: x @ p,
                loss="mse")
    assert expect in str(info.value)


def test_composed_training_decreases_the_loss(lineax_plugin):
    key = jax.random.key(0)
    x = jax.random.normal(key, (32, 4))
    y = x @ jnp.array([1.0, -2.0, 0.5, 3.0]) + 0.1
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}

    def predict(p, inputs):
        return inputs @ p["w"] + p["b"]

    method = compose("ggn", "lineax_cg", predict_fn=predict, loss="mse",
                     damping={"name": "constant", "lam": 1e-3})
    state = method.init(params)
    losses = []
    for _ in range(3):
        params, state, info = method.step(params, state, (x, y[:, None].squeeze(-1)))
        losses.append(float(info["loss"]))
    assert losses[-1] < 1e-2 * losses[0]
