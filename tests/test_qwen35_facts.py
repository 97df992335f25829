"""Facts about Qwen3.5 / Qwen3.6 (and the MoE families) in transformers 5.23 that the engine
builds on, each checked on a tiny random model (float32, CPU). docs/qwen35-facts.md lists them.

The hand-written arithmetic here is deliberately naive (HF's own order of operations), so it
states what HF computes independently of corgi/engine/linear_attention.py."""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import (DynamicCache, Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
                          Qwen3_5MoeForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

IMAGE, VIDEO, V_START, V_END = 500, 501, 502, 503
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1], "mrope_interleaved": True}     # head_dim 32 -> rotary 8 -> 4 freqs
VISION = dict(depth=1, hidden_size=32, hidden_act="gelu_pytorch_tanh", intermediate_size=64, num_heads=2,
              in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
              num_position_embeddings=64)
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END)


def tiny_text(**overrides) -> dict:
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, rms_norm_eps=1e-6,
                max_position_embeddings=4096, initializer_range=0.25, rope_parameters=dict(ROPE),
                tie_word_embeddings=False, dtype="float32")
    text.update(overrides)
    return text


def tiny_qwen35(seed: int = 0, **text_overrides) -> Qwen3_5ForConditionalGeneration:
    """A tiny random Qwen3_5ForConditionalGeneration. The weights HF initialises to constants
    (norms: zeros of a 1+w norm, gated norm: ones, dt_bias: ones) are randomised so that each
    of them matters, and A_log is kept in a range where the recurrent state remembers."""
    config = Qwen3_5Config(text_config=tiny_text(**text_overrides), vision_config=dict(VISION), **TOKENS)
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen).mul(0.99).add(0.01).log())   # A in [0.01, 1)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_qwen35()


def ids_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 400, (1, n), generator=torch.Generator().manual_seed(seed))


def prefill(model, ids, cache=None, **kw):
    cache = cache if cache is not None else DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, **kw).logits
    return logits, cache


# ---- layer pattern and cache ------------------------------------------------------------------

def test_layer_types_every_fourth_layer_attends():
    cfg = Qwen3_5Config(text_config=tiny_text(num_hidden_layers=8)).text_config
    assert cfg.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 2
    cfg = Qwen3_5Config(text_config=tiny_text(num_hidden_layers=6, full_attention_interval=2)).text_config
    assert cfg.layer_types == ["linear_attention", "full_attention"] * 3
    assert Qwen3_5Config().text_config.rope_parameters["partial_rotary_factor"] == 0.25   # default


def test_cache_from_config_has_linear_layers_and_a_bare_cache_fails(model):
    cache = DynamicCache(config=model.config)
    assert [type(layer) for layer in cache.layers] == [LinearAttentionLayer] * 3 + [DynamicLayer]
    ids = ids_of(6, 0)
    with pytest.raises(IndexError):                   # lazily grown layer list: layer 0 is missing
        prefill(model, ids, DynamicCache())
    attention_only = DynamicCache()
    attention_only.layers = [DynamicLayer() for _ in range(4)]   # what a pure-K/V cache looks like
    with pytest.raises(ValueError, match="Cannot get conv state for non linear attention layer 0"):
        prefill(model, ids, attention_only)


def test_linear_states_location_shape_dtype_and_in_place(model):
    text = model.config.text_config
    conv_dim = 2 * text.linear_num_key_heads * text.linear_key_head_dim + \
        text.linear_num_value_heads * text.linear_value_head_dim
    _, cache = prefill(model, ids_of(10, 1))
    layer = cache.layers[0]
    conv, rec = layer.conv_states[0], layer.recurrent_states[0]     # dicts keyed by state index
    assert conv.shape == (1, conv_dim, text.linear_conv_kernel_dim) and conv.dtype == torch.float32
    assert rec.shape == (1, text.linear_num_value_heads, text.linear_key_head_dim, text.linear_value_head_dim)
    assert rec.dtype == torch.float32
    assert cache.get_conv_state(0) is conv and cache.get_recurrent_state(0) is rec
    assert layer.has_previous_state[0]
    assert cache.get_seq_length() == 10                     # read from the first attention layer
    before = (conv.clone(), rec.clone())
    ptrs = (conv.data_ptr(), rec.data_ptr())
    prefill(model, torch.tensor([[7]]), cache)              # a decode step
    prefill(model, torch.tensor([[8, 9, 10]]), cache)       # a chunked continuation
    assert layer.conv_states[0] is conv and layer.recurrent_states[0] is rec
    assert (conv.data_ptr(), rec.data_ptr()) == ptrs         # updated in place ...
    assert not torch.equal(conv, before[0]) and not torch.equal(rec, before[1])   # ... so snapshot = clone
    with torch.inference_mode():
        twin = copy.deepcopy(cache)                          # deepcopy works on inference tensors
    assert twin.layers[0].recurrent_states[0].data_ptr() != rec.data_ptr()
    assert torch.equal(twin.layers[0].recurrent_states[0], rec)


