"""The tile configs a CUDA tuning kit builds for one Tensor Core weight-GEMM kernel (no GPU needed).

    space      = search_space(M, K, arch)       TileConfig's own checks (tile_config.py): multiples of 16,
                                                 warps, accumulator registers <= 128, the smem model
    fits       = the token tiles that suit the token counts timed (block_n <= token_tile(N) of the largest)
                 and the dynamic shared memory of the *scheduled* kernel (this format's staged buffers
                 and decoded tile, read from the lowered TIR) within the arch's per-block limit
    candidates = the untuned choice for each token count first, then a seeded sample of the rest,
                 ordered by the template's cost model (`tile_config._score`) with every EXPLORE_EVERY-th
                 pick random: a device that runs out of budget has timed the likeliest ones

Nothing here is timed: the device times the candidates (benchmarks/kit/tuning_run.py), so the order is
chosen here, where the compiler is.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

EXPLORE_EVERY = 4  # every 4th candidate after the defaults is a random one, not the model's next best


def tensorcore_candidates(
    func: Any, arch: str, tokens: Sequence[int], count: int, seed: int = 0
) -> list[dict[str, int]]:
    """`count` tile configs (as dicts; more only if the token counts have more distinct untuned choices,
    fewer if the space is smaller) for the weight-GEMM PrimFunc `func` on `arch`, timed at the token
    counts `tokens`: the untuned choices first, then the module docstring's order. Every config validates
    for the arch, fits the kernel's shape and its shared memory."""
    from tensorpress.schedules.tensorcore.arch import arch_spec
    from tensorpress.schedules.tensorcore.template import weight_gemm_shape
    from tensorpress.schedules.tensorcore.tile_config import _score, choose_config, search_space, token_tile

    spec = arch_spec(arch)
    m, k = weight_gemm_shape(func)
    defaults: list[Any] = []
    for n in tokens:
        config = choose_config(m, k, spec, n)
        if config not in defaults:
            defaults.append(config)
    widest = max(token_tile(n) for n in tokens)
    rest = [c for c in search_space(m, k, spec) if c.block_n <= widest and c not in defaults]
    digest = hashlib.sha256(f"{seed}:{func.attrs['tensorpress.format']}:{m}x{k}".encode()).hexdigest()
    rng = random.Random(int(digest[:8], 16))
    sample = rng.sample(rest, min(len(rest), 3 * count))  # more than needed: some may not fit their smem

    def model_time(config) -> float:
        return min(_score(config, m, k, spec, n) for n in tokens if config.block_n <= max(16, token_tile(n)))

    ranked = sorted(sample, key=model_time)
    ordered: list[Any] = []
    while ranked:
        pick = ranked.pop(rng.randrange(len(ranked)) if (len(ordered) + 1) % EXPLORE_EVERY == 0 else 0)
        ordered.append(pick)
    chosen = [config.to_dict() for config in defaults]  # always: each point is timed against its default
    for config in ordered:
        if len(chosen) >= count:
            break
        if fits_shared_memory(func, config, arch):
            chosen.append(config.to_dict())
    return chosen


def fits_shared_memory(func: Any, config: Any, arch: str) -> bool:
    """Whether `func` scheduled with `config` allocates no more dynamic shared memory than a block may
    use on `arch` (the lowered kernel's own allocations: the format's staged buffers included)."""
    import tvm

    from tensorpress.errors import ConfigError, ShapeError
    from tensorpress.schedules.tensorcore.arch import arch_spec
    from tensorpress.schedules.tensorcore.intrinsics import cuda_intrinsics
    from tensorpress.schedules.tensorcore.template import schedule_weight_gemm
    from tensorpress.schedules.verification.cuda_inspection import dynamic_shared_bytes

    try:
        scheduled = schedule_weight_gemm(func, config, cuda_intrinsics()).mod["main"]
    except (ConfigError, ShapeError):
        return False
    sizes = dynamic_shared_bytes(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), arch)
    return max(sizes.values(), default=0) <= arch_spec(arch).shared_bytes_per_block
