"""Prompt lookup decoding for the llama.cpp tiers: draft tokens copied from the context, checked in one pass.

With EchoLM's examples a small model's answer often repeats long runs of a cached answer: the same task
asked with other names, numbers or in another language (on mbpp-camel it copies the example's code and
renames the function). Prompt lookup decoding (also vLLM's "ngram" speculative method and llama.cpp's
lookup decoding) finds the context's last n-gram earlier in the context, drafts the tokens that followed
it there, and lets the model evaluate the sampled token and the draft in one batch: the draft tokens the
model would have chosen itself are kept, the first one it would not is replaced by its own choice. Greedy
answers stay the model's own; only llama.cpp's float reductions, which differ between batch sizes, can
tip a near tie.

On a CPU a batch of ``1 + k`` tokens costs more than one token (prefill runs about 2-3x the decode
rate), so drafting pays only where drafts are accepted; where the context has no match nothing is
drafted and a step costs what it did.

``LookupLlama`` changes how llama-cpp-python's speculative path evaluates: given a draft model it
computes logits for every prompt token and copies each row (a vocabulary of float32, 600 KB for
Qwen2.5) into a Python score matrix. Here the prompt keeps only its last row, as without drafting,
and decode batches keep theirs in llama.cpp's own buffer, which the sampler reads; nothing is copied.
Touches attributes of the pinned llama-cpp-python's ``Llama`` that are not public API (``_ctx``,
``_batch``, ``_requires_eval``), like ``echolm.generation.llamacpp_prefix``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_speculative import LlamaDraftModel


def lookup_draft(context: npt.NDArray[np.intc], max_ngram: int, n_draft: int,
                 min_ngram: int = 1) -> npt.NDArray[np.intc]:
    """Up to ``n_draft`` tokens that followed the latest earlier occurrence of ``context``'s last n-gram,
    trying the longest n-gram (``max_ngram``) first, down to ``min_ngram``; empty when none recurs.

    The latest occurrence, not the first: in a chat prompt the first occurrence of a short n-gram is
    often in the instructions, while the latest is in the example answer being followed or in the
    answer itself."""
    length = len(context)
    for size in range(min(max_ngram, length - 1), max(min_ngram, 1) - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], size)
        matches = np.flatnonzero(np.all(windows == context[-size:], axis=1))
        if matches.size:
            start = int(matches[-1]) + size
            return context[start:start + n_draft]
    return np.empty(0, dtype=np.intc)


@dataclass
class LookupStats:
    """Counters since the model was loaded: decode passes (batches after the prompt), draft tokens offered."""

    passes: int = 0
    drafted: int = 0


class PromptLookupDraft(LlamaDraftModel):
    """llama-cpp-python's draft-model hook, drafting with ``lookup_draft``."""

    def __init__(self, n_draft: int, max_ngram: int = 4, min_ngram: int = 3) -> None:
        self.n_draft = n_draft
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.stats = LookupStats()

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **_: Any) -> npt.NDArray[np.intc]:
        draft = lookup_draft(input_ids, self.max_ngram, self.n_draft, self.min_ngram)
        self.stats.drafted += len(draft)
        return draft


class LookupLlama(llama_cpp.Llama):
    """A ``Llama`` decoding with prompt lookup drafts (module docstring)."""

    def __init__(self, *args: Any, n_draft: int, max_ngram: int = 4, min_ngram: int = 3, **kwargs: Any) -> None:
        self.lookup = PromptLookupDraft(n_draft, max_ngram, min_ngram)
        super().__init__(*args, draft_model=self.lookup, **kwargs)
        # Never written (see eval): the base class sized it n_batch x vocabulary.
        self.scores = np.zeros((1, self._n_vocab), dtype=np.single)
        self._prompt_pending = False

    @property
    def _scores(self) -> npt.NDArray[np.single]:
        # generate() hands a row to its stopping criteria, whose chat-format stop reads only the tokens:
        # zeros, one read-only row seen at every position, so any row index it takes is valid.
        return np.broadcast_to(self.scores[0], (self.n_tokens, self._n_vocab))

    def generate(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        # generate() is a generator: its first eval, on the first iteration, is the prompt's.
        self._prompt_pending = True
        return super().generate(tokens, *args, **kwargs)

    def eval(self, tokens: Any) -> None:
        """``Llama.eval`` without the score copies: every row's logits for decode batches (the draft is
        checked against them), only the last row's for the prompt."""
        all_logits = not self._prompt_pending
        self._prompt_pending = False
        if all_logits and tokens:
            self.lookup.stats.passes += 1
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        for start in range(0, len(tokens), self.n_batch):
            batch = tokens[start:start + self.n_batch]
            n_past = self.n_tokens
            self._batch.set_batch(batch=batch, n_past=n_past, logits_all=all_logits)
            self._ctx.decode(self._batch)
            self.input_ids[n_past:n_past + len(batch)] = batch
            self.n_tokens += len(batch)
            self._requires_eval = False
