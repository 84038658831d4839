"""What the GPU kit builds and measures. Pure Python (no TVM, no torch): both sides import it.

A kernel is identified by (format, M, K, bias, tile config); its function name in the libraries is
`kernel_name(...)`. N (tokens) is symbolic in every kernel: one kernel serves every N.
"""

from __future__ import annotations

from dataclasses import dataclass

# Linear layers (M = output features, K = input features) of the models the issue names.
LLM_LAYERS: dict[str, tuple[int, int]] = {
    "llama2-7b q/k/v/o": (4096, 4096),
    "llama2-7b gate/up": (11008, 4096),
    "llama2-7b down": (4096, 11008),
    "llama2-70b q/o": (8192, 8192),
    "llama2-70b gate/up": (28672, 8192),
    "llama2-70b down": (8192, 28672),
    "opt-66b q/k/v/o": (9216, 9216),
    "opt-66b fc1": (36864, 9216),
    "opt-66b fc2": (9216, 36864),
}
BENCH_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)

# The dry run (CPU-built kernels, this machine) uses small layers: it proves the plumbing only.
DRY_LAYERS: dict[str, tuple[int, int]] = {"dry 256x512": (256, 512), "dry 128x256": (128, 256)}
DRY_TOKENS = (1, 5, 16, 33)

# FPx weights (FP6-LLM): the formats and layers of the FPx benchmark, by the stage name the kernels
# take (fp6 = e3m2, fp5 = e2m2, fp4 = e2m1), against cuBLAS fp16 at the same shapes.
FPX_BENCH_FORMATS: dict[str, str] = {"fp6": "e3m2", "fp5": "e2m2", "fp4": "e2m1"}
FPX_LAYERS: dict[str, tuple[int, int]] = {
    name: shape for name, shape in LLM_LAYERS.items() if name.startswith(("llama2-70b", "opt-66b"))
}
FPX_BENCH_TOKENS = (1, 2, 4, 8, 16, 32, 64)
DRY_FPX_LAYERS: dict[str, tuple[int, int]] = {"dry 128x256": (128, 256)}
# The FPx gpu tests: every format the benchmark times plus e2m3 and e3m1, a small and a real layer.
FPX_TEST_FORMATS = ("e3m2", "e2m3", "e2m2", "e3m1", "e2m1")
FPX_TEST_SHAPES = ((256, 512), (4096, 4096))
DRY_FPX_TEST_SHAPES = ((128, 256),)

# Correctness grid of the gpu tests: every N below against torch.matmul, for each case.
TEST_TOKENS = (1, 2, 7, 16, 17, 31, 64, 100, 130)
DRY_TEST_TOKENS = (1, 7, 17)


@dataclass(frozen=True)
class KernelCase:
    """One kernel: a weight GEMM for an [m, k] weight in `fmt`, with a tile config (a dict of
    TileConfig fields) and optionally a bias."""

    fmt: str
    m: int
    k: int
    config: tuple[tuple[str, int], ...]  # TileConfig fields, sorted (hashable)
    bias: bool = False

    @property
    def config_dict(self) -> dict[str, int]:
        return dict(self.config)

    @property
    def label(self) -> str:
        c = self.config_dict
        return f"n{c['block_n']}m{c['block_m']}k{c['block_k']}w{c['warps']}s{c['stages']}sk{c['split_k']}"

    @property
    def is_fpx(self) -> bool:
        """An eXmY weight (bit planes + scales) rather than a dense one."""
        return not self.fmt.startswith(("dense", "test"))

    @property
    def name(self) -> str:
        """The function name in the kernel library."""
        fmt = self.fmt.replace("-", "_")
        return f"wg_{fmt}_{self.m}x{self.k}_{self.label}" + ("_bias" if self.bias else "")

    def to_json(self) -> dict:
        return {"fmt": self.fmt, "m": self.m, "k": self.k, "config": self.config_dict, "bias": self.bias}

    @staticmethod
    def from_json(data: dict) -> KernelCase:
        return KernelCase(data["fmt"], data["m"], data["k"], tuple(sorted(data["config"].items())), data["bias"])


def case(fmt: str, m: int, k: int, config: dict[str, int], bias: bool = False) -> KernelCase:
    return KernelCase(fmt, m, k, tuple(sorted(config.items())), bias)


