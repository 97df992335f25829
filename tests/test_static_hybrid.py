"""The static decode step for the Qwen3.5 hybrid text stack (Gated DeltaNet + gated attention),
on a tiny random Qwen3_5ForConditionalGeneration (CPU, float32): it gives the HF eager decode's
tokens and logits, rows of a batch are independent, and the state handed back lets HF go on
as if the static path had never been used."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from corgi.engine import linear_attention as la
from corgi.engine.kv import GrowingLayer
from corgi.engine.static_decode import HybridBucket, StaticDecoder, is_hybrid, supported
from test_qwen35_facts import image_inputs, tiny_qwen35

STEPS = 12


@pytest.fixture(scope="module")
def model():
    return tiny_qwen35(seed=11)


def new_cache(model, growing: bool = False) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if growing:     # the engine's cache: attention layers grow in place (kv.GrowingLayer)
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.inference_mode()
def prefill_image_prompt(model, cache):
    """Image prompt through HF (vision tower + M-RoPE); returns (logits [1, V], length, rope delta)."""
    ids, pixels, grid, types_ = image_inputs()
    positions, delta = model.model.get_rope_index(ids, types_, image_grid_thw=grid)
    out = model(input_ids=ids, position_ids=positions, pixel_values=pixels, image_grid_thw=grid,
                past_key_values=cache, use_cache=True)
    return out.logits[:, -1].float(), ids.shape[1], int(delta)


@torch.inference_mode()
def hf_decode(model, cache, logits, start: int, delta: int, steps: int):
    """Greedy eager decode with HF: (tokens, logits per step [1, V])."""
    tokens, seen = [], []
    for i in range(steps):
        token = logits.argmax(-1)
        tokens.append(int(token))
        pos = torch.full((3, 1, 1), start + i + delta)
        logits = model(input_ids=token[:, None], position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1].float()
        seen.append(logits)
    return tokens, seen


def static_decode(bucket, logits, steps: int):
    """Greedy decode on a loaded bucket: (tokens per row, logits per step [rows, V])."""
    tokens, seen = [], []
    for _ in range(steps):
        token = logits.argmax(-1)
        tokens.append(token.tolist())
        logits = bucket.step(token)
        seen.append(logits)
    return [list(row) for row in zip(*tokens)], seen


def decoder(model, **kw) -> StaticDecoder:
    return StaticDecoder(model, torch.device("cpu"), torch.float32, use_graphs=False, compile_layers=False, **kw)


def test_hybrid_stack_is_detected(model):
    dec = decoder(model)
    assert is_hybrid(model) and supported(model) and dec.hybrid
    bucket = dec.bucket(1, 100)
    assert isinstance(bucket, HybridBucket)
    assert [k is not None for k in bucket.k] == [False, False, False, True]          # K/V: attention layers only
    assert bucket.conv[0].shape == (1, 128, 4) and bucket.rec[0].shape == (1, 4, 16, 16)
    assert bucket.rec[0].dtype == torch.float32


@pytest.mark.parametrize("growing", [False, True])
def test_static_steps_match_hf_eager(model, growing):
    hf_cache, st_cache = new_cache(model, growing), new_cache(model, growing)
    logits, start, delta = prefill_image_prompt(model, hf_cache)
    logits2, _, _ = prefill_image_prompt(model, st_cache)
    assert delta != 0                                                                # M-RoPE offset in play
    hf_tokens, hf_logits = hf_decode(model, hf_cache, logits, start, delta, STEPS)
    bucket = decoder(model).bucket(1, start + STEPS)
    bucket.load(st_cache, start, torch.tensor([start + delta]), None)
    st_tokens, st_logits = static_decode(bucket, logits2, STEPS)
    assert st_tokens == [hf_tokens]
    assert len(set(hf_tokens)) > 3                                                   # the text really varies
    for a, b in zip(hf_logits, st_logits):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def padded_prefill(model, prompts):
    """Left-padded batch prefill with the mask: (cache, logits [B, V], mask [B, L], next positions [B])."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    cache = new_cache(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return cache, out.logits[:, -1].float(), mask, torch.tensor([len(p) for p in prompts])


@pytest.mark.parametrize("rows", [2, 3])
def test_batch_rows_equal_each_alone(model, rows):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in (9, 17, 13)[:rows]]
    dec = decoder(model)
    cache, logits, mask, next_pos = padded_prefill(model, prompts)
    bucket = dec.bucket(rows, mask.shape[1] + STEPS)
    assert bucket.batch == (2 if rows == 2 else 4)
    bucket.load(cache, mask.shape[1], next_pos, valid=mask)
    batch_tokens, batch_logits = static_decode(bucket, logits, STEPS)
    for r, prompt in enumerate(prompts):
        solo_cache, solo_logits, _, solo_pos = padded_prefill(model, [prompt])
        hf_tokens, hf_logits = hf_decode(model, solo_cache, solo_logits, len(prompt), 0, STEPS)
        assert batch_tokens[r] == hf_tokens
        for a, b in zip(hf_logits, batch_logits):
            assert torch.allclose(a[0], b[r], atol=1e-4, rtol=1e-4)
    assert len({tuple(t) for t in batch_tokens}) == rows                              # rows really differ


