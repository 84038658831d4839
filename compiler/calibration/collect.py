"""Run the imported model on calibration feeds and hand each linear layer's input to its accumulator.

    run = CalibrationRun(imported, weights)          # built once for the CPU
    run.collect(feeds, {weight: LinearInputStatistics(k)}, params={weight: new value})
    run.levels                                       # {weight: 1 + the deepest level upstream of its input}

`expose_linear_inputs` turns "main" into a function returning (its outputs, x of site 1, x of site 2,
...): dataflow blocks become ordinary ones (ToNonDataflow) so that every site's input is in scope at
the end, and the matched input expressions join the returned tuple. The module is built for the CPU by
the compiler's own build (scheduled kernels: a run takes seconds, not minutes) and run by TVM's VM,
one feed at a time. The weights are the VM's arguments, so a run may replace some of them (the layers
already compressed) without a rebuild: `compress_in_order` uses that.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tensorpress.compiler.calibration.prefill_arguments import prefill_arguments
from tensorpress.compiler.calibration.statistics import LinearInputStatistics
from tensorpress.errors import ConfigError, TensorpressError
from tensorpress.frontend.relax_params import split_params

PREFILL = "prefill"  # a decoder's function that takes whole prompts (frontend/decoders/causal_lm.py)
PREFILL_INPUTS = ("input_ids", "positions", "seq_slot", "block_table", "last_token_index")  # then the cache
BATCH_LIMIT = 64  # samples a run stacks at most (memory: every linear layer's input is returned)


class Accumulator(Protocol):
    def update(self, x: np.ndarray) -> None: ...


def linear_input_statistics(imported: Any, feeds: list[dict[str, np.ndarray]], weights: dict[str, int]):
    """{weight name: LinearInputStatistics} of the linear layers reading `weights` ({name: K}), one run
    of the model as it is."""
    stats = {name: LinearInputStatistics(k) for name, k in weights.items()}
    CalibrationRun(imported, list(weights)).collect(feeds, stats)
    return stats


def compress_in_order(
    imported: Any,
    feeds: list[dict[str, np.ndarray]],
    weights: dict[str, int],
    compress: Callable[[str, LinearInputStatistics], tuple[Any, np.ndarray]],
    run: CalibrationRun | None = None,
) -> dict[str, Any]:
    """Compress the layers reading `weights` ({name: K}) level by level (`CalibrationRun.levels`): each
    level's statistics are collected on the model whose earlier levels are already compressed, as
    SparseGPT and Wanda do layer by layer, so a layer is fitted to the inputs it will really see.
    `compress(name, stats)` returns (its result, the new value of the parameter `name`, same shape).
    Returns {name: result}. `run`: a CalibrationRun of these weights to reuse (else one is built)."""
    run = run or CalibrationRun(imported, list(weights))
    replaced: dict[str, np.ndarray] = {}
    results = {}
    for level in sorted(set(run.levels.values())):
        names = [name for name in weights if run.levels[name] == level]
        stats = {name: LinearInputStatistics(weights[name]) for name in names}
        run.collect(feeds, stats, replaced)
        for name in names:
            results[name], replaced[name] = compress(name, stats[name])
    return results


def expose_linear_inputs(
    mod, weights: list[str], entry: str = "main"
) -> tuple[Any, list[tuple[str, int]], dict[str, int]]:
    """(a copy of `mod` whose function `entry` returns (its result, *site inputs), [(weight, index of its
    input in that tuple)] for each linear layer reading one of `weights`, {weight: level}: 1 for a layer
    whose input no other of these layers feeds, else 1 + the highest level among those that do)."""
    import tvm
    from tvm import relax

    from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import linear_site_inputs

    mod = tvm.IRModule(dict(mod.functions_items()))
    func = relax.transform.ToNonDataflow()(tvm.IRModule({entry: mod[entry]}))[entry]
    inputs = linear_site_inputs(func)
    exposed: list[Any] = []
    where: list[tuple[str, int]] = []
    for name in weights:
        for x in inputs.get(name, []):
            where.append((name, 1 + len(exposed)))
            exposed.append(x)
    levels = _levels(func, {name: inputs.get(name, []) for name in weights})
    body = func.body
    ret = relax.TupleType([body.body.ty, *[x.ty for x in exposed]])
    new = relax.Function(
        func.params, relax.SeqExpr(body.blocks, relax.Tuple([body.body, *exposed])), ret, attrs=func.attrs
    )
    mod[entry] = new
    # the other entry points (a decoder's decode) are not run: only `entry` and what it calls is built
    return relax.transform.DeadCodeElimination([entry])(relax.transform.Normalize()(mod)), where, levels


def _levels(func, inputs: dict[str, list]) -> dict[str, int]:
    """{weight: level} (see expose_linear_inputs) from which weight parameters each input depends on."""
    from tvm import relax

    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    upstream: dict[Any, frozenset[str]] = {}
    names = {v: v.name for v in func.params}

    def weights_above(expr) -> frozenset[str]:
        found: set[str] = set()
        todo = list(relax.analysis.free_vars(expr))
        while todo:
            var = todo.pop()
            if var in upstream:
                found |= upstream[var]
            elif var in bound:  # iterative: a deep graph would overflow a recursion
                pending = [u for u in relax.analysis.free_vars(bound[var]) if u not in upstream]
                if pending:
                    todo += [var, *pending]
                    continue
                upstream[var] = frozenset().union(*(upstream[u] for u in relax.analysis.free_vars(bound[var])))
                found |= upstream[var]
            else:  # a parameter (a weight or a runtime input), or a shape variable
                upstream[var] = frozenset({names.get(var, "")} & inputs.keys())
                found |= upstream[var]
        return frozenset(found)

    above = {name: frozenset().union(*(weights_above(x) for x in xs)) - {name} for name, xs in inputs.items()}
    levels: dict[str, int] = {}
    for name in inputs:  # longest chain through `above`, a DAG once each weight's own reuse is removed
        stack = [name]
        while stack:
            top = stack[-1]
            missing = [a for a in above[top] if a not in levels and a not in stack]
            if missing:
                stack += missing
                continue
            levels[top] = 1 + max((levels.get(a, 0) for a in above[top]), default=0)
            stack.pop()
    return levels


class CalibrationRun:
    """The model of `imported` built once for the CPU with the inputs of the linear layers reading
    `weights` exposed; `collect` runs it over feeds."""

    def __init__(self, imported: Any, weights: list[str]):
        import tvm
        from tvm import relax

        from tensorpress.compiler.build import build_library
        from tensorpress.compiler.build_folder import build_folder
        from tensorpress.compiler.targets import parse_target

        if imported.kind not in ("graph", "decoder"):
            raise ConfigError(f"calibration runs graph models and decoders, not a {imported.kind}; compile without it.")
        self.entry = PREFILL if imported.kind == "decoder" else "main"
        mod, self.where, self.levels = expose_linear_inputs(imported.mod, weights, self.entry)
        missing = sorted(set(weights) - {name for name, _ in self.where})
        if missing:
            raise TensorpressError(f"calibration found no linear layer reading {', '.join(missing)}.")
        func = mod[self.entry]
        self.imported = imported
        self.param_names = [v.name for v in split_params(func)[1]]
        with build_folder() as tmp:
            build = build_library(mod, parse_target("cpu"), Path(tmp) / "calibration.so")
            self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(build.library)), tvm.cpu())
        self.weights = {name: tvm.runtime.tensor(self.imported.params[name]) for name in self.param_names}

    def collect(
        self,
        feeds: list[dict[str, np.ndarray]],
        accumulators: dict[str, Accumulator],
        params: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Run "main" on each feed, with the parameters in `params` replaced, and update the accumulator
        of each weight in `accumulators` with the input of every linear layer that reads that weight."""
        import tvm

        weights = dict(self.weights)
        for name, value in (params or {}).items():
            weights[name] = tvm.runtime.tensor(np.ascontiguousarray(value, dtype=self.imported.params[name].dtype))
        args = [weights[name] for name in self.param_names]
        for feed in self._batched(feeds):
            inputs = [tvm.runtime.tensor(np.ascontiguousarray(feed[spec.name])) for spec in self.imported.inputs]
            outputs = self.vm[self.entry](*inputs, *args)
            for name, index in self.where:
                if name in accumulators:
                    accumulators[name].update(outputs[index].numpy())

    def _batched(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """A decoder's prompts, up to BATCH_LIMIT at a time, as the arguments of one ragged prefill
        (prefill_arguments.py). Other models' feeds of one shape stacked along the batch axis, where
        every input's first dimension is the same symbolic one (a batch). Either way each token's
        activations are what they are alone, and the statistics (sums over tokens) the same, for far
        fewer, larger runs."""
        if self.entry == PREFILL:
            return [self._prefill_feed(feeds[i : i + BATCH_LIMIT]) for i in range(0, len(feeds), BATCH_LIMIT)]
        firsts = {spec.shape[0] if spec.shape else None for spec in self.imported.inputs}
        if len(firsts) != 1 or not isinstance(next(iter(firsts)), str):
            return feeds
        groups: dict[tuple, list[dict[str, np.ndarray]]] = {}
        for feed in feeds:
            groups.setdefault(tuple(feed[spec.name].shape for spec in self.imported.inputs), []).append(feed)
        return [
            {name: np.concatenate([feed[name] for feed in group]) for name in group[0]}
            for group in groups.values()
            for group in [group[i : i + BATCH_LIMIT] for i in range(0, len(group), BATCH_LIMIT)]
        ]

    def _prefill_feed(self, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        specs = self.imported.inputs
        page_size = int(self.imported.info["decoder"]["page_size"])
        arguments = prefill_arguments([feed["input_ids"] for feed in feeds], specs[len(PREFILL_INPUTS) :], page_size)
        return {spec.name: value for spec, value in zip(specs, arguments)}
