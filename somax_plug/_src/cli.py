"""The ``somax-plug`` command line.

Subcommands: ``list``, ``show``, ``doctor`` (the registry), ``plan`` (explain a
composition), ``demo`` (the main job) and ``bench`` (benchmarks). Each of
``list``, ``show``, ``doctor`` and ``plan`` takes ``--json``; the JSON shapes are a
contract that other tools read (see the docs' CLI page). ``--debug`` anywhere on the
command line shows the traceback of an error instead of its one-line message.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from somax_plug._src.errors import SomaxPlugError


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(s.rstrip() for s in out)


def _requires_text(req: dict[str, list[str]]) -> str:
    parts = [f"{k}={'+'.join(v)}" for k, v in req.items() if v]
    return ", ".join(parts) or "-"


class NothingMatched(SomaxPlugError):
    """``somax-plug list`` filters that match no registered component (exit status 2)."""


def _close(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"did you mean {' or '.join(map(repr, close))}? " if close else ""


def _nothing_matched(reg: Any, args: argparse.Namespace) -> str:
    """Why ``list`` matched nothing, with the names that would match."""
    given = [
        f"--{key} {value!r}"
        for key, value in (("kind", args.kind), ("tag", args.tag), ("plugin", args.plugin))
        if value
    ]
    parts = [f"no component matches {' '.join(given)}"]
    plugins = sorted(reg.plugins)
    if args.plugin and args.plugin not in reg.plugins:
        parts.append(
            f"no plugin is named {args.plugin!r}; {_close(args.plugin, plugins)}"
            f"plugins: {', '.join(plugins)}"
        )
    elif args.plugin and not reg.list(plugin=args.plugin):
        record = reg.plugins[args.plugin]
        parts.append(f"plugin {args.plugin!r} ({record.status}) registered no components")
    if args.tag:
        pool = reg.list(kind=args.kind, plugin=args.plugin if args.plugin in reg.plugins else None)
        tags = sorted({t for spec in pool for t in spec.provides})
        parts.append(
            f"{_close(args.tag, tags)}tags and statistics provided"
            + (f" by {args.kind} components" if args.kind else "")
            + f": {', '.join(tags) or '(none)'}"
        )
    return "; ".join(parts)


def cmd_list(args: argparse.Namespace) -> int:
    from somax_plug._src.registry import get_registry

    reg = get_registry()
    specs = reg.list(kind=args.kind, tag=args.tag, plugin=args.plugin)
    if not specs and (args.kind or args.tag or args.plugin):
        if args.json:
            print("[]")
        raise NothingMatched(_nothing_matched(reg, args))
    rows = [s.to_dict() for s in specs]
    keys = (
        "kind",
        "name",
        "qualified_name",
        "plugin",
        "provides",
        "requires",
        "summary",
        "options",
        "every_k",
        "cadence",
        "preconditioned",
    )
    if args.json:
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
        return 0
    table = [
        [
            r["kind"],
            r["name"],
            r["plugin"],
            ",".join(r["provides"]) or "-",
            _requires_text(r["requires"]),
            r["summary"],
        ]
        for r in rows
    ]
    print(_table(table, ["kind", "name", "plugin", "provides", "requires", "summary"]))
    if not args.kind and not args.tag and not args.plugin:
        presets = reg.presets()
        if presets:
            print()
            print(
                _table(
                    [[p.name, p.plugin, p.summary] for p in presets],
                    ["preset", "plugin", "summary"],
                )
            )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from somax_plug._src.errors import UnknownComponentError
    from somax_plug._src.kinds import Kind
    from somax_plug._src.registry import get_registry

    reg = get_registry()
    found = reg.find(args.name)
    if not found:
        # re-raise the most helpful error: the per-kind suggestion for a solver-like name
        messages = []
        for kind in Kind:
            try:
                reg.get(kind, args.name)
            except SomaxPlugError as exc:
                messages.append(str(exc))
        raise UnknownComponentError(
            f"nothing is registered as {args.name!r}:\n  " + "\n  ".join(messages)
        )
    items = [f.to_dict() for f in found]
    if args.json:
        print(json.dumps(items if len(items) > 1 else items[0], indent=2))
        return 0
    for item in items:
        print(f"{item['kind']} {item['qualified_name']}")
        for key, value in item.items():
            if key in ("kind", "qualified_name", "defaults"):
                continue
            if key == "options":
                print(f"  {'options':<14} {'-' if not value else ''}")
                for opt in value:
                    default = "required" if opt["required"] else f"default {opt['default']!r}"
                    doc = f": {opt['doc']}" if opt.get("doc") else ""
                    print(f"    {opt['name']:<18} {opt['allowed']} ({default}){doc}")
                continue
            if isinstance(value, dict):
                value = json.dumps(value)
            elif isinstance(value, list):
                value = ", ".join(map(str, value)) or "-"
            print(f"  {key:<14} {value}")
        if item["kind"] == "preset":
            from somax_plug._src.planner import make_plan

            try:
                print()
                print(make_plan(args.name).explain())
            except SomaxPlugError as exc:
                print(f"  (cannot plan this preset here: {exc})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from somax_plug._src.registry import get_registry

    reg = get_registry()
    reg.check_factories()  # imports each lazy factory: a missing one is not "ok"
    plugins = [r.to_dict() for r in reg.plugins.values()]
    report = {
        "plugins": plugins,
        "conflicts": [c.message() for c in reg.conflicts],
        "fingerprint": reg.fingerprint(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rows = [
            [
                p["name"],
                p["distribution"] or "-",
                p["version"] or "-",
                p["status"],
                str(len(p["components"])),
                "-" if p["import_seconds"] is None else f"{p['import_seconds']:.3f}",
                p["error"] or "",
            ]
            for p in plugins
        ]
        headers = ["plugin", "distribution", "version", "status", "components", "import s"]
        print(_table(rows, [*headers, "error"]))
        for p in plugins:
            for warning in p["warnings"]:
                print(f"warning: plugin {p['name']!r}: {warning}")
            for override in p["overrides"]:
                print(f"override: plugin {p['name']!r} overrides {override}")
        for message in report["conflicts"]:
            print(f"conflict: {message}")
        print(f"fingerprint: {report['fingerprint']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from somax_plug._src.composition import load_composition
    from somax_plug._src.planner import make_plan

    composition = load_composition(args.config)
    plan = make_plan(composition, unplanned=args.unplanned)
    layer_map = None if args.model is None else _layer_map_of(plan, args.model)
    if args.json:
        out = plan.to_dict()
        if layer_map is not None:
            out["layer_map"] = str(layer_map).splitlines()
        print(json.dumps(out, indent=2))
    else:
        print(plan.explain())
        if layer_map is not None:
            print(layer_map)
    return 0


def _layer_map_of(plan: Any, spec: str) -> Any:
    """The layer map that ``plan``'s ``layer_map`` provider finds for ``--model MOD:FN``.

    ``FN()`` returns ``(predict_fn, params, example_inputs)``; a plan that reads no
    layer map uses the built-in provider (and the map is printed all the same).
    """
    import jax

    from somax_plug._src.errors import CompositionError
    from somax_plug._src.layers import layer_map_provider
    from somax_plug._src.model import make_model
    from somax_plug._src.resources import Resources

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise CompositionError(
            f"--model {spec!r}: expected MODULE:FUNCTION (for example mypkg.models:mlp), "
            "a function of no arguments returning (predict_fn, params, example_inputs)"
        )
    if os.getcwd() not in sys.path:  # a console script does not put the cwd on the path
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module), attr)
        predict_fn, params, inputs = factory()
    except (ImportError, AttributeError) as exc:
        raise CompositionError(f"--model {spec!r}: cannot load it: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise CompositionError(
            f"--model {spec!r}: it must return (predict_fn, params, example_inputs): {exc}"
        ) from exc
    found = next((r.provider for r in plan.resources if r.name == "layer_map"), None)
    provider = found if found is not None else layer_map_provider()
    res = Resources(make_model(predict_fn, "mse"), params, (inputs, None), jax.random.key(0),
                    {"layer_map": provider})
    return res["layer_map"]


def _delegate(module: str, argv: Sequence[str]) -> int:
    return int(importlib.import_module(module).main(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="somax-plug", description="Composable second-order training in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered components")
    p.add_argument(
        "--kind", choices=["curvature", "estimator", "solver", "preconditioner", "damping"]
    )
    p.add_argument("--tag", help="only components that provide this tag or statistic")
    p.add_argument("--plugin", help="only components of this plugin")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one component or preset")
    p.add_argument("name", help="short or qualified (plugin:name) name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("doctor", help="report every plugin's status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("plan", help="explain the plan of a composition (TOML file or preset)")
    p.add_argument("config", help="a .toml file, or the name of a preset")
    p.add_argument("--unplanned", action="store_true", help="explain the unplanned variant")
    p.add_argument("--model", metavar="MODULE:FUNCTION", default=None,
                   help="also print the layer map of this model: FUNCTION() returns "
                   "(predict_fn, params, example_inputs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    for name, module, text in (
        ("demo", "somax_plug._src.demo", "train on the bundled digits dataset (main job)"),
        ("bench", "somax_plug._src.bench", "run the benchmarks"),
    ):
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(func=None, delegate=module)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _say(message: str) -> None:
    try:
        print(f"somax-plug: {message}", file=sys.stderr)
    except (OSError, ValueError):
        pass


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if getattr(args, "delegate", None):
        status = _delegate(args.delegate, argv[1:])
    else:
        status = int(args.func(args) or 0)
    sys.stdout.flush()  # a full device fails here, inside the handlers below
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Exit status: 0 on success, 2 for a :class:`~somax_plug.SomaxPlugError` (a named
    error; also a ``list`` that matched nothing), 1 for anything else: an
    ``OSError`` such as a full device, or an unexpected exception, printed as one
    line that names it (``--debug``, anywhere on the command line, shows the
    traceback instead), 130 on Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("demo", "bench"):
        module = {"demo": "somax_plug._src.demo", "bench": "somax_plug._src.bench"}[argv[0]]
        args = argparse.Namespace(delegate=module)
    else:
        args = build_parser().parse_args(argv)
    hint = "run again with --debug for the traceback"
    try:
        return _run(args, argv)
    except SomaxPlugError as exc:
        if debug:
            raise
        _say(f"error: {exc}")
        return 2
    except BrokenPipeError:  # `somax-plug list --json | head`: the reader left early
        _silence_stdout()
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except OSError as exc:
        _silence_stdout()
        if debug:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _say(f"error: input/output failed{where}: {type(exc).__name__}: {exc}; {hint}")
        return 1
    except Exception as exc:
        if debug:
            raise
        _say(f"internal error: {type(exc).__name__}: {exc}; {hint}, and report it")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