def test_a_reused_bucket_forgets_the_previous_conversation(model):
    dec = decoder(model)
    cache, logits, mask, pos = padded_prefill(model, [list(range(3, 30))])
    bucket = dec.bucket(1, 64)
    bucket.load(cache, mask.shape[1], pos, None)
    static_decode(bucket, logits, STEPS)                                             # another conversation
    fresh_cache, fresh_logits, fresh_mask, fresh_pos = padded_prefill(model, [[5, 6, 7, 8, 9]])
    hf_cache, hf_logits0, _, _ = padded_prefill(model, [[5, 6, 7, 8, 9]])
    bucket.load(fresh_cache, fresh_mask.shape[1], fresh_pos, None)
    tokens, _ = static_decode(bucket, fresh_logits, STEPS)
    assert tokens[0] == hf_decode(model, hf_cache, hf_logits0, 5, 0, STEPS)[0]


@pytest.mark.parametrize("growing", [False, True])
def test_handing_back_then_continuing_with_hf_equals_never_using_the_static_path(model, growing):
    more = 6
    ref_cache, cache = new_cache(model, growing), new_cache(model, growing)
    logits, start, delta = prefill_image_prompt(model, ref_cache)
    prefill_image_prompt(model, cache)
    ref_tokens, ref_logits = hf_decode(model, ref_cache, logits, start, delta, STEPS + more)

    bucket = decoder(model).bucket(1, start + STEPS + more)
    bucket.load(cache, start, torch.tensor([start + delta]), None)
    tokens, seen = static_decode(bucket, logits, STEPS)
    with pytest.raises(ValueError, match="every fed token"):
        bucket.append_to(cache, start, start + STEPS - 1)
    bucket.append_to(cache, start, start + STEPS)
    assert cache.get_seq_length() == start + STEPS
    rest, _ = hf_decode(model, cache, seen[-1], start + STEPS, delta, more)
    assert tokens[0] + rest == ref_tokens
    for i, layer in enumerate(cache.layers):                                         # same state at the end
        ref = ref_cache.layers[i]
        if i % 4 == 3:
            assert torch.allclose(layer.keys, ref.keys, atol=1e-4) and torch.allclose(layer.values, ref.values,
                                                                                      atol=1e-4)
        else:
            assert torch.allclose(layer.conv_states[0], ref.conv_states[0], atol=1e-4)
            assert torch.allclose(layer.recurrent_states[0], ref.recurrent_states[0], atol=1e-4)


@torch.inference_mode()
def hf_feed(model, cache, tokens, start: int):
    """Feed given tokens one at a time through HF: logits after each [len, V]."""
    seen = []
    for i, token in enumerate(tokens):
        pos = torch.full((3, 1, 1), start + i)
        seen.append(model(input_ids=torch.tensor([[token]]), position_ids=pos, past_key_values=cache,
                          use_cache=True).logits[0, -1].float())
    return torch.stack(seen)


def test_a_chunk_of_uneven_rows_feeds_each_row_only_its_own_tokens(model):
    """One multi-token forward (a jump-forward chunk) over two rows with 5 and 2 real tokens: each
    row's logits and its next step equal HF fed that row's tokens alone, so the padding after
    the short row never reached its linear states; keep() refuses to keep other counts (the
    forward was not made to be cut back)."""
    prompts = [list(range(3, 20)), list(range(40, 51))]
    chunk = [[11, 22, 33, 44, 55], [66, 77]]
    dec = decoder(model)
    cache, logits, mask, next_pos = padded_prefill(model, prompts)
    bucket = dec.bucket(2, mask.shape[1] + 16)
    bucket.load(cache, mask.shape[1], next_pos, valid=mask)
    ids = torch.tensor([chunk[0], chunk[1] + [0, 0, 0]])
    wide = bucket.extend(ids, lengths=[5, 2])
    assert bucket.last_width == 8 and bucket.last_forwards == 1                   # padded to a width bucket, one forward
    with pytest.raises(ValueError, match="rewind=True"):
        bucket.keep([3, 2])
    bucket.keep([5, 2])
    after = bucket.step(torch.tensor([7, 8]))
    for r, prompt in enumerate(prompts):
        solo_cache, _, _, _ = padded_prefill(model, [prompt])
        ref = hf_feed(model, solo_cache, chunk[r] + [(7, 8)[r]], len(prompt))
        n = len(chunk[r])
        assert torch.allclose(wide[r, :n], ref[:n], atol=1e-4, rtol=1e-4)
        assert torch.allclose(after[r], ref[n], atol=1e-4, rtol=1e-4)


