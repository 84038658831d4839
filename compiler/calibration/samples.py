"""The calibration file: read and checked before any work, then turned into one feed per sample
({input name: array}) against the imported model's inputs. Layout: see the package docstring."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import ConfigError

SUFFIXES = (".npz", ".txt")


@dataclass(frozen=True)
class CalibrationData:
    """A read calibration file: arrays by input name (.npz) or text samples (.txt)."""

    path: Path
    arrays: dict[str, np.ndarray] | None = None
    texts: tuple[str, ...] | None = None


def read_calibration_file(path: str | os.PathLike) -> CalibrationData:
    """The file read whole, or a ConfigError (one sentence) when it cannot be used as calibration data."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(
            f"calibration file {path} must be an .npz of model inputs or a .txt of text "
            f"(not {path.suffix or 'no suffix'!r})."
        )
    if not path.is_file():
        raise ConfigError(f"calibration file {path} does not exist; give an .npz of model inputs or a .txt of text.")
    try:
        if path.suffix == ".txt":
            texts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            if not texts:
                raise ConfigError(f"calibration file {path} holds no text; write one sample per line.")
            return CalibrationData(path, texts=texts)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ConfigError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"cannot read calibration file {path}: {_first_line(err)}.") from err
    if not arrays:
        raise ConfigError(f"calibration file {path} holds no arrays; save the model's inputs by name with np.savez.")
    return CalibrationData(path, arrays=arrays)


def calibration_feeds(data: CalibrationData, imported: Any) -> list[dict[str, np.ndarray]]:
    """One {input name: array} per sample, each fitting `imported.inputs` (names, dtypes, ranks, fixed
    sizes, and the same size wherever two inputs share a symbolic dimension), or a ConfigError.
    A decoder's samples are prompts: {"input_ids": int32 [n]} each (see `_prompts`)."""
    if imported.kind == "decoder":
        return _prompts(data, imported)
    if data.texts is not None:
        feeds = _tokenized(data, imported)
    else:
        assert data.arrays is not None
        feeds = _split_samples(data.path, data.arrays, imported.inputs)
    for i, feed in enumerate(feeds):
        _check_feed(data.path, i, feed, imported.inputs)
    return feeds


def _split_samples(path: Path, arrays: dict[str, np.ndarray], specs: list) -> list[dict[str, np.ndarray]]:
    names = [spec.name for spec in specs]
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        what = f"lacks the model's input(s) {', '.join(missing)}" if missing else f"holds {', '.join(extra)}"
        raise ConfigError(
            f"calibration file {path} {what}; it must hold exactly the model's inputs by name: {', '.join(names)}."
        )
    counts = set()
    for spec in specs:
        rank = np.ndim(arrays[spec.name])
        if rank not in (len(spec.shape), len(spec.shape) + 1):
            raise ConfigError(
                f"calibration input {spec.name} in {path} has rank {rank}; the model's input is "
                f"{_described(spec)}: give one sample of that rank, or [samples, ...] one more."
            )
        counts.add(arrays[spec.name].shape[0] if rank == len(spec.shape) + 1 else None)
    if len(counts) != 1:
        raise ConfigError(
            f"the inputs in calibration file {path} disagree on the number of samples; stack the same "
            "number of samples (the first axis) for every input, or give every input as one sample."
        )
    (count,) = counts
    if count is None:
        return [dict(arrays)]
    if count == 0:
        raise ConfigError(f"calibration file {path} holds zero samples.")
    return [{name: arrays[name][i] for name in names} for i in range(count)]


