"""decode.MinLength: the stop ids stay banned until n tokens were accepted, then the logits are
left alone (benchmarks force exact token counts with it; it masks with a device index, made once)."""
from __future__ import annotations

import torch

from corgi.engine.decode import MinLength


def test_stop_ids_are_banned_until_n_tokens_then_free():
    rule = MinLength(2, [3, 7])
    for accepted in range(4):
        logits = torch.zeros(1, 10)
        rule.mask(logits)
        banned = {i for i in range(10) if logits[0, i] == float("-inf")}
        assert banned == ({3, 7} if accepted < 2 else set()), accepted
        assert rule.accept(5) and not rule.is_finished()


def test_the_masked_logits_keep_their_dtype_and_other_entries():
    rule = MinLength(float("inf"), [0])
    logits = torch.arange(4, dtype=torch.bfloat16)[None]
    rule.mask(logits)
    assert logits.dtype == torch.bfloat16
    assert logits[0, 0] == float("-inf") and logits[0, 1:].tolist() == [1.0, 2.0, 3.0]