def test_a_verify_cut_back_per_row_equals_feeding_only_the_kept_tokens(model):
    """A draft verify over two rows (extend with rewind=True) of which row 0 keeps 3 of its 5
    tokens and row 1 keeps 1 of 2: keep() replays the linear states from the tape, with no
    second forward, and each row's next steps equal HF fed only that row's kept tokens."""
    prompts = [list(range(3, 20)), list(range(40, 51))]
    chunk = [[11, 22, 33, 44, 55], [66, 77]]
    kept = [3, 1]
    dec = decoder(model)
    cache, logits, mask, next_pos = padded_prefill(model, prompts)
    bucket = dec.bucket(2, mask.shape[1] + 16)
    bucket.load(cache, mask.shape[1], next_pos, valid=mask)
    ids = torch.tensor([chunk[0], chunk[1] + [0, 0, 0]])
    held = dec.nbytes()
    wide = bucket.extend(ids, lengths=[5, 2], rewind=True)
    assert bucket.snapshot_nbytes() > 0
    assert dec.nbytes() == held + bucket.snapshot_nbytes()      # in the memory budget from the first verify
    bucket.keep(kept)
    assert bucket.last_forwards == 1                     # the cut-back read no weights
    after = [bucket.step(torch.tensor([7, 8])), bucket.step(torch.tensor([9, 10]))]
    for r, prompt in enumerate(prompts):
        solo_cache, _, _, _ = padded_prefill(model, [prompt])
        fed = chunk[r][:kept[r]] + [(7, 8)[r], (9, 10)[r]]
        ref = hf_feed(model, solo_cache, fed, len(prompt))
        n = kept[r]
        assert torch.allclose(wide[r, :n], ref[:n], atol=1e-4, rtol=1e-4)
        assert torch.allclose(after[0][r], ref[n], atol=1e-4, rtol=1e-4)
        assert torch.allclose(after[1][r], ref[n + 1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot be cut back"):        # wider than the tape
        bucket.extend(torch.zeros((2, 9), dtype=torch.long), rewind=True)


def test_layer_functions_trace_as_one_graph_each(model):
    """fullgraph compilation (no graph breaks, no host syncs, in-place state updates allowed) of
    the two layer functions; aot_eager instead of inductor keeps it quick on CPU."""
    import torch._dynamo
    torch._dynamo.reset()
    fns = {"linear_attention": la.linear_layer_step, "full_attention": la.gated_attention_layer_step}
    compiled = {k: torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager") for k, f in fns.items()}
    wide = {"linear_attention": la.linear_layer_extend, "full_attention": la.gated_attention_layer_extend}
    dec = decoder(model)
    dec.layer_fn = compiled
    dec.extend_fn = {k: torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager") for k, f in wide.items()}
    cache, logits, mask, pos = padded_prefill(model, [[3, 1, 4, 1, 5, 9, 2, 6]])
    ref_cache, ref_logits, _, _ = padded_prefill(model, [[3, 1, 4, 1, 5, 9, 2, 6]])
    bucket = dec.bucket(1, 32)
    bucket.load(cache, 8, pos, None)
    tokens, seen = static_decode(bucket, logits, 4)
    hf_tokens, hf_logits = hf_decode(model, ref_cache, ref_logits, 8, 0, 4)
    assert tokens[0] == hf_tokens
    assert torch.allclose(seen[-1], hf_logits[-1], atol=1e-4)
    chunk = bucket.extend(torch.tensor([[5, 6, 7]]))                               # a compiled multi-token forward
    bucket.keep([3])
    ref = hf_feed(model, ref_cache, [5, 6, 7], 12)                                # hf_decode fed 4 tokens from 8
    assert torch.allclose(chunk[0], ref, atol=1e-4)


def test_moe_text_stacks_are_not_covered():
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
    from test_qwen35_facts import ROPE, VISION
    text = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                shared_expert_intermediate_size=32, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, rope_parameters=dict(ROPE))
    moe = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=dict(VISION)))
    assert is_hybrid(moe) and not supported(moe)
    with pytest.raises(ValueError, match="dense MLPs only"):
        decoder(moe)


def test_the_decoder_counts_every_buffer_it_holds(model):
    """StaticDecoder.nbytes (the memory budget's view of the compiled decoder): K/V, linear
    states, tapes, and a captured width's input and logits buffers (CUDA keeps them in
    bucket.wide; filled by hand here, as _capture_extend returns them), but not the weights."""
    dec = decoder(model)
    bucket = dec.bucket(1, 64)
    own = sum(t.numel() * t.element_size() for group in (bucket.k, bucket.v, bucket.conv, bucket.rec)
              for t in group if t is not None)
    own += sum(t.numel() * t.element_size() for tape in bucket.tape if tape for t in tape)
    assert own < dec.nbytes() < own + 1_000_000          # plus small io buffers, no weights
    held = dec.nbytes()
    ids, logits = torch.zeros((1, 8), dtype=torch.long), torch.zeros((1, 8, 1000))
    bucket.wide[8] = (ids, None, logits)
    assert dec.nbytes() == held + ids.numel() * 8 + logits.numel() * 4
