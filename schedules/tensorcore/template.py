"""The Tensor Core weight-GEMM template: one schedule for every weight format.

    sch = schedule_weight_gemm(make_weight_gemm(stage, m, k), TileConfig(...), cuda_intrinsics())

The PrimFunc (`schedules/weight_gemm.py`) computes Y[n, m] = Σ_k X[n, k]·W[m, k] with W produced by the
format's "decode" block. The template never looks at the format's name; it reads the decode block
like any other producer:

    global ──cp.async──▶ X tile (shared, swizzled) ──ldmatrix──▶ A fragments ─┐
    global ──cp.async──▶ staged stored tiles (shared; formats that ask)      │ mma.sync
                 └─(decode block: plain TIR, any dtype/bit ops)──▶ W tile     ├─▶ fp32 accumulators
                   (for dense W the decode block is itself the cp.async copy) │
                                          W tile ──ldmatrix──▶ B fragments ─┘
    accumulators ──▶ shared fp32 tile ──▶ "store" block (× row scale, + bias, cast, rows n < N) ──▶ Y
      (split_k > 1: accumulators ──▶ fp32 workspace; a second kernel adds the K slices in order)

A format opts into staging through its decode stage's `staged_buffers` (see
`schedules/decode_stage.py`); otherwise its decode reads global memory inside the W-tile fetch. A staged
format whose stage offers fragment decode skips the W tile: each warp decodes the staged words straight
into its B fragments, two weights per register (`fragment_decode.py` has the picture):

    global ──cp.async──▶ staged words (shared, rows padded) ──LDS + pair decode──▶ B fragments ──▶ mma
                                  (bitmap: + offsets and values, LDG at a pair's rank) ──┘
      (bitmap: a lane counts its two rows' set bits; the rows above each come from a scan of the
       counts across the warp, shuffles, not from recounting them in every lane)

A stage offering both fragment decode and a tile scatter (bitmap) says per weight which the template
takes (`fragment_decode_preferred`: bitmap above 33 % density; fragment decode costs the same at any
density, the scatter a loop trip per set bit); a config whose block_k the stage's unit does not divide
takes the scatter.

A stage offering runs along K (its `k_runs`, e.g. bitmap: the rank of a tile row shared by its weights)
decodes its W tile in runs: each thread takes whole runs of L consecutive weights of one row, rows
fastest across threads, and stores each 8 weights as one 16-byte STS (`run_tile.py` has the picture):

    global bits/offsets/values ──run decode (rank once, rank += bit a weight; registers)──┐
    W tile (shared, rows padded +16 B) ◀──STS.128 per 8 weights, thread t = row t of a run column──┘
                                          W tile ──ldmatrix──▶ B fragments ──▶ mma   (as a decoded tile)

A scatter format (its stage's `tile_scatter`, e.g. Tiled-CSL: words of (fp16 value | position) per 16 x 64
tile; bitmap and bitmap x FPx: a bitmap word per 32 positions, the values in position order) builds its
W tiles by the scatter, preferred to runs along K: the PrimFunc's whole-W decode block is dropped and
each K tile's W tile builds itself (`scatter_tile.py`, `schedules/tile_scatter.py`), one seam for all such
formats:

    W tile (shared, rows padded +16 B) ◀──STS.128 zeros (all threads)── ; __syncthreads()
    global words ──LDG.128: 4 words a thread──▶ registers ──STS value at (row, col) of its word──▶ W tile
                   (the block_m x block_k W tile covers whole 16 x 64 format tiles, or half of one when
                    block_k = 32; each format tile's words are dealt to threads / tiles threads)
                                          W tile ──ldmatrix──▶ B fragments ──▶ mma   (as a decoded tile)

    bitmap words (`set_bits`): the fill phase also counts each thread's group of words into shared memory
    (STS); after the barrier a thread's rank = the tile's first index + the counts of the groups before
    (LDS), then for each of its words, its set bits lowest first (POPC(~m & (m - 1)), m &= m - 1), a
    chunk of them a loop trip (the format's `SetBits.chunk`: bitmap 4, bitmap x FPx 3):
    global values / code stream ──LDG at rank (FPx: a window a chunk)──▶ values ──STS.U16 at (row, bit)──▶ W tile

N and K are padded to whole tiles inside the kernel (predicated, zero-filling cp.async; Y rows
n >= N are never stored); block_m must divide M (TileConfig.check_shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.stmt import SBlock, SBlockRealize

from tensorpress.errors import ConfigError, ShapeError
from tensorpress.schedules.decode_stage import DecodeStage, TileScatter, staged_buffer_names
from tensorpress.schedules.tensorcore import fragments as frag
from tensorpress.schedules.tensorcore.fragment_decode import install_fragment_decode
from tensorpress.schedules.tensorcore.intrinsics import IntrinsicSet
from tensorpress.schedules.tensorcore.run_tile import install_k_runs, run_length, spread_runs
from tensorpress.schedules.tensorcore.scatter_tile import install_tile_scatter, without_scatter_decode
from tensorpress.schedules.tensorcore.tile_config import MMA_TILE, VECTOR_BYTES, WARP_SIZE, TileConfig
from tensorpress.schedules.weight_gemm import ROW_SCALE_ATTR, decode_stage_of, is_weight_gemm, weight_gemm_params


@dataclass(frozen=True)
class TemplateBlocks:
    """Handles of the template's blocks in a scheduled module (for tests that plant bugs)."""

    x_shared: s_tir.SBlockRV  # global -> shared copy of the X tile
    w_shared: s_tir.SBlockRV | None  # global (or staged shared) -> decoded W tile; None: decoded in registers
    x_fragment: s_tir.SBlockRV  # shared -> A fragments (outer block, carries permuted_layout)
    w_fragment: s_tir.SBlockRV  # shared W tile (ldmatrix) or staged words (fragment decode) -> B fragments

    @staticmethod
    def of(sch: s_tir.Schedule, intrinsics: IntrinsicSet) -> TemplateBlocks:
        def named(prefix: str, suffix: str):
            blocks = find_blocks(sch, lambda b: b.name_hint.startswith(prefix) and b.name_hint.endswith(suffix))
            return blocks[0] if blocks else None

        shared, fragment = intrinsics.shared_scope, intrinsics.fragment_scope
        return TemplateBlocks(
            x_shared=named("X", f"_{shared}"),
            w_shared=named("decode", f"_{shared}"),
            x_fragment=named("X", f"_{fragment}_o"),
            w_fragment=named("decode", f"_{fragment}_o"),
        )


