"""Train the README's demo model: a tiny Llama on the docstrings of Python's own standard library.

    .venv/bin/python examples/train_tiny_llama.py                  # writes examples/tiny_llama/
    .venv/bin/python examples/train_tiny_llama.py --steps 50 --out /tmp/tiny   # a quick try

Everything it needs ships with Python (the text) or with tensorpress' dev dependencies (torch,
transformers, tokenizers). It runs on the CPU in a few minutes and is deterministic: fixed seeds, the
docstrings in sorted-file order, a fixed number of steps (the corpus depends on the Python version
that runs it; the one used is recorded in examples/tiny_llama/training.json).

The result is a Hugging Face folder (config.json, model.safetensors, tokenizer.json, ...):
LlamaForCausalLM with RMSNorm, RoPE, SwiGLU and grouped-query attention (4 query heads over 2 KV
heads of 32), 4 layers, hidden 128, byte-level BPE vocabulary of 1024, tied embeddings: about 0.9M
weights, 3.7 MB in float32.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import numpy as np

VOCAB = 1024
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
SEQ_LEN = 128
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "turtledemo", "__pycache__"}


def stdlib_docstrings() -> list[str]:
    """Every module/class/function docstring longer than 40 characters, in sorted-file, walk order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(lib).parts))
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc)
    return docs


def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer)
    # encode() adds <s> in front, like Llama's tokenizers
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def token_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """<s> doc </s> <s> doc </s> ... as one int64 array."""
    ids = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(2)
    return np.asarray(ids, dtype=np.int64)


def model_config():
    import transformers as tf

    return tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def batches(stream: np.ndarray, rng: np.random.Generator, batch: int):
    while True:
        starts = rng.integers(0, len(stream) - SEQ_LEN - 1, batch)
        yield np.stack([stream[s : s + SEQ_LEN + 1] for s in starts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tiny_llama"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers as tf

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.time()
    docs = stdlib_docstrings()
    held_out = docs[-len(docs) // 20 :]  # the last 5% of files: text the model never trains on
    tokenizer = train_tokenizer(docs[: -len(held_out)])
    train, valid = token_stream(tokenizer, docs[: -len(held_out)]), token_stream(tokenizer, held_out)
    print(f"{len(docs)} docstrings, {len(train)} training tokens, {len(valid)} held-out tokens")

    model = tf.LlamaForCausalLM(model_config())
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M weights")
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)
    schedule = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data = batches(train, np.random.default_rng(0), args.batch)

    def held_out_loss() -> float:
        model.eval()
        windows = [valid[s : s + SEQ_LEN + 1] for s in range(0, len(valid) - SEQ_LEN - 1, SEQ_LEN)][:64]
        with torch.no_grad():
            x = torch.from_numpy(np.stack(windows))
            loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels by one itself
        model.train()
        return float(loss)

    model.train()
    for step in range(args.steps):
        x = torch.from_numpy(next(data))
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:6.0f} s", flush=True)
    valid_loss = held_out_loss()
    minutes = (time.time() - start) / 60
    print(f"held-out loss {valid_loss:.3f} (perplexity {math.exp(valid_loss):.1f}); {minutes:.1f} min")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": 512,
            },
            indent=1,
        )
    )
    record = {
        "corpus": "docstrings (> 40 chars) of the Python standard library, sorted files, last 5% held out",
        "python": platform.python_version(),
        "steps": args.steps,
        "batch": args.batch,
        "sequence_length": SEQ_LEN,
        "training_tokens": int(len(train)),
        "weights": params,
        "held_out_loss": round(valid_loss, 4),
        "held_out_perplexity": round(math.exp(valid_loss), 2),
        "minutes": round(minutes, 1),
        "threads": args.threads,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")

    prompt = "Return the"
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=40, do_sample=False, attention_mask=torch.ones_like(ids))
    print(repr(prompt + tokenizer.decode(out[0, ids.shape[1] :].tolist())))


if __name__ == "__main__":
    main()
