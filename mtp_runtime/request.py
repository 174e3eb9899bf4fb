"""generate()'s arguments, each checked for its type and range before any is used, made into a GenerationRequest.

Runtime.generate and the command line's check before the model loads both build their request here, so that the
two cannot disagree on a default or a rule. What is accepted, per argument:

* prompt: a str, or a non-empty list/tuple of str (a batch); each non-empty, valid Unicode.
* input_ids: token ids as a list/tuple of ints, a list/tuple of such lists (a batch), or a 1-D/2-D integer numpy
  array or torch tensor; numpy integer scalars count as ints; bools and floats do not.
* max_new_tokens, top_k, num_draft_tokens, depth, draft_topk, seed: integers (not bool); temperature, top_p:
  real numbers (not bool); eos_token_id: a token id or a list of them; stop: a str or a list of str;
  ignore_eos, stream: bool.
Anything else is a GenerationSettingsError naming the argument and the type it got.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import GenerationSettingsError, TokenizerError
from .params import GenerationRequest, resolve_draft
from .sampling import SamplingParams
from .validate import check_text, is_int, is_number, show, wrong_type


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know of the model; None where it is not known (yet)."""

    num_mtp_modules: int | None = None
    vocab_size: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    """The checkpoint's own end-of-sequence ids (config.json and tokenizer), used when eos_token_id is None."""
    has_tokenizer: bool | None = None


def build_request(facts: ModelFacts, *, max_new_tokens: Any = 64, temperature: Any = 0.0, top_k: Any = 0,
                  top_p: Any = 1.0, seed: Any = None, draft: Any = None, num_draft_tokens: Any = None, tree: Any = None,
                  depth: Any = None, draft_topk: Any = None, eos_token_id: Any = None, ignore_eos: Any = False,
                  stop: Any = None, acceptance: Any = "exact") -> GenerationRequest:
    """A validated GenerationRequest from generate()'s keyword arguments."""
    check_flag("ignore_eos", ignore_eos)
    request = GenerationRequest(
        max_new_tokens=_plain(max_new_tokens),
        sampling=SamplingParams(temperature=_plain(temperature, real=True), top_k=_plain(top_k),
                                top_p=_plain(top_p, real=True), seed=_plain(seed)),
        draft=resolve_draft(draft, facts.num_mtp_modules, num_draft_tokens, tree, depth, draft_topk),
        eos_token_ids=eos_ids(eos_token_id, ignore_eos, facts),
        stop_strings=stop_strings(stop), acceptance=acceptance)
    request.validate()
    if request.stop_strings and facts.has_tokenizer is False:
        raise TokenizerError("stop strings need a tokenizer, but this model folder has no tokenizer.json")
    return request


def _plain(value: Any, real: bool = False) -> Any:
    """A numpy integer or float as Python's int or float (real: an integer too becomes a float); else unchanged."""
    if is_int(value) and not real:
        return int(value)
    if real and is_number(value):
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range
            return math.inf if value > 0 else -math.inf
    return value


def draft_topk_argument(draft_topk: Any, topk: Any) -> Any:
    """generate's draft_topk, or its old name topk (still accepted, with a DeprecationWarning)."""
    if topk is None:
        return draft_topk
    if draft_topk is not None:
        raise GenerationSettingsError("topk is the old name of draft_topk; pass only draft_topk")
    warnings.warn("generate(topk=...) is renamed draft_topk=...", DeprecationWarning, stacklevel=3)
    return topk


def check_flag(name: str, value: Any) -> bool:
    """value itself when it is a bool."""
    if not isinstance(value, bool):
        raise wrong_type(name, value, "True or False")
    return value


def stop_strings(stop: Any) -> tuple[str, ...]:
    """The stop argument (None, a str, or a list/tuple of str) as a tuple."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, (list, tuple)):
        raise wrong_type("stop", stop, "a non-empty string or a list of them")
    return tuple(stop)


def eos_ids(eos_token_id: Any, ignore_eos: bool, facts: ModelFacts) -> tuple[int, ...]:
    """The end-of-sequence ids a request stops at: eos_token_id (a token id or a list of them), else the model's."""
    if eos_token_id is None:
        return () if ignore_eos else facts.eos_token_ids
    if ignore_eos:
        raise GenerationSettingsError(f"eos_token_id={show(eos_token_id)} does not apply with ignore_eos=True; "
                                      "drop one of them")
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not ids or not all(is_int(t) for t in ids):
        raise wrong_type("eos_token_id", eos_token_id, "a token id (int) or a non-empty list of them")
    return tuple(token_ids_in_vocabulary(ids, facts.vocab_size, "eos_token_id"))


