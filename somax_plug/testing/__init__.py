"""Plugin author kit (see somax_plug.testing.plugin for the pytest plugin)."""
