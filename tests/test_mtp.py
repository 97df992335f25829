"""The checkpoint's MTP head as a draft model (issue 14, item 3's stretch goal), on the Qwen3.5 twin.

Facts first: transformers drops the `mtp.*` weights on load, and the head reads them from the
checkpoint's files. Then the drafts: greedy output with MTP drafts equals plain decoding, on the
eager and the static step, whether the drafts are the head's own (random weights: rejected) or
an oracle's (the plain greedy tokens: accepted); and the head is fed each position with the
token that followed it, in order."""
from __future__ import annotations

import pytest
import torch

from conftest import loaded_model, make_engine
from corgi import boxes, prompts
from corgi.engine import mtp
from corgi.pipeline import ChatSession
from corgi.types import CacheStats

MODEL = "tiny-qwen3.5"


def test_transformers_drops_the_mtp_weights_and_the_head_reads_them_from_the_files():
    from safetensors import safe_open
    lm = loaded_model(MODEL)
    assert not any("mtp" in name for name in lm.model.state_dict())          # dropped on load
    with safe_open(f"{lm.path}/model.safetensors", framework="pt") as f:
        on_disk = {k[len(mtp.PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(mtp.PREFIX)}
    assert "fc.weight" in on_disk and "layers.0.self_attn.q_proj.weight" in on_disk
    head = mtp.load_mtp_head(lm)
    assert head is not None and set(head.state_dict()) == set(on_disk)
    assert all(torch.equal(head.state_dict()[k], v.to(lm.dtype)) for k, v in on_disk.items())
    hidden = lm.text_config.hidden_size
    assert head.fc.weight.shape == (hidden, 2 * hidden)
    assert mtp.load_mtp_head(loaded_model("tiny-qwen2.5-vl")) is None       # a family without one


class Oracle(mtp.MtpDraft):
    """Runs the head as usual (its cache and pairs as in a real run), but proposes the plain run's
    next greedy token, so that drafts are accepted."""
    plain: list[int] = []

    new = 0          # sequence index of the row's first decoded token

    def draft(self, limit):
        mine = super().draft(limit)
        # The head last saw (seen - 1, ids[seen]): it drafts ids[seen + 1].
        index = self.seen + 1 - self.new
        return [self.plain[index]] if mine and 0 <= index < len(self.plain) else mine


def _run(engine, image, drafter=None):
    session = ChatSession(engine, image)
    engine.append(session.conv, prompts.reasoning_prompt("hi", 2, boxes.REL1000))
    made = []
    if drafter is not None:
        original = engine._drafts

        def recorded(conv, first, prefilled, sampling):
            made.append(original(conv, first, prefilled, sampling))
            # the engine's own draft source, run as `drafter` (Oracle overrides draft() only)
            made[-1].__class__, made[-1].new = drafter, len(conv.token_ids)
            return made[-1]
        engine._drafts = recorded
    # Per call: where its prefill starts and where its new tokens start.
    starts = [(session.conv.kv_len, len(session.conv.token_ids))]
    first = list(engine.generate(session.conv, 14, min_new_tokens=14, stats=(stats := CacheStats())))
    engine.append(session.conv, "\nmore")
    starts.append((session.conv.kv_len, len(session.conv.token_ids)))
    second = list(engine.generate(session.conv, 6, min_new_tokens=6))
    return dict(tokens=(first, second), stats=stats, lengths=(session.conv.kv_len, len(session.conv.token_ids)),
                made=made, starts=starts, ids=list(session.conv.token_ids))


@pytest.mark.parametrize("compiled", [False, True])
def test_mtp_drafts_leave_greedy_output_as_plain_decoding(compiled, street_image):
    overrides = dict(pipeline__prompt_lookup=False, pipeline__jump_forward=False)
    if compiled:
        overrides.update(model__compile=True, model__warmup=False)    # the static step, eager on a CPU
    plain = _run(make_engine(MODEL, **overrides), street_image)
    engine = make_engine(MODEL, pipeline__mtp_drafts=True, **overrides)
    assert engine.mtp is not None
    Oracle.plain = plain["tokens"][0]
    for drafter in (mtp.MtpDraft, Oracle):
        run = _run(engine, street_image, drafter)
        assert run["tokens"] == plain["tokens"] and run["lengths"] == plain["lengths"]
        # One draft per forward: the oracle's are accepted, so a forward yields two tokens.
        assert run["stats"].drafted_tokens >= (6 if drafter is Oracle else 12)
        # The head saw each position from the call's prefill on once, in order, with the token
        # that followed it: the prefilled prompt, then what was decoded.
        assert len(run["made"]) == 2
        for row, (start, new), tokens in zip(run["made"], run["starts"], run["tokens"]):
            assert row.mismatches == 0 and row.start == start < new
            assert [index for index, _ in row.consumed] == list(range(start, start + len(row.consumed)))
            assert all(run["ids"][index + 1] == token for index, token in row.consumed)
            assert row.consumed[-1][0] >= new + len(tokens) - 4
        if drafter is Oracle:
            assert run["stats"].accepted_drafts >= 5
            assert run["stats"].decode_model_steps < plain["stats"].decode_model_steps
