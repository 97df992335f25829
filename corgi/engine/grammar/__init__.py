"""Grammar-constrained decoding for the two structured phases, on xgrammar 0.2.8.

  schemas.py   the accepted outputs as EBNF (formats of `corgi.formats`; box integer ranges
               of the family's `BoxConvention`) and their worst-case byte lengths
  lengths.py   the length limits: per-token character costs, the budget masks, a small lexer
  decoder.py   ConstrainedDecoder (one sequence), GrammarCache (compiled grammars over a
               tokenizer's shared tables), mask_batch
  tables_cache.py  those per-vocabulary tables on disk, for the next process

Where the bounds live. The structure, the step/item counts and the box ranges are in the EBNF.
The *lengths* (thinking text, strings) are enforced by `ConstrainedDecoder`, not by the EBNF:
in xgrammar 0.2.8 a bounded repetition is expensive at a Qwen-sized vocabulary (151,936 ids):
`[^<]{0,256}` takes ~8 s to compile, `[^"...]{0,200}` ~4 s, and `("\\" [..] | [^..]){0,200}`
makes every mask cost 0.3-0.8 s, while the unbounded recursive forms used here compile in ~0.02 s
and fill a mask in ~0.01-0.05 ms. The decoder follows the accepted bytes with a small lexer and,
near a limit, also masks out every token that would write past it (`lengths.py`). Hence any
token sequence the decoder allows ends within `spec.max_bytes` bytes, so within that many tokens
(each allowed token is >= 1 byte).

Termination / EOS. The grammars contain no end-of-sequence token. Matchers are built with
`terminate_without_stop_token=True`, so `ConstrainedDecoder.is_finished()` is True right after
the final "}" is accepted; the engine stops and appends <|im_end|> itself. Do not `accept`
<|im_end|> (xgrammar refuses every token after termination; `accept` returns False). A `mask()`
after the end allows only the stop tokens (<|im_end|>, <|endoftext|>), xgrammar's own behaviour,
and stop tokens are never allowed before the end.

Special tokens. xgrammar 0.2.8 decodes added special tokens such as <|image_pad|> or <|im_start|>
to their literal names and treats them as text, so the grammar alone would allow them inside a
JSON string; `ConstrainedDecoder` masks out every special token of the tokenizer.

Out of budget. `completion_text()` / `completion_token_ids()` / `finish()` close the structure
validly from wherever the output stopped (greedy, checked against the grammar). Inside <think>
the closing is
    </think>\\n{"steps": [{"statement": "", "kind": "reasoning", "bbox_2d": null}]}
(one empty reasoning step: no region to look at; `parsing.py` drops empty statements, so this
reads as "no steps"); inside a step it closes the open string, picks "reasoning" if the kind is
not written yet, finishes an open box with zeros, then closes the arrays and objects. In phase 4
it closes the strings, writes "null" for an unwritten box and ends key_evidence there.
If the budget ran out inside a multi-byte character, `text()` leaves that character out and
`completion_text()` starts with it, finished; `closed_text()` is always the whole valid output and
`completion_token_ids()` the exact tokens to append (they continue the split bytes, whereas
re-encoding `completion_text()` would repeat them).
"""
from __future__ import annotations

from ...formats import MAX_EXPLANATION_CHARS, MAX_STRING_CHARS, THINK_CLOSE, THINK_OPEN
from .decoder import COMPILE_THREADS, ConstrainedDecoder, GrammarCache, Vocabulary, mask_batch, vocabulary
from .schemas import (MAX_EVIDENCE_ITEMS, GrammarSpec, reasoning_grammar_source, reasoning_max_bytes,
                      reasoning_spec, synthesis_grammar_source, synthesis_max_bytes, synthesis_spec)

__all__ = [
    "MAX_STRING_CHARS", "MAX_EXPLANATION_CHARS", "MAX_EVIDENCE_ITEMS", "GrammarSpec",
    "reasoning_grammar_source", "synthesis_grammar_source", "reasoning_spec", "synthesis_spec",
    "reasoning_max_bytes", "synthesis_max_bytes", "GrammarCache", "ConstrainedDecoder",
    "mask_batch", "Vocabulary", "vocabulary", "COMPILE_THREADS", "THINK_OPEN", "THINK_CLOSE",
]
