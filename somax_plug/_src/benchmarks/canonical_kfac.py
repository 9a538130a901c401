"""Per-step time of the ``kfac`` preset with and without canonical reductions, 1 device.

Times ``compose(preset="kfac")`` on the 784-256-10 tanh MLP of the other benchmarks
(float32, softmax cross-entropy) on a 1-device mesh, in two layouts:

* ``plain``: ``DataParallel(data_parallel_mesh(1))`` (GSPMD's reductions);
* ``reduce_chunks=4``: ``DataParallel(data_parallel_mesh(1), reduce_chunks=4)``: the
  model, the tapped pass of the layer map and the Kronecker factors' sums evaluated
  on 4 fixed chunks (device-count-independent reductions).

Protocol: each layout is compiled and stepped once (the first step computes the
factor inverses: ``inverse_every=10``); the timed calls then repeat the *second*
step from that state (no inverse refresh: the step between refreshes), alternating
the layouts over ``repeats`` rounds (:func:`~somax_plug._src.benchmarks.common.alternate`);
the per-step time is the median. Run by ``somax-plug bench`` (part
``canonical_kfac``).

Example:
    >>> from somax_plug._src.benchmarks import canonical_kfac
    >>> canonical_kfac.run(smoke=True)["layouts"]  # doctest: +SKIP
    ['plain', 'reduce_chunks=4']
"""

from __future__ import annotations

from typing import Any

LAYOUTS = ("plain", "reduce_chunks=4")


def run(quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Seconds per ``kfac`` step, plain and with ``reduce_chunks=4``, and their ratio.

    ``smoke``: a 64-8-10 MLP, batch 16, 3 rounds (a schema check); ``quick``: the
    784-256-10 MLP, batch 256, 5 rounds; otherwise batch 512, 15 rounds.
    """
    import jax

    from somax_plug import DataParallel, compose, data_parallel_mesh
    from somax_plug._src.benchmarks.common import (
        alternate,
        init_mlp,
        machine_info,
        median,
        mlp,
        random_batch,
    )

    sizes = (64, 8, 10) if smoke else (784, 256, 10)
    batch = 16 if smoke else (256 if quick else 512)
    repeats = 3 if smoke else (5 if quick else 15)
    params = init_mlp(jax.random.key(0), sizes)
    data = random_batch(jax.random.key(1), batch, d_in=sizes[0], classes=sizes[-1])
    mesh = data_parallel_mesh(1)
    layouts = {"plain": DataParallel(mesh), "reduce_chunks=4": DataParallel(mesh,
                                                                            reduce_chunks=4)}
    calls = {}
    for name, layout in layouts.items():
        method = compose(preset="kfac", predict_fn=mlp, loss="softmax_cross_entropy",
                         mesh=layout)
        p1, s1, _ = method.step(params, method.init(params), data, jax.random.key(0))
        calls[name] = (
            lambda m=method, p=p1, s=s1: m.step(p, s, data, jax.random.key(1))[0]
        )
    times = alternate(calls, repeats)
    per_step = {name: median(t) for name, t in times.items()}
    return {
        "what": f"kfac per-step seconds (between inverse refreshes), MLP "
                f"{'-'.join(map(str, sizes))}, float32, 1 CPU device",
        "layouts": list(LAYOUTS),
        "batch": batch,
        "repeats": repeats,
        "seconds_per_step": per_step,
        "reduce_chunks_overhead": per_step["reduce_chunks=4"] / per_step["plain"],
        "machine": machine_info(),
    }
