"""Multi-turn conversations over one KV sequence: each turn prefills only its own new tokens.

    with model.conversation() as chat:
        a = chat.send("Hello", max_new_tokens=16)        # prefill "Hello", then 16 decode steps
        b = chat.send(" And then?", max_new_tokens=16)   # prefill [a[-1], " And then?"] after turn 1's cache
        chat.tokens                                       # the whole conversation: prompts and answers

The conversation's sequence keeps its pages between turns. With a page-granular KV cache (int2-kitty)
the pages of earlier turns that left the window are 2-bit by then, and the next turn's prefill reads
them as they are stored. Generation never appends the last token it emits to the cache, so that token is
prefilled with the next turn's prompt (`pending` below).

Pages an open conversation holds are not available to other generate calls on the model; `close()` (or
leaving the `with` block) gives them back. A turn that fails after it started (out of pages mid-way, an
error in a compiled call) closes the conversation, since its cache no longer says what `tokens` says; a
turn refused before it started (a bad option, a prompt the pool can never hold) leaves it as it was.

Imports only tensorpress' runtime-side modules: it runs in a runtime-only bundle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tensorpress.errors import InputError
from tensorpress.runtime.generation_options import check_generation_options

if TYPE_CHECKING:
    from tensorpress.runtime.decoder import DecoderModel, Prompt


class Conversation:
    """One sequence of a `DecoderModel` that grows turn by turn (module docstring)."""

    def __init__(self, model: DecoderModel):
        self._model = model
        self._seq_id = -1  # the cache's sequence, once the first turn has started
        self._pending: list[int] = []  # tokens of the conversation not in the cache yet
        self.tokens: list[int] = []  # every token of the conversation, in order
        self._closed_because: str | None = None
        self._in_turn = False

    @property
    def cached_tokens(self) -> int:
        """Tokens of the conversation whose K/V are in the cache."""
        return len(self.tokens) - len(self._pending)

    def send(
        self,
        prompt: Prompt,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] | None = None,
        seed: int | None = None,
        allow_beyond_context: bool = False,
    ) -> list[int]:
        """The next turn: `prompt` (text or ids) follows everything said so far; returns the new token
        ids. The options are `DecoderModel.generate`'s."""
        stream = self.send_stream(prompt, max_new_tokens, temperature, top_p, stop_ids, seed, allow_beyond_context)
        return list(stream)

    def send_stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] | None = None,
        seed: int | None = None,
        allow_beyond_context: bool = False,
    ) -> Iterator[int]:
        """Like `send`, yielding each new token id as soon as it exists. Checked when called."""
        if self._closed_because is not None:
            raise InputError(f"this conversation is closed ({self._closed_because}); start a new one.")
        if self._in_turn:
            raise InputError("this conversation is still streaming its last turn; finish reading it first.")
        options = check_generation_options(max_new_tokens, temperature, top_p, stop_ids, seed, allow_beyond_context)
        if isinstance(prompt, str | Sequence) and len(prompt) == 0:
            raise InputError("the turn's prompt is empty; give some text or at least one token id.")
        request = self._model._request(0, prompt, options, history=(self._seq_id, self._pending))
        return self._turn(request, options, len(self.tokens))

    def _turn(self, request: Any, options: Any, tokens_before: int) -> Iterator[int]:
        # Checked again when the turn starts (the first token is asked for), not when it was prepared: a
        # stream never read holds nothing, and one prepared before another turn ran is stale.
        if self._closed_because is not None:
            raise InputError(f"this conversation is closed ({self._closed_because}); start a new one.")
        if self._in_turn:
            raise InputError("this conversation is still streaming its last turn; finish reading it first.")
        if len(self.tokens) != tokens_before:
            raise InputError("another turn of this conversation ran after this one was prepared; send it again.")
        self._in_turn = True
        model = self._model
        length_before = model.cache.length(self._seq_id) if self._seq_id >= 0 else 0
        stream = model._stream([request], options)
        try:
            for event in stream:
                yield event.token
        except BaseException as err:
            stream.close()  # its own cleanup (the request leaves the live set) before ours
            started = request.seq_id >= 0 and (
                request.seq_id != self._seq_id or model.cache.length(request.seq_id) != length_before
            )
            if started and not isinstance(err, GeneratorExit):
                self._seq_id = request.seq_id
                self.close(f"a turn failed part-way: {type(err).__name__}")
            raise
        finally:
            self._in_turn = False
            if self._closed_because is None:
                self._seq_id = request.seq_id
                new = request.prompt[len(self._pending) :]
                self.tokens += [*new, *request.output]
                # the last token generated is fed with the next turn; a turn that generated nothing
                # (max_new_tokens = 0) cached nothing either
                self._pending = [request.output[-1]] if request.output else list(request.prompt)

    def close(self, reason: str = "closed by the caller") -> None:
        """Give the conversation's pages back to the pool; later turns are refused."""
        if self._closed_because is not None:
            return
        self._closed_because = reason
        if self._seq_id >= 0:
            self._model._release_sequence(self._seq_id)

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
