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
    """Upload (the head prefill at upload), two calls, then a cut back into the second call's
    output (Stop, Regenerate) and a third call."""
    session = ChatSession(engine, image)
    engine.prefill(session.conv)
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
    news, tokens = [], []
    for budget, text in ((14, "\nmore"), (6, None), (5, None)):
        news.append(len(session.conv.token_ids))                # where the call's new tokens start
        tokens.append(list(engine.generate(session.conv, budget, min_new_tokens=budget,
                                           stats=(stats := CacheStats()) if budget == 14 else None)))
        if budget == 14:
            first_stats = stats
            engine.append(session.conv, text)
        elif budget == 6:
            session.conv.truncate(news[-1] + 3)                  # back into this call's output
    return dict(tokens=tokens, stats=first_stats, lengths=(session.conv.kv_len, len(session.conv.token_ids)),
                made=made, news=news, ids=list(session.conv.token_ids), conv=session.conv)


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
        # The head's context is the conversation's: the upload's prefill on, each position once,
        # in order, with the token that followed it, across calls, until the cut.
        rows, ids = run["made"], run["ids"]
        assert len(rows) == 3 and all(row.context is rows[0].context for row in rows)
        assert all(row.mismatches == 0 for row in rows)
        before = [i for row in rows[:2] for i, _ in row.consumed]
        assert before == list(range(len(before)))
        assert before[-1] >= run["news"][1] + len(run["tokens"][1]) - 4
        cut = run["news"][1] + 3
        context = rows[0].context
        assert context.positions == sorted(set(context.positions))             # one entry a position
        assert context.cache.get_seq_length() == len(context.positions)
        after = rows[2].consumed
        assert after and all(ids[i + 1] == t for i, t in after)               # paired with the new tokens
        assert all(i >= rows[2].start for i, _ in after) and rows[2].start <= cut
        assert run["conv"].nbytes() >= context.nbytes() > 0
        if drafter is Oracle:
            assert run["stats"].accepted_drafts >= 5
            assert run["stats"].decode_model_steps < plain["stats"].decode_model_steps
