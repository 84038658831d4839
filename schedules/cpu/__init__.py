"""CPU (llvm) schedules: tiling, vectorisation and threads for the ops of a transformer.

    rules = cpu_rules()                        # the list `schedules/rules.py` gives dlight for llvm
    mod = dl.ApplyDefaultSchedule(*rules)(mod)  # inside `with target:`

Rules are tried in order, the first that takes a function wins:
    EncoderAttention  the fused encoder attention kernel             encoder_attention.py
    WeightGemm     the weight-GEMM kernel (every decode stage)        weight_gemm.py
    DepthwiseConv  channels-last depthwise convolutions               depthwise_conv.py
    Matmul         legalised matmuls: linear, batched attention       matmul.py
    GEMV           dlight's matrix-vector rule (one row or column)
    RowLoops       the same over rows of symbolic length, written out  row_loops.py
    RowReduction   softmax, layer norm, RMS norm                      row_reduction.py
    Injective      elementwise, broadcast, transpose, gather          injective.py
    Fallback       anything else: inlined, parallel, vectorised       fallback.py
All read the vector width and register count from the target (`vector_unit.py`), so x86-64-v3
artifacts get AVX2 code on any host.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl

from tensorpress.schedules.cpu.depthwise_conv import DepthwiseConv
from tensorpress.schedules.cpu.encoder_attention import EncoderAttention
from tensorpress.schedules.cpu.fallback import Fallback
from tensorpress.schedules.cpu.injective import Injective
from tensorpress.schedules.cpu.matmul import Matmul
from tensorpress.schedules.cpu.row_loops import RowLoops
from tensorpress.schedules.cpu.row_reduction import RowReduction
from tensorpress.schedules.cpu.weight_gemm import WeightGemm
from tensorpress.schedules.template_config import ConfigLookup


def cpu_rules(configs: ConfigLookup | None = None) -> list[dl.ScheduleRule]:
    """Rules for llvm targets, most specific first; `configs`: tuned template configs (None: defaults)."""
    return [
        EncoderAttention(),
        WeightGemm(configs),
        DepthwiseConv(),
        Matmul(),
        dl.cpu.GEMV(),
        RowLoops(),
        RowReduction(),
        Injective(),
        Fallback(),
    ]
