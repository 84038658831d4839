"""Page tables of the KV cache: which pages of the pool each live sequence owns (pure bookkeeping).

The pool itself is the KV-cache format's tensors (e.g. kv_pages[L, P, 2, KVH, PS, D]), held by
`DecoderModel` (layouts: `schedules/kv_attention.py`, `compiler/formats/kv_*.py`). This class decides
which of the P pages hold which tokens:

    sequence 7: length 37, pages [4, 9, 2]      page_size 16
        positions  0..15 -> page 4, rows 0..15
        positions 16..31 -> page 9, rows 0..15
        positions 32..36 -> page 2, rows 0..4     (rows 5..15 are free space of this sequence)

`block_table(seq_ids)` turns that into the [B, M] int32 array the compiled functions read. Pages are
handed out lowest id first, so a run is reproducible. Allocation is all-or-nothing: when the pool
cannot hold a request, `OutOfKVPagesError` is raised and no table changes, so no other sequence's
pages are ever touched.

A page-granular KV format adds a second pool of quantised pages, each holding G runtime pages
(`runtime/page_quantisation.py` says when). `quantise_group` swaps G consecutive full-precision pages of
a sequence for one quantised page q; their table entries become -1 - (q·G + sub), sub = 0..G-1, the tag
the attention reads (`compiler/formats/kv_page_quantised.py`); the fp pages return to their pool once
the caller has run the quantise kernel (`free_full_precision`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from tensorpress.errors import TensorpressError


class OutOfKVPagesError(TensorpressError):
    """The KV page pool has too few free pages for a request."""


@dataclass
class _Sequence:
    length: int = 0  # tokens whose K/V are (or are about to be) stored
    pages: list[int] = field(default_factory=list)


def pages_for(tokens: int, page_size: int) -> int:
    """Number of pages that hold `tokens` tokens."""
    return -(-tokens // page_size)


class PagedKVCache:
    """Page tables of live sequences over a pool of `num_pages` pages of `page_size` tokens."""

    def __init__(self, num_pages: int, page_size: int, num_quantised_pages: int = 0, group_pages: int = 1):
        if num_pages < 1 or page_size < 1 or group_pages < 1:
            raise ValueError("num_pages, page_size and group_pages must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_quantised_pages = num_quantised_pages
        self.group_pages = group_pages
        self._free = list(range(num_pages))  # a min-heap: lowest page id first
        self._free_quantised = list(range(num_quantised_pages))
        self._sequences: dict[int, _Sequence] = {}
        self._next_id = 0

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_free_quantised_pages(self) -> int:
        return len(self._free_quantised)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the pools hold (a quantised page holds G pages' worth)."""
        return (self.num_pages + self.num_quantised_pages * self.group_pages) * self.page_size

    def held(self, seq_id: int) -> tuple[int, int]:
        """(full-precision, quantised) pages a sequence holds."""
        pages = self._sequences[seq_id].pages
        quantised = sum(1 for p in pages if p < 0)
        return len(pages) - quantised, quantised // self.group_pages

    def quantise_group(self, seq_id: int, first: int) -> tuple[list[int], int]:
        """Give the G full-precision pages at table entries first.. of a sequence one quantised page q,
        retag their entries; returns (the fp pages, q). The fp pages stay taken until `free_full_precision`."""
        seq = self._sequences[seq_id]
        group = seq.pages[first : first + self.group_pages]
        if len(group) < self.group_pages or min(group) < 0:
            raise ValueError(f"sequence {seq_id} has no {self.group_pages} full-precision pages at entry {first}")
        if not self._free_quantised:
            raise OutOfKVPagesError(
                f"the quantised KV pool is full: sequence {seq_id} needs a quantised page but all "
                f"{self.num_quantised_pages} are taken; raise --max-total-tokens."
            )
        q = heapq.heappop(self._free_quantised)
        seq.pages[first : first + self.group_pages] = [-1 - (q * self.group_pages + sub) for sub in range(len(group))]
        return group, q

    def free_full_precision(self, pages: list[int]) -> None:
        """Return full-precision pages (quantised away by `quantise_group`) to their pool."""
        for page in pages:
            heapq.heappush(self._free, page)

    def add_sequence(self) -> int:
        """Register an empty sequence; returns its id."""
        seq_id = self._next_id
        self._next_id += 1
        self._sequences[seq_id] = _Sequence()
        return seq_id

    def length(self, seq_id: int) -> int:
        return self._sequences[seq_id].length

    def pages(self, seq_id: int) -> list[int]:
        return list(self._sequences[seq_id].pages)

    def extend(self, seq_id: int, new_length: int) -> None:
        """Grow a sequence to `new_length` tokens, taking pages as needed (all or nothing)."""
        seq = self._sequences[seq_id]
        if new_length < seq.length:
            raise ValueError(f"sequence {seq_id} cannot shrink from {seq.length} to {new_length} tokens")
        missing = pages_for(new_length, self.page_size) - len(seq.pages)
        if missing > len(self._free):
            raise OutOfKVPagesError(
                f"the KV cache is full: sequence {seq_id} needs {missing} more page(s) of {self.page_size} "
                f"tokens but {len(self._free)} of {self.num_pages} are free; raise --max-total-tokens."
            )
        for _ in range(missing):
            seq.pages.append(heapq.heappop(self._free))
        seq.length = new_length

    def release(self, seq_id: int) -> None:
        """Forget a sequence and return its pages to the pool."""
        for page in self._sequences.pop(seq_id).pages:
            if page >= 0:
                heapq.heappush(self._free, page)
            elif (-1 - page) % self.group_pages == 0:  # a quantised page, once (its first entry)
                heapq.heappush(self._free_quantised, (-1 - page) // self.group_pages)

    def block_table(self, seq_ids: list[int]) -> np.ndarray:
        """[len(seq_ids), max pages] int32 page ids, row i for seq_ids[i]; unused entries are 0."""
        rows = [self._sequences[s].pages for s in seq_ids]
        table = np.zeros((len(rows), max((len(r) for r in rows), default=0) or 1), dtype=np.int32)
        for i, row in enumerate(rows):
            table[i, : len(row)] = row
        return table
