"""q·k over 2-bit key pages as integer dot products (x86 `vpmaddubsw`): the int8-query scores of a chunk.

With `int8_query` (a page-granular KV format's option, llvm builds only), the paged attention's stage 1
computes the scores of a (token n, kv head g, chunk c) task with this one block instead of gathering the
keys into an fp32 tile and multiplying by q in fp32: q's products with a quantised key row become integer
dot products, 32 of them per instruction (u8 code x s8 query, pairs summed into int16), instead of 8 fp32
FMAs, and the 2-bit codes are decoded in registers (a shift and a mask per 4 channels of 8 rows).

The scores it defines (the numpy reference: `int8_query_scores_reference`), for query head h, its query
q = q_scaled[n, h] (fp32, already times 1/√D) and a position t of the chunk:

    full-precision row k:   s_t = Σ_d q_d · k_d                         (fp32, d in order)
    quantised row, keys x̂_d = a · code_d + b:
      per token (a, b the row's: int2-oscar)
        σ = max_d |q_d| / 127,  q8_d = rint(q_d / σ)  (0 when σ = 0),  Q = Σ_d q_d  (d in order)
        s_t = (Σ_d q8_d · code_d) · (a · σ) + b · Q
      per channel (a_d, b_d the quantised page's: int2-kitty, code = low | high << 2 up to 15)
        w_d = q_d · a_d,  σ = max_d |w_d| / 127,  w8_d = rint(w_d · (127 / max_d |w_d|))  (0 when the max is 0),
        B = Σ_d q_d · b_d  (fp32, in the kernel's order),  s_t = (Σ_d w8_d · code_d) · σ + B

The integer sums are exact (|Σ| < 2^24). The approximation against fp32 dequantised keys is q's (or w's)
rounding to 8 bits: at most σ/2 per channel, against the 2-bit key's own error of a/2 per channel.

How a task runs (8 rows a vector: one page lookup per vector, PS a multiple of 8; head_dim a multiple of 16,
chunks of 128 channels, a partial last one read as its words followed by zero words, its query positions 0;
at head_dim <= 64 two rows share each vector instead, `pairs_rows`: row r's word m at word 2m, row r + 1's at
2m + 1, q's codes at both (`paired_position`), kitty's high bytes 0..3 and 4..7, and `pair_sum` for the sums):

    per token and head (root)   σ, Q and q's int8 codes in the packed order: position 128·c + 32·k + 4·m + i
                                holds channel 128·c + 16·m + 4·i + k (`permuted`)
    per quantised page (kitty)  w8 in the same order, σ, B for the group's heads, once, in a root block
                                ("page_weights", slot p·G.. of the block table) before the tasks: pages of
                                128 rows start at the sink's end, so each straddles two chunks (done in the
                                tasks, the set-up was 14% of int2-kitty's time at G8 B8)
    per vector of 8 rows        the page entry; full precision: fp32 FMAs over d; quantised, per row:
        the row's 32 bytes      uint32 x 8, one load (128 channels of 2 bits)
        (row >> 2k) & 0x03030303  byte 4m + i = the code of channel 16m + 4i + k: the packed order (chunk c, k)
        vpmaddubsw with q's 32 bytes (c, k), per head, summed in int16; kitty's 4-bit channels: the row's
                                8 high bytes (a partial last chunk: its bytes, then zeros) spread to 32 (field
                                k of byte j at byte 8k + j) times 4, into the same sums. A lane's sum: per
                                chunk 4 x 2 x 3 x 127 = 3048 from the low codes, per 32 boosted channels
                                2 x 12 x 127 = 3048 from the high bits; at head_dim 512 and f = 0.25,
                                4 x 3048 + 4 x 3048 = 24384 < 2^15 (MAX_HEAD_DIM)
        vpmaddwd with 1         int32 x 8 a row; the 8 rows' vectors reduced and transposed by shuffles into
                                one int32 x 8, row r in lane r; then the scale and the bias in fp32

Positions past the token's own (a partial chunk) are computed from the rows of the last live vector's
page or skipped: their scores are masked out by the definition's `prob` and `chunk_max`, like its clamps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tensorpress.schedules.cpu.loop_helpers import largest_divisor

ROWS = 8  # rows of a vector: uint32 x 8 words, one int32 lane a row
PREFETCH_VECTORS = 2  # vectors of rows ahead whose pages are prefetched (~2 x 600 instructions: DRAM latency)
HEADS_A_TILE = 8  # int16 accumulators held in registers (of 16 ymm)
MADDUBS = "llvm.x86.avx2.pmadd.ub.sw"
MADDWD = "llvm.x86.avx2.pmadd.wd"


@dataclass(frozen=True)
class Int8QueryKeys:
    """What a format gives the int8-query scores (`PageQuantisedKVFormat.int8_query_keys`).

    scale_axis   "token" (a, b per row) or "channel" (a_d, b_d per quantised page)
    low_row      (quantised, layer, qpage, head, row, byte, words=8) -> uint32 x 8: 32 bytes of one row's 2-bit
                 plane (`row_words`: only the first `words` words read, the rest zero: a partial last chunk)
    high_row     kitty: (quantised, layer, qpage, head, row, chunk, count=8) -> uint64: 8 bytes (32 boosted
                 channels, in slot order) of one row's high plane, chunk `chunk` (`row_bytes`: only the first
                 `count` bytes read, the rest zero: the last chunk when `high_count` is not a multiple of 32)
    rows_to_prefetch  (quantised, layer, qpage, head, row) -> the loads whose cache lines hold 8 rows of
                 the page (K and V codes and per-row metadata): fetched a few vectors ahead
    slot         kitty: (quantised, layer, qpage, head, d) -> int32 slot of channel d in the high plane
                 (255: not boosted)
    row_affine   per token: (quantised, layer, qpage, head, row, part) -> float32 x 8: the scale a (part 0)
                 or the min b (part 1) of rows row .. row + 7
    channel_vector  per channel: (quantised, layer, qpage, head, channel, part) -> float32 x 4: a (part 0)
                 or b (part 1) of channels channel + 4i, i = 0..3 (4 neighbours in the query's packed order)
    """

    scale_axis: str
    low_row: Callable[..., Any]
    row_affine: Callable[..., Any] | None = None
    channel_vector: Callable[..., Any] | None = None
    rows_to_prefetch: Callable[..., Any] | None = None
    high_row: Callable[..., Any] | None = None
    high_count: int = 0
    slot: Callable[..., Any] | None = None


def strided_load(buffer, indices: list, axis: int, lanes: int = ROWS, step: int = 1):
    """buffer[indices] and the next lanes - 1 elements `step` apart along `axis`, as one vector built from
    scalar loads (TIR takes a vector index on the last axis only; a second buffer over the same memory, a
    view, is what the other way would take)."""
    from tvm import tirx

    def element(lane: int):
        at = list(indices)
        at[axis] = at[axis] + lane * step
        return buffer[tuple(at)]

    return tirx.Shuffle([element(lane) for lane in range(lanes)], [tirx.IntImm("int32", i) for i in range(lanes)])


_LOW128, _HIGH128 = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]  # 128-bit halves of two vectors


def _shuffle(a, b, lanes: list[int]):
    """Lanes of the concatenation of vectors a and b."""
    from tvm import tirx

    return tirx.Shuffle([a, b], [tirx.IntImm("int32", i) for i in lanes])


def row_words(buffer, indices: list, words: int = 8):
    """`words` words (4 bytes each) of a uint8 buffer from indices (the last counts bytes) as uint32 x 8, the
    words past `words` zero: 8 words of one row, or the last, partial chunk of a row (head_dim % 128)."""
    from tvm import tirx

    last = tirx.Cast("int64", indices[-1])
    load = buffer[(*indices[:-1], tirx.Ramp(last, tirx.IntImm("int64", 1), 4 * words))]
    if words == 8:
        return tirx.reinterpret("uint32x8", load)
    part = tirx.reinterpret("uint32" if words == 1 else f"uint32x{words}", load)
    return _zero_extended(part, words, tirx.const(0, "uint32"))


def key_codes_row(quantised: list, layer, qpage, head, row, byte, words: int = 8):
    """`Int8QueryKeys.low_row` of a format whose first cache tensor is its 2-bit codes, [layers, pages,
    2 (keys, values), kv heads, rows, head_dim / 4] uint8 (int2-kitty's and int2-oscar's)."""
    return row_words(quantised[0], [layer, qpage, 0, head, row, byte], words)


def row_bytes(buffer, indices: list, count: int = 8):
    """`count` bytes of a uint8 buffer from indices (the last counts bytes) as one uint64, the bytes past
    `count` zero: a chunk of int2-kitty's high plane, or its last, partial chunk (high_count % 32)."""
    from tvm import tirx

    last = tirx.Cast("int64", indices[-1])
    if count == 1:
        return tirx.Cast("uint64", buffer[(*indices[:-1], last)])
    load = buffer[(*indices[:-1], tirx.Ramp(last, tirx.IntImm("int64", 1), count))]
    if count < 8:
        load = _zero_extended(load, count, tirx.const(0, "uint8"))
    return tirx.reinterpret("uint64", load)


def _zero_extended(part, lanes: int, zero):
    """`part` (a scalar or a vector of `lanes`) followed by zeros, 8 lanes in all."""
    from tvm import tirx

    return tirx.Shuffle([part, tirx.Broadcast(zero, 8 - lanes)], [tirx.IntImm("int32", i) for i in range(8)])


MAX_HEAD_DIM = 512  # the int16 sums' bound (module docstring) holds up to here


def supported(keys: Int8QueryKeys | None, head_dim: int, page_size: int) -> bool:
    """Whether the block can take this shape: rows of whole words (head_dim a multiple of 16; a last chunk
    of fewer than 128 channels is read as its words and zeros), int16 sums that cannot overflow, whole
    vectors of rows in a page."""
    return keys is not None and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM and page_size % ROWS == 0


def faster_by_default(head_dim: int) -> bool:
    """Where the formats' default (int8_query None) takes the block: where it measured faster than the fp32
    q·k for both formats (`benchmarks/kv_attention_cpu.py --head-dim D --contexts 32768 --groups 8`,
    x86-64-v3, 2 threads): head_dim 128, int2-kitty 16-20% and int2-oscar 17-21% faster (B1, B8); head_dim 64
    with paired rows, int2-kitty 4-6% and int2-oscar 8-17% faster (quiet machine, two runs); head_dim 32,
    int2-kitty 10-15% slower (q·k is too little of the work there), int2-oscar level to 12% faster. Other
    head dims (a partial chunk of more than 64 channels, padded) were not measured."""
    return head_dim % 128 == 0 or head_dim == 64


def packed_length(head_dim: int) -> int:
    """Positions of the query's packed order: whole chunks of 128 (a partial last chunk's missing channels
    are zeros there, multiplied by the zero words `row_words` puts past the row)."""
    return -(-head_dim // 128) * 128


def high_packed_length(high_count: int) -> int:
    """Positions of int2-kitty's high weights (hw8): whole chunks of 32 boosted channels, at least one."""
    return max(-(-high_count // 32), 1) * 32


def permuted(p: int) -> int:
    """The channel at position p of the query's packed order: p = 128·chunk + 32·k + 4·m + i holds channel
    128·chunk + 16·m + 4·i + k, so 32 bytes (chunk, k) line up with (row's 32 bytes >> 2k) & 0x03030303."""
    chunk, k, m, i = p // 128, (p % 128) // 32, (p % 32) // 4, p % 4
    return 128 * chunk + 16 * m + 4 * i + k


def pairs_rows(head_dim: int) -> bool:
    """Whether a vector holds two rows: at head_dim <= 64 a row's codes fill at most half of 32 bytes, so rows
    r and r + 1 share each vpmaddubsw, their words interleaved (row r's word m at 2m, row r + 1's at 2m + 1)."""
    return head_dim <= 64


def paired_position(d, half: int):
    """Where channel d's int8 code sits for paired rows (`pairs_rows`): the packed order's word m = d // 16 at
    word 2m + half of the 32 bytes (k, so half 0 meets row r's word m and half 1 row r + 1's)."""
    return (d % 4) * 32 + (2 * (d // 16) + half) * 4 + (d % 16) // 4


def packed_position(d: int):
    """The inverse of `permuted` (TIR or int): where channel d sits in the query's packed order."""
    return (d // 128) * 128 + (d % 4) * 32 + ((d % 128) // 16) * 4 + (d % 16) // 4


def prepare_query(head_dim: int):
    """The TVMScript macro of the "q_prepared" block (one per token and query head, before the tasks):
    `prepare(n, h, q, scale, q_perm, q_codes, q_sigma, q_total)` writes q · scale in the packed order, its
    int8 codes in that order with σ = max |q| / 127, and Q = Σ_d q_d (d in order); the positions of a partial
    last chunk's missing channels hold zeros."""
    from tvm.script import tirx as T

    D, DP, PAIRS = head_dim, packed_length(head_dim), pairs_rows(head_dim)

    def code_position(d, half):
        return paired_position(d, half) if PAIRS else packed_position(d)

    @T.macro
    def prepare(n, h, q, scale, q_perm, q_codes, q_sigma, q_total):
        if DP > D:
            for p in range(DP):
                q_perm[n, h, p] = T.float32(0)
                q_codes[n, h, p] = T.int8(0)
        q_sigma[n, h] = T.float32(0)
        q_total[n, h] = T.float32(0)
        for d in range(D):
            q_sigma[n, h] = T.max(q_sigma[n, h], T.abs(T.Cast("float32", q[n, h, d]) * scale))
            q_total[n, h] = q_total[n, h] + T.Cast("float32", q[n, h, d]) * scale
        q_sigma[n, h] = q_sigma[n, h] / T.float32(127)
        for d in range(D):
            q_perm[n, h, packed_position(d)] = T.Cast("float32", q[n, h, d]) * scale
            for half in range(2 if PAIRS else 1):  # paired rows: each code twice, once for each row of a pair
                q_codes[n, h, code_position(d, half)] = T.if_then_else(
                    q_sigma[n, h] > T.float32(0),
                    T.Cast("int8", T.nearbyint(T.Cast("float32", q[n, h, d]) * scale / q_sigma[n, h])),
                    T.int8(0),
                )

    return prepare


def int8_query_scores(keys: Int8QueryKeys, cache: list, group: int, head_dim: int, page_size: int, chunk: int):
    """The TVMScript macro of the block's body, for the paged attention definition: called as
    `scores(n, g, c, layer, q_scaled, q_perm, q_codes, q_sigma, q_total, positions, seq_slot, block_table,
    score)` inside its block (the q_* buffers: `prepare_query`'s)."""
    from tvm.script import tirx as T

    pages, *quantised = cache
    G, D, PS, CH = group, head_dim, page_size, chunk
    DP, FC, PW = packed_length(D), D // 128, (D % 128) // 16  # packed positions; whole chunks; a last one's words
    GP = int(quantised[0].shape[4]) // PS  # rows of a quantised page over runtime page rows
    HC, HP = keys.high_count, high_packed_length(keys.high_count)  # boosted channels; their packed positions
    HW, HB = HC // 32, (HC % 32) // 4  # whole 8-byte chunks of a row's high plane; a last one's bytes
    PAIRS = pairs_rows(D)  # two rows a vector (then FC = HW = 0: PW <= 4 words, HB <= 4 bytes a row)
    HT = largest_divisor(G, HEADS_A_TILE)
    per_token = keys.scale_axis == "token"
    i64 = T.int64
    mask = T.broadcast(T.uint32(0x03030303), ROWS)
    ones = T.broadcast(T.int16(1), 16)
    lanes8 = lambda start: T.ramp(start, 1, 8)  # noqa: E731

    def plane_bytes(word, k):  # field k of every byte of a row's 32 bytes: channels 16m + 4i + k
        codes = T.bitwise_and(T.shift_right(word, T.broadcast(T.uint32(2 * k), ROWS)), mask)
        return T.reinterpret("int8x32", codes)

    def rounded_weights(n, g, j, v, q_perm, ap, vsum):
        """w8 at packed positions 8v .. 8v + 7 of head j: rint(q · a · 127 / max), the factor in vsum[0]."""
        return T.Cast(
            "int8x8", T.nearbyint(q_perm[n, g * G + j, lanes8(v * 8)] * ap[lanes8(v * 8)] * T.broadcast(vsum[0], 8))
        )

    def packed_weight(n, g, slot, j, position, w8, w_std):
        """w8 of head j at a packed-order position: paired rows keep the packed order in w_std."""
        return w_std[position] if PAIRS else w8[n, g, slot, j, position]

    def high_position(s, half):
        """Where boosted channel s's weight sits in hw8: field k = s % 4 of byte s // 4 of its chunk (byte j of
        field k at 8k + j); paired rows: row r's bytes at 8k + j, row r + 1's at 8k + 4 + j."""
        if PAIRS:
            return (s % 4) * 8 + half * 4 + s // 4
        return (s // 32) * 32 + (s % 4) * 8 + (s % 32) // 4

    @T.macro
    def page_channels(layer, qpage, g, ap, bp, chunk, k, m):
        """a (ap) and b (bp) of channels chunk·128 + 16m + k + 4i, i = 0..3, at their packed positions."""
        ap[T.ramp(chunk * 128 + k * 32 + m * 4, 1, 4)] = keys.channel_vector(
            quantised, layer, qpage, g, chunk * 128 + m * 16 + k, 0
        )
        bp[T.ramp(chunk * 128 + k * 32 + m * 4, 1, 4)] = keys.channel_vector(
            quantised, layer, qpage, g, chunk * 128 + m * 16 + k, 1
        )

    @T.macro
    def page_query(n, g, layer, qpage, slot, q_perm, w8, hw8, sigma, total, ap, bp, slot_of, vmax, vsum, w_std):
        """Per-channel formats: w = q · a rounded to int8 (σ, B) for every head, for quantised page qpage, into
        the page workspace's entry `slot` of (n, g)."""
        if DP > D:  # a partial last chunk: its missing channels weigh 0
            for v in range(DP // 8):
                ap[lanes8(v * 8)] = T.broadcast(T.float32(0), 8)
                bp[lanes8(v * 8)] = T.broadcast(T.float32(0), 8)
        for chunk, k, m in T.grid(FC, 4, 8):
            page_channels(layer, qpage, g, ap, bp, chunk, k, m)
        if PW > 0:
            for k, m in T.grid(4, PW):
                page_channels(layer, qpage, g, ap, bp, FC, k, m)
        if HC > 0:
            for d in range(D):
                if keys.slot(quantised, layer, qpage, g, d) < HC:  # 255: not boosted
                    slot_of[keys.slot(quantised, layer, qpage, g, d)] = T.int32(packed_position(d))
        for j in range(G):
            vmax[0:8] = T.broadcast(T.float32(0), 8)
            vsum[0:8] = T.broadcast(T.float32(0), 8)
            for v in range(DP // 8):
                vmax[lanes8(0)] = T.max(vmax[lanes8(0)], T.abs(q_perm[n, g * G + j, lanes8(v * 8)] * ap[lanes8(v * 8)]))
                vsum[lanes8(0)] = vsum[lanes8(0)] + q_perm[n, g * G + j, lanes8(v * 8)] * bp[lanes8(v * 8)]
            sigma[n, g, slot, j] = T.float32(0)
            total[n, g, slot, j] = T.float32(0)
            for lane in range(8):
                sigma[n, g, slot, j] = T.max(sigma[n, g, slot, j], vmax[lane])
                total[n, g, slot, j] = total[n, g, slot, j] + vsum[lane]
            # w8 = rint(w · 127 / max): one division a head and page, not one a channel (vdivps is slow)
            vsum[0] = T.if_then_else(
                sigma[n, g, slot, j] > T.float32(0), T.float32(127) / sigma[n, g, slot, j], T.float32(0)
            )
            sigma[n, g, slot, j] = sigma[n, g, slot, j] / T.float32(127)
            for v in range(DP // 8):
                if PAIRS:  # w8 in the packed order first, then each code at its two paired positions
                    w_std[lanes8(v * 8)] = rounded_weights(n, g, j, v, q_perm, ap, vsum)
                    w8[n, g, slot, j, lanes8(v * 8)] = T.broadcast(T.int8(0), 8)
                else:
                    w8[n, g, slot, j, lanes8(v * 8)] = rounded_weights(n, g, j, v, q_perm, ap, vsum)
            if PAIRS:
                for d, half in T.grid(D, 2):
                    w8[n, g, slot, j, paired_position(d, half)] = w_std[packed_position(d)]
            if HC > 0:
                if HP > HC:  # a partial last chunk: zero weights where its zero bytes are
                    for s in range(HP):
                        hw8[n, g, slot, j, s] = T.int8(0)
                for s, half in T.grid(HC, 2 if PAIRS else 1):
                    hw8[n, g, slot, j, high_position(s, half)] = packed_weight(n, g, slot, j, slot_of[s], w8, w_std)

    def prefetch(load):
        return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(load), T.int32(0), T.int32(3), T.int32(1))

    def prefetch_nth(i, layer, g, ahead, row):
        """Prefetch the i-th line of the 8 rows at `row` of the page the tagged entry `ahead` names (a no-op
        past the format's list)."""
        lines = keys.rows_to_prefetch(quantised, layer, T.floordiv(i64(-1) - ahead, GP), g, row)
        return prefetch(lines[i]) if i < len(lines) else T.int32(0)

    @T.macro
    def prefetch_ahead(n, c, v, layer, g, positions, seq_slot, block_table):
        """The rows of the vector PREFETCH_VECTORS ahead, when it is in a quantised page: those pages are
        scattered, which the hardware prefetcher does not follow (the score's loads waited on DRAM)."""
        if v + PREFETCH_VECTORS < CH // ROWS and c * CH + (v + PREFETCH_VECTORS) * ROWS <= T.Cast(
            "int64", positions[n]
        ):
            ahead = T.Cast("int64", block_table[seq_slot[n], (c * CH + (v + PREFETCH_VECTORS) * ROWS) // PS])
            if ahead < i64(0):
                row = T.floormod(i64(-1) - ahead, GP) * PS + T.floormod(c * CH + (v + PREFETCH_VECTORS) * ROWS, PS)
                T.evaluate(prefetch_nth(0, layer, g, ahead, row))
                T.evaluate(prefetch_nth(1, layer, g, ahead, row))
                T.evaluate(prefetch_nth(2, layer, g, ahead, row))
                T.evaluate(prefetch_nth(3, layer, g, ahead, row))
                T.evaluate(prefetch_nth(4, layer, g, ahead, row))
                T.evaluate(prefetch_nth(5, layer, g, ahead, row))
                T.evaluate(prefetch_nth(6, layer, g, ahead, row))
                T.evaluate(prefetch_nth(7, layer, g, ahead, row))
                T.evaluate(prefetch_nth(8, layer, g, ahead, row))
                T.evaluate(prefetch_nth(9, layer, g, ahead, row))

    def high_bytes(chunk8):
        """8 bytes of 2-bit fields -> 32 bytes (field k of byte j at byte 8k + j), times 4 (code bits 2..3)."""
        fields = T.shift_right(T.broadcast(chunk8, 4), T.ramp(T.uint64(0), T.uint64(2), 4))
        return T.reinterpret(
            "int8x32",
            T.shift_left(
                T.bitwise_and(fields, T.broadcast(T.uint64(0x0303030303030303), 4)), T.broadcast(T.uint64(2), 4)
            ),
        )

    def maddubs32(codes, query32):  # query32: int8 x 32, the 32 bytes of (chunk, k)
        return T.call_llvm_pure_intrin("int16x16", MADDUBS, codes, query32)

    def row_sum(per_row, j):
        """The 8 rows' int32 sums of lanes, as one int32 x 8 (row r in lane r): per_row[j, r] holds row r's
        8 partial sums. Pairwise adds of shuffled lanes (vphaddd-like), then the two 128-bit halves."""

        def hadd(a, b):
            return _shuffle(a, b, [0, 2, 8, 10, 4, 6, 12, 14]) + _shuffle(a, b, [1, 3, 9, 11, 5, 7, 13, 15])

        v = [per_row[j, r, lanes8(0)] for r in range(ROWS)]
        quads = [hadd(hadd(v[0], v[1]), hadd(v[2], v[3])), hadd(hadd(v[4], v[5]), hadd(v[6], v[7]))]
        return _shuffle(quads[0], quads[1], _LOW128) + _shuffle(quads[0], quads[1], _HIGH128)

    def pair_sum(per_row, j):
        """The 8 rows' int32 sums as one int32 x 8 (row r in lane r) from 4 pair vectors: per_row[j, p] holds
        rows 2p (even lanes) and 2p + 1 (odd lanes). Lanes c and c + 2 added, then the two 128-bit halves."""

        def fold(a, b):
            return _shuffle(a, b, [0, 1, 8, 9, 4, 5, 12, 13]) + _shuffle(a, b, [2, 3, 10, 11, 6, 7, 14, 15])

        v = [per_row[j, p, lanes8(0)] for p in range(ROWS // 2)]
        x, y = fold(v[0], v[1]), fold(v[2], v[3])
        return _shuffle(x, y, _LOW128) + _shuffle(x, y, _HIGH128)

    def pair_words(row_a, row_b):
        """Two rows' words interleaved: row a's word m at 2m, row b's at 2m + 1 (m < 4)."""
        return _shuffle(row_a, row_b, [0, 8, 1, 9, 2, 10, 3, 11])

    def query_bytes(n, g, slot, head, start, q_codes, page_w8):
        """The 32 int8 codes a row's codes meet from `start` for query head `head` of the group: the query's
        own (per-token scales) or the quantised page's weights w8 (per-channel scales)."""
        if per_token:
            return q_codes[n, g * G + head, T.ramp(start, 1, 32)]
        return page_w8[n, g, slot, head, T.ramp(start, 1, 32)]

    @T.macro
    def pair_products(n, g, layer, qpage, row, slot, ht, q_codes, page_w8, page_hw8, acc_row):
        """acc_row[j] += rows row and row + 1 (two rows a vector, `pairs_rows`): their 2-bit codes times the
        query's (or the page's weights') int8 codes in the paired order, and kitty's high bits likewise."""
        for k in T.unroll(4):
            for j in T.unroll(HT):
                acc_row[j, T.ramp(0, 1, 16)] = acc_row[j, T.ramp(0, 1, 16)] + maddubs32(
                    plane_bytes(
                        pair_words(
                            keys.low_row(quantised, layer, qpage, g, row, 0, PW),
                            keys.low_row(quantised, layer, qpage, g, row + 1, 0, PW),
                        ),
                        k,
                    ),
                    query_bytes(n, g, slot, ht * HT + j, k * 32, q_codes, page_w8),
                )
        if HB > 0:  # bytes 0..3 row's, 4..7 the next row's
            for j in T.unroll(HT):
                acc_row[j, T.ramp(0, 1, 16)] = acc_row[j, T.ramp(0, 1, 16)] + maddubs32(
                    high_bytes(
                        T.bitwise_or(
                            keys.high_row(quantised, layer, qpage, g, row, 0, HB),
                            T.shift_left(keys.high_row(quantised, layer, qpage, g, row + 1, 0, HB), T.uint64(32)),
                        )
                    ),
                    page_hw8[n, g, slot, ht * HT + j, T.ramp(0, 1, 32)],
                )

    @T.macro
    def page_weights(n, g, p, pages_wide, layer, q_perm, positions, seq_slot, block_table, w8, hw8, sigma, total):
        """The "page_weights" block (per-channel formats), slot p of token n and kv head g: the quantised page
        whose first runtime page m lies in p·G .. p·G + G - 1 (a sequence's quantised pages start G runtime
        pages apart, so at most one does) and within the token's positions gets its w8, σ and B for the
        group's heads, once (the scores' tasks read them there: such a page straddles two chunks)."""
        ap = T.alloc_buffer((DP,), "float32", scope="local")
        bp = T.alloc_buffer((DP,), "float32", scope="local")
        slot_of = T.alloc_buffer((max(HC, 1),), "int32", scope="local")
        vmax = T.alloc_buffer((8,), "float32", scope="local")
        vsum = T.alloc_buffer((8,), "float32", scope="local")
        w_std = T.alloc_buffer((DP,), "int8", scope="local")  # paired rows: w8 in the packed order
        for i in range(GP):
            if p * GP + i < pages_wide and (p * GP + i) * PS <= T.Cast("int64", positions[n]):
                entry = T.Cast("int64", block_table[seq_slot[n], p * GP + i])
                if entry < i64(0) and T.floormod(i64(-1) - entry, GP) == i64(0):
                    page_query(
                        n, g, layer, T.floordiv(i64(-1) - entry, GP), p, q_perm, w8, hw8, sigma, total, ap, bp,
                        slot_of, vmax, vsum, w_std,
                    )  # fmt: skip

    @T.macro
    def low_products(n, g, layer, qpage, row, slot, ht, chunk, words, q_codes, page_w8, acc_row):
        """acc_row[j] += the 2-bit codes of chunk `chunk` of the row (its first `words` words) times the query's
        (or the page's weights') int8 codes at the chunk's packed positions, for the heads of tile ht."""
        for k in T.unroll(4):
            for j in T.unroll(HT):
                acc_row[j, T.ramp(0, 1, 16)] = acc_row[j, T.ramp(0, 1, 16)] + maddubs32(
                    plane_bytes(keys.low_row(quantised, layer, qpage, g, row, chunk * 32, words), k),
                    query_bytes(n, g, slot, ht * HT + j, chunk * 128 + k * 32, q_codes, page_w8),
                )

    @T.macro
    def high_products(n, g, layer, qpage, row, slot, ht, hc, count, page_hw8, acc_row):
        """acc_row[j] += 4 x the high bits of the row's boosted channels 32·hc .. (its first `count` bytes)
        times the page's int8 weights of those channels, for the heads of tile ht (int2-kitty)."""
        for j in T.unroll(HT):
            acc_row[j, T.ramp(0, 1, 16)] = acc_row[j, T.ramp(0, 1, 16)] + maddubs32(
                high_bytes(keys.high_row(quantised, layer, qpage, g, row, hc, count)),
                page_hw8[n, g, slot, ht * HT + j, T.ramp(hc * 32, 1, 32)],
            )

    @T.macro
    def scores(
        n, g, c, layer, q_scaled, q_codes, q_sigma, q_total, page_w8, page_hw8, page_sigma, page_total, positions,
        seq_slot, block_table, score,
    ):  # fmt: skip
        acc32 = T.alloc_buffer((HT, ROWS), "int32", scope="local")
        accf = T.alloc_buffer((G, ROWS), "float32", scope="local")
        per_row = T.alloc_buffer((HT, ROWS, ROWS), "int32", scope="local")
        acc_row = T.alloc_buffer((HT, 16), "int16", scope="local")
        ra = T.alloc_buffer((ROWS,), "float32", scope="local")
        rb = T.alloc_buffer((ROWS,), "float32", scope="local")
        for v in range(CH // ROWS):
            if c * CH + v * ROWS <= T.Cast("int64", positions[n]):
                entry = T.Cast("int64", block_table[seq_slot[n], (c * CH + v * ROWS) // PS])
                row = T.floormod(c * CH + v * ROWS, PS)
                if entry >= i64(0):
                    for j in T.unroll(G):
                        accf[j, lanes8(0)] = T.broadcast(T.float32(0), ROWS)
                    for d in range(D):
                        for j in T.unroll(G):
                            accf[j, lanes8(0)] = accf[j, lanes8(0)] + T.broadcast(
                                q_scaled[n, g * G + j, d], ROWS
                            ) * T.Cast("float32x8", strided_load(pages, [layer, entry, 0, g, row, d], 4))
                    for j in T.unroll(G):
                        score[n, g * G + j, c, T.ramp(v * ROWS, i64(1), ROWS)] = accf[j, lanes8(0)]
                else:
                    qpage = T.floordiv(i64(-1) - entry, GP)
                    qrow = T.floormod(i64(-1) - entry, GP) * PS + row
                    if keys.rows_to_prefetch is not None:
                        prefetch_ahead(n, c, v, layer, g, positions, seq_slot, block_table)
                    slot = T.floordiv((c * CH + v * ROWS) // PS - T.floormod(i64(-1) - entry, GP), GP)
                    if per_token:
                        ra[lanes8(0)] = keys.row_affine(quantised, layer, qpage, g, qrow, 0)
                        rb[lanes8(0)] = keys.row_affine(quantised, layer, qpage, g, qrow, 1)
                    for ht in range(G // HT):
                        if PAIRS:
                            for pair in T.unroll(ROWS // 2):
                                for j in T.unroll(HT):
                                    acc_row[j, T.ramp(0, 1, 16)] = T.broadcast(T.int16(0), 16)
                                pair_products(
                                    n, g, layer, qpage, qrow + 2 * pair, slot, ht, q_codes, page_w8, page_hw8, acc_row
                                )
                                for j in T.unroll(HT):
                                    per_row[j, pair, lanes8(0)] = T.call_llvm_pure_intrin(
                                        "int32x8", MADDWD, acc_row[j, T.ramp(0, 1, 16)], ones
                                    )
                            for j in T.unroll(HT):
                                acc32[j, lanes8(0)] = pair_sum(per_row, j)
                        else:
                            for r in T.unroll(ROWS):  # a row's 32 bytes: 128 channels, 4 shifts
                                for j in T.unroll(HT):
                                    acc_row[j, T.ramp(0, 1, 16)] = T.broadcast(T.int16(0), 16)
                                for chunk in range(FC):
                                    low_products(
                                        n, g, layer, qpage, qrow + r, slot, ht, chunk, 8, q_codes, page_w8, acc_row
                                    )
                                if PW > 0:  # a partial last chunk: its words, then zeros
                                    low_products(
                                        n, g, layer, qpage, qrow + r, slot, ht, FC, PW, q_codes, page_w8, acc_row
                                    )
                                if HW > 0:  # kitty: the high bits of the boosted channels, into the same sums
                                    for hc in range(HW):
                                        high_products(n, g, layer, qpage, qrow + r, slot, ht, hc, 8, page_hw8, acc_row)
                                if HB > 0:
                                    high_products(n, g, layer, qpage, qrow + r, slot, ht, HW, HB, page_hw8, acc_row)
                                for j in T.unroll(HT):
                                    per_row[j, r, lanes8(0)] = T.call_llvm_pure_intrin(
                                        "int32x8", MADDWD, acc_row[j, T.ramp(0, 1, 16)], ones
                                    )
                            for j in T.unroll(HT):
                                acc32[j, lanes8(0)] = row_sum(per_row, j)
                        for j in T.unroll(HT):
                            if per_token:
                                score[n, g * G + ht * HT + j, c, T.ramp(v * ROWS, i64(1), ROWS)] = T.Cast(
                                    "float32x8", acc32[j, lanes8(0)]
                                ) * (ra[lanes8(0)] * T.broadcast(q_sigma[n, g * G + ht * HT + j], ROWS)) + rb[
                                    lanes8(0)
                                ] * T.broadcast(q_total[n, g * G + ht * HT + j], ROWS)
                            else:
                                score[n, g * G + ht * HT + j, c, T.ramp(v * ROWS, i64(1), ROWS)] = T.Cast(
                                    "float32x8", acc32[j, lanes8(0)]
                                ) * T.broadcast(page_sigma[n, g, slot, ht * HT + j], ROWS) + T.broadcast(
                                    page_total[n, g, slot, ht * HT + j], ROWS
                                )

    return scores, (None if per_token else page_weights)
