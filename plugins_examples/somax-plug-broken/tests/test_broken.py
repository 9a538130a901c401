"""The broken plugin is rolled back and reported, and the host keeps working."""

import pytest
import somax_plug_broken

from somax_plug import CompositionError, compose


def test_half_registration_is_rolled_back(somax_registry, register_plugin):
    record = register_plugin(somax_plug_broken, name="broken")
    assert record.status == "failed"
    assert somax_plug_broken.ERROR in record.error
    assert record.components == []
    assert somax_registry.list(plugin="broken") == []


def test_the_host_keeps_working_and_quotes_the_failure(somax_registry, register_plugin):
    register_plugin(somax_plug_broken, name="broken")
    # its validate hook would veto every plan; it must not run
    method = compose("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse")
    assert method.plan.component("solver").name == "builtin:cg"
    with pytest.raises(CompositionError, match="failed to load.*fails on purpose"):
        compose("ggn", "broken_solver", predict_fn=lambda p, x: x @ p, loss="mse")
