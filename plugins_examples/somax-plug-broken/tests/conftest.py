"""The somax_plug author kit's fixtures."""

pytest_plugins = ["somax_plug.testing"]
