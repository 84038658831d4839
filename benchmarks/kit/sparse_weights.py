"""Pruned weights for the kit's bitmap kernels: a random mask, the numpy packer, the kernels' buffers.

    packer = BandPacker(workers=16)                       # processes: the packer is numpy, one core each
    weight = make_sparse_weight(8192, 28672, 0.8, torch.device("cuda"), packer)
    kit.run(case, x, weight.stored)                       # bits, offsets, values (padded to the capacity)
    torch.matmul(x, weight.dense.t())                     # cuBLAS on the very same pruned fp16 W

The mask keeps exactly `kept_per_row(K, sparsity)` weights of each row (torch, on the device): drawn
uniformly, or Wanda's choice over drawn input-channel norms (`wanda_channel_norms`); kept values are
random fp16 around 1/sqrt(K), none zero (a zero would not be stored).
Packing is `tensorpress.compiler.formats.bitmap`'s numpy packer, run on bands of whole 16-row tile rows
in parallel and joined (`join_bands`: each band's offsets shifted by the nonzeros before it); the join
equals packing the whole weight at once (tests/benchmarks/test_sparse_weights.py). Tiled-CSL's packer
joins the same way (`BandPacker.pack_tiled_csl`: each band's offsets shifted by the words before it);
`make_tiled_csl_weight` packs the very pruned W of a bitmap weight for the kit's tiled-csl kernels.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

BAND_ROWS = 1024  # rows per packing task (a multiple of the bitmap tile's 16 rows)


@dataclass
class SparseWeight:
    """W [M, K] pruned: a sparse kernel's buffers (`stored`, torch), the W they hold (`dense`), the bytes
    the packed weight really holds (without the kit's padding) and how long making it took."""

    stored: list[Any]
    dense: Any
    stored_bytes: int
    nonzeros: int
    seconds: dict[str, float]


def _pack_band(band: np.ndarray) -> dict[str, np.ndarray]:
    from tensorpress.compiler.formats import get_weight_format

    packed = get_weight_format("bitmap").pack(band)
    # the packer stores every nonzero fp16 bit pattern (-0.0 included): that many values are real
    nnz = np.count_nonzero(band.astype(np.float16).view(np.uint16))
    return {**packed.arrays, "nnz": np.array(nnz)}


def join_bands(parts: list[dict[str, np.ndarray]], capacity: int | None = None) -> dict[str, np.ndarray]:
    """The bitmap arrays of a weight from those of its row bands (each a whole number of tile rows),
    in order; "values" padded with zeros to `capacity` (default: the packer's own length)."""
    from tensorpress.compiler.formats.bitmap import VALUES_MULTIPLE, VALUES_SPARE

    total = sum(int(p["nnz"]) for p in parts)
    size = -(-(total + VALUES_SPARE) // VALUES_MULTIPLE) * VALUES_MULTIPLE if capacity is None else capacity
    if size < total + VALUES_SPARE:
        raise ValueError(f"{total} nonzeros do not fit a values buffer of {size}")
    values = np.zeros(size, np.float16)
    offsets, start = [], 0
    for p in parts:
        nnz = int(p["nnz"])
        offsets.append(p["offsets"] + np.int32(start))
        values[start : start + nnz] = p["values"][:nnz]
        start += nnz
    bits = np.concatenate([p["bits"] for p in parts])
    return {"bits": bits, "offsets": np.concatenate(offsets).astype(np.int32), "values": values}


def _pack_fpx_band(band: np.ndarray) -> dict[str, np.ndarray]:
    """A band's sparse x FPx arrays before the stream is packed, and its exact float32 W."""
    from benchmarks.kit.cases import SPARSE_FPX_FORMAT
    from tensorpress.compiler.formats import fpx_codes, get_weight_format
    from tensorpress.compiler.formats.bitmap_fpx import tile_codes

    fpx = get_weight_format(SPARSE_FPX_FORMAT).fpx  # type: ignore[attr-defined]
    codes, scales = fpx.encode(band.astype(np.float32))
    bits, offsets, nonzeros = tile_codes(codes)
    exact = fpx_codes.decode(codes, scales, fpx.ebits, fpx.mbits)
    return {"bits": bits, "offsets": offsets, "nonzeros": nonzeros, "scales": scales, "exact": exact}


def join_fpx_bands(parts: list[dict[str, np.ndarray]], capacity: int | None = None) -> dict[str, np.ndarray]:
    """The bitmap-e3m2 arrays of a weight from those of its row bands (whole tile rows), in order, the
    code stream padded with zero codes to `capacity` codes (default: the packer's own length); plus
    "exact", the float32 W they decode to."""
    from benchmarks.kit.cases import SPARSE_FPX_FORMAT
    from tensorpress.compiler.formats import code_stream, get_weight_format
    from tensorpress.compiler.formats.bitmap_fpx import stream_length

    nonzeros = np.concatenate([p["nonzeros"] for p in parts])
    starts = np.cumsum([0] + [p["nonzeros"].size for p in parts[:-1]])
    offsets = np.concatenate([p["offsets"] + np.int32(start) for p, start in zip(parts, starts)]).astype(np.int32)
    bits, scales = np.concatenate([p["bits"] for p in parts]), np.concatenate([p["scales"] for p in parts])
    exact = np.concatenate([p["exact"] for p in parts])
    fmt = get_weight_format(SPARSE_FPX_FORMAT)
    arrays = dict(fmt.pack_stream(exact.shape, bits, offsets, nonzeros, scales).arrays)  # type: ignore[attr-defined]
    if capacity is not None:  # more zero codes: the stream grows by whole zero words
        if capacity < stream_length(nonzeros.size) or capacity % code_stream.WORD_BITS:
            raise ValueError(
                f"{nonzeros.size} nonzero codes do not fit a stream of {capacity} codes: it needs at least "
                f"{stream_length(nonzeros.size)} (the spare codes included), in whole words of 32"
            )
        grown = np.zeros(code_stream.stream_shape(capacity, fmt.code_bits()), np.uint32)
        grown[:, : arrays[code_stream.NAME].shape[1]] = arrays[code_stream.NAME]
        arrays[code_stream.NAME] = grown
    return {**arrays, "exact": exact}


def _pack_tiled_csl_band(band: np.ndarray) -> dict[str, np.ndarray]:
    from tensorpress.compiler.formats.tiled_csl import pack_tiled_csl

    return pack_tiled_csl(band)


def join_tiled_csl_bands(parts: list[dict[str, np.ndarray]], capacity: int | None = None) -> dict[str, np.ndarray]:
    """The tiled-csl arrays of a weight from those of its row bands (whole 16-row tile rows), in order:
    each band's offsets rows shifted by the words before it; "words" padded with zero words (no tile
    names them) to `capacity` (default: the packer's own length)."""
    starts = np.cumsum([0] + [p["words"].size for p in parts[:-1]])
    total = int(sum(p["words"].size for p in parts))
    size = total if capacity is None else capacity
    if size < total:
        raise ValueError(f"{total} tiled-csl words do not fit a words buffer of {size}")
    words = np.zeros(size, np.uint32)
    words[:total] = np.concatenate([p["words"] for p in parts])
    offsets = np.concatenate([p["offsets"] + np.int32(start) for p, start in zip(parts, starts)]).astype(np.int32)
    return {"words": words, "offsets": offsets}


class BandPacker:
    """Packs with the numpy bitmap packer, bands of BAND_ROWS rows in `workers` processes (spawned:
    the parent holds a CUDA context); workers=0 packs in this process."""

    def __init__(self, workers: int):
        import multiprocessing

        self.pool = (
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 0 else None
        )

    def pack(self, w: np.ndarray, capacity: int | None = None) -> dict[str, np.ndarray]:
        bands = [w[r : r + BAND_ROWS] for r in range(0, w.shape[0], BAND_ROWS)]
        parts = list(self.pool.map(_pack_band, bands)) if self.pool else [_pack_band(b) for b in bands]
        return join_bands(parts, capacity)

    def pack_fpx(self, w: np.ndarray, capacity: int | None = None) -> dict[str, np.ndarray]:
        """`join_fpx_bands` of the bands of `w`, packed in the workers."""
        bands = [w[r : r + BAND_ROWS] for r in range(0, w.shape[0], BAND_ROWS)]
        parts = list(self.pool.map(_pack_fpx_band, bands)) if self.pool else [_pack_fpx_band(b) for b in bands]
        return join_fpx_bands(parts, capacity)

    def pack_tiled_csl(self, w: np.ndarray, capacity: int | None = None) -> dict[str, np.ndarray]:
        """`join_tiled_csl_bands` of the bands of `w`, packed in the workers."""
        bands = [w[r : r + BAND_ROWS] for r in range(0, w.shape[0], BAND_ROWS)]
        parts = (
            list(self.pool.map(_pack_tiled_csl_band, bands)) if self.pool else [_pack_tiled_csl_band(b) for b in bands]
        )
        return join_tiled_csl_bands(parts, capacity)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()


def random_pruned(m: int, k: int, sparsity: float, device, seed: int, mask: str = "random"):
    """fp16 W [m, k] on `device`: random values around 1/sqrt(K) (none zero), each row keeping exactly
    kept_per_row(k, sparsity) of them: at random positions (mask "random"), or the largest
    |w_ij| * ||X_j|| over drawn input-channel norms (mask "wanda": `wanda_channel_norms`)."""
    import torch

    from benchmarks.kit.cases import kept_per_row

    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(m, k, generator=g, device=device) / k**0.5).to(torch.float16)
    w = torch.where(w == 0, torch.tensor(2.0**-14, dtype=torch.float16, device=device), w)
    if mask == "wanda":
        score = w.float().abs() * wanda_channel_norms(k, seed, device)
    elif mask == "random":
        score = torch.rand(m, k, generator=g, device=device)
    else:
        raise ValueError(f"unknown mask {mask!r}: random or wanda")
    keep = score.topk(kept_per_row(k, sparsity), dim=1).indices
    kept = torch.zeros(m, k, dtype=torch.bool, device=device).scatter_(1, keep, True)
    return torch.where(kept, w, torch.zeros((), dtype=torch.float16, device=device))


def wanda_channel_norms(k: int, seed: int, device):
    """Drawn input-channel norms ||X_j|| [k] standing in for a real model's calibration activations (the
    kit carries none): log-normal, with a few outlier channels many times larger (cases.WANDA_*), so that
    Wanda keeps the outlier columns in every row and the other columns' density varies, as it does in a
    Wanda-pruned LLM; the kernels then see uneven tiles, where random masks give even ones."""
    import torch

    from benchmarks.kit.cases import WANDA_NORM_SIGMA, WANDA_OUTLIER_FACTOR, WANDA_OUTLIER_FRACTION

    g = torch.Generator().manual_seed(seed + 1)
    norms = torch.exp(WANDA_NORM_SIGMA * torch.randn(k, generator=g))
    outliers = torch.randperm(k, generator=g)[: max(1, round(k * WANDA_OUTLIER_FRACTION))]
    norms[outliers] *= WANDA_OUTLIER_FACTOR
    return norms.to(device)


def make_sparse_weight(
    m: int, k: int, sparsity: float, device, packer: BandPacker, capacity: int, seed: int = 0, mask: str = "random"
) -> SparseWeight:
    import torch

    start = time.perf_counter()
    dense = random_pruned(m, k, sparsity, device, seed, mask)
    host = dense.cpu().numpy()
    masked = time.perf_counter()
    arrays = packer.pack(host, capacity)
    packed = time.perf_counter()
    nnz = int(np.count_nonzero(host.view(np.uint16)))
    stored = [torch.from_numpy(arrays[name]).to(device) for name in ("bits", "offsets", "values")]
    from tensorpress.compiler.formats.bitmap import VALUES_MULTIPLE, VALUES_SPARE

    real_values = -(-(nnz + VALUES_SPARE) // VALUES_MULTIPLE) * VALUES_MULTIPLE  # the packer's own (no kit padding)
    nbytes = arrays["bits"].nbytes + arrays["offsets"].nbytes + 2 * real_values
    seconds = {"mask": masked - start, "pack": packed - masked, "upload": time.perf_counter() - packed}
    return SparseWeight(stored, dense, int(nbytes), nnz, seconds)


def make_sparse_fpx_weight(dense, packer: BandPacker, capacity: int) -> SparseWeight:
    """The sparse x FPx (bitmap-e3m2) weight of a pruned fp16 W on its device (`random_pruned`): the
    kernels' buffers, `dense` = the exact W they decode to (float32), the bytes the packer alone stores."""
    import torch

    from benchmarks.kit.cases import SPARSE_FPX_FORMAT
    from tensorpress.compiler.formats import code_stream, get_weight_format
    from tensorpress.compiler.formats.bitmap_fpx import stream_length

    start = time.perf_counter()
    host = dense.cpu().numpy()
    arrays = packer.pack_fpx(host, capacity)
    packed = time.perf_counter()
    nnz = int(np.unpackbits(arrays["bits"].view(np.uint8)).sum())
    fmt = get_weight_format(SPARSE_FPX_FORMAT)
    names = ["bits", "offsets", code_stream.NAME, "scales"]
    stored = [torch.from_numpy(np.ascontiguousarray(arrays[name])).to(dense.device) for name in names]
    exact = torch.from_numpy(arrays["exact"]).to(dense.device)
    stream_bytes = stream_length(nnz) * fmt.code_bits() // 8
    nbytes = arrays["bits"].nbytes + arrays["offsets"].nbytes + arrays["scales"].nbytes + stream_bytes
    seconds = {"pack": packed - start, "upload": time.perf_counter() - packed}
    return SparseWeight(stored, exact, int(nbytes), nnz, seconds)


def make_tiled_csl_weight(dense, packer: BandPacker, capacity: int) -> SparseWeight:
    """The tiled-csl weight of a pruned fp16 W on its device (`random_pruned`): the kernels' buffers
    (words padded to `capacity`, offsets), `dense` = W itself, the bytes the packer alone stores."""
    import torch

    start = time.perf_counter()
    host = dense.cpu().numpy()
    arrays = packer.pack_tiled_csl(host, capacity)
    packed = time.perf_counter()
    nnz = int(np.count_nonzero(host.view(np.uint16)))
    stored = [torch.from_numpy(arrays[name]).to(dense.device) for name in ("words", "offsets")]
    real_words = int(arrays["offsets"][-1, -1])  # what the packer alone stores (no kit padding)
    nbytes = 4 * real_words + arrays["offsets"].nbytes
    seconds = {"pack": packed - start, "upload": time.perf_counter() - packed}
    return SparseWeight(stored, dense, nbytes, nnz, seconds)
