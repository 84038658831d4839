"""A decoder's calibration run: its prompts packed into the arguments of one ragged `prefill` call.

A decoder (frontend/decoders/causal_lm.py) has no forward function without a KV cache; its `prefill`
takes the tokens of B sequences flattened, their positions, which sequence each token is in, a block
table and the cache tensors. For calibration every prompt is one sequence starting at position 0, its
pages consecutive, in a cache of exactly the pages the prompts need (zeros: prefill writes before it
reads). Prefill attends in full precision over the prompt, as it does at serving time, so each linear
layer sees the same activations it sees when that prompt is served.

    [input_ids, positions, seq_slot, block_table, last_token_index, *cache]  (the order of `prefill`)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def prefill_arguments(prompts: Sequence[np.ndarray], cache_specs: Sequence[Any], page_size: int) -> list[np.ndarray]:
    """The arguments of one prefill over `prompts` (int token ids, each [n_i] with n_i >= 1), with
    zero cache tensors shaped by `cache_specs` (TensorSpecs whose symbolic sizes are page counts: the
    full-precision pages, and a page-quantised format's quantised pages, which prefill never reads)."""
    lengths = [len(p) for p in prompts]
    pages = [-(-n // page_size) for n in lengths]
    first_page = np.concatenate([[0], np.cumsum(pages)[:-1]]).astype(np.int32)
    block_table = np.zeros((len(prompts), max(pages)), dtype=np.int32)
    for b, (start, count) in enumerate(zip(first_page, pages)):
        block_table[b, :count] = np.arange(start, start + count)
    arguments = [
        np.concatenate([np.asarray(p, dtype=np.int32) for p in prompts]),
        np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        np.concatenate([np.full(n, b, dtype=np.int32) for b, n in enumerate(lengths)]),
        block_table,
        (np.cumsum(lengths) - 1).astype(np.int32),
    ]
    total_pages = int(sum(pages))
    for spec in cache_specs:  # every symbolic size is a page count of some pool: as many as the prompts take
        shape = [total_pages if isinstance(dim, str) else int(dim) for dim in spec.shape]
        arguments.append(np.zeros(shape, dtype=spec.dtype))
    return arguments