def test_bf16_model_keeps_a_float32_recurrent_state():
    model = tiny_qwen35().to(torch.bfloat16)
    _, cache = prefill(model, ids_of(8, 2))
    prefill(model, torch.tensor([[5]]), cache)
    assert cache.layers[0].conv_states[0].dtype == torch.bfloat16
    assert cache.layers[0].recurrent_states[0].dtype == torch.float32
    assert cache.layers[3].keys.dtype == torch.bfloat16


def test_attention_layers_crop_and_linear_layers_cannot(model):
    _, cache = prefill(model, ids_of(10, 3))
    assert not cache.is_croppable and not cache.layers[0].is_croppable
    with pytest.raises(RuntimeError, match="does not track past states"):
        cache.layers[0].crop(-2)
    with pytest.raises(RuntimeError):
        cache.crop(-2)                                      # whole cache: the linear layers refuse
    with pytest.raises(ValueError, match="positive value"):
        cache.layers[3].crop(8)                            # 5.23: only a negative count
    cache.layers[3].crop(-2)
    assert cache.layers[3].keys.shape[-2] == 8 and cache.get_seq_length() == 8
    # Linear layers have no batch_repeat_interleave / batch_select_indices either.
    assert not hasattr(cache.layers[0], "batch_repeat_interleave")
    with pytest.raises(AttributeError):
        cache.batch_repeat_interleave(2)


# ---- vision inputs, positions ---------------------------------------------------------------

def image_inputs():
    grid = torch.tensor([[1, 4, 6]])                      # 24 patches -> 6 merged LM tokens
    pixels = torch.randn(24, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[1, 2, V_START] + [IMAGE] * 6 + [V_END, 3, 4, 5]])
    return ids, pixels, grid, (ids == IMAGE).long()


def test_vision_inputs_like_qwen3_vl_and_precomputed_features(model):
    ids, pixels, grid, types_ = image_inputs()
    with torch.inference_mode():
        ref = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types_).logits
        features = model.model.get_image_features(pixels, grid, return_dict=True)
        assert set(features.keys()) == {"last_hidden_state", "pooler_output"}      # no deepstack_features
        assert isinstance(features.pooler_output, tuple) and features.pooler_output[0].shape == (6, 64)
        pre = model(input_ids=ids, mm_encoder_outputs={"image": features}, image_grid_thw=grid,
                    mm_token_type_ids=types_).logits
        assert torch.equal(pre, ref)                        # the vision tower is skipped, same result
        # Only pooler_output is read: a duck-typed object (the engine's EncoderOutput) works, and so
        # do explicit positions without grid / token types (what the engine passes).
        positions, delta = model.model.get_rope_index(ids, types_, image_grid_thw=grid)
        duck = types.SimpleNamespace(pooler_output=features.pooler_output, deepstack_features=[])
        engine_style = model(input_ids=ids, position_ids=positions, mm_encoder_outputs={"image": duck}).logits
        assert torch.allclose(engine_style, ref, atol=1e-5)
        with pytest.raises(ValueError, match="cannot specify both"):
            model(input_ids=ids, pixel_values=pixels, mm_encoder_outputs={"image": features},
                  image_grid_thw=grid, mm_token_type_ids=types_)
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    assert not hasattr(model.model.visual, "deepstack_merger_list")
    assert not hasattr(model.config.vision_config, "deepstack_visual_indexes")


def test_rope_index_equals_qwen3_vl(model):
    ids, _, grid, types_ = image_inputs()
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                                     "mrope_section": [4, 2, 2],
                                                                     "mrope_interleaved": True})
    vision = dict(VISION, deepstack_visual_indexes=[0])
    qwen3 = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **TOKENS))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                                           # and with left padding
    for kwargs in ({}, {"attention_mask": mask}):
        pos5, delta5 = model.model.get_rope_index(ids, types_, image_grid_thw=grid, **kwargs)
        pos3, delta3 = qwen3.model.get_rope_index(ids, types_, image_grid_thw=grid, **kwargs)
        assert torch.equal(pos5, pos3) and torch.equal(delta5, delta3)
    pos, delta = model.model.get_rope_index(ids, types_, image_grid_thw=grid)
    assert pos[:, 0, 3:9].tolist() == [[3] * 6, [3, 3, 3, 4, 4, 4], [3, 4, 5, 3, 4, 5]]
    assert delta.item() == -3                                 # 13 tokens, last position 9


# ---- left padding ---------------------------------------------------------------------------