def weight_gemm_shape(func: tirx.PrimFunc) -> tuple[int, int]:
    """(M, K) of a weight-GEMM PrimFunc, from its `tensorpress.mk` attribute."""
    m, k = (int(v) for v in func.attrs["tensorpress.mk"])
    return m, k


def schedule_weight_gemm(func: tirx.PrimFunc, config: TileConfig, intrinsics: IntrinsicSet) -> s_tir.Schedule:
    """Schedule a weight-GEMM PrimFunc onto Tensor Cores with `config`, tensorizing with `intrinsics`.

    Raises ShapeError when M or K is not a multiple of 16, block_m does not divide M, or the format
    cannot take the shape; ConfigError for activations that are not float16. N and K need not fit
    the tiles: they are padded inside the kernel.
    """
    if not is_weight_gemm(func):
        raise ConfigError("schedule_weight_gemm expects a PrimFunc made by make_weight_gemm.")
    m, k = weight_gemm_shape(func)
    config.check_shape(m, k)
    stage = decode_stage_of(func)
    reason = stage.unsupported_reason(m, k)
    if reason:
        raise ShapeError(f"weight GEMM {stage.name} with M={m}, K={k}: {reason}.")
    return _Template(func, config, intrinsics).schedule()


def builds_w_by_scatter(func: tirx.PrimFunc, config: TileConfig) -> bool:
    """True when the template builds the W tiles of `func` with `config` by its stage's tile scatter
    (whose loops run as often as the data says: `benchmarks/gemm_sass.py` weights them)."""
    stage = decode_stage_of(func)
    m, k = weight_gemm_shape(func)
    staged = staged_buffer_names(stage, m, k, [str(p.name) for p in func.params])
    return _fragment_decode_stage(stage, func, config, bool(staged)) is None and _scatter_of(stage, func) is not None


