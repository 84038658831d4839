"""`tensorpress generate ARTIFACT.tpk --prompt "..." | --prompt-ids 1,2,3 [options]`

Several --prompt (or --prompt-ids) are the turns of one conversation (`runtime/conversation.py`): each
turn's prompt follows the tokens of the turns before it, whose KV cache is kept, not recomputed.

Output contract (scripts read it), once per turn:
    stdout line 1   the new token ids, comma-separated
    stdout line 2+  the new text, when the model has a tokenizer (one line: newlines become spaces
                    when there is more than one turn)
    stderr (last)   token counts and tokens/s
"""

from __future__ import annotations

import argparse
import sys
import time

from tensorpress.errors import InputError
from tensorpress.runtime.generation_options import check_generation_options


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tensorpress generate` (the CLI's subparser calls this)."""
    parser.add_argument("artifact", help="a .tpk file compiled from a decoder model")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt", action="append", help="prompt text (needs the model's tokenizer); repeat it for more turns"
    )
    prompt.add_argument(
        "--prompt-ids", type=_int_list, action="append", help="prompt token ids, e.g. 1,2,3; repeat it for more turns"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument(
        "--stop-ids", type=_int_list, default=None, help="stop after one of these ids (default: the eos ids)"
    )
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--max-total-tokens", type=int, default=None, help="KV cache size in tokens, all sequences together"
    )
    cache.add_argument(
        "--memory-fraction", type=float, default=None, help="KV cache size as a share of the free device memory"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument(
        "--allow-beyond-context",
        action="store_true",
        help="generate past the model's context length (refused by default)",
    )


def generate_command(args: argparse.Namespace) -> int:
    """Run `tensorpress generate`; returns the exit status. TensorpressErrors propagate to the CLI."""
    from tensorpress.runtime.decoder import DecoderModel
    from tensorpress.runtime.loaded_artifact import load_artifact

    # The API's own checks, before the (slow) load: a bad option costs nothing.
    options = check_generation_options(
        args.max_new_tokens, args.temperature, args.top_p, args.stop_ids, args.seed, args.allow_beyond_context
    )
    for flag, turns, what in (
        ("--prompt-ids", args.prompt_ids or [], "at least one token id, e.g. --prompt-ids 1,2,3"),
        ("--prompt", args.prompt or [], "some text"),
    ):
        for turn, prompt in enumerate(turns, 1):
            if not prompt:
                which = f" of turn {turn}" if len(turns) > 1 else ""
                raise InputError(f"{flag}{which} is empty; give {what}.")
    loaded = load_artifact(args.artifact, args.device)
    if loaded.manifest.get("kind") != "decoder":
        raise InputError(f"{args.artifact} is not a decoder model; `generate` needs an artifact of an LLM.")
    model = DecoderModel(loaded, max_total_tokens=args.max_total_tokens, memory_fraction=args.memory_fraction)
    turns = args.prompt if args.prompt is not None else args.prompt_ids
    settings = {
        "max_new_tokens": options.max_new_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "stop_ids": options.stop_ids,
        "seed": options.seed,
        "allow_beyond_context": options.allow_beyond_context,
    }
    with model.conversation() as chat:
        for prompt in turns:
            start = time.perf_counter()
            tokens = chat.send(prompt, **settings) if len(turns) > 1 else model.generate(prompt, **settings)
            _print_turn(model, tokens, time.perf_counter() - start, one_line=len(turns) > 1)
    return 0


def _print_turn(model, tokens: list[int], seconds: float, one_line: bool) -> None:
    print(",".join(str(t) for t in tokens), flush=True)
    if model.tokenizer is not None:
        text = model.decode_text(tokens)
        print(" ".join(text.splitlines()) if one_line else text, flush=True)
    stats = model.last_stats
    rate = len(tokens) / seconds if seconds else 0.0
    print(
        f"{len(tokens)} new tokens in {seconds:.3f} s ({rate:.1f} tokens/s); "
        f"prefill {stats.prefill_tokens} tokens in {stats.prefill_seconds * 1e3:.1f} ms, "
        f"decode {stats.decode_tokens_per_second:.1f} tokens/s",
        file=sys.stderr,
    )