def test_left_padding_is_zeroed_before_the_linear_layers(model):
    pad = 5
    a, b = ids_of(12, 5)[0], ids_of(12 + pad, 6)[0]
    solo_a, cache_a = prefill(model, a[None])
    solo_b, _ = prefill(model, b[None])
    mask = torch.ones(2, 12 + pad, dtype=torch.long)
    mask[0, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    rows = {}
    for filler in (0, 123):                                   # what sits under the padding must not matter
        ids = torch.stack([torch.cat([torch.full((pad,), filler), a]), b])
        rows[filler] = prefill(model, ids, attention_mask=mask, position_ids=positions)
    (batch, cache), (other, _) = rows[0], rows[123]
    assert torch.allclose(batch[0, pad:], solo_a[0], atol=1e-4) and torch.allclose(batch[1], solo_b[0], atol=1e-4)
    assert torch.allclose(batch[:, pad:], other[:, pad:], atol=1e-5)   # (pad positions' own outputs differ)
    for i in range(3):                                        # the states of the padded row = its own run
        assert torch.allclose(cache.layers[i].conv_states[0][0], cache_a.layers[i].conv_states[0][0], atol=1e-4)
        assert torch.allclose(cache.layers[i].recurrent_states[0][0], cache_a.layers[i].recurrent_states[0][0],
                              atol=1e-4)
    # A decode step after the padded prefill (a 1-token step carries no linear-layer mask).
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step_pos = torch.tensor([[12], [12 + pad]])[None].expand(3, -1, -1)
    tokens = torch.tensor([[7], [9]])
    batch2, _ = prefill(model, tokens, cache, attention_mask=step_mask, position_ids=step_pos)
    solo2, _ = prefill(model, tokens[:1], cache_a, position_ids=step_pos[:, :1])
    assert torch.allclose(batch2[0], solo2[0], atol=1e-4)
    # Without the mask the padding leaks into the recurrence.
    ids = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), a]), b])
    leaky, _ = prefill(model, ids, position_ids=positions)
    assert (leaky[0, -1] - solo_a[0, -1]).abs().max() > 1e-2


# ---- the two mixers, by hand ----------------------------------------------------------------

def zc_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def test_decoder_norms_are_zero_centred(model):
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm, Qwen3_5RMSNormGated
    layer = model.model.language_model.layers[0]
    assert isinstance(layer.input_layernorm, Qwen3_5RMSNorm) and isinstance(model.model.language_model.norm,
                                                                            Qwen3_5RMSNorm)
    assert torch.equal(Qwen3_5RMSNorm(8).weight, torch.zeros(8))        # 1 + w: zeros at init
    assert torch.equal(Qwen3_5RMSNormGated(8).weight, torch.ones(8))     # plain w: ones at init
    x = torch.randn(3, 64)
    norm = layer.input_layernorm
    with torch.no_grad():
        assert torch.allclose(norm(x), zc_norm(x, norm.weight, norm.eps), atol=1e-6)


