"""Times pcx's predictive-coding training step for ``benchmarks/suite.py``, over stdin/stdout.

Runs in an interpreter whose environment has pcx (``pip install "pcx==0.6.3" "jax<0.5"`` in
a virtual environment of its own: this project does not depend on pcx); the suite starts it
with ``--pcx-python PYTHON`` and interleaves its timings with the torch ones. It needs nothing
from this repository.

Protocol: one JSON object per line each way; an error comes back as ``{"error": "..."}``.

    {"op": "hello"}  ->  {"pcx": ..., "jax": ..., "jaxlib": ..., "devices": [...], "cpus": n}
    {"op": "setup", "key": K, "in_features": 40, "width": 256, "classes": 10, "depth": 3,
     "batch": 256, "inference_steps": 8, "inference_lr": 0.1, "lr": 0.01, "seed": 0}
                     ->  {"compile_s": ...}        (builds, jits and runs two steps)
    {"op": "time", "key": K, "steps": n}  ->  {"seconds_per_step": ..., "energy": ...}
    {"op": "quit"}   ->  {"bye": true}

The task is the suite's reference task written the way pcx's examples write it: an
``EnergyModule`` MLP ``in -> M -> ... -> M -> classes`` (``pxnn.Linear`` with biases, tanh),
one ``Vode`` after each layer with the squared-error energy, the output vode's ``h`` frozen to
the one-hot target; per batch a forward pass in ``STATUS.INIT`` (feedforward states), then
``T`` gradient steps of ``optax.sgd(inference_lr)`` on the hidden vodes of the energy summed
over the batch, then one ``optax.sgd(lr)`` weight step on the batch mean, all in one
``pxf.jit`` function. A timing runs ``n`` steps and waits for the weights to be computed.

    python benchmarks/pcx_worker.py [--cpus 0,1]   # --cpus: pin to these CPUs first
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import IO, Any


def _build(spec: dict[str, Any]) -> dict[str, Any]:
    """The model, optimizers, batch and jitted step of one ``setup`` request."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import pcx as px
    import pcx.functional as pxf
    import pcx.nn as pxnn
    import pcx.predictive_coding as pxc
    import pcx.utils as pxu

    class Model(pxc.EnergyModule):
        """MLP of ``depth`` ``Linear`` layers with a vode after each."""

        def __init__(self, in_features: int, width: int, classes: int, depth: int) -> None:
            super().__init__()
            self.act_fn = px.static(jax.nn.tanh)
            sizes = [in_features] + [width] * (depth - 1) + [classes]
            self.layers = [pxnn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
            self.vodes = [pxc.Vode() for _ in range(depth)]
            self.vodes[-1].h.frozen = True

        def __call__(self, x: Any, y: Any) -> Any:
            for vode, layer in zip(self.vodes[:-1], self.layers[:-1]):
                x = vode(self.act_fn(layer(x)))
            self.vodes[-1](self.layers[-1](x))
            if y is not None:
                self.vodes[-1].set("h", y)
            return self.vodes[-1].get("u")

    batched = pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0))

    @pxf.vmap(batched, in_axes=(0, 0), out_axes=0)
    def forward(x: Any, y: Any, *, model: Model) -> Any:
        return model(x, y)

    @pxf.vmap(batched, in_axes=(0,), out_axes=(None, 0), axis_name="batch")
    def energy(x: Any, *, model: Model) -> Any:
        y_ = model(x, None)
        return jax.lax.psum(model.energy(), "batch"), y_

    states = pxu.M_hasnot(pxc.VodeParam, frozen=True)

    @pxf.jit(static_argnums=0)
    def train_on_batch(steps: int, x: Any, y: Any, *, model: Model, optim_w: Any,
                       optim_h: Any) -> Any:
        model.train()
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            forward(x, y, model=model)
        optim_h.init(states(model))
        for _ in range(steps):
            with pxu.step(model, clear_params=pxc.VodeParam.Cache):
                _, grads = pxf.value_and_grad(states.to([False, True]), has_aux=True)(
                    energy)(x, model=model)
            optim_h.step(model, grads["model"])
        optim_h.clear()
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            (total, _), grads = pxf.value_and_grad(
                pxu.M(pxnn.LayerParam).to([False, True]), has_aux=True)(energy)(x, model=model)
        optim_w.step(model, grads["model"], scale_by=1.0 / x.shape[0])
        return total

    px.RKG.seed(int(spec.get("seed", 0)))
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    batch, in_features = int(spec["batch"]), int(spec["in_features"])
    classes = int(spec["classes"])
    model = Model(in_features, int(spec["width"]), classes, int(spec["depth"]))
    x = jnp.asarray(rng.standard_normal((batch, in_features), dtype=np.float32))
    y = jax.nn.one_hot(jnp.asarray(rng.integers(0, classes, batch)), classes)
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        forward(jnp.zeros((batch, in_features)), None, model=model)
    optim_h = pxu.Optim(lambda: optax.sgd(float(spec["inference_lr"])))
    optim_w = pxu.Optim(lambda: optax.sgd(float(spec["lr"])), pxu.M(pxnn.LayerParam)(model))
    steps = int(spec["inference_steps"])

    def step() -> Any:
        return train_on_batch(steps, x, y, model=model, optim_w=optim_w, optim_h=optim_h)

    def wait(result: Any) -> None:
        jax.block_until_ready((result, jax.tree_util.tree_leaves(model)))

    return {"step": step, "wait": wait}


def _time(built: dict[str, Any], steps: int) -> dict[str, Any]:
    step, wait = built["step"], built["wait"]
    start = time.perf_counter()
    result = None
    for _ in range(steps):
        result = step()
    wait(result)
    elapsed = time.perf_counter() - start
    return {"seconds_per_step": elapsed / steps, "energy": float(result)}


def _hello() -> dict[str, Any]:
    from importlib.metadata import version

    import jax

    return {
        "pcx": version("pcx"), "jax": jax.__version__, "jaxlib": version("jaxlib"),
        "devices": [str(d) for d in jax.devices()],
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": sys.version.split()[0],
    }


def serve(requests: IO[str], answers: IO[str]) -> None:
    """Answer requests, one JSON line each, until ``quit`` or end of input."""
    built: dict[str, dict[str, Any]] = {}
    for line in requests:
        if not line.strip():
            continue
        request: dict[str, Any] = {}
        try:
            request = json.loads(line)
            op = request.get("op")
            if op == "hello":
                answer = _hello()
            elif op == "setup":
                start = time.perf_counter()
                built[request["key"]] = _build(request)
                _time(built[request["key"]], 2)  # compile, then one compiled step
                answer = {"compile_s": time.perf_counter() - start}
            elif op == "time":
                answer = _time(built[request["key"]], max(1, int(request["steps"])))
            elif op == "quit":
                answer = {"bye": True}
            else:
                answer = {"error": f"unknown op {op!r}"}
        except Exception as error:  # reported to the suite, which stops with it
            traceback.print_exc(file=sys.stderr)
            answer = {"error": f"{type(error).__name__}: {error}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
        if request.get("op") == "quit":
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cpus", default=None, help="comma-separated CPUs to pin to")
    args = parser.parse_args()
    if args.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    # Answers go to a copy of stdout; anything else printed (by jax or XLA) goes to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    serve(sys.stdin, answers)


if __name__ == "__main__":
    main()
