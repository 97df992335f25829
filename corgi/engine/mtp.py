"""The checkpoint's own multi-token-prediction (MTP) head as a draft model (Qwen3.5 / Qwen3.6).

Every Qwen3.5 checkpoint ships one MTP layer (`mtp.*` weights) that transformers drops on load
(`_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]`; tests/test_mtp.py checks it). It predicts
the token after next from the main model's last hidden state, as vLLM's Qwen3_5MTP runs it:

    x_{p+1} -> embed -> pre_fc_norm_embedding --+
                                                cat -> fc [2H -> H] -> one full-attention
    h_p (main model, after its final norm) -> pre_fc_norm_hidden --+      decoder layer (own K/V)
                                                                          -> norm -> lm_head -> x_{p+2}

embed_tokens and lm_head are the main model's. The layer attends over its own K/V, one entry
per position p it has seen, at the main model's rope position of p.

`MtpDraft` is a row's draft source in the decode loop (decode.Row.lookup, beside prompt
lookup): `observe(hidden)` takes the main model's hidden states of the positions a forward
kept, `push(token)` every token the row took, and `draft()` runs the layer over the (hidden,
next token) pairs it has not seen yet and proposes the argmax of the last. Its context is the
conversation's (`HeadState`, Conversation.mtp): every position the conversation computed since
its first prefill (the image at upload, every phase's prompt and output, every turn), kept,
cut back and dropped with the conversation's K/V and counted with it in the memory budget.
A cut that removes the state the head had not paired yet leaves one hole in its cache. Sampled
rows (temperature > 0) draft nothing, and what they compute is a hole too. Drafts only: greedy
output is what plain decoding gives, whatever the drafts are.
"""
from __future__ import annotations

import bisect
import copy
import importlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from . import state

log = logging.getLogger(__name__)

PREFIX = "mtp."


def _layer_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class MtpHead(nn.Module):
    """The MTP layer of a Qwen3.5 text config: parameter names are the checkpoint's, less "mtp."."""

    def __init__(self, text_config, layer_class: str):
        super().__init__()
        # A full-attention layer of the family's own class, with its own one-layer cache.
        self.config = copy.deepcopy(text_config)
        self.config.layer_types = ["full_attention"]
        self.config.num_hidden_layers = 1
        self.layers = nn.ModuleList([_layer_class(layer_class)(self.config, 0)])
        norm = type(self.layers[0].input_layernorm)      # the family's RMSNorm (Qwen3.5: x * (1 + w))
        hidden, eps = text_config.hidden_size, text_config.rms_norm_eps
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = norm(hidden, eps=eps)
        self.pre_fc_norm_hidden = norm(hidden, eps=eps)
        self.norm = norm(hidden, eps=eps)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor,
                cache: DynamicCache, embed: nn.Module, rotary: nn.Module) -> torch.Tensor:
        """hidden [1, T, H] of positions p (main model, post-norm), next_ids [1, T] = x_{p+1},
        position_ids [3, 1, T] the rope positions of p -> [1, T, H] post-norm (lm_head reads it).
        The cache gains T entries."""
        x = torch.cat([self.pre_fc_norm_embedding(embed(next_ids)), self.pre_fc_norm_hidden(hidden)], dim=-1)
        x = self.fc(x)                                                       # [1, T, H]
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=None,
                                  past_key_values=cache, position_ids=position_ids[0])
        x = self.layers[0](x, position_embeddings=rotary(x, position_ids), attention_mask=mask,
                           position_ids=position_ids[0], past_key_values=cache, use_cache=True)
        return self.norm(x)