def test_full_attention_layer_gate_partial_rotary_and_qk_norm(model):
    lm = model.model.language_model
    attn = lm.layers[3].self_attn
    text = model.config.text_config
    hq, hkv, d = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    assert attn.q_proj.out_features == 2 * hq * d                      # query and output gate
    rot = lm.rotary_emb.inv_freq.numel() * 2
    assert rot == int(d * 0.25) == 8                                  # partial rotary
    t = 5
    x = torch.randn(1, t, 64, generator=torch.Generator().manual_seed(7))
    pos = torch.arange(t)[None, None].expand(3, 1, t)
    with torch.no_grad():
        cos, sin = lm.rotary_emb(x, pos)                              # [1, T, rot]
        assert cos.shape[-1] == rot
        out, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)
        qg = attn.q_proj(x).view(1, t, hq, 2 * d)
        q, gate = qg[..., :d], qg[..., d:].reshape(1, t, hq * d)      # per head: D query, D gate
        q = zc_norm(q, attn.q_norm.weight, 1e-6).transpose(1, 2)       # [1, Hq, T, D]
        k = zc_norm(attn.k_proj(x).view(1, t, hkv, d), attn.k_norm.weight, 1e-6).transpose(1, 2)
        v = attn.v_proj(x).view(1, t, hkv, d).transpose(1, 2)

        def rope(y):
            c, s = cos[:, None], sin[:, None]
            y1, y2 = y[..., :rot // 2], y[..., rot // 2:rot]
            return torch.cat([y[..., :rot] * c + torch.cat([-y2, y1], -1) * s, y[..., rot:]], -1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        scores = q @ k.transpose(-1, -2) / d ** 0.5 + torch.full((t, t), float("-inf")).triu(1)
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, t, hq * d)
        expected = attn.o_proj(mixed * torch.sigmoid(gate))
    assert torch.allclose(out, expected, atol=1e-5)


def test_gated_deltanet_decode_step_by_hand(model):
    text = model.config.text_config
    la = model.model.language_model.layers[0].linear_attn
    hk, hv, dk, dv = text.linear_num_key_heads, text.linear_num_value_heads, text.linear_key_head_dim, \
        text.linear_value_head_dim
    assert la.conv1d.bias is None and la.conv1d.groups == la.conv_dim and la.conv1d.kernel_size == (4,)
    _, cache = prefill(model, ids_of(9, 8))
    conv0 = cache.layers[0].conv_states[0].clone()
    rec0 = cache.layers[0].recurrent_states[0].clone()
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        out = la(hidden_states=x, cache_params=cache, attention_mask=None)
        xs = x[0, 0]
        mixed, z, b, a = la.in_proj_qkv(xs), la.in_proj_z(xs), la.in_proj_b(xs), la.in_proj_a(xs)
        window = torch.cat([conv0[0, :, 1:], mixed[:, None]], -1)    # conv state = the last K inputs
        conv = F.silu((window * la.conv1d.weight[:, 0]).sum(-1))
        q, k, v = conv.split([hk * dk, hk * dk, hv * dv])
        q = q.view(hk, dk).repeat_interleave(hv // hk, 0)
        k = k.view(hk, dk).repeat_interleave(hv // hk, 0)
        v = v.view(hv, dv)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / dk ** 0.5    # l2norm, then 1/sqrt(dk)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        beta = torch.sigmoid(b)
        g = -la.A_log.exp() * F.softplus(a + la.dt_bias)                # log decay per value head
        state = rec0[0] * g.exp()[:, None, None]
        delta = (v - (state * k[:, :, None]).sum(-2)) * beta[:, None]
        state = state + k[:, :, None] * delta[:, None, :]
        o = (state * q[:, :, None]).sum(-2)                             # [Hv, dv]
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * la.norm.weight * F.silu(z.view(hv, dv))
        expected = la.out_proj(o.reshape(-1))
    assert torch.allclose(out[0, 0], expected, atol=1e-5)
    assert torch.allclose(cache.layers[0].conv_states[0][0], window, atol=1e-6)
    assert torch.allclose(cache.layers[0].recurrent_states[0][0], state, atol=1e-5)


# ---- the MoE families -----------------------------------------------------------------------

def moe_text(**kw):
    return {**dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2), **kw}


def test_qwen35_moe_block_router_shared_expert_and_experts_implementation():
    text = moe_text(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4, shared_expert_intermediate_size=48, rope_parameters=dict(ROPE))
    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=dict(VISION))).eval()
    assert model.config._experts_implementation == "grouped_mm"        # the default
    layers = model.model.language_model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["Qwen3_5MoeSparseMoeBlock"] * 4   # every layer
    assert [layer.block_type for layer in layers] == ["linear_attention"] * 3 + ["full_attention"]
    block = layers[0].mlp
    assert block.experts.gate_up_proj.shape == (8, 2 * 32, 64) and block.experts.down_proj.shape == (8, 64, 32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
        x = torch.randn(1, 5, 64)
        out = block(x)
        h = x.view(-1, 64)
        probs = F.softmax(F.linear(h, block.gate.weight), dim=-1, dtype=torch.float)
        top, idx = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)                          # renormalised top-k
        routed = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for j in range(2):
                e = idx[t, j]
                gate, up = F.linear(h[t], block.experts.gate_up_proj[e]).chunk(2)
                routed[t] += top[t, j] * F.linear(F.silu(gate) * up, block.experts.down_proj[e])
        shared = block.shared_expert(h) * torch.sigmoid(block.shared_expert_gate(h))   # sigmoid-gated shared expert
        assert torch.allclose(out.view(-1, 64), routed + shared, atol=1e-5)
        ids = torch.randint(0, 250, (1, 9))
        logits = {}
        for impl in ("eager", "grouped_mm", "batched_mm"):
            model.set_experts_implementation(impl)
            logits[impl] = model(input_ids=ids).logits
    assert all(torch.allclose(v, logits["eager"], atol=1e-4) for v in logits.values())
    with pytest.raises(ValueError, match="experts_implementation"):
        model.set_experts_implementation("nope")


def test_qwen3_vl_moe_block_has_no_shared_expert():
    text = moe_text(intermediate_size=96, num_hidden_layers=2, head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                     "mrope_interleaved": True})
    vision = dict(VISION, deepstack_visual_indexes=[0])
    model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision))
    block = model.model.language_model.layers[0].mlp
    assert type(block).__name__ == "Qwen3VLMoeTextSparseMoeBlock"
    assert {n for n, _ in block.named_children()} == {"experts", "gate"}
    assert model.config._experts_implementation == "grouped_mm"
    cfg = model.config.text_config
    assert cfg.decoder_sparse_step == 1 and not cfg.mlp_only_layers     # every layer MoE by default
