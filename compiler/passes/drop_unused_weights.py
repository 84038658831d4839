"""DropUnusedWeights: remove weight parameters that no function reads (e.g. BERT's pooler when only
last_hidden_state is returned), so the artifact does not carry them."""

from __future__ import annotations

from tvm import relax

from tensorpress.imported_model import ImportedModel


def drop_unused_weights(model: ImportedModel) -> ImportedModel:
    mod = relax.transform.DeadCodeElimination()(model.mod)
    used: set[str] = set()
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function) or func.attrs is None or "num_input" not in func.attrs:
            continue
        num_input = int(func.attrs["num_input"])
        free = {v.name for v in relax.analysis.free_vars(func.body)}
        keep = list(func.params)[:num_input] + [v for v in list(func.params)[num_input:] if v.name in free]
        if len(keep) != len(func.params):
            mod[gvar] = relax.Function(keep, func.body, func.ret_ty, func.is_pure, func.attrs)
        used.update(v.name for v in keep[num_input:])
    params = {name: value for name, value in model.params.items() if name in used}
    return model.with_module(mod, params)
