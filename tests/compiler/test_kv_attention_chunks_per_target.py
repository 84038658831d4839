"""A decoder imported for a compile defines its paged attention for the target: the CPU's long chunks
(`kv_attention.CPU_CHUNK_TOKENS`) for cpu, the GPU's for cuda (`kv_attention.chunk_tokens`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorpress.compiler.api import import_for_compile
from tensorpress.compiler.targets import parse_target
from tensorpress.schedules.kv_attention import ATTENTION_KERNEL, CHUNK_ATTR, CPU_CHUNK_TOKENS, kernel_name

TINY_LLAMA = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"  # 4 query heads over 2 kv heads


def _attention_chunks(target: str) -> dict[str, int]:
    imported = import_for_compile(TINY_LLAMA, parse_target(target), kv_cache="int2-kitty").imported
    return {
        gvar.name_hint: int(func.attrs[CHUNK_ATTR])
        for gvar, func in imported.mod.functions_items()
        if kernel_name(func) == ATTENTION_KERNEL
    }


@pytest.mark.parametrize("target, chunk", [("cpu", CPU_CHUNK_TOKENS), ("cuda:sm_90a", 64)])
def test_the_attention_of_an_imported_decoder_has_its_targets_chunks(target, chunk):
    chunks = _attention_chunks(target)
    assert len(chunks) == 2, chunks  # prefill and decode
    assert set(chunks.values()) == {chunk}