def token_ids_in_vocabulary(ids: list, vocab_size: int | None, what: str) -> list[int]:
    """ids as Python ints, each an integer in [0, vocab_size)."""
    for t in ids:
        if not is_int(t):
            raise GenerationSettingsError(f"{what} holds {show(t)} ({type(t).__name__}); token ids are integers")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocabulary size)"
            raise GenerationSettingsError(f"token id {show(t)} in {what} is outside the vocabulary {bound}")
    return [int(t) for t in ids]


def prompt_texts(prompt: Any) -> tuple[list[str], bool]:
    """The prompt argument as a list of texts, and whether it was a batch."""
    if isinstance(prompt, str):
        texts, batched = [prompt], False
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, str) for t in prompt):
        texts, batched = list(prompt), True
    elif isinstance(prompt, (bytes, bytearray)):
        raise GenerationSettingsError(f"prompt must be text (str), not {type(prompt).__name__} {show(prompt)}; "
                                      "decode it first, e.g. prompt.decode('utf-8')")
    elif isinstance(prompt, (list, tuple)) and prompt:
        bad = next(t for t in prompt if not isinstance(t, str))
        raise wrong_type("each prompt of a batch", bad, "a str (or pass token ids as input_ids)")
    else:
        raise wrong_type("prompt", prompt, "text (str) or a non-empty list of str (or pass input_ids)")
    for i, text in enumerate(texts):
        what = f"prompt {i}" if batched else "prompt"
        if not text:
            raise GenerationSettingsError(f"{what} is empty; give some text (or input_ids)")
        check_text(text, what)
    return texts, batched


def prompt_ids(input_ids: Any, vocab_size: int | None) -> tuple[list[list[int]], bool]:
    """The input_ids argument as a list of token-id lists, and whether it was a batch."""
    rows, batched = _id_rows(input_ids)
    if not rows:
        raise GenerationSettingsError("input_ids is empty; give at least one prompt of token ids")
    prompts = []
    for i, row in enumerate(rows):
        what = f"input_ids[{i}]" if batched else "input_ids"
        if not row:
            raise GenerationSettingsError(f"{what} is empty (no tokens); give at least one token")
        prompts.append(token_ids_in_vocabulary(row, vocab_size, what))
    return prompts, batched


def _id_rows(input_ids: Any) -> tuple[list[list], bool]:
    """input_ids as rows of (unchecked) elements: a tensor or array is read as a whole, a list row by row."""
    if _is_array(input_ids):
        return _array_rows(input_ids, "input_ids")
    if not isinstance(input_ids, (list, tuple)):
        raise wrong_type("input_ids", input_ids, "a list of token ids, a list of such lists, or a 1-D/2-D integer "
                                                 "array or tensor")
    sequences = [isinstance(e, (list, tuple)) or _is_array(e) for e in input_ids]
    if not any(sequences):
        return [list(input_ids)], False
    if not all(sequences):
        raise GenerationSettingsError("input_ids mixes token ids and lists; give one list of ids, or a list of lists")
    rows = []
    for i, element in enumerate(input_ids):
        if _is_array(element):
            element_rows, nested = _array_rows(element, f"input_ids[{i}]")
            if nested:
                raise GenerationSettingsError(f"input_ids[{i}] is 2-D; each prompt of a batch is one row of ids")
            rows.append(element_rows[0])
        elif any(isinstance(e, (list, tuple)) or _is_array(e) for e in element):
            raise GenerationSettingsError(f"input_ids[{i}] holds a list: token ids are nested too deeply (a batch "
                                          "is a list of lists of ints)")
        else:
            rows.append(list(element))
    return rows, True


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _array_rows(array: Any, what: str) -> tuple[list[list], bool]:
    """A 1-D (one prompt) or 2-D (a batch) integer array as rows of ints."""
    dtype = array.dtype
    integer = (not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
               if isinstance(array, torch.Tensor) else dtype.kind in "iu")
    if not integer:
        raise GenerationSettingsError(f"{what} is an array of {dtype}; token ids need an integer dtype")
    if array.ndim not in (1, 2):
        raise GenerationSettingsError(f"{what} has {array.ndim} dimensions; give 1 (a prompt) or 2 (a batch)")
    values = array.tolist()
    return (values, True) if array.ndim == 2 else ([values], False)
