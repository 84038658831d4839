"""The tile parameters of the Tensor Core weight GEMM, their bounds, and the search space.

One CTA computes a block_n × block_m tile of Y (tokens × weight rows) over one K slice:

            K slice (K / split_k), walked block_k at a time through a `stages`-deep cp.async ring
          ┌──────────────────────────────┐
  block_n │ X tile (tokens)              │  ─┐
          └──────────────────────────────┘   │  mma.sync m16n8k16, fp32 accumulators in registers;
          ┌──────────────────────────────┐   │  `warps` warps split the weight rows, each computing
  block_m │ W tile (weight rows,         │  ─┘  all block_n tokens × (block_m / warps) rows
          │ decoded into shared memory)  │
          └──────────────────────────────┘

Grid: blockIdx.x = N tiles (fastest, so CTAs that share a W tile run together and hit L2),
blockIdx.y = M tiles, blockIdx.z = K slices. With split_k > 1 every CTA writes fp32 partial sums to
a workspace and a second kernel adds the slices in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from tensorpress.errors import ConfigError, ShapeError
from tensorpress.schedules.tensorcore.arch import ArchSpec

MMA_TILE = 16  # rows, cols and k of one warp-level tile (two m16n8k16)
WARP_SIZE = 32
VECTOR_BYTES = 16  # one cp.async / ldmatrix row


@dataclass(frozen=True)
class TileConfig:
    """Typed parameters of the template; `validate(arch)` checks them against the architecture."""

    block_n: int = 16  # tokens per CTA (N is padded to a multiple of it inside the kernel)
    block_m: int = 128  # weight rows per CTA
    block_k: int = 64  # K per pipeline stage
    warps: int = 4  # warps per CTA, splitting block_m
    stages: int = 4  # cp.async ring depth, >= 2
    split_k: int = 1  # K slices reduced by a second kernel, in fixed order

    @property
    def threads(self) -> int:
        return self.warps * WARP_SIZE

    @property
    def warp_tile_m(self) -> int:
        """Weight rows per warp (every warp covers all block_n tokens)."""
        return self.block_m // self.warps

    def shared_bytes(self, weight_tile_bytes_per_element: float = 2.0) -> int:
        """Model of the dynamic shared memory: the stage ring plus the fp32 output tile.

        `weight_tile_bytes_per_element` is what one W element costs in shared memory at the stage
        where it waits (2 for fp16; a packed format stages fewer bytes and adds a decoded fp16 tile).
        """
        ring = self.stages * self.block_k * (self.block_n * 2 + self.block_m * weight_tile_bytes_per_element)
        epilogue = self.block_n * self.block_m * 4 if self.split_k == 1 else 0
        return int(ring + epilogue)

    def accumulator_registers(self) -> int:
        """fp32 accumulator registers per thread (8 per 16×16 tile)."""
        return (self.block_n // MMA_TILE) * (self.warp_tile_m // MMA_TILE) * 8

    def validate(self, arch: ArchSpec) -> None:
        """Raise ConfigError naming the first parameter that breaks a rule of the template or `arch`."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"tile parameter {f.name}={value!r} must be a positive integer.")
        for name in ("block_n", "block_m", "block_k"):
            if getattr(self, name) % MMA_TILE:
                raise ConfigError(f"tile parameter {name}={getattr(self, name)} must be a multiple of 16.")
        if self.block_k not in (32, 64, 128, 256):
            raise ConfigError(f"block_k={self.block_k} must be 32, 64, 128 or 256 (rows of the swizzled tiles).")
        if self.block_n > 64:
            raise ConfigError(f"block_n={self.block_n}: at most 64 tokens per CTA (more tokens take more CTAs).")
        if self.warp_tile_m * self.warps != self.block_m or self.warp_tile_m % MMA_TILE:
            raise ConfigError(f"block_m={self.block_m} must split into warps={self.warps} multiples of 16.")
        if self.stages < 2:
            raise ConfigError(f"stages={self.stages}: the cp.async pipeline needs at least 2 stages.")
        if self.threads > arch.max_threads_per_block:
            raise ConfigError(
                f"{self.warps} warps exceed {arch.max_threads_per_block} threads per block on {arch.name}."
            )
        if self.accumulator_registers() > 128:
            raise ConfigError(
                f"warp tile {self.block_n}x{self.warp_tile_m} needs {self.accumulator_registers()} accumulator"
                " registers per thread (at most 128, or ptxas spills)."
            )
        if self.shared_bytes() > arch.shared_bytes_per_block:
            raise ConfigError(
                f"tile config needs about {self.shared_bytes()} B of shared memory, more than the "
                f"{arch.shared_bytes_per_block} B a block may use on {arch.name}; lower stages or block_k."
            )

    def check_shape(self, m: int, k: int) -> None:
        """Raise ShapeError unless M, K are multiples of 16 and block_m divides M.

        (K and N are padded inside the kernel. Padding M too left TVM 0.27 with an N-dependent size
        for the epilogue's shared tile, which its CSE pass then miscompiles; a tile with
        block_m = 16 exists for every M.)
        """
        check_weight_shape(m, k)
        if m % self.block_m:
            raise ShapeError(
                f"weight GEMM with M={m}: the tile config {self.label()} needs M to be a multiple of "
                f"block_m={self.block_m}; choose a config whose block_m divides M."
            )

    def padded_k(self, k: int) -> int:
        """K rounded up to whole K slices (padded inside the kernel; padding costs bandwidth)."""
        step = self.split_k * self.block_k
        return -(-k // step) * step

    def label(self) -> str:
        """Short stable name, e.g. 'n16m128k64w4s4sk1' (used in file names and results)."""
        return f"n{self.block_n}m{self.block_m}k{self.block_k}w{self.warps}s{self.stages}sk{self.split_k}"

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def check_weight_shape(m: int, k: int) -> None:
    """The template's one hard rule on shapes: M and K multiples of 16 (N may be anything >= 1)."""
    if m % MMA_TILE or k % MMA_TILE or m <= 0 or k <= 0:
        raise ShapeError(
            f"weight GEMM with M={m}, K={k}: the Tensor Core kernel needs M and K to be positive multiples"
            " of 16; pad the layer or compile it for the CPU."
        )


def search_space(m: int, k: int, arch: ArchSpec) -> list[TileConfig]:
    """Every valid config for an [m, k] weight on `arch` within the tuner's bounds (small, hardware-aware)."""
    configs = []
    for block_n in (16, 32, 64):
        for block_m in (32, 64, 128, 256):
            for block_k in (32, 64, 128):
                for warps in (1, 2, 4, 8):
                    for stages in (2, 3, 4, 5):
                        for split_k in (1, 2, 3, 4, 6, 8):
                            cfg = TileConfig(block_n, block_m, block_k, warps, stages, split_k)
                            try:
                                cfg.validate(arch)
                            except ConfigError:
                                continue
                            padded_k = cfg.padded_k(k)
                            if m % block_m or padded_k > 1.03 * k or padded_k // split_k < 2 * block_k:
                                continue  # > 3 % padding, or K slices too short to pipeline
                            configs.append(cfg)
    return configs


# The tile shapes the untuned compile picks from (split_k is chosen per shape). Each is compiled for
# sm_80 and sm_90a in the default tests (SASS: HMMA, LDSM, LDGSTS; no spills; shared memory fits).
SHIPPED_TILES: tuple[TileConfig, ...] = (
    TileConfig(block_n=16, block_m=128, block_k=64, warps=4, stages=4),  # decode: 16 KB W per stage
    TileConfig(block_n=16, block_m=64, block_k=128, warps=4, stages=4),  # decode, more CTAs
    TileConfig(block_n=16, block_m=32, block_k=128, warps=2, stages=4),  # decode, small M
    TileConfig(block_n=32, block_m=128, block_k=64, warps=4, stages=4),  # short prefill
    TileConfig(block_n=64, block_m=128, block_k=64, warps=4, stages=3),  # prefill
    TileConfig(block_n=64, block_m=64, block_k=64, warps=4, stages=4),  # prefill, more CTAs
    # any M (a multiple of 16); block_k 128 spreads one warp's per-K-tile cost (barriers, copy
    # addresses) over twice the weights: FP4 4.63 -> 4.33 SASS instructions a weight (budget 4.6)
    TileConfig(block_n=16, block_m=16, block_k=128, warps=1, stages=4),
)
SPLIT_K_CHOICES = (1, 2, 3, 4, 6, 8)


def token_tile(n_hint: int) -> int:
    """block_n for about `n_hint` tokens: 16 up to 16 tokens, 32 up to 32, else 64."""
    return 16 if n_hint <= 16 else 32 if n_hint <= 32 else 64


def choose_config(m: int, k: int, arch: ArchSpec, n_hint: int = 16) -> TileConfig:
    """The untuned config for an [m, k] weight and about `n_hint` tokens on `arch`.

    A weight-streaming kernel is bound by the bytes of W, so the choice aims at (1) enough CTAs to
    fill every SM, with whole waves; (2) several 16 KB stages in flight per SM; (3) little extra
    traffic: split-K partials (split_k·N·M·4 B written and read), X re-reads and K padding.
    Picks among SHIPPED_TILES whose block_m divides M (the 16-row tile divides every M), with any
    split_k; raises ShapeError when M or K is not a multiple of 16.
    """
    check_weight_shape(m, k)
    block_n = token_tile(n_hint)
    best: tuple[float, TileConfig] | None = None
    for tile in SHIPPED_TILES:
        if m % tile.block_m:
            continue
        for split_k in SPLIT_K_CHOICES:
            cfg = replace(tile, split_k=split_k)
            try:
                cfg.validate(arch)
            except ConfigError:
                continue
            if split_k > 1 and cfg.padded_k(k) // split_k < 2 * cfg.block_k:
                continue  # K slices too short to be worth a second kernel
            # the token tile that suits n_hint first; other token tiles only where none fits
            score = _score(cfg, m, k, arch, n_hint) + (0.0 if tile.block_n == block_n else 100.0)
            if best is None or score < best[0]:
                best = (score, cfg)
    assert best is not None, "the 16-row shipped tile fits every M, K that are multiples of 16"
    return best[1]


def _score(cfg: TileConfig, m: int, k: int, arch: ArchSpec, n_hint: int) -> float:
    """Estimated time in units of 'streaming all of W once at full bandwidth' (lower is better).

    A model, not a measurement: the GPU benchmarks (benchmarks/gemm_weight.py) are what settle it.
    """
    padded_k = cfg.padded_k(k)
    weight_bytes = m * k * 2.0
    padding = m * (padded_k - k) * 2.0
    ctas = (m // cfg.block_m) * cfg.split_k * math.ceil(n_hint / cfg.block_n)
    per_sm = max(1, min(arch.shared_bytes_per_sm // max(cfg.shared_bytes(), 1), 2048 // cfg.threads, 16))
    slots = arch.sm_count * per_sm
    waves = math.ceil(ctas / slots)
    # CTAs resident together share the SM's bandwidth; an uneven last wave idles SMs.
    balance = ctas / (waves * min(ctas, slots)) if ctas else 1.0
    in_flight = per_sm * (cfg.stages - 1) * cfg.block_m * cfg.block_k * 2
    latency_penalty = max(0.0, 1.0 - in_flight / 32768) * 0.5
    partial_bytes = 2 * cfg.split_k * max(n_hint, 1) * m * 4 if cfg.split_k > 1 else 0
    x_rereads = (m / cfg.block_m) * cfg.block_n * k * 2.0 * 0.25  # mostly from L2
    launch = 0.1 if cfg.split_k > 1 else 0.0  # the second kernel
    fill = min(1.0, ctas / arch.sm_count)
    extra = (partial_bytes + x_rereads + padding) / weight_bytes
    return (1.0 + extra) / (balance * fill) + latency_penalty + launch
