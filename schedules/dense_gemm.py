"""Dense weights: the identity decode stage of the weight GEMM (W stored as an [M, K] matrix)."""

from __future__ import annotations

from tvm import te, tirx

from tensorpress.schedules.weight_gemm import DecodeStage, StoredBuffer, register_decode_stage


class DenseDecode(DecodeStage):
    """W[m, k] = weight[m, k], stored in the compute dtype (fp16 on CUDA, fp32 or fp16 on the CPU)."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype

    def stored_buffers(self, m: int, k: int) -> list[StoredBuffer]:
        return [StoredBuffer("weight", (m, k), self.dtype)]

    def decode(self, stored: list[te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str):
        value = stored[0][row, col]
        return value if self.dtype == dtype else value.astype(dtype)


DENSE_FP16 = register_decode_stage(DenseDecode("dense-fp16", "float16"))
DENSE_FP32 = register_decode_stage(DenseDecode("dense-fp32", "float32"))