# Sparse weights (bitmap, `compiler/formats/bitmap.py`): the FPx layers (LLaMA-2-70B, OPT-66B) pruned at
# random, each row keeping exactly round(K (1 - sparsity)) weights (the per-row groups Wanda prunes in,
# so every run of every machine packs the same number of nonzeros). One kernel per (layer, tile) serves
# every sparsity: its "values" buffer holds the nonzeros of the densest sparsity in SPARSITIES, and a
# sparser weight's values are padded with zeros to that length (never read: only the bytes of the
# weight's own nonzeros count as moved).
SPARSE_LAYERS = FPX_LAYERS
SPARSITIES = (0.5, 0.7, 0.8, 0.9)
SPARSE_BENCH_TOKENS = (1, 8, 16, 32, 64)
DRY_SPARSE_LAYERS: dict[str, tuple[int, int]] = {"dry 128x256": (128, 256)}
DRY_SPARSITIES = (0.5, 0.8)
DRY_SPARSE_TOKENS = (1, 16)
# The bitmap gpu tests (tests/schedules/tensorcore/test_bitmap_gpu.py): a small and a real layer.
BITMAP_TEST_SHAPES = ((256, 512), (4096, 4096), (48, 208))  # 48 x 208: part tiles along M and K
DRY_BITMAP_TEST_SHAPES = ((128, 256),)
BITMAP_TEST_SPARSITIES = (0.5, 0.8)


# Wanda masks (issue 12: random masks AND Wanda masks): no calibration activations travel to the device,
# so the input-channel norms ||X_j|| are drawn (sparse_weights.wanda_channel_norms): log-normal with
# sigma WANDA_NORM_SIGMA, and a WANDA_OUTLIER_FRACTION of channels WANDA_OUTLIER_FACTOR x larger (the
# outlier features of LLM.int8(): a handful of channels per 4096, one to two orders above the rest). Each
# row keeps the same count as with random masks, so the bitmap kernels and capacities serve both; the
# tiles are uneven (outlier columns dense in every row). Timed at 80 % and the target N only, against the
# same cuBLAS: the part's 4 minutes (budget.py) leave room for no more.
WANDA_MASK_SPARSITIES = (0.8,)
WANDA_MASK_TOKENS = (16,)
WANDA_NORM_SIGMA = 0.5
WANDA_OUTLIER_FRACTION = 0.002
WANDA_OUTLIER_FACTOR = 20.0


def sparse_mask_cases(spec: dict) -> list[tuple[float, str, list[int]]]:
    """(sparsity, mask, tokens) at which the sparse part times a layer of its manifest section: random
    masks at every sparsity, Wanda masks at their own sparsities and tokens."""
    wanda = spec.get("wanda", {})
    return [(s, "random", spec["tokens"]) for s in spec["sparsities"]] + [
        (s, "wanda", wanda["tokens"]) for s in wanda.get("sparsities", [])
    ]


def kept_per_row(k: int, sparsity: float) -> int:
    """Weights a row of K keeps at `sparsity` (random masks: exactly this many per row)."""
    return k - round(k * sparsity)


# Sparse x FPx (`compiler/formats/bitmap_fpx.py`): the same layers and random masks at 80% (issue 12's
# target: >= 4x cuBLAS at N = 16 on an H100), the kept values quantised to FP6 e3m2 by the numpy packer.
# Llama-2-70B's layers only: the numpy FP6 packer (~2e6 weights/s a core) keeps the part within budget.
SPARSE_FPX_FORMAT = "bitmap-e3m2"
SPARSE_FPX_SPARSITIES = (0.8,)
SPARSE_FPX_LAYERS = tuple(name for name in FPX_LAYERS if name.startswith("llama2-70b")) + ("dry 128x256",)


def bitmap_fpx_stream_capacity(m: int, k: int, sparsities=SPARSE_FPX_SPARSITIES) -> int:
    """Codes in the bitmap-e3m2 kernels' stream for an [m, k] layer: the densest sparsity's nonzeros,
    with the format's spare code and padding (`bitmap_fpx.stream_length`)."""
    from tensorpress.compiler.formats.bitmap_fpx import stream_length

    return stream_length(m * kept_per_row(k, min(sparsities)))