def _check_feed(path: Path, index: int, feed: dict[str, np.ndarray], specs: list) -> None:
    sizes: dict[str, int] = {}
    for spec in specs:
        array = feed[spec.name]
        where = f"calibration input {spec.name} (sample {index}) in {path}"
        if str(array.dtype) != spec.dtype:
            raise ConfigError(f"{where} is {array.dtype}; the model's input is {_described(spec)}.")
        if array.ndim != len(spec.shape):
            raise ConfigError(f"{where} has shape {list(array.shape)}; the model's input is {_described(spec)}.")
        for size, dim in zip(array.shape, spec.shape):
            if isinstance(dim, str):
                dim = sizes.setdefault(dim, size)
            if size != dim or size == 0:
                raise ConfigError(
                    f"{where} has shape {list(array.shape)}; the model's input is {_described(spec)} "
                    "(a symbolic size must be the same in every input of a sample, and not 0)."
                )


def _prompts(data: CalibrationData, imported: Any) -> list[dict[str, np.ndarray]]:
    """A decoder's calibration prompts: each text line through the model's tokenizer, or the .npz's
    `input_ids` (its only array: one prompt [n], or [S, n] for S prompts of one length), each checked
    against the vocabulary and the context length."""
    section = imported.info["decoder"]
    vocab, context = int(section["config"]["vocab_size"]), int(section["context_length"])
    if data.texts is not None:
        tokenizer_file = imported.info.get("extra_files", {}).get(section.get("tokenizer") or "")
        if tokenizer_file is None:
            raise ConfigError(
                f"calibration text {data.path} needs the model's tokenizer.json, which its folder lacks; "
                "give an .npz of input_ids instead."
            )
        tokenizer = _tokenizer(str(Path(tokenizer_file).parent), data.path)
        prompts = [np.asarray(tokenizer(text)["input_ids"]) for text in data.texts]
    else:
        assert data.arrays is not None
        ids = data.arrays.get("input_ids")
        if ids is None or len(data.arrays) != 1 or ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):
            raise ConfigError(
                f"calibration file {data.path} must hold one integer array, input_ids: the token ids of one "
                "prompt [n], or of several prompts of one length [samples, n]."
            )
        prompts = list(ids) if ids.ndim == 2 else [ids]
    for i, prompt in enumerate(prompts):
        where = f"calibration prompt {i} in {data.path}"
        if not 1 <= len(prompt) <= context:
            raise ConfigError(f"{where} has {len(prompt)} tokens; a prompt needs 1 to {context} (the context length).")
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise ConfigError(
                f"{where} holds token ids {prompt.min()}..{prompt.max()}; the vocabulary's ids are 0..{vocab - 1}."
            )
    return [{"input_ids": prompt.astype(np.int32)} for prompt in prompts]


def _tokenized(data: CalibrationData, imported: Any) -> list[dict[str, np.ndarray]]:
    folder = imported.info.get("hf_folder") if isinstance(imported.info, dict) else None
    if folder is None:
        raise ConfigError(
            f"calibration text {data.path} needs a model with a tokenizer (a Hugging Face folder); "
            "for this model give an .npz of its inputs."
        )
    tokenizer = _tokenizer(folder, data.path)
    assert data.texts is not None
    feeds = []
    for text in data.texts:
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)[None, :]
        feed = {}
        for spec in imported.inputs:
            if spec.name == "input_ids":
                value = ids
            elif spec.name == "attention_mask":
                value = np.ones_like(ids)
            elif spec.name == "token_type_ids":
                value = np.zeros_like(ids)
            elif spec.name == "position_ids":
                value = np.arange(ids.shape[1], dtype=np.int64)[None, :]
            else:
                raise ConfigError(
                    f"calibration text {data.path} cannot supply the model's input {spec.name}; "
                    "give an .npz of its inputs."
                )
            feed[spec.name] = value.astype(spec.dtype)
        feeds.append(feed)
    return feeds


def _tokenizer(folder: str, path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise ConfigError(
            f"calibration text {path} needs the model's tokenizer, which {folder} does not load "
            f"({_first_line(err)}); give an .npz of its inputs."
        ) from err


def _described(spec: Any) -> str:
    return f"{spec.dtype} [{', '.join(str(d) for d in spec.shape)}]"


def _first_line(err: BaseException) -> str:
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return first.split(". ")[0].rstrip(".")  # one sentence of it
