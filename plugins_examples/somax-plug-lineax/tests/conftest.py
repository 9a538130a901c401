"""The somax_plug author kit's fixtures, and a Hypothesis profile sized for JAX.

Every conformance example compiles JAX code, so the profile keeps examples few.
"""

import os

from hypothesis import settings

pytest_plugins = ["somax_plug.testing"]

settings.register_profile("plugin-ci", max_examples=4, deadline=None, derandomize=True)
settings.register_profile("plugin-dev", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "plugin-ci" if os.environ.get("CI")
                                     else "plugin-dev"))
