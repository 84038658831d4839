"""When a page-granular KV cache quantises pages, and how big its two pools are (pure arithmetic).

A page-granular KV format (`compiler/formats/kv_page_quantised.py`) keeps each sequence's first
`sink` tokens and its last `window` tokens in full-precision pages of PS tokens and quantises the rest
G pages at a time into one quantised page. The manifest's "page_quantisation" says sink, window and G;
the runtime never knows the format. A group is due once all its tokens lie before the window:

    PS = 16, sink 32 (2 pages), window 128, G = 8; a sequence of 300 tokens:
        pages 0-1    sink, full precision
        pages 2-9    group 0 (tokens 32..159): due, 159 < 300 - 128
        pages 10-17  group 1 (tokens 160..287): waits until the length reaches 416
        page 18      being filled

So a sequence holds at most `steady_pages` = sink pages + window pages + G + 1 full-precision pages
(the +1: a decode step takes its new page before the step's quantisation frees a group), plus, while
its prompt is prefilled, the pages of one prefill slice: prefill attends in full precision, so a slice
is in fp pages until the call returns and its due groups are quantised. A prompt longer than
PREFILL_SLICE_TOKENS (or the runtime's max_prefill_tokens) is prefilled in slices; each later slice
reads the 2-bit pages of the earlier ones, as a second turn of a conversation would.

Pools: `max_total_tokens` T sizes the quantised pool for T tokens and the full-precision pool for
min(T, FULL_PRECISION_SEQUENCES sequences at their steady count); `memory_fraction` gives the bytes,
and T is the most tokens whose two pools fit in them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tensorpress.runtime.paged_kv_cache import pages_for

FULL_PRECISION_SEQUENCES = 8  # sequences whose sink + window the full-precision pool holds at once
PREFILL_SLICE_TOKENS = 512  # a longer prompt is prefilled in slices, its old pages quantised between them


@dataclass(frozen=True)
class PageQuantisationPolicy:
    """sink and window in runtime pages, G pages per quantised page (module docstring)."""

    page_size: int
    sink_tokens: int
    window_tokens: int
    group_pages: int

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> PageQuantisationPolicy | None:
        """The policy of a decoder section, or None for a per-row cache (no "page_quantisation")."""
        spec = section.get("page_quantisation")
        if spec is None:
            return None
        return cls(
            int(section["page_size"]), int(spec["sink_tokens"]), int(spec["window_tokens"]), int(spec["group_pages"])
        )

    @property
    def sink_pages(self) -> int:
        return pages_for(self.sink_tokens, self.page_size)

    @property
    def steady_pages(self) -> int:
        """Most full-precision pages a sequence holds between steps (module docstring)."""
        return self.sink_pages + pages_for(self.window_tokens, self.page_size) + self.group_pages + 1

    def groups_due(self, length: int) -> int:
        """Groups of a sequence of `length` tokens whose pages all lie past the sink, before the window."""
        before_window = max(0, length - self.window_tokens) // self.page_size  # whole pages before it
        return max(0, before_window - self.sink_pages) // self.group_pages

    def first_page_of_group(self, group: int) -> int:
        """Block-table index of the first page of a sequence's group `group`."""
        return self.sink_pages + group * self.group_pages

    def reservation(self, prompt_tokens: int, final_tokens: int, slice_tokens: int | None = None) -> tuple[int, int]:
        """(full-precision, quantised) pages a sequence needs at most, from prefill (in slices of
        `slice_tokens`: between them the due groups are quantised) to its last token."""
        pages = pages_for(final_tokens, self.page_size)
        prefill = pages_for(min(prompt_tokens, slice_tokens or prompt_tokens), self.page_size)
        return min(pages, prefill + self.steady_pages), self.groups_due(final_tokens)

    def pool_pages(self, tokens: int) -> tuple[int, int]:
        """(full-precision, quantised) pool pages for `tokens` tokens (module docstring)."""
        full = min(pages_for(tokens, self.page_size), FULL_PRECISION_SEQUENCES * self.steady_pages)
        return max(full, 1), max(pages_for(tokens, self.page_size * self.group_pages), 1)

    def tokens_in(self, budget: int, full_page_bytes: int, quantised_page_bytes: int) -> int:
        """The most tokens (whole quantised pages) whose two pools fit `budget` bytes (at least one page)."""
        quantised_tokens = self.page_size * self.group_pages
        per_token = full_page_bytes / self.page_size + quantised_page_bytes / quantised_tokens
        tokens = int(budget // per_token)
        cap = FULL_PRECISION_SEQUENCES * self.steady_pages
        if pages_for(tokens, self.page_size) > cap:  # the fp pool stops growing: the rest is 2-bit
            tokens = int((budget - cap * full_page_bytes) // quantised_page_bytes) * quantised_tokens
        return max(tokens // quantised_tokens * quantised_tokens, quantised_tokens)