class _Template:
    def __init__(self, func: tirx.PrimFunc, config: TileConfig, intrinsics: IntrinsicSet):
        self.cfg = config
        self.intr = intrinsics
        self.m, self.k = weight_gemm_shape(func)
        self.stage = decode_stage_of(func)
        stored = [p.name for p in func.params]
        self.staged = staged_buffer_names(self.stage, self.m, self.k, stored)
        self.fragment_decode = _fragment_decode_stage(self.stage, func, config, bool(self.staged))
        # a stage offering both builds its W by fragment decode (`_fragment_decode_stage` says why)
        self.scatter = None if self.fragment_decode is not None else _scatter_of(self.stage, func)
        self.run_length: int | None = None  # runs along K of the W-tile decode (`_fetch_operands`)
        _check_dtypes(func)
        # int32 index math everywhere (N is int64 in the PrimFunc; mixed widths break layout maps).
        narrow = tvm.tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]
        if self.scatter is not None:  # the W tiles build themselves: the whole-W decode block goes
            narrow, self.scatter_stored = without_scatter_decode(narrow)
        self.sch = s_tir.Schedule(narrow)

    # -- orchestration --------------------------------------------------------------------------------

    def schedule(self) -> s_tir.Schedule:
        self._pad()
        self._split_reduction()
        self._tile()
        self._fetch_operands()
        self._fragments()
        self._epilogue()
        self._tensorize()
        self._pipeline()
        if self.run_length is not None:
            k_tiles_pad_k = self.k % (self.cfg.split_k * self.cfg.block_k) != 0
            self.sch = install_k_runs(self.sch, self.w_runs, self.stage, self.run_length, self.k, k_tiles_pad_k)
        if self.fragment_decode is not None:
            self.sch = install_fragment_decode(
                self.sch, self.frag_tiles[1], self.fragment_decode, self._stored_or_staged(), self.intr.decode_b
            )
        if self.scatter is not None:
            self.sch = install_tile_scatter(
                self.sch, self.w_scatter, self.scatter_stored, self.cfg, self.m, self.k, self.intr.kind == "cuda"
            )
        return self.sch

    # -- steps ---------------------------------------------------------------------------------------

    def _pad(self) -> None:
        """Pad N and K to whole tiles; padded X/W elements read as 0, padded Y rows are not stored.

        N is symbolic, so it is always padded (predicated, zero-filling loads). K is static: a config
        whose K slices divide it adds no padding and no predicate. block_m divides M (check_shape).
        """
        sch, cfg = self.sch, self.cfg
        sch.pad_einsum(sch.get_sblock("gemm"), [cfg.block_n, 1, cfg.split_k * cfg.block_k])
        blocks = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
        sch.compute_inline(sch.get_sblock("gemm_pad"))  # the un-pad copy; "store" reads the padded acc
        # decode_pad[m, k] = m < M and k < K ? decode[m, k] : 0 (a scatter stage has no decode block)
        if "decode_pad" in blocks and "decode" in blocks:
            sch.compute_inline(sch.get_sblock("decode"))
        self.x_padded = "X_pad" if "X_pad" in blocks else None
        self.w_source = "decode_pad" if "decode_pad" in blocks else "decode"

    def _split_reduction(self) -> None:
        """split_k > 1: rfactor K into slices; "gemm" becomes the fixed-order sum of the slices."""
        sch = self.sch
        gemm = sch.get_sblock("gemm")
        if self.cfg.split_k == 1:
            self.main, self.final = gemm, None
            return
        n, m, k = sch.get_loops(gemm)
        ks, _ = sch.split(k, [self.cfg.split_k, None])
        sch.reorder(ks, n, m)
        self.main, self.final = sch.rfactor(ks, factor_axis=0), gemm

    def _tile(self) -> None:
        """16×16×16 tensor-core blocks; CTA and warp tiling; grid and warp bindings."""
        sch, cfg = self.sch, self.cfg
        loops = sch.get_loops(self.main)
        k_slice = loops[0] if cfg.split_k > 1 else None
        n, m, k = loops[-3:]
        n, n_t = sch.split(n, [None, MMA_TILE])
        m, m_t = sch.split(m, [None, MMA_TILE])
        k, k_t = sch.split(k, [None, MMA_TILE])
        sch.reorder(n, m, k, n_t, m_t, k_t)
        self.inner = self.main
        self.outer = sch.blockize(n_t)
        n0, n2 = sch.split(n, [None, cfg.block_n // MMA_TILE])
        m0, m1, m2 = sch.split(m, [None, cfg.warps, cfg.warp_tile_m // MMA_TILE])
        k0, k1 = sch.split(k, [None, cfg.block_k // MMA_TILE])
        # k_unit: one step of the W fragment decode (fragment_k columns); k1: one mma k step (16).
        k_unit = k1
        if self.fragment_decode is not None:
            k_unit, k1 = sch.split(k1, [None, self.fragment_decode.fragment_k // MMA_TILE])
        sch.reorder(m0, n0, m1, k0, *([k_unit] if k_unit != k1 else []), k1, n2, m2)
        sch.bind(n0, "blockIdx.x")
        sch.bind(m0, "blockIdx.y")
        if k_slice is not None:
            sch.bind(k_slice, "blockIdx.z")
        sch.bind(m1, "threadIdx.y")
        self.warp, self.cta, self.k0, self.k_unit, self.k1 = m1, n0, k0, k_unit, k1

    def _fetch_operands(self) -> None:
        """cp.async-able global→shared copies of X and W; the decode block fused into W's fetch, or
        (fragment decode) into the B fragments, which then read the staged words."""
        sch, scope = self.sch, self.intr.shared_scope
        self.x_shared = sch.cache_read(self.outer, 0, scope)
        sch.compute_at(self.x_shared, self.k0)
        if self.x_padded:
            sch.compute_inline(sch.get_sblock(self.x_padded))
        if self.fragment_decode is not None:
            self.w_shared = None
            self.w_frag = sch.cache_read(self.outer, 1, self.intr.fragment_scope)
            sch.compute_at(self.w_frag, self.k_unit)
        else:
            self.w_shared = sch.cache_read(self.outer, 1, scope)
            sch.compute_at(self.w_shared, self.k0)
        if self.scatter is not None:
            self.staged_blocks = []
            self._cooperative(self.x_shared, self.k0, vector=True)
            sch.annotate(self.x_shared, "permuted_layout", 1)
            self._scatter_tile()
            return
        decode = sch.get_sblock(self.w_source)
        staged_blocks = []
        for name in self.staged:
            # Static "shared", not the dynamic pool: TVM's ThreadSync treats every shared.dyn buffer as
            # one, so reading staged words while writing the W tile looked like a loop-carried conflict
            # and put a barrier in every decode step (67 BAR per K tile instead of 4 for FP6).
            staged_blocks.append(sch.cache_read(decode, _read_index(sch, decode, name), "shared"))
        sch.compute_inline(decode)
        for block in staged_blocks:
            sch.compute_at(block, self.k0)
        self.staged_blocks = staged_blocks
        for block in [self.x_shared, *staged_blocks]:
            self._cooperative(block, self.k0, vector=True)
        sch.annotate(self.x_shared, "permuted_layout", 1)
        if self.w_shared is None:
            # The 8 rows g of a B fragment are read by one warp instruction (lanes 4g + t): a row pitch
            # of 4 words mod 8 puts them in 8 different 4-bank groups (an unpadded 8-word FP6 plane4 row
            # put rows g and g + 4 in the same banks: 2-way conflicts on every LDS).
            for block in staged_blocks:
                sch.storage_align(block, 0, axis=-2, factor=8, offset=4)
            self.swizzle_w = False
            return
        copy = self._is_copy(self.w_shared)
        self.run_length = None if copy or staged_blocks else _run_length(self.stage, func_of(sch), self.cfg)
        if self.run_length is not None:  # runs along K: each thread decodes whole runs of a row
            loops = _loops_below(sch, self.w_shared, self.k0, 0)
            self.w_runs = spread_runs(sch, loops, self.cfg, self.run_length)
        else:
            self._cooperative(self.w_shared, self.k0, vector=copy)
        # Tiles are XOR-swizzled (TVM's permuted_layout) so ldmatrix reads are free of bank conflicts.
        # InjectPermutedLayout would also rewrite the staged buffers a decode reads, which it cannot
        # lay out (32-bit words), and a run's 16-byte stores are replaced after it ran; such a decoded
        # W tile therefore gets padded rows (+16 B) instead.
        self.swizzle_w = not staged_blocks and self.run_length is None
        if self.swizzle_w:
            sch.annotate(self.w_shared, "permuted_layout", 1)
        else:
            tile = self.w_runs if self.run_length is not None else self.w_shared  # the run block outlives w_shared
            sch.storage_align(tile, 0, axis=-2, factor=32 if self.cfg.block_k == 32 else 64, offset=8)

    def _scatter_tile(self) -> None:
        """A scatter stage: the W tile (one block per K tile, rows padded like a decoded tile) whose body
        `install_tile_scatter` replaces with the CTA's zero-fill and scatter of the stage's words."""
        sch = self.sch
        if self.w_source == "decode_pad":  # the W tile reads decode through the padding guard
            sch.compute_inline(sch.get_sblock("decode_pad"))
        self.w_scatter = sch.blockize(_loops_below(sch, self.w_shared, self.k0, 0)[0])
        # padded rows (+16 B), as a decoded tile: the scatter stores at the buffer's own (row, col)
        sch.storage_align(self.w_scatter, 0, axis=-2, factor=32 if self.cfg.block_k == 32 else 64, offset=8)
        self.swizzle_w = False

    def _fragments(self) -> None:
        """ldmatrix sources/targets and the warp accumulator, laid out as the mma fragments."""
        sch = self.sch
        self.x_frag = sch.cache_read(self.outer, 0, self.intr.fragment_scope)
        sch.compute_at(self.x_frag, self.k1)
        if self.fragment_decode is None:
            self.w_frag = sch.cache_read(self.outer, 1, self.intr.fragment_scope)
            sch.compute_at(self.w_frag, self.k1)
        self.acc = sch.cache_write(self.outer, 0, "warp")
        sch.reverse_compute_at(self.acc, self.warp)
        rows, cols = sch.get_loops(self.acc)[-2:]
        r0, r1 = sch.split(rows, [None, MMA_TILE])
        c0, c1 = sch.split(cols, [None, MMA_TILE])
        sch.reorder(r0, c0, r1, c1)
        w_unit = self.fragment_decode.fragment_k if self.fragment_decode is not None else MMA_TILE
        for block, unit_cols in ((self.x_frag, MMA_TILE), (self.w_frag, w_unit)):
            rows, cols = sch.get_loops(block)[-2:]
            r0, r1 = sch.split(rows, [None, MMA_TILE])
            c0, c1 = sch.split(cols, [None, unit_cols])
            sch.reorder(r0, c0, r1, c1)
        sch.transform_layout(self.x_frag, ("write", 0), frag.a_warp_layout)
        sch.transform_layout(self.w_frag, ("write", 0), frag.b_warp_layout)
        sch.transform_layout(self.acc, ("read", 0), frag.c_warp_layout)
        # InjectPermutedLayout rewrites the ldmatrix addresses only inside annotated blocks.
        self.frag_tiles = []
        for block, swizzled in ((self.x_frag, True), (self.w_frag, self.swizzle_w)):
            tile = sch.blockize(sch.get_loops(block)[-2])
            if swizzled:
                sch.annotate(tile, "permuted_layout", 1)
            self.frag_tiles.append(tile)

    def _epilogue(self) -> None:
        """Accumulators -> Y: through a shared fp32 tile (split_k == 1) or a workspace + 2nd kernel."""
        sch, cfg = self.sch, self.cfg
        store = sch.get_sblock("store")
        if cfg.split_k == 1:
            sch.set_scope(self.acc, 0, self.intr.shared_scope)
            sch.reverse_compute_at(store, self.cta)
            out_bytes = tvm.DataType(str(sch.get(store).writes[0].source.dtype)).bits // 8
            # 8 lanes of fp32 math with a constant (a row scale's 2^e) print as a broken ulonglong4
            # broadcast in TVM 0.27's CUDA codegen; 4 lanes are a float4.
            lanes = 4 if _has_float32_constant(sch.get(store).body) else 8
            self._cooperative(store, self.cta, vector=True, vector_bytes=min(VECTOR_BYTES, lanes * out_bytes))
        else:
            i, j = sch.get_loops(store)
            sch.compute_at(self.final, j)
            sch.set_scope(self.final, 0, "local")
            bx, tx = sch.split(sch.fuse(i, j), [None, 256])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
        self.init = sch.decompose_reduction(self.outer, self.k0)

    def _tensorize(self) -> None:
        sch, intr = self.sch, self.intr
        # Loops over fragments, unrolled so register arrays are indexed by constants (no stack frame).
        fragment_loops = [self.k1] if self.k_unit == self.k1 else [self.k_unit, self.k1]
        x_tile, w_tile = self.frag_tiles
        for block, ancestor in ((x_tile, self.k1), (w_tile, self.k_unit), (self.outer, self.k1)):
            fragment_loops += _loops_below(sch, block, ancestor, 0)
        fragment_loops += _loops_below(sch, self.init, self.warp, 0)
        fragment_loops += _loops_below(sch, self.acc, self.warp, 2)
        sch.tensorize(sch.get_loops(self.x_frag)[-2], intr.load_a)
        if self.fragment_decode is None:  # else the B fragments are decoded (install_fragment_decode)
            sch.tensorize(sch.get_loops(self.w_frag)[-2], intr.load_b)
        sch.tensorize(sch.get_loops(self.inner)[-3], intr.mma)
        sch.tensorize(sch.get_loops(sch.get_child_blocks(self.init)[0])[-2], intr.fill)
        store = intr.store_shared if self.cfg.split_k == 1 else intr.store_global
        sch.tensorize(sch.get_loops(self.acc)[-2], store)
        for loop in fragment_loops:
            sch.unroll(loop)

    def _pipeline(self) -> None:
        """Stage 0: every global→shared copy (cp.async); last stage: decode from shared + mma."""
        sch = self.sch
        copies = {sch.get(b).name_hint for b in [self.x_shared, *self.staged_blocks]}
        if self.w_shared is not None and not self.staged_blocks:
            copies.add(sch.get(self.w_shared).name_hint)
        stages = []
        for child in _loop_children(sch.get(self.k0)):
            names = _block_names(child)
            stages.append(0 if names and names <= copies else self.cfg.stages - 1)
        if stages.count(0) == 0 or stages[-1] == 0:
            raise ShapeError("internal: the k loop of the weight GEMM has no copy stage to pipeline")
        sch.annotate(self.k0, "software_pipeline_stage", stages)
        sch.annotate(self.k0, "software_pipeline_order", list(range(len(stages))))
        sch.annotate(self.k0, "software_pipeline_async_stages", [0])

    # -- helpers -------------------------------------------------------------------------------------

    def _stored_or_staged(self) -> list:
        """The stored buffers in order, each staged one replaced by its shared copy (what a stage's
        `fragment_pair` reads)."""
        copies = {}
        for block in self.staged_blocks:
            copy = self.sch.get(block)
            copies[str(copy.reads[0].source.name)] = copy.writes[0].source
        stored = weight_gemm_params(func_of(self.sch)).stored
        return [copies.get(str(buffer.name), buffer) for buffer in stored]

    def _cooperative(self, block, anchor, vector: bool, vector_bytes: int = VECTOR_BYTES) -> None:
        """Spread the loop nest of `block` below `anchor` (its rows and columns, or a single loop when
        a row of the tile is one element: compute_at leaves no unit loop) over all threads of the
        CTA, in 16-byte vectors if a copy."""
        sch, cfg = self.sch, self.cfg
        loops = _loops_below(sch, block, anchor, 0)
        inner = int(sch.get(loops[-1]).extent)
        elem = tvm.DataType(str(sch.get(block).writes[0].source.dtype)).bits // 8
        lanes = max(1, vector_bytes // elem) if vector else 1
        while inner % lanes:
            lanes //= 2
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        _, ty, tx, vec = sch.split(fused, [None, cfg.warps, WARP_SIZE, lanes])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        if lanes > 1:
            sch.vectorize(vec)

    def _is_copy(self, block) -> bool:
        """True when the block stores a load, or `cond ? load : 0` (cp.async copies, zero-filling)."""
        stmt = self.sch.get(block).body
        if not isinstance(stmt, tirx.BufferStore):
            return False
        value = stmt.value
        if isinstance(value, tvm.ir.Call) and value.op.same_as(tvm.ir.Op.get("prim.if_then_else")):
            value = value.args[1]
        return isinstance(value, tvm.ir.TensorLoad)


def _fragment_decode_stage(
    stage: DecodeStage, func: tirx.PrimFunc, config: TileConfig, staged: bool
) -> DecodeStage | None:
    """`stage` when the template decodes W straight into the B fragments, else None.

    That needs a staged stage offering fragment decode whose unit divides block_k, and fragment pairs holding what the
    PrimFunc's decode block computes: for a stage with a row scale, a PrimFunc that applies it in the
    epilogue (the pairs are the unscaled values; a PrimFunc made with row_scale_in_epilogue=False
    decodes scaled weights and takes the W-tile path).
    """
    if stage.fragment_k is None or not staged:
        return None
    if stage.fragment_k % MMA_TILE or config.block_k % stage.fragment_k:
        return None
    if stage.scales_rows and not bool(func.attrs.get(ROW_SCALE_ATTR, False)):
        return None
    if stage.tile_scatter is not None:  # it offers both: the stage says which for this weight
        m, k = weight_gemm_shape(func)
        if not stage.fragment_decode_preferred(list(weight_gemm_params(func).stored), m, k):
            return None
    return stage


def _scatter_of(stage: DecodeStage, func: tirx.PrimFunc) -> TileScatter | None:
    """The stage's tile scatter when the template builds its W tiles by it (preferred to runs along K):
    a scatter gives the unscaled values, so a stage with a row scale needs a PrimFunc that applies it in
    the epilogue (else its per-element decode, scaled, fills the W tile)."""
    if stage.tile_scatter is None:
        return None
    if stage.decodes_elements and stage.scales_rows and not bool(func.attrs.get(ROW_SCALE_ATTR, False)):
        return None
    return stage.tile_scatter


def _run_length(stage: DecodeStage, func: tirx.PrimFunc, config: TileConfig) -> int | None:
    """The run length along K of the W-tile decode (`run_tile.py`), or None for one weight a thread.

    That needs a stage offering runs along K with a length that fits the tile, holding what the
    PrimFunc's decode block computes (for a stage with a row scale, the unscaled values: a PrimFunc
    that applies the scale in the epilogue).
    """
    if stage.k_runs is None:
        return None
    if stage.scales_rows and not bool(func.attrs.get(ROW_SCALE_ATTR, False)):
        return None
    return run_length(stage, config)


def func_of(sch: s_tir.Schedule) -> tirx.PrimFunc:
    return sch.mod["main"]


def find_blocks(sch: s_tir.Schedule, predicate) -> list:
    """Every block (SBlockRV) of the scheduled function for which predicate(SBlock) is true, in
    program order; unlike `get_sblock` this also reaches blocks that share a name."""
    found, pending = [], list(sch.get_child_blocks(sch.get_sblock("root")))
    while pending:
        block = pending.pop(0)
        if predicate(sch.get(block)):
            found.append(block)
        pending[:0] = list(sch.get_child_blocks(block))
    return found


def _read_index(sch: s_tir.Schedule, block, buffer_name: str) -> int:
    """Position of `buffer_name` among the buffers `block` reads (what cache_read takes)."""
    names = [str(region.source.name) for region in sch.get(block).reads]
    return names.index(buffer_name)


def _loops_below(sch: s_tir.Schedule, block, ancestor, tile_loops: int) -> list:
    """Loops of `block` strictly inside `ancestor`, minus its innermost `tile_loops` (tensorized)."""
    loops = sch.get_loops(block)
    start = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(ancestor))) + 1
    return list(loops[start : len(loops) - tile_loops])


def _check_dtypes(func: tirx.PrimFunc) -> None:
    x = func.params[0]  # in TVM 0.27 a buffer parameter is a Var of BufferType
    if str(x.dtype) != "float16":
        raise ConfigError(
            f"the Tensor Core weight GEMM takes float16 activations, not {x.dtype}; compile with dtype float16."
        )


def _has_float32_constant(stmt: tirx.Stmt) -> bool:
    import tvm_ffi

    found = []

    def visit(imm):
        if str(imm.ty) == "float32":
            found.append(imm)
        return imm

    tvm_ffi.structural_map(stmt, (tirx.FloatImm, visit))
    return bool(found)


def _loop_children(loop: tirx.For) -> list[tirx.Stmt]:
    body = loop.body
    if isinstance(body, SBlockRealize):
        body = body.block.body
    return list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]


def _block_names(stmt: tirx.Stmt) -> set[str]:
    import tvm_ffi

    names: set[str] = set()

    def visit(block):
        names.add(str(block.name_hint))
        return block

    tvm_ffi.structural_map(stmt, (SBlock, visit))
    return names
