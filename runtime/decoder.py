"""Text generation with a compiled decoder: the runtime owns the paged KV cache and the batch.

    model = tensorpress.runtime.load("llm.tpk", device="cpu")          # -> DecoderModel
    model.generate([1, 2, 3], max_new_tokens=32)                       # -> [new token ids]
    model.generate(["Hello", [5, 6]], max_new_tokens=8, temperature=0.7, top_p=0.9, seed=1)
    for seq, token in model.generate_stream("Hello", max_new_tokens=8): ...
    with model.conversation() as chat: chat.send("Hi"); chat.send("And then?")   # multi-turn, one cache

One call to `generate` runs a small continuous-batching loop: prompts of any lengths are admitted
while the page pool can hold them, prefilled together (ragged, one `prefill` call), then decoded
together one token per step (one `decode` call per step). A finished sequence gives its pages back at
once and waiting prompts take them. A prompt is only admitted when the pool can hold it through its
last token (prompt + max_new_tokens - 1 cached tokens), so a running sequence never runs out of
pages mid-way; a prompt that could not fit even in an empty pool raises `OutOfKVPagesError`.

A prompt whose tokens plus max_new_tokens exceed the model's context length (manifest
`context_length`: config.json's max_position_embeddings, extended by RoPE scaling) is refused unless
the caller passes allow_beyond_context=True; a model with a learned position table (OPT) cannot go
past its table at all.

Threads: one DecoderModel may be shared by threads. Each thread's compiled calls run on its own VM
state (see `loaded_artifact`) and in parallel; the page pool's bookkeeping is guarded by one lock, so
sequences of different threads never share a page. A thread whose prompt does not fit while other
threads' sequences hold the pages waits for them. `last_stats` is per thread.

Greedy decoding (temperature 0) is deterministic. Sampling draws from a generator seeded with
(seed, prompt index), so a prompt's tokens do not depend on what else is in the batch.

Imports only numpy and tensorpress' runtime-side modules: it runs in a runtime-only bundle.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import numpy as np

from tensorpress.errors import InputError
from tensorpress.runtime import cpu_threads
from tensorpress.runtime.conversation import Conversation
from tensorpress.runtime.generation_options import GenerationOptions, check_generation_options, check_prompt_ids
from tensorpress.runtime.kv_pool import (
    DEFAULT_MAX_TOTAL_TOKENS,
    NUM_PAGES,
    NUM_QUANTISED_PAGES,
    allocate_pool,
    cache_tensors_of,
    pool_page_counts,
)
from tensorpress.runtime.page_quantisation import PREFILL_SLICE_TOKENS, PageQuantisationPolicy
from tensorpress.runtime.paged_kv_cache import OutOfKVPagesError, PagedKVCache, pages_for
from tensorpress.runtime.sampling import sample_token

__all__ = ["DEFAULT_MAX_PREFILL_TOKENS", "DEFAULT_MAX_TOTAL_TOKENS", "DecoderModel", "GeneratedToken", "sample_token"]
# The paged-attention workspace of one prefill call grows with its tokens (tokens x heads x chunks x
# head_dim fp32: 17 GB for 16 x 2048 tokens at Llama-7B's shape); slicing prefills bounds it.
DEFAULT_MAX_PREFILL_TOKENS = 4096
_KDL_CPU = 1
_ATTR_AVAILABLE_MEMORY = 15  # TVM DeviceAttrKind kAvailableGlobalMemory

Prompt = str | Sequence[int] | np.ndarray


class DecoderArtifact(Protocol):
    """What DecoderModel needs from a loaded artifact (`runtime.loaded_artifact.LoadedArtifact`).

    Optional, used when present: `function_params(name)` (weights of one function, else `params`),
    `empty(shape, dtype)`, `read_file(name) -> bytes` (files packed beside the weights, e.g. the
    tokenizer), `free_memory_bytes()`.
    """

    vm: Any  # vm["prefill"](*args) runs a compiled function
    params: list[Any]  # device tensors, in the functions' trailing-parameter order
    manifest: dict[str, Any]  # our section: manifest["decoder"] or manifest["info"]["decoder"]
    device: Any  # a tvm-ffi Device

    def to_device(self, array: np.ndarray) -> Any: ...
    def to_numpy(self, tensor: Any) -> np.ndarray: ...


class GeneratedToken(NamedTuple):
    """One token of a streamed generation: which prompt (index in the call) and the token id."""

    sequence: int
    token: int


@dataclass
class GenerationStats:
    """Timings of the last generate call (seconds; tokens counted over all sequences)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0  # tokens produced by decode steps (the first token of each comes from prefill)
    generated_tokens: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class _Request:
    index: int
    prompt: list[int]
    max_new_tokens: int
    rng: np.random.Generator | None
    reserved_pages: int  # (full-precision) pages this request may hold at its longest
    reserved_quantised: int = 0  # quantised pages it may hold (page-granular KV formats)
    thread: int = field(default_factory=threading.get_ident)  # the thread generating it
    seq_id: int = -1  # preset when the request continues a conversation's sequence
    output: list[int] = field(default_factory=list)
    done: bool = False
    cached: int = 0  # tokens of its sequence already in the cache (a conversation's earlier turns)
    keep: bool = False  # its pages outlive it (a conversation's turn): finishing does not release them