def random_mtp_head(text_config, layer_class: str, seed: int) -> MtpHead:
    """An MTP head of the given shape with random float32 weights, initialised as the main
    model is (matrices and MoE experts normal(0, initializer_range), norms x * (1 + 0)): the
    twins' (engine/tiny.py) and the GPU benchmarks' random shapes."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        head = MtpHead(text_config, layer_class).to(torch.float32)
        for param in head.parameters():
            if param.dim() == 1:
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=text_config.initializer_range)
    return head.eval().requires_grad_(False)


def checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    """The `mtp.*` tensors of a checkpoint (a folder, or a hub id already in the local cache),
    read from its safetensors files; {} when it has none."""
    from safetensors import safe_open
    from transformers.utils import cached_file
    files: list[str] = []
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        weight_map = json.loads(Path(index).read_text()).get("weight_map", {})
        shards = sorted({f for key, f in weight_map.items() if key.startswith(PREFIX)})
        files = [cached_file(path, shard) for shard in shards]
    else:
        single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        files = [single] if single else []
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.startswith(PREFIX):
                    tensors[key[len(PREFIX):]] = f.get_tensor(key)
    return tensors


def load_mtp_head(loaded) -> MtpHead | None:
    """The checkpoint's MTP head on the model's device and dtype, or None (a family without
    one, or a checkpoint whose files carry no `mtp.*` weights)."""
    if not loaded.family.mtp_layer:
        log.info("%s (%s) has no MTP head: no MTP drafts", loaded.model_id, loaded.family.name)
        return None
    tensors = checkpoint_tensors(loaded.path)
    if not tensors:
        log.info("%s carries no mtp.* weights: no MTP drafts", loaded.model_id)
        return None
    head = MtpHead(loaded.text_config, loaded.family.mtp_layer)
    missing, unexpected = head.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        log.warning("%s: its mtp.* weights do not fit the MTP layer (missing %s, unexpected %s): no MTP drafts",
                    loaded.model_id, missing[:3], unexpected[:3])
        return None
    return head.to(device=loaded.device, dtype=loaded.dtype).eval().requires_grad_(False)


class HeadState:
    """A conversation's MTP head context, kept across its phases and turns like its K/V
    (Conversation.mtp): the head's cache, the sequence index of each entry (entry p holds the pair
    (h_p, x_{p+1})), and the hidden states of the positions computed since that are not paired yet
    (`pending`, from index `pending_start` on). Cut back with the conversation; dropped with it."""

    def __init__(self, head: MtpHead):
        self.cache = head.new_cache()
        self.positions: list[int] = []
        self.pending: list[torch.Tensor] = []
        self.pending_start = 0

    def cut(self, length: int) -> None:
        """The conversation now holds token_ids[:length]: entries whose next token is gone go
        (the head's cache is one attention layer, cut like the model's), and so do pending states
        of positions past it."""
        keep = bisect.bisect_left(self.positions, length - 1)
        if keep < len(self.positions):
            layer = self.cache.layers[0]
            layer.crop(keep - layer.get_seq_length())
            del self.positions[keep:]
        del self.pending[max(length - self.pending_start, 0):]

    def wait(self, first: int, hidden: torch.Tensor) -> None:
        """hidden [T, H] of positions first.. (a prefill no row decodes after, such as an image's
        at upload): kept for the next call's head to pair, after what already waits."""
        if self.pending_start + len(self.pending) != first:
            self.pending, self.pending_start = [], first
        self.pending.extend(hidden.detach().clone().unbind(0))

    def nbytes(self) -> int:
        return state.cache_nbytes(self.cache) + sum(t.numel() * t.element_size() for t in self.pending)


class MtpDraft:
    """One row's MTP drafts (greedy): see the module docstring. `context`: the conversation's
    HeadState; `first`: where this call's prefill started, `prefilled` its hidden states [T, H],
    `token_ids` the conversation's tokens through the prefill; rope_delta: the conversation's
    M-RoPE delta (text positions are index + delta). Where the context's pending states end
    right before `first`, they continue into the prefill; otherwise (the conversation was cut
    back past them) the head's cache has a hole there."""

    def __init__(self, head: MtpHead, model, context: HeadState, first: int, prefilled: torch.Tensor,
                 token_ids: list[int], rope_delta: int, k: int = 1):
        self.head, self.context, self.k = head, context, k
        text = model.model.language_model
        self.embed, self.rotary, self.lm_head = text.embed_tokens, text.rotary_emb, model.lm_head
        self.delta = rope_delta
        context.wait(first, prefilled)
        self.seen = self.start = context.pending_start     # sequence index of hidden[0]
        self.hidden: list[torch.Tensor] = list(context.pending)   # [H] per position, not yet in the cache
        # tokens[i] follows hidden[i]: those after the states through the prefill, then the row's.
        self.tokens: list[int] = list(token_ids[self.seen + 1:first + prefilled.shape[0]])
        self.mismatches = 0      # draft() calls that found the pairs out of step (tests: none)
        self.consumed: list[tuple[int, int]] = []    # (sequence index, next token) per pair, in order

    def observe(self, hidden: torch.Tensor) -> None:
        """hidden [n, H]: the main model's post-norm states of the n positions a forward kept."""
        self.hidden.extend(hidden.detach().clone().unbind(0))

    def push(self, token: int) -> None:
        self.tokens.append(token)

    def close(self, length: int) -> None:
        """The call is over and the conversation holds token_ids[:length]: what the head has not
        paired yet waits in the conversation's context for the next call."""
        self.context.pending, self.context.pending_start = self.hidden[:max(length - self.seen, 0)], self.seen

    @torch.inference_mode()
    def draft(self, limit: int) -> list[int]:
        """Up to min(k, limit) tokens (k = 1: the head predicts one token ahead)."""
        n = min(len(self.hidden), len(self.tokens))
        if n == 0 or limit < 1:
            return []
        if len(self.hidden) != len(self.tokens):
            # Every position a forward kept is followed by one token the row took; out of step,
            # the pairs cannot be trusted: leave a hole in the head's cache and start again.
            self.mismatches += 1
            log.debug("MTP pairs out of step: %d hidden states, %d tokens", len(self.hidden), len(self.tokens))
            self.seen += len(self.hidden)
            self.hidden.clear()
            self.tokens.clear()
            return []
        hidden = torch.stack(self.hidden).unsqueeze(0)                        # [1, n, H]
        ids = torch.tensor([self.tokens], device=hidden.device)              # [1, n]
        pos = torch.arange(self.seen, self.seen + n, device=hidden.device) + self.delta
        out = self.head(hidden.to(self.lm_head.weight.dtype), ids, pos.view(1, 1, -1).expand(3, 1, -1),
                        self.context.cache, self.embed, self.rotary)         # [1, n, H]
        self.consumed += [(self.seen + i, t) for i, t in enumerate(self.tokens)]
        self.context.positions.extend(range(self.seen, self.seen + n))
        self.hidden.clear()
        self.tokens.clear()
        self.seen += n
        return [int(self.lm_head(out[:, -1]).argmax(-1))][:min(self.k, limit)]