def bitmap_value_capacity(m: int, k: int, sparsities=SPARSITIES) -> int:
    """Length of the bitmap kernels' "values" buffer for an [m, k] layer: the nonzeros of the densest
    sparsity plus the format's spare slots, rounded up to its multiple of 8 (`bitmap.VALUES_MULTIPLE`)."""
    from tensorpress.compiler.formats.bitmap import VALUES_MULTIPLE, VALUES_SPARE

    nnz = m * kept_per_row(k, min(sparsities))
    return -(-(nnz + VALUES_SPARE) // VALUES_MULTIPLE) * VALUES_MULTIPLE


# Tiled-CSL (`compiler/formats/tiled_csl.py`, Flash-LLM's format): the same layers and masks as bitmap, its
# candidates chosen as bitmap's, at 80 % only (issue 12's headline target): every bitmap sparsity would put
# the sparse part's bound (budget.py) at ~316 s, over its 4 minutes (80 % alone: ~220 s). Its kernels'
# "words" buffer holds the densest sparsity's words (zero words after a sparser weight's, never read).
TILED_CSL_FORMAT = "tiled-csl"
TILED_CSL_SPARSITIES = (0.8,)


def tiled_csl_word_capacity(m: int, k: int, sparsities=TILED_CSL_SPARSITIES) -> int:
    """Length of the tiled-csl kernels' "words" buffer for an [m, k] layer: the densest sparsity's
    nonzeros plus at most 3 padding words a 16 x 64 tile, rounded up to the format's multiple of 4."""
    from tensorpress.compiler.formats.bitmap import tile_grid
    from tensorpress.compiler.formats.tiled_csl import WORDS_MULTIPLE

    tm, tk = tile_grid(m, k)
    words = m * kept_per_row(k, min(sparsities)) + (WORDS_MULTIPLE - 1) * tm * tk
    return -(-words // WORDS_MULTIPLE) * WORDS_MULTIPLE


# Quantised KV cache: decode attention (one query token per sequence) over pages of 16 tokens, 32
# query heads of head_dim 128 over 8 (GQA group 4) or 4 (group 8) kv heads, per cache format, at
# each context, against torch's scaled_dot_product_attention in fp16.
KV_FORMATS = ("fp16", "int8", "int4", "int2-kitty")  # int2-kitty: fp16 sink + window, 2-bit pages of 128
KV_CONFIGS = ((32, 8, 128), (32, 4, 128))  # (query heads, kv heads, head_dim)
KV_CONTEXTS = (4096, 32768, 131072)
KV_BATCHES = (1, 8)
KV_PAGE_SIZE = 16
KV_CHECK_CONTEXT = 4096  # outputs checked against fp32 SDPA over the dequantised cache at this context
DRY_KV_CONFIGS = ((4, 1, 16), (4, 2, 16))
DRY_KV_CONTEXTS = (64, 320)  # 320: int2-kitty holds a 2-bit page from 288 tokens on
DRY_KV_BATCHES = (1, 2)
DRY_KV_CHECK_CONTEXT = 320  # int2-kitty: one 2-bit page checked (2 sink pages, 8 in a group, the window)


def kv_kernel_name(fmt: str, heads: int, kv_heads: int, head_dim: int) -> str:
    return f"kv_decode_{fmt}_{heads}_{kv_heads}_{head_dim}"


# The tuning part (prepare.py --tuning; benchmarks/kit/tuning_run.py): candidate tile configs of the
# dense fp16 and FP6 (e3m2) weight GEMMs on the LLaMA-2-70B and OPT-66B layers, timed at these token
# counts (record keys with n = N: a decoder's decode step is keyed n = 16 and its prefill n = 128, as
# rewrite_linear_to_weight_gemm.token_count_hint keys symbolic token counts) within TUNING_BUDGET_S.
TUNING_FORMATS = ("dense-fp16", "e3m2")
TUNING_LAYERS = FPX_LAYERS
TUNING_TOKENS = (1, 16, 64, 128)
TUNING_CANDIDATES = 12  # built per (format, layer): ~5 s of nvcc each here, ~40 KB each
TUNING_BUDGET_S = 90.0
DRY_TUNING_LAYERS: dict[str, tuple[int, int]] = {"dry 128x256": (128, 256)}
DRY_TUNING_TOKENS = (1, 16)
DRY_TUNING_CANDIDATES = 2
