"""DropUnusedWeights: remove weight parameters that no function reads (e.g. BERT's pooler when only
last_hidden_state is returned), so the artifact does not carry them."""

from __future__ import annotations

from tvm import relax

from tensorpress.frontend.relax_params import is_model_function, split_params
from tensorpress.imported_model import ImportedModel


def drop_unused_weights(model: ImportedModel) -> ImportedModel:
    mod = relax.transform.DeadCodeElimination()(model.mod)
    used: set[str] = set()
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function) or not is_model_function(func):
            continue
        inputs, weights = split_params(func)
        free = {v.name for v in relax.analysis.free_vars(func.body)}
        kept_weights = [v for v in weights if v.name in free]
        if len(kept_weights) != len(weights):
            mod[gvar] = relax.Function(inputs + kept_weights, func.body, func.ret_ty, func.is_pure, func.attrs)
        used.update(v.name for v in kept_weights)
    params = {name: value for name, value in model.params.items() if name in used}
    return model.with_module(mod, params)
