"""Run the imported model on calibration feeds and hand each linear layer's input to its accumulator.

    accumulators = {weight: LinearInputStatistics(k), ...}      # any object with update(x [.., K])
    collect_linear_inputs(imported, feeds, accumulators)

`expose_linear_inputs` turns "main" into a function returning (its outputs, x of site 1, x of site 2,
...): dataflow blocks become ordinary ones (ToNonDataflow) so that every site's input is in scope at
the end, and the matched input expressions join the returned tuple. The module is then built for the
CPU by the compiler's own build (scheduled kernels: a calibration run takes seconds, not minutes) and
run by TVM's VM, one feed at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tensorpress.compiler.calibration.statistics import LinearInputStatistics
from tensorpress.errors import ConfigError, TensorpressError


class Accumulator(Protocol):
    def update(self, x: np.ndarray) -> None: ...


def linear_input_statistics(imported: Any, feeds: list[dict[str, np.ndarray]], weights: dict[str, int]):
    """{weight name: LinearInputStatistics} of the linear layers reading `weights` ({name: K})."""
    stats = {name: LinearInputStatistics(k) for name, k in weights.items()}
    collect_linear_inputs(imported, feeds, stats)
    return stats


def expose_linear_inputs(mod, weights: list[str]) -> tuple[Any, list[tuple[str, int]]]:
    """(a copy of `mod` whose "main" returns (its result, *site inputs), [(weight, index of its input
    in that tuple)] for each linear layer reading one of `weights`)."""
    import tvm
    from tvm import relax

    from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import linear_site_inputs

    mod = tvm.IRModule(dict(mod.functions_items()))
    func = relax.transform.ToNonDataflow()(tvm.IRModule({"main": mod["main"]}))["main"]
    inputs = linear_site_inputs(func)
    exposed: list[Any] = []
    where: list[tuple[str, int]] = []
    for name in weights:
        for x in inputs.get(name, []):
            where.append((name, 1 + len(exposed)))
            exposed.append(x)
    body = func.body
    ret = relax.TupleType([body.body.ty, *[x.ty for x in exposed]])
    new = relax.Function(
        func.params, relax.SeqExpr(body.blocks, relax.Tuple([body.body, *exposed])), ret, attrs=func.attrs
    )
    mod["main"] = new
    return relax.transform.Normalize()(mod), where


def collect_linear_inputs(
    imported: Any, feeds: list[dict[str, np.ndarray]], accumulators: dict[str, Accumulator]
) -> None:
    """Run "main" of `imported` on each feed on the CPU, and update the accumulator of each weight in
    `accumulators` with the input of every linear layer that reads that weight."""
    import tvm
    from tvm import relax

    from tensorpress.compiler.build import build_library
    from tensorpress.compiler.build_folder import build_folder
    from tensorpress.compiler.targets import parse_target

    if imported.kind != "graph":
        raise ConfigError(f"calibration runs graph models only for now, not a {imported.kind}; compile it without it.")
    mod, where = expose_linear_inputs(imported.mod, list(accumulators))
    func = mod["main"]
    found = {name for name, _ in where}
    if set(accumulators) - found:
        missing = sorted(set(accumulators) - found)
        raise TensorpressError(f"calibration found no linear layer reading {', '.join(missing)}.")
    num_input = int(func.attrs["num_input"])
    weights = [tvm.runtime.tensor(imported.params[v.name]) for v in list(func.params)[num_input:]]
    with build_folder() as tmp:
        build = build_library(mod, parse_target("cpu"), Path(tmp) / "calibration.so")
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(build.library)), tvm.cpu())
        for feed in feeds:
            inputs = [tvm.runtime.tensor(np.ascontiguousarray(feed[spec.name])) for spec in imported.inputs]
            outputs = vm["main"](*inputs, *weights)
            for name, index in where:
                accumulators[name].update(outputs[index].numpy())