class DecoderModel:
    """A compiled decoder on a device, with its KV page pool and (optionally) its tokenizer."""

    def __init__(
        self,
        artifact: DecoderArtifact,
        max_total_tokens: int | None = None,
        memory_fraction: float | None = None,
        tokenizer: Any = None,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    ):
        """max_total_tokens: KV tokens the pool holds over all live sequences (default 4096); or
        memory_fraction: the pool takes that share of the device's free memory (host RAM on the CPU).
        tokenizer: a `tokenizers.Tokenizer` to use instead of the one packed with the model.
        max_prefill_tokens: admitted prompts are prefilled in calls of at most this many tokens (whole
        prompts; a longer prompt goes alone), which bounds the attention kernels' workspace."""
        if max_prefill_tokens < 1:
            raise InputError(f"max_prefill_tokens must be at least 1, got {max_prefill_tokens}.")
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.artifact = artifact
        self._on_cpu = artifact.device.dlpack_device_type() == _KDL_CPU
        manifest = artifact.manifest
        section = manifest["decoder"] if "decoder" in manifest else manifest["info"]["decoder"]
        self.section = section
        self.config: dict[str, Any] = section["config"]
        self.page_size = int(section["page_size"])
        self.eos_token_ids = [int(t) for t in section.get("eos_token_ids") or []]
        self.max_sequence_length = section.get("max_sequence_length")  # a learned position table's end
        # Artifacts compiled before `context_length` was recorded: config.json's positions.
        context = section.get("context_length", self.config.get("max_position_embeddings"))
        self.context_length: int | None = None if context is None else int(context)
        self._prefill = self._function(section["functions"]["prefill"])
        self._decode = self._function(section["functions"]["decode"])
        self.cache_tensors = cache_tensors_of(section)
        counts = pool_page_counts(section, max_total_tokens, memory_fraction, self._free_memory_bytes)
        # the KV cache: exactly the tensors the manifest lists, in the compiled functions' order
        self.kv_cache = allocate_pool(section, counts, self._empty, self._free_memory_bytes())
        self.kv_pages = self.kv_cache[0]  # the first (for the unquantised cache, the only) cache tensor
        # page-granular KV formats: pages leave full precision when they leave the window (page_quantisation.py)
        self._policy = PageQuantisationPolicy.from_section(section)
        group = self._policy.group_pages if self._policy else 1
        self.cache = PagedKVCache(counts[NUM_PAGES], self.page_size, counts.get(NUM_QUANTISED_PAGES, 0), group)
        self._quantize = self._function(section["functions"]["quantize_pages"]) if self._policy else None
        self._live: dict[int, _Request] = {}  # sequences holding pages, by cache sequence id
        # Guards self.cache and self._live (all threads); notified whenever pages are given back.
        self._pages_changed = threading.Condition(threading.RLock())
        self._per_thread = threading.local()
        self._tokenizer = tokenizer
        self._tokenizer_looked_up = tokenizer is not None
        self._tokenizer_needs_package = False

    @property
    def last_stats(self) -> GenerationStats:
        """Timings of the calling thread's last generate call."""
        stats = getattr(self._per_thread, "stats", None)
        return stats if stats is not None else GenerationStats()

    @last_stats.setter
    def last_stats(self, stats: GenerationStats) -> None:
        self._per_thread.stats = stats

    # ------------------------------------------------------------------ setup

    def _function(self, name: str) -> tuple[str, list[Any]]:
        """A compiled function's name and the device weights it takes after its inputs."""
        if hasattr(self.artifact, "function_params"):
            params = self.artifact.function_params(name)
        else:
            params = list(self.artifact.params)
        return name, params

    def _compiled(self, name: str) -> Any:
        """The calling thread's handle to a compiled function (a VM is not shared between threads)."""
        if hasattr(self.artifact, "function"):
            return self.artifact.function(name)
        return self.artifact.vm[name]

    def _empty(self, shape: list[int], dtype: str) -> Any:
        if hasattr(self.artifact, "empty"):
            return self.artifact.empty(shape, dtype)
        from tensorpress.runtime import tvm_runtime

        return tvm_runtime.empty(shape, dtype, self.artifact.device)

    def _free_memory_bytes(self) -> int:
        if hasattr(self.artifact, "free_memory_bytes"):
            return int(self.artifact.free_memory_bytes())
        device = self.artifact.device
        if device.dlpack_device_type() == _KDL_CPU:
            from tensorpress.runtime import tvm_runtime

            return tvm_runtime.host_available_memory_bytes()
        from tensorpress.runtime import tvm_runtime

        get_attr = tvm_runtime.get_global_func("runtime.GetDeviceAttr")
        return int(get_attr(device.dlpack_device_type(), device.index, _ATTR_AVAILABLE_MEMORY))

    def _read_file(self, name: str) -> bytes | None:
        """A file packed with the model (e.g. tokenizer.json), or None when it is not there."""
        if hasattr(self.artifact, "read_file"):
            try:
                return self.artifact.read_file(name)
            except (KeyError, FileNotFoundError):
                return None
        # Artifacts that do not pack extra files yet: the path recorded at compile time, if still there.
        info = self.artifact.manifest.get("info", {})
        path = info.get("extra_files", {}).get(name)
        return Path(path).read_bytes() if path and Path(path).is_file() else None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (a `tokenizers.Tokenizer`), or None when it has none or the optional
        `tokenizers` package is not installed."""
        if not self._tokenizer_looked_up:
            self._tokenizer_looked_up = True
            name = self.section.get("tokenizer")
            data = self._read_file(name) if name else None
            if data is not None:
                try:
                    from tokenizers import Tokenizer
                except ImportError:
                    self._tokenizer_needs_package = True
                else:
                    self._tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            if self._tokenizer_needs_package:
                raise InputError(
                    "text prompts need the `tokenizers` package (pip install tokenizers); or pass token ids."
                )
            raise InputError("this model has no tokenizer (no tokenizer.json in its folder); pass token ids.")
        return list(self.tokenizer.encode(text).ids)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; it cannot turn token ids into text.")
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    # ------------------------------------------------------------------ generation

    def conversation(self) -> Conversation:
        """A multi-turn conversation: each `send` continues one sequence whose KV cache stays between
        turns, so a turn prefills only its own tokens (`conversation.py`). Close it to free its pages."""
        return Conversation(self)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Decoders are not run on raw inputs: this says to use `generate` (InputError)."""
        raise InputError("this artifact is a decoder (an LLM); call generate(), not run().")

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] | None = None,
        seed: int | None = None,
        allow_beyond_context: bool = False,
    ) -> list[int] | list[list[int]]:
        """New token ids for one prompt (token ids or text), or a list of them for a list of prompts.

        max_new_tokens: a whole number >= 0. temperature: >= 0, 0 = greedy. top_p: nucleus mass in
        (0, 1]. stop_ids: a sequence ends after emitting one of these (included in its output);
        default: the model's eos ids. seed: sampling seed >= 0 (ignored for greedy decoding).
        allow_beyond_context: run past the model's context length (quality is not promised there).
        Every parameter is checked first (`generation_options`); a bad one raises InputError.
        """
        batch, single = _as_batch(prompts)
        outputs: list[list[int]] = [[] for _ in batch]
        events = self.generate_stream(
            batch, max_new_tokens, temperature, top_p, stop_ids, seed, allow_beyond_context=allow_beyond_context
        )
        for event in events:
            outputs[event.sequence].append(event.token)
        return outputs[0] if single else outputs

    def generate_stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] | None = None,
        seed: int | None = None,
        allow_beyond_context: bool = False,
    ) -> Iterator[GeneratedToken]:
        """Like `generate`, but yields each token as soon as it exists, as GeneratedToken(sequence, token).
        The parameters are checked when this is called, before the first token is asked for."""
        options = check_generation_options(max_new_tokens, temperature, top_p, stop_ids, seed, allow_beyond_context)
        batch, _ = _as_batch(prompts)
        requests = [self._request(i, p, options) for i, p in enumerate(batch)]
        return self._stream(requests, options)

    def _stream(self, requests: list[_Request], options: GenerationOptions) -> Iterator[GeneratedToken]:
        max_new_tokens, temperature, top_p = options.max_new_tokens, options.temperature, options.top_p
        stops = set(self.eos_token_ids if options.stop_ids is None else options.stop_ids)
        self.last_stats = stats = GenerationStats()
        if max_new_tokens == 0:
            return
        waiting, running = deque(requests), list[_Request]()
        try:
            while waiting or running:
                admitted = self._admit(waiting, running)
                if admitted:
                    t0 = time.perf_counter()
                    logits = self._run_prefill(admitted)
                    stats.prefill_seconds += time.perf_counter() - t0
                    stats.prefill_tokens += sum(len(r.prompt) for r in admitted)
                    for r, row in zip(admitted, logits):
                        yield self._emit(r, row, temperature, top_p, stops)
                    running.extend(r for r in admitted if not r.done)
                    stats.generated_tokens += len(admitted)
                if running:
                    t0 = time.perf_counter()
                    logits = self._run_decode(running)
                    stats.decode_seconds += time.perf_counter() - t0
                    stats.decode_tokens += len(running)
                    stats.generated_tokens += len(running)
                    for r, row in zip(list(running), logits):
                        yield self._emit(r, row, temperature, top_p, stops)
                running = [r for r in running if not r.done]
        finally:
            for r in requests:  # also when the caller stops iterating early
                if not r.done and self._live.get(r.seq_id) is r:
                    self._finish(r)

    def token_logprobs(
        self, texts: Prompt | Sequence[Prompt], allow_beyond_context: bool = False
    ) -> np.ndarray | list[np.ndarray]:
        """Teacher-forced log-probabilities: for each text (ids or str) of n tokens, the n - 1 values
        log p(t_i | t_0..t_i-1), i = 1..n-1 (float64), computed through the KV cache exactly as
        generation computes them (one prefill of t_0, then one decode step per token).
        Perplexity is exp(-mean); the quality of a compressed artifact is measured with it."""
        batch, single = _as_batch(texts)
        requests = []
        for i, text in enumerate(batch):
            ids = self.encode(text) if isinstance(text, str) else check_prompt_ids(text, i)
            if len(ids) < 2:
                raise InputError(f"text {i} has fewer than 2 tokens; there is nothing to score.")
            options = check_generation_options(len(ids) - 1, allow_beyond_context=allow_beyond_context)
            r = self._request(i, ids[:1], options)
            r.output = ids[1:]  # the tokens fed back at each step, instead of sampled ones
            requests.append(r)
        scores: list[list[float]] = [[] for _ in batch]

        def take(r: _Request, logits: np.ndarray) -> None:
            z = logits.astype(np.float64)
            log_z = z.max() + np.log(np.exp(z - z.max()).sum())
            scores[r.index].append(float(z[r.output[len(scores[r.index])]] - log_z))

        waiting, running = deque(requests), list[_Request]()
        try:
            while waiting or running:
                admitted = self._admit(waiting, running)
                if admitted:
                    for r, row in zip(admitted, self._run_prefill(admitted)):
                        take(r, row)
                    running.extend(admitted)
                for r in running:
                    if len(scores[r.index]) == len(r.output):
                        self._finish(r)
                running = [r for r in running if not r.done]
                if running:
                    with self._pages_changed:
                        positions = [self.cache.length(r.seq_id) for r in running]
                    fed = [r.output[p - 1] for r, p in zip(running, positions)]
                    for r, row in zip(running, self._run_decode(running, fed)):
                        take(r, row)
        finally:
            for r in requests:
                if not r.done and self._live.get(r.seq_id) is r:
                    self._finish(r)
        out = [np.asarray(s) for s in scores]
        return out[0] if single else out

    def next_token_logits(self, prompts: Prompt | Sequence[Prompt]) -> np.ndarray:
        """Logits [B, vocab] (float32) of the token after each prompt: one prefill, nothing kept."""
        batch, _ = _as_batch(prompts)
        one_token = check_generation_options(1)
        requests = [self._request(i, p, one_token) for i, p in enumerate(batch)]
        needed = (sum(r.reserved_pages for r in requests), sum(r.reserved_quantised for r in requests))
        with self._pages_changed:
            free = self._free_unpromised()
            if needed[0] > free[0] or needed[1] > free[1]:
                raise OutOfKVPagesError(
                    f"these prompts need {_pages_words(needed)} together but {_pages_words(free)} are free; "
                    "pass fewer prompts at once or raise max_total_tokens."
                )
            for r in requests:
                self._start(r)
        try:
            return self._run_prefill(requests)
        finally:
            for r in requests:
                self._finish(r)

    def _request(
        self, index: int, prompt: Prompt, options: GenerationOptions, history: tuple[int, list[int]] | None = None
    ) -> _Request:
        """The request of one prompt. history: (sequence id, tokens it has cached) of the conversation the
        prompt continues (`conversation.py`); the prompt's ids then start after them."""
        ids = self.encode(prompt) if isinstance(prompt, str) else check_prompt_ids(prompt, index)
        if not ids:
            raise InputError(f"prompt {index} is empty; give at least one token.")
        vocab = int(self.config["vocab_size"])
        if max(ids) >= vocab:
            raise InputError(f"prompt {index} has token ids outside the vocabulary [0, {vocab}).")
        seq_id, pending = history if history is not None else (-1, [])
        cached_before = self.cache.length(seq_id) if seq_id >= 0 else 0
        ids = [*pending, *ids]  # tokens of earlier turns not in the cache yet (the last one generated)
        max_new = options.max_new_tokens
        total = cached_before + len(ids) + max_new
        if self.max_sequence_length is not None and total > self.max_sequence_length:
            raise InputError(
                f"prompt {index}: {len(ids)} prompt + {max_new} new tokens exceed the "
                f"{self.max_sequence_length} positions of the model's position table; shorten the prompt or "
                "lower max_new_tokens."
            )
        if self.context_length is not None and total > self.context_length and not options.allow_beyond_context:
            raise InputError(
                f"prompt {index}: {len(ids)} prompt + {max_new} new tokens exceed the model's context length "
                f"of {self.context_length} tokens; shorten the prompt or lower max_new_tokens (or pass "
                "allow_beyond_context=True, --allow-beyond-context on the command line, to run past it)."
            )
        seed = options.seed
        entropy = seed if seed is not None else int(np.random.SeedSequence().entropy)  # type: ignore[arg-type]
        rng = np.random.default_rng([entropy, index])
        cached = cached_before + len(ids) + max(max_new - 1, 0)  # the last generated token is never appended
        sampled = options.temperature > 0
        full, quantised = pages_for(cached, self.page_size), 0
        if self._policy is not None:
            full, quantised = self._policy.reservation(len(ids), cached, self._prefill_slice_tokens())
        return _Request(
            index,
            ids,
            max_new,
            rng if sampled else None,
            full,
            quantised,
            seq_id=seq_id,
            cached=cached_before,
            keep=history is not None,
        )

    def _free_unpromised(self) -> tuple[int, int]:
        """(full-precision, quantised) free pages that no live sequence may still take to reach its
        reserved length (hold the lock)."""
        full, quantised = self.cache.num_free_pages, self.cache.num_free_quantised_pages
        for r in self._live.values():
            needed = self._still_needed(r)
            full, quantised = full - needed[0], quantised - needed[1]
        return full, quantised

    def _still_needed(self, r: _Request) -> tuple[int, int]:
        """(full-precision, quantised) pages a request may still take: its reservation less what its
        sequence already holds (a live one's, or the conversation's it continues)."""
        held = self.cache.held(r.seq_id) if r.seq_id >= 0 else (0, 0)
        return max(0, r.reserved_pages - held[0]), max(0, r.reserved_quantised - held[1])

    def _admit(self, waiting: deque[_Request], running: list[_Request]) -> list[_Request]:
        """Start waiting requests while the pool can hold them to their end (in order, no overtaking).

        Pages promised to live sequences (of this call and of other streams still open on this model)
        are held back, so a live sequence can always grow to its reserved length. When nothing of this
        call runs and other threads' sequences hold the pages, this waits for them to give pages back.
        """
        with self._pages_changed:
            while True:
                admitted = self._admit_locked(waiting)
                if admitted or running or not waiting:
                    return admitted
                if not any(r.thread != threading.get_ident() for r in self._live.values()):
                    # this thread's own open stream, or open conversations, hold the pages: waiting would
                    # never end
                    raise OutOfKVPagesError(
                        f"prompt {waiting[0].index} waits for KV pages that another generation still in "
                        "progress, or an open conversation, on this model holds; finish or close it first, "
                        "or raise max_total_tokens."
                    )
                self._pages_changed.wait()

    def _admit_locked(self, waiting: deque[_Request]) -> list[_Request]:
        admitted: list[_Request] = []
        free = self._free_unpromised()
        while waiting:
            r = waiting[0]
            if r.reserved_pages > self.cache.num_pages or r.reserved_quantised > self.cache.num_quantised_pages:
                tokens = len(r.prompt) + r.max_new_tokens
                at_least = r.reserved_pages * self.page_size
                raise OutOfKVPagesError(
                    f"prompt {r.index} needs {_pages_words((r.reserved_pages, r.reserved_quantised))} of "
                    f"{self.page_size} tokens ({len(r.prompt)} prompt + {r.max_new_tokens} new tokens) but the "
                    f"pool has only {_pages_words((self.cache.num_pages, self.cache.num_quantised_pages))}; "
                    f"raise max_total_tokens to at least {tokens if self._policy else at_least}."
                )
            needed = self._still_needed(r)
            if needed[0] > free[0] or needed[1] > free[1]:
                break
            waiting.popleft()
            self._start(r)
            free = (free[0] - needed[0], free[1] - needed[1])  # taken now or promised
            admitted.append(r)
        return admitted

    def _start(self, r: _Request) -> None:
        with self._pages_changed:
            if r.seq_id < 0:
                r.seq_id = self.cache.add_sequence()
            first_slice = min(len(r.prompt), self._prefill_slice_tokens() or len(r.prompt))
            self.cache.extend(r.seq_id, r.cached + first_slice)
            self._live[r.seq_id] = r

    def _prefill_slice_tokens(self) -> int | None:
        """Tokens of a prompt prefilled in one call with a page-granular cache (None: whole prompts)."""
        return None if self._policy is None else min(self.max_prefill_tokens, PREFILL_SLICE_TOKENS)

    def _finish(self, r: _Request) -> None:
        with self._pages_changed:
            r.done = True
            if not r.keep:
                self.cache.release(r.seq_id)
            del self._live[r.seq_id]
            self._pages_changed.notify_all()

    def _release_sequence(self, seq_id: int) -> None:
        """Give back the pages of a conversation's sequence (`Conversation.close`)."""
        with self._pages_changed:
            self.cache.release(seq_id)
            self._pages_changed.notify_all()

    def _emit(self, r: _Request, logits: np.ndarray, temperature: float, top_p: float, stops: set[int]):
        token = sample_token(logits, temperature, top_p, r.rng)
        r.output.append(token)
        if token in stops or len(r.output) >= r.max_new_tokens:
            self._finish(r)
        return GeneratedToken(r.index, token)

    # ------------------------------------------------------------------ compiled calls

    def _call(self, function: tuple[str, list[Any]], *arrays: np.ndarray) -> np.ndarray:
        name, params = function
        device_args = [self.artifact.to_device(a) for a in arrays]
        compiled = self._compiled(name)

        def call() -> Any:
            # Outside the lock: calls of several threads write disjoint pages of the cache (their own
            # sequences'), and each thread runs its own VM state.
            return compiled(*device_args, *self.kv_cache, *params)

        chooser = cpu_threads.chooser_for_this_thread() if self._on_cpu else None
        if chooser is None:
            return self.artifact.to_numpy(call())
        # single-threaded or on the whole pool, whichever is faster now (small steps on a busy CPU: one)
        key = (id(self), name, len(arrays[0]).bit_length())
        return self.artifact.to_numpy(chooser.run(key, call))

    def _run_prefill(self, requests: list[_Request]) -> np.ndarray:
        """Last-token logits of each request's prompt, prefilled in calls of <= max_prefill_tokens (whole
        prompts; a longer prompt goes alone). A page-granular cache prefills a prompt in slices of
        `_prefill_slice_tokens`: after each, the pages that left the window are quantised, and the next
        slice reads them (a slice attends in full precision to itself, the sink and the window)."""
        slice_tokens = self._prefill_slice_tokens() or max(len(r.prompt) for r in requests)
        last: dict[int, np.ndarray] = {}
        spans = [(i, r, 0, min(len(r.prompt), slice_tokens)) for i, r in enumerate(requests)]
        while spans:
            group: list[tuple[int, _Request, int, int]] = []
            tokens = 0
            for span in spans:
                if group and tokens + span[3] - span[2] > self.max_prefill_tokens:
                    self._prefill_group(group, last)
                    group, tokens = [], 0
                group.append(span)
                tokens += span[3] - span[2]
            self._prefill_group(group, last)
            spans = [
                (i, r, end, min(len(r.prompt), end + slice_tokens)) for i, r, _, end in spans if end < len(r.prompt)
            ]
            with self._pages_changed:
                for _, r, _, end in spans:
                    self.cache.extend(r.seq_id, r.cached + end)  # never fails: admission reserved the pages
        return np.stack([last[i] for i in range(len(requests))])

    def _prefill_group(self, spans: list[tuple[int, _Request, int, int]], last: dict[int, np.ndarray]) -> None:
        """One prefill call over the spans (index, request, start, end); keeps the logits of prompts' ends."""
        for (i, r, _, end), row in zip(spans, self._prefill_call([(r, start, end) for _, r, start, end in spans])):
            if end == len(r.prompt):
                last[i] = row

    def _prefill_call(self, spans: list[tuple[_Request, int, int]]) -> np.ndarray:
        """Logits of the last token of each span (request, start, end) of prompt tokens, cached before."""
        lengths = [end - start for _, start, end in spans]
        input_ids = np.concatenate([r.prompt[start:end] for r, start, end in spans]).astype(np.int32)
        positions = np.concatenate([np.arange(r.cached + start, r.cached + end) for r, start, end in spans])
        positions = positions.astype(np.int32)
        seq_slot = np.repeat(np.arange(len(spans)), lengths).astype(np.int32)
        requests = [r for r, _, _ in spans]
        with self._pages_changed:
            block_table = self.cache.block_table([r.seq_id for r in requests])
        last_token_index = (np.cumsum(lengths) - 1).astype(np.int32)
        logits = self._call(self._prefill, input_ids, positions, seq_slot, block_table, last_token_index)
        self._quantise_due_pages(requests)  # prefill attended in full precision; now the old pages go 2-bit
        return logits

    def _run_decode(self, requests: list[_Request], tokens: list[int] | None = None) -> np.ndarray:
        """One decode step: feed each request its last output token (or `tokens`), get next logits."""
        with self._pages_changed:
            positions = np.array([self.cache.length(r.seq_id) for r in requests], dtype=np.int32)
            for r, pos in zip(requests, positions):
                self.cache.extend(r.seq_id, int(pos) + 1)  # never fails: admission reserved the pages
            block_table = self.cache.block_table([r.seq_id for r in requests])
        fed = [r.output[-1] for r in requests] if tokens is None else tokens
        input_ids = np.array(fed, dtype=np.int32)
        seq_slot = np.arange(len(requests), dtype=np.int32)
        logits = self._call(self._decode, input_ids, positions, seq_slot, block_table)
        self._quantise_due_pages(requests)
        return logits

    def _quantise_due_pages(self, requests: list[_Request]) -> None:
        """Quantise, in one compiled call, every group of pages of these sequences that has left the
        window (`page_quantisation.py`); their full-precision pages go back to the pool."""
        if self._policy is None or self._quantize is None:
            return
        src: list[list[int]] = []
        dst: list[int] = []
        with self._pages_changed:
            for r in requests:
                done = self.cache.held(r.seq_id)[1]
                for group in range(done, self._policy.groups_due(self.cache.length(r.seq_id))):
                    pages, q = self.cache.quantise_group(r.seq_id, self._policy.first_page_of_group(group))
                    src.append(pages)
                    dst.append(q)
            if not src:
                return
            # under the lock: the fp pages must not be handed out before the kernel has read them
            name, params = self._quantize
            args = [self.artifact.to_device(np.array(a, np.int32)) for a in (src, dst)]
            self._compiled(name)(*args, *self.kv_cache, *params)
            self.cache.free_full_precision([p for pages in src for p in pages])


def _pages_words(pages: tuple[int, int]) -> str:
    """(full-precision, quantised) pages in words: "12 KV pages" or "12 full-precision + 3 quantised KV pages"."""
    return f"{pages[0]} KV pages" if not pages[1] else f"{pages[0]} full-precision + {pages[1]} quantised KV pages"


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
    """(the prompts as a list, whether one prompt was given): a str, or a flat sequence of ints, is
    one prompt; a list of those is a batch."""
    if isinstance(prompts, str):
        return [prompts], True
    if isinstance(prompts, np.ndarray):
        if prompts.size == 0:
            raise InputError("the prompt is empty; give at least one token id (or a text).")
        return ([prompts], True) if prompts.ndim == 1 else (list(prompts), False)
    if not isinstance(prompts, Sequence):
        raise InputError(f"a prompt is a text or a list of token ids, got {type(prompts).__name__}.")
    items = list(prompts)
    if not items:
        raise InputError("the prompt is empty; give at least one token id (or a text).")
    if all(not isinstance(t, str | Sequence | np.ndarray) for t in items):  # flat: one prompt of ids
        return [cast(Sequence[int], items)], True
    return cast(list[Prompt], items), False
