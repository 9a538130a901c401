#!/usr/bin/env bash
# The example plugins, pip-installed into a fresh virtual environment.
#
# Called by .ci/run after the main test-suite. It
#   1. creates a venv ($VENV, default: a new mktemp dir) with $PYTHON (default python3),
#   2. pip installs somax-plug with its test extra, then the two working example
#      plugins (somax-plug-lineax, somax-plug-xdiag) with theirs, from PyPI,
#   3. runs each example's own test-suite against the installed packages,
#   4. checks that `somax-plug list --json` attributes their components to them,
#   5. installs somax-plug-broken and checks that `somax-plug doctor --json` reports it
#      failed while `somax-plug list` still works, and that SOMAX_PLUG_DISABLE=broken
#      hides the failure,
#   6. trains a small model with scripts/train_with_plugins.py (a lineax solver and
#      the xdiag estimator through somax_plug.as_optax inside optax.chain).
#
# Builds run from copies of the sources, so pip writes nothing into the work tree.
# Usage: scripts/ci_plugins.sh          PYTHON=python3.11 VENV=/tmp/v scripts/ci_plugins.sh
set -euo pipefail

start=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
VENV=${VENV:-$WORK/venv}
EXAMPLES="$ROOT/plugins_examples"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - start))"; }

stage() {  # stage SRC NAME: copy a source tree to $WORK/src/NAME, without build output
  mkdir -p "$WORK/src/$2"
  tar -C "$1" --exclude=.git --exclude=plugins_examples --exclude=build --exclude=dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.hypothesis --exclude=.pytest_cache \
    --exclude=site --exclude=demo_out -cf - . | tar -C "$WORK/src/$2" -xf -
  echo "$WORK/src/$2"
}

step "venv $VENV with $("$PYTHON" --version)"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
CLI="$VENV/bin/somax-plug"
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset SOMAX_PLUG_DISABLE SOMAX_PLUG_ONLY SOMAX_PLUG_STRICT PYTHONPATH

step "pip install somax-plug[test]"
"$PY" -m pip install --quiet "$(stage "$ROOT" somax-plug)[test]"

step "pip install the example plugins"
"$PY" -m pip install --quiet \
  "$(stage "$EXAMPLES/somax-plug-lineax" somax-plug-lineax)[test]" \
  "$(stage "$EXAMPLES/somax-plug-xdiag" somax-plug-xdiag)[test]"

for example in somax-plug-lineax somax-plug-xdiag; do
  step "tests of $example"
  # bin/pytest (not python -m) so the installed package is imported, not the source folder
  (cd "$EXAMPLES/$example" && CI=1 "$VENV/bin/pytest" -q -p no:cacheprovider tests)
done

step "somax-plug list --json attributes the components to their plugins"
"$CLI" list --json > "$WORK/list.json"
"$PY" - "$WORK/list.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
# the contract (docs/reference/cli.md): keys are only ever added, never renamed or removed
keys = {"kind", "name", "qualified_name", "plugin", "provides", "requires", "summary",
        "options", "every_k", "cadence", "preconditioned"}
assert all(keys <= set(r) for r in rows), f"list rows lack contract keys: {keys - set(rows[0])}"
found = {(r["plugin"], r["kind"], r["name"]) for r in rows}
expected = {("lineax", "solver", "lineax_gmres"), ("lineax", "solver", "lineax_bicgstab"),
            ("lineax", "solver", "lineax_cg"), ("xdiag", "estimator", "xdiag")}
missing = expected - found
assert not missing, f"not listed: {sorted(missing)}"
print(f"ok: {len(rows)} components, including {sorted(f'{p}:{n}' for p, _, n in expected)}")
EOF

step "pip install the broken example"
"$PY" -m pip install --quiet --no-deps "$(stage "$EXAMPLES/somax-plug-broken" somax-plug-broken)"

step "doctor reports it failed; list still works; SOMAX_PLUG_DISABLE=broken hides it"
"$CLI" doctor --json > "$WORK/doctor.json"
"$CLI" list --json > "$WORK/list-broken.json"
SOMAX_PLUG_DISABLE=broken "$CLI" doctor --json > "$WORK/doctor-disabled.json"
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
plugins = {p["name"]: p for p in json.loads((work / "doctor.json").read_text())["plugins"]}
for p in plugins.values():
    assert {"name", "distribution", "version", "status", "error"} <= set(p), p
broken = plugins["broken"]
assert broken["status"] == "failed" and "fails on purpose" in broken["error"], broken
assert all(plugins[n]["status"] == "ok" for n in ("builtin", "lineax", "xdiag")), plugins
rows = json.loads((work / "list-broken.json").read_text())
assert {r["plugin"] for r in rows} >= {"builtin", "lineax", "xdiag"}
assert not [r for r in rows if r["plugin"] == "broken"], "a failed plugin must list nothing"
hidden = json.loads((work / "doctor-disabled.json").read_text())["plugins"]
assert not [p for p in hidden if p["status"] == "failed"], hidden
assert {p["name"]: p["status"] for p in hidden}["broken"] == "disabled"
print(f"ok: broken failed ({broken['error'][:60]}...), list has {len(rows)} rows, "
      "disabled when SOMAX_PLUG_DISABLE=broken")
EOF

step "train with the plugins' components through the Optax bridge"
(cd "$WORK" && "$PY" "$ROOT/scripts/train_with_plugins.py")

step "ci_plugins.sh passed in $((SECONDS - start))s"
