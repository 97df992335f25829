"""Issue 6: the naive CoRGI pipeline vs this project's engine, on one GPU, in one run.

    python benchmarks/gpu_pipeline.py --shape qwen2.5-vl-3b --out gpu.json
    python benchmarks/gpu_pipeline.py --shape qwen3.5-4b --out gpu35.json
    # functional check of this script on CPU (minutes, numbers mean nothing):
    python benchmarks/gpu_pipeline.py --device cpu --shape qwen3.5-4b --layers 4 --vision-depth 1 \\
        --tokens-scale 0.05 --image-scale 0.25 --regions 1 --repeats 1 --out /tmp/g.json

Random weights of the real checkpoint's shape (same compute as the real model; bf16 on CUDA),
the family's real tokenizer. Token counts are forced, so every arm does the same work:
  W1, first turn: 1232x896 image, ~20-token question; phase 1+2 512 tokens; phase 3 six
      448x448 regions x 48 tokens; phase 4 128 tokens.
  W2, follow-up on the same image: phase 1+2 256 tokens; two regions; phase 4 128 tokens.

Engine arm: the real `corgi.pipeline.ChatSession` drives both turns on a `benchmarks.common.
ForcedEngine`: phase 1+2 and 4 write scripted token sequences of exactly the budget (a think
block of filler, then steps whose boxes are the six 448x448 regions, resp. an answer object), so
ChatSession parses real steps, crops and captions the regions in one batch (rows never stop
early) and runs phase 4 on the real evidence. The scripted "constraint" costs one fill of the
logits per token; no grammar is built. Naive arm: a fresh HF generate() per phase and per crop,
the image encoded again from pixels each time (benchmarks/naive.py).

Also in the same run:
  - the decode floor: every byte a decode step must read at the measured context: the text
    layers' weights, the lm_head, the K/V of every attention layer, and for hybrid models
    (Qwen3.5) each linear layer's conv + recurrent state, read and written; over the bandwidth
    of a device-to-device copy.
  - decode ms/token: the engine's eager HF loop, its static + compiled + CUDA-graph step, and
    HF `model.generate()` with its default cache (greedy, min_new_tokens == max_new_tokens,
    same prompt with pixel_values), each after the same ~1.5k-token prefix.
  - six region captions vs one (batched, vision cache off).
  - which linear-attention kernels transformers chose (fla, causal_conv1d or the torch fallbacks).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import StoppingCriteria  # noqa: E402

from benchmarks import common, naive  # noqa: E402
from benchmarks.shapes import family_of, loaded_random_model  # noqa: E402
from corgi import boxes, prompts  # noqa: E402
from corgi.config import load_config  # noqa: E402
from corgi.engine.engine import Engine  # noqa: E402
from corgi.pipeline import ChatSession  # noqa: E402
from corgi.types import Box, StepKind  # noqa: E402

W1 = dict(reasoning=512, regions=6, evidence=48, synthesis=128)
W2 = dict(reasoning=256, regions=2, evidence=48, synthesis=128)
QUESTION = "What is written on the red sign next to the small blue car?"   # ~20 tokens
FOLLOW_UP = "And what colour is the roof of the house on the left?"
IMAGE_SIZE = (1232, 896)         # the whole image is seen: 1408 visual tokens for Qwen2.5-VL
CROP = 448                       # region side in pixels (crop padding 0)
CORNERS = [(0, 0), (392, 0), (784, 0), (0, 448), (392, 448), (784, 448)]
DECODE_SKIP = 16                 # prefill and the first steps are not decode throughput (--decode-skip)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ---- geometry -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Geometry:
    """Image and region sizes, scaled together by --image-scale (CPU checks)."""
    scale: float = 1.0

    def px(self, v: int) -> int:
        return max(28, round(v * self.scale))

    @property
    def image_size(self) -> tuple[int, int]:
        return self.px(IMAGE_SIZE[0]), self.px(IMAGE_SIZE[1])

    @property
    def max_pixels(self) -> int:
        w, h = self.image_size
        return w * h

    @property
    def crop(self) -> int:
        return self.px(CROP)

    def regions(self, n: int) -> list[Box]:
        """n boxes of exactly crop x crop pixels of the image."""
        w, h = self.image_size
        c = self.crop
        out = []
        for x, y in CORNERS[:n]:
            x, y = min(round(x * self.scale), w - c), min(round(y * self.scale), h - c)
            out.append(Box(x / w, y / h, (x + c) / w, (y + c) / h))
        return out


def test_image(size: tuple[int, int]) -> Image.Image:
    w, h = IMAGE_SIZE
    image = Image.new("RGB", IMAGE_SIZE, (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 600, w, h), fill=(90, 90, 95))
    draw.rectangle((100, 300, 450, 600), fill=(170, 60, 50))
    draw.regular_polygon((850, 250, 90), 8, fill=(200, 20, 20))
    draw.rectangle((550, 480, 750, 580), fill=(30, 80, 200))
    return image if size == IMAGE_SIZE else image.resize(size, Image.BICUBIC)


# ---- the floor ------------------------------------------------------------------------------

def bandwidth_gbps() -> float:
    """Device-to-device copy of 2 GiB; bytes read + written over time (median of 10)."""
    src = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        sync()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    seconds = statistics.median(times)
    del src, dst
    return 2 * (1 << 30) * 2 / seconds / 1e9


def decode_step_bytes(model, context: float, rows: int = 1) -> dict:
    """Bytes one decode step (one new token per row) must move at least, at `context` cached
    tokens per row:
      weights        text layers + final norm (the embedding table is read one row per token)
      lm_head        the output projection (the tied embedding, for tied models)
      kv             K and V of every attention layer over the context (read)
      linear_state   hybrid models: each linear-attention layer's conv state (model dtype) and
                     recurrent state (float32), read and written back
    A dense text MLP is assumed (an MoE step reads only the routed experts)."""
    tc = model.config.get_text_config()
    text = model.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in text.named_parameters() if "embed_tokens" not in n)
    lm_head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    elem = next(text.parameters()).element_size()
    n_layers = tc.num_hidden_layers
    types = list(getattr(tc, "layer_types", None) or ["full_attention"] * n_layers)
    n_linear = types.count("linear_attention")
    n_attention = n_layers - n_linear
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv = n_attention * 2 * tc.num_key_value_heads * head_dim * elem * context * rows
    linear_state = 0
    if n_linear:
        conv_dim = 2 * tc.linear_num_key_heads * tc.linear_key_head_dim \
            + tc.linear_num_value_heads * tc.linear_value_head_dim
        conv = conv_dim * tc.linear_conv_kernel_dim * elem
        recurrent = tc.linear_num_value_heads * tc.linear_key_head_dim * tc.linear_value_head_dim * 4
        linear_state = n_linear * 2 * (conv + recurrent) * rows
    out = {"weights": weights, "lm_head": lm_head, "kv": int(kv), "linear_state": linear_state,
           "context": context, "attention_layers": n_attention, "linear_layers": n_linear}
    out["total"] = weights + lm_head + int(kv) + linear_state
    return out


# ---- kernels --------------------------------------------------------------------------------

def _importable(module: str):
    try:
        mod = importlib.import_module(module)
        return getattr(mod, "__version__", True)
    except Exception as e:           # noqa: BLE001 - the reason is the report
        return f"no ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


def linear_attention_kernels(family) -> dict | None:
    """What transformers' own detection chose for the Gated DeltaNet layers: each kernel function
    of modeling_qwen3_5 is wrapped at import time (use_kernel_func_from_hub_with_fallback) around
    the package implementation (fla / causal_conv1d) if it imports, else the torch fallback;
    the wrapper's closure holds the choice. The engine's static decode step does not use them:
    it runs corgi.engine.linear_attention (torch ops, compiled on CUDA); the engine's prefill and
    eager decode, HF generate() and the naive arm run the HF layers, hence these kernels."""
    if not family.hybrid:
        return None
    from transformers.utils import import_utils
    report = {"fla": _importable("fla"), "causal_conv1d": _importable("causal_conv1d"),
              "kernels_hub_available": bool(getattr(import_utils, "is_kernels_available", lambda: False)())}
    try:
        from transformers.models.qwen3_5 import modeling_qwen3_5 as m
        for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                     "causal_conv1d_fn", "causal_conv1d_update"):
            fn = getattr(m, name)
            closure = inspect.getclosurevars(fn).nonlocals
            impl = closure.get("implementation", fn)
            report[name] = {"implementation": f"{getattr(impl, '__module__', '?')}.{getattr(impl, '__qualname__', '?')}",
                            "torch_fallback": not closure.get("is_new_implementation", False)}
    except Exception as e:           # noqa: BLE001
        report["error"] = f"{type(e).__name__}: {e}"
    report["engine_static_step"] = "corgi.engine.linear_attention (torch ops; torch.compile + CUDA graph on CUDA)"
    return report


# ---- the engine through ChatSession -------------------------------------------------------

class TimedEngine(common.GrammarScriptEngine):
    """The scripted engine (forced token sequences, or texts under the real grammar) that notes
    when the first token of a turn came out (time to first token)."""
    first_token_at: float | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[dict] = []

    def generate(self, *args, **kwargs):
        for token in super().generate(*args, **kwargs):
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            yield token

    def generate_batch(self, images, heads, *args, **kwargs):
        """Also notes, per caption batch, the crops' sizes and the seconds to its first token
        (vision tower + prefill) and to its end: where a first-use cost in phase 3 goes."""
        sync()
        t0, first = time.perf_counter(), None
        for item in super().generate_batch(images, heads, *args, **kwargs):
            if first is None:
                first = time.perf_counter()
            yield item
        sync()
        self.batches.append({"crops": [im.size for im in images], "head_chars": [len(h[1]) for h in heads],
                             "first_token_s": (first or time.perf_counter()) - t0,
                             "total_s": time.perf_counter() - t0})


def engine_turn(engine: TimedEngine, session: ChatSession, question: str, work: dict, geo: Geometry) -> dict:
    """One CoRGI turn through ChatSession with scripted phase 1+2 / 4 outputs of exactly the
    budget; seconds per phase (the pipeline's own timings) and TTFT."""
    settings = dataclasses.replace(engine.config.pipeline, max_regions=work["regions"],
                                   reasoning_max_new_tokens=work["reasoning"],
                                   evidence_max_new_tokens=work["evidence"],
                                   synthesis_max_new_tokens=work["synthesis"])
    regions = geo.regions(work["regions"])
    convention = session.convention
    engine.texts = {}
    engine.scripts = {
        "reasoning": common.reasoning_script(engine, convention, work["reasoning"], work["regions"],
                                             boxes=[(b.x1, b.y1, b.x2, b.y2) for b in regions]),
        "synthesis": common.synthesis_script(engine, convention, work["synthesis"])}
    engine.first_token_at, engine.batches = None, []
    generated = engine.generated
    t0 = time.perf_counter()
    events = list(session.ask(question, settings))
    sync()
    total = time.perf_counter() - t0
    result = events[-1].result
    assert len(result.evidence) == work["regions"], result.warnings
    expected = work["reasoning"] + work["regions"] * work["evidence"] + work["synthesis"]
    assert engine.generated - generated == expected, (engine.generated - generated, expected)
    t = result.timings
    return {"ttft": engine.first_token_at - t0, "reasoning": t["reasoning"], "evidence": t["evidence"],
            "synthesis": t["synthesis"], "total": total, "tokens": expected,
            "cache": result.cache.to_json(), "caption_batches": engine.batches}


def captions_note(turn: dict) -> str:
    return "; ".join(f"captions: first token {b['first_token_s']:.3f} of {b['total_s']:.3f} s, crops "
                     f"{sorted(set(b['crops']))}, heads {min(b['head_chars'])}-{max(b['head_chars'])} chars"
                     for b in turn["caption_batches"])


def grammar_turn(engine: TimedEngine, session: ChatSession, question: str, work: dict, geo: Geometry) -> dict:
    """One CoRGI turn whose phase 1+2 / 4 texts (about the budget's token count: think filler,
    steps with the regions' boxes; an answer with key evidence) are written under the phase's
    REAL grammar (common.GrammarScript): jump-forward acts where the grammar allows one
    continuation, as on the default config with a real model. Phase 3 as in engine_turn."""
    settings = dataclasses.replace(engine.config.pipeline, max_regions=work["regions"],
                                   reasoning_max_new_tokens=work["reasoning"] + 32,
                                   evidence_max_new_tokens=work["evidence"],
                                   synthesis_max_new_tokens=work["synthesis"] + 32)
    regions = [(b.x1, b.y1, b.x2, b.y2) for b in geo.regions(work["regions"])]
    convention = session.convention
    engine.texts = {"reasoning": common.reasoning_text(engine, convention, work["reasoning"], regions,
                                                         settings.max_thinking_chars),
                    "synthesis": common.synthesis_text(engine, convention, work["synthesis"], regions)}
    engine.first_token_at, engine.batches = None, []
    sync()
    t0 = time.perf_counter()
    events = list(session.ask(question, settings))
    sync()
    total = time.perf_counter() - t0
    script, engine.texts = engine.texts["synthesis"], {}
    result = events[-1].result
    assert len(result.evidence) == work["regions"], result.warnings
    assert result.raw["synthesis"] == script, "the script was not followed"
    c, t = result.cache, result.timings
    return {"ttft": engine.first_token_at - t0, "total": total,
            **{k: t[k] for k in ("reasoning", "evidence", "synthesis")},
            "model_steps": c.decode_model_steps, "output_tokens": c.decode_output_tokens,
            "forced": c.forced_tokens, "drafted": c.drafted_tokens, "accepted": c.accepted_drafts,
            "cache": c.to_json(), "caption_batches": engine.batches}


# ---- decode speed ---------------------------------------------------------------------------

def _decode_prompt(engine: Engine, image: Image.Image):
    conv = engine.start_conversation(image, prompts.conversation_head())
    convention = boxes.convention_for(engine.lm.family.box_style, conv.resized)
    engine.append(conv, prompts.reasoning_prompt(QUESTION, 6, convention))
    return conv


def decode_ms_per_token(engine: Engine, image: Image.Image, tokens: int) -> tuple[float, float]:
    """(ms/token, mean context) of steady-state decode of one conversation after the
    ~1.5k-token image + prompt prefix."""
    conv = _decode_prompt(engine, image)
    stream = engine.generate(conv, tokens + DECODE_SKIP, min_new_tokens=tokens + DECODE_SKIP)
    for _ in range(DECODE_SKIP):
        next(stream)
    context = len(conv.token_ids) + tokens / 2
    sync()
    t0 = time.perf_counter()
    for _ in stream:
        pass
    sync()
    engine.end_conversation(conv)
    return (time.perf_counter() - t0) / tokens * 1e3, context


class _StepClock(StoppingCriteria):
    """A stopping criterion that never stops: generate() calls it once per new token, after
    the token was chosen, so its timestamps are the per-step clock of generate's own loop."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_generate_ms_per_token(engine: Engine, image: Image.Image, tokens: int, max_pixels: int,
                             static: bool = False) -> dict:
    """HF model.generate() on the decode arms' prompt (same ids, pixel_values, mm_token_type_ids):
    greedy, min_new_tokens == max_new_tokens. ms/token from generate's own per-step clock over the
    steps after the first DECODE_SKIP, as the other arms. static: what a user would pick instead
    of the default DynamicCache, `cache_implementation="static"`, with which generate() compiles
    the decode forward itself (its default CompileConfig: inductor, "reduce-overhead", i.e. CUDA
    graphs); the warm call has the same length, so the timed one reuses cache and compilation."""
    from transformers import StoppingCriteriaList
    lm = engine.lm
    conv = _decode_prompt(engine, image)
    ids = list(conv.token_ids)
    engine.end_conversation(conv)
    cfg = engine.config.image
    pixel_values, grid, _ = naive._image_inputs(lm, image, cfg.min_pixels, max_pixels)
    extra = {"cache_implementation": "static"} if static else {}
    t0 = time.perf_counter()
    naive._generate(lm, ids, pixel_values, grid, DECODE_SKIP + tokens if static else 2, **extra)   # warm
    warm_s = time.perf_counter() - t0
    clock = _StepClock()
    sync()
    t0 = time.perf_counter()
    naive._generate(lm, ids, pixel_values, grid, DECODE_SKIP + tokens,
                    stopping_criteria=StoppingCriteriaList([clock]), **extra)
    times = clock.times
    assert len(times) == DECODE_SKIP + tokens, len(times)
    return {"ms_per_token": (times[-1] - times[DECODE_SKIP - 1]) / tokens * 1e3,
            "first_token_s": times[0] - t0, "tokens": tokens, "prompt_tokens": len(ids),
            "context": len(ids) + DECODE_SKIP + tokens / 2,
            "warm_call_s": warm_s,
            "cache": ('cache_implementation="static" (generate() compiles the decode forward)' if static
                      else "generate() default (DynamicCache(config=...))")}


@torch.inference_mode()
def graph_replay_ms(engine: Engine, replays: int = 200) -> float:
    """GPU time of one captured decode step (batch 1, 4096 columns), no host work between."""
    bucket = engine.static.bucket(1, 4096)
    bucket.write.fill_(1600)
    bucket.positions.fill_(1600)
    bucket.mask.fill_(float("-inf"))
    bucket.mask[..., :1600] = 0.0          # 1600 cached tokens count (split-KV skips masked blocks)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    bucket.graph.replay()
    start.record()
    for _ in range(replays):
        bucket.graph.replay()
        bucket.write.fill_(1600)       # stay inside the buffer
    end.record()
    sync()
    return start.elapsed_time(end) / replays


@torch.inference_mode()
def profile_step(engine: Engine, top: int = 14) -> str:
    """Kernel time breakdown of one decode step (compiled layers, not replayed as a graph)."""
    from torch.profiler import ProfilerActivity, profile
    bucket = engine.static.bucket(1, 4096)
    bucket.write.fill_(1600)
    bucket.mask.fill_(float("-inf"))
    bucket.mask[..., :1600] = 0.0
    bucket._step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            bucket.write.fill_(1600)
            bucket._step()
        sync()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def captions_seconds(engine: Engine, image: Image.Image, geo: Geometry, n: int, tokens: int) -> float:
    crops = [boxes.crop(image, b, 0.0) for b in geo.regions(n)]
    before, after = prompts.crop_head()
    heads = [(before, after + prompts.crop_instruction(StepKind.OBJECT, "x"))] * n
    sync()
    t0 = time.perf_counter()
    for _ in engine.generate_batch(crops, heads, tokens, geo.crop ** 2, min_new_tokens=tokens):
        pass
    sync()
    return time.perf_counter() - t0


def median_of(fn, repeats: int):
    values = [fn() for _ in range(repeats)]
    return statistics.median(values), values


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-vl-3b", help="benchmarks.shapes name")
    parser.add_argument("--out", default="benchmarks/out/gpu_pipeline.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-hf-generate", action="store_true")
    parser.add_argument("--skip-hf-static", action="store_true",
                        help="skip HF generate() with a static cache + its own torch.compile")
    parser.add_argument("--skip-grammar", action="store_true",
                        help="skip the engine turns written under the real grammar (jump-forward acting)")
    parser.add_argument("--profile", action="store_true", help="print the kernel breakdown of a decode step")
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="keep prompt-lookup drafts on; off by default: the scripted outputs copy the "
                             "prompt, so drafts would be accepted as no random-weight model accepts them")
    parser.add_argument("--attention", default="auto", choices=("auto", "triton", "torch"),
                        help="model.decode_attention of the compiled step")
    parser.add_argument("--gemv", default="auto", choices=("auto", "cublas"), help="model.decode_gemv")
    parser.add_argument("--device", default="cuda", help="cpu: a functional check of this script only")
    parser.add_argument("--tokens-scale", type=float, default=1.0,
                        help="scale every token count (cpu check); phase 1+2 / 4 never go below what "
                             "their scripts need")
    parser.add_argument("--decode-tokens", type=int, default=256, help="timed tokens of the static decode arm")
    parser.add_argument("--eager-tokens", type=int, default=64,
                        help="timed tokens of the eager loop and of HF generate()")
    parser.add_argument("--layers", type=int, default=None, help="text layers (default: the real depth)")
    parser.add_argument("--vision-depth", type=int, default=None, help="vision blocks (default: the real depth)")
    parser.add_argument("--image-scale", type=float, default=1.0,
                        help="scale the image and the region crops (cpu check)")
    parser.add_argument("--regions", type=int, default=None, help="W1 regions (default 6; W2 keeps at most 2)")
    parser.add_argument("--workloads", default="W1,W2", help="W1,W2 (default) or W1 (cpu check)")
    parser.add_argument("--decode-skip", type=int, default=DECODE_SKIP,
                        help="untimed first decode steps of the decode arms (default 16)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    global DEVICE, DECODE_SKIP
    DEVICE, DECODE_SKIP = args.device, args.decode_skip
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    assert names and set(names) <= {"W1", "W2"} and names[0] == "W1", "--workloads: W1 or W1,W2"
    geo = Geometry(args.image_scale)
    work = {name: dict({"W1": W1, "W2": W2}[name]) for name in names}
    if args.regions is not None:
        work["W1"]["regions"] = args.regions
        if "W2" in work:
            work["W2"]["regions"] = min(W2["regions"], args.regions)
    scale = lambda n: max(2, int(n * args.tokens_scale))
    for w in work.values():
        for k in ("reasoning", "evidence", "synthesis"):
            w[k] = scale(w[k])
    decode_tokens, eager_tokens = max(8, scale(args.decode_tokens)), max(8, scale(args.eager_tokens))
    family = family_of(args.shape)
    cuda = DEVICE == "cuda"
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              "shape": args.shape, "family": family.name, "layers_override": args.layers,
              "vision_depth_override": args.vision_depth, "image": geo.image_size, "crop": geo.crop,
              "environment": common.environment(DEVICE)}
    result["bandwidth_gbps"] = bandwidth_gbps() if cuda else None

    t = time.perf_counter()
    dtype = torch.bfloat16 if cuda else torch.float32
    lm = loaded_random_model(args.shape, DEVICE, dtype, max_pixels=geo.max_pixels,
                             layers_override=args.layers, vision_depth_override=args.vision_depth)
    result["build_seconds"] = time.perf_counter() - t
    result["tokenizer"] = {"kind": family.tokenizer, "tokens": len(lm.tokenizer), "vocab_rows": lm.vocab_size,
                           "image_pad_id": lm.special.image_pad}
    result["linear_attention_kernels"] = linear_attention_kernels(family)
    if result["linear_attention_kernels"]:
        print("linear-attention kernels:", json.dumps(result["linear_attention_kernels"]), flush=True)
    image = test_image(geo.image_size)
    base = {"model.device": DEVICE, "model.dtype": str(dtype).removeprefix("torch."),
            "image.max_pixels": geo.max_pixels, "cache.kv_cache_mb": 16384.0, "cache.vision_cache_mb": 4096.0,
            "pipeline.structured_output": True, "pipeline.temperature": 0.0, "pipeline.max_steps": 6,
            "pipeline.crop_padding": 0.0, "pipeline.crop_max_pixels": geo.crop ** 2,
            "pipeline.prompt_lookup": args.prompt_lookup,
            "model.decode_attention": args.attention, "model.decode_gemv": args.gemv}
    eager = Engine(lm, load_config(None, dict(base, **{"model.compile": False})))
    fast = TimedEngine(lm, load_config(None, dict(base, **{"model.compile": True, "model.warmup": False})))
    result["static_decode"] = fast.static is not None
    result["vision_compiled"] = fast.vision_compiled
    result["prompt_lookup"] = args.prompt_lookup
    if fast.static is not None:
        result["decode_kernels"] = {"split_kv_attention": fast.static.split_kv, "gemv": fast.static.gemv_report}
        chosen = [k for k, r in fast.static.gemv_report.items() if r["chosen"] == "triton"]
        print(f"decode kernels: split-KV attention {fast.static.split_kv}; Triton GEMV for {chosen or 'none'}",
              flush=True)

    # Phase budgets never below what the scripts need (only a --tokens-scale run gets there).
    grid = fast.image_grid(image, fast.config.image.min_pixels, geo.max_pixels)
    convention = boxes.convention_for(family.box_style, (grid[2] * lm.patch_size, grid[1] * lm.patch_size))
    for name, w in work.items():
        regions = [(b.x1, b.y1, b.x2, b.y2) for b in geo.regions(w["regions"])]
        need = common.reasoning_script_min_tokens(fast, convention, w["regions"], regions)
        w["reasoning"] = max(w["reasoning"], need + 2)
        w["synthesis"] = max(w["synthesis"], common.synthesis_script_min_tokens(fast, convention) + 2)
    result["workloads"] = work

    t = time.perf_counter()
    if fast.static is not None and cuda:
        # The widths jump-forward chunks take, as the engine's own warm-up captures them.
        fast.static.warm_up([(1, 2048), (1, 3072), (1, 4096), (1, 512), (2, 512), (8, 512)], fast.warmup_widths())
    if cuda:            # the prefill warm-ups the engine runs on CUDA (model.warmup)
        if family.hybrid:
            fast.warm_up_prefill()
        fast.warm_up_captions()
    fast.grammars()
    result["warmup_seconds"] = time.perf_counter() - t
    print(f"built in {result['build_seconds']:.1f}s, warm-up {result['warmup_seconds']:.1f}s; "
          f"workloads {work}", flush=True)

    # Decode speed, side by side, after the same prefix.
    result["decode_ms_eager"], ctx_eager = decode_ms_per_token(eager, image, eager_tokens)
    samples = [decode_ms_per_token(fast, image, decode_tokens) for _ in range(args.repeats)]
    result["decode_ms_static"] = statistics.median(s[0] for s in samples)
    result["decode_ms_static_runs"] = [s[0] for s in samples]
    context = samples[0][1]
    result["decode_context_tokens"] = context
    if not args.skip_hf_generate:
        result["hf_generate"] = hf_generate_ms_per_token(eager, image, eager_tokens, geo.max_pixels)
    print(f"decode ms/token: eager loop {result['decode_ms_eager']:.2f}, static {result['decode_ms_static']:.2f}"
          + (f", HF generate {result['hf_generate']['ms_per_token']:.2f}" if "hf_generate" in result else ""),
          flush=True)

    # The floor at the static arm's mean context (the other arms' contexts are within a few %).
    step = decode_step_bytes(lm.model, context)
    result["decode_step_bytes"] = step
    if cuda:
        bw = result["bandwidth_gbps"] * 1e9
        result["floor_ms_per_token"] = step["total"] / bw * 1e3
        result["floor_weights_only_ms_per_token"] = (step["weights"] + step["lm_head"]) / bw * 1e3
        print(f"floor {result['floor_ms_per_token']:.3f} ms/token at {result['bandwidth_gbps']:.0f} GB/s "
              f"({step['total'] / 1e9:.3f} GB/step: weights {step['weights'] / 1e9:.3f}, lm_head "
              f"{step['lm_head'] / 1e9:.3f}, kv {step['kv'] / 1e6:.1f} MB, linear state "
              f"{step['linear_state'] / 1e6:.1f} MB)", flush=True)
        if fast.static is not None:
            try:
                result["graph_replay_ms"] = graph_replay_ms(fast)
                print(f"graph replay alone: {result['graph_replay_ms']:.2f} ms/step", flush=True)
            except Exception as e:       # noqa: BLE001 - report, keep the other arms
                result["graph_replay_error"] = f"{type(e).__name__}: {e}"
            if args.profile:
                table = profile_step(fast)
                print(table, flush=True)
                result["profile"] = table

    # Six captions vs one, batched; the vision cache is off so every crop is encoded, as new
    # regions are in a real turn.
    n_caps = work["W1"]["regions"]
    ev = work["W1"]["evidence"]
    fast.vision.enabled = False
    captions_seconds(fast, image, geo, n_caps, ev)          # warm
    result["captions_n"] = n_caps
    result["captions_1_s"], _ = median_of(lambda: captions_seconds(fast, image, geo, 1, ev), args.repeats)
    result["captions_6_s"], _ = median_of(lambda: captions_seconds(fast, image, geo, n_caps, ev), args.repeats)
    fast.vision.enabled = True

    # The engine through ChatSession: W1 cold (new image content each repeat: nothing cached),
    # then W2 on the same session.
    runs = []
    for r in range(args.repeats):
        img = image.copy()
        img.putpixel((r, 0), (r, r, r))      # new content -> vision cache miss, fresh prefill
        fast.vision.clear()                  # every crop and the image are encoded afresh
        session = ChatSession(fast, img)
        run = {"W1": engine_turn(fast, session, QUESTION, work["W1"], geo)}
        if "W2" in work:
            fast.vision.clear()              # W2's regions count as new crops too
            run["W2"] = engine_turn(fast, session, FOLLOW_UP, work["W2"], geo)
        session.close()
        runs.append(run)
        print(f"engine run {r}: " + ", ".join(
            f"{w} {t['total']:.2f}s (1+2 {t['reasoning']:.2f}, 3 {t['evidence']:.2f}, 4 {t['synthesis']:.2f}; "
            f"ttft {t['ttft'] * 1e3:.0f} ms; {t['cache']['decode_model_steps']} steps for "
            f"{t['cache']['decode_output_tokens']} tokens; {captions_note(t)})" for w, t in run.items()), flush=True)
    result["engine_runs"] = runs
    keys = ("ttft", "reasoning", "evidence", "synthesis", "total")
    for w in work:
        result[f"engine_{w}"] = {k: statistics.median(run[w][k] for run in runs) for k in keys}

    # The same turns with the texts written under the real grammar: jump-forward (on by default)
    # appends what the grammar forces without a model step each, as it does for a real model.
    if not args.skip_grammar:
        runs = []
        for r in range(args.repeats):
            img = image.copy()
            img.putpixel((r, 1), (r, r, 255 - r))
            fast.vision.clear()
            session = ChatSession(fast, img)
            run = {"W1": grammar_turn(fast, session, QUESTION, work["W1"], geo)}
            if "W2" in work:
                fast.vision.clear()
                run["W2"] = grammar_turn(fast, session, FOLLOW_UP, work["W2"], geo)
            session.close()
            runs.append(run)
            print(f"engine run {r}, real grammar: " + ", ".join(
                f"{w} {t['total']:.2f}s (1+2 {t['reasoning']:.2f}, 3 {t['evidence']:.2f}, 4 {t['synthesis']:.2f}; "
                f"ttft {t['ttft'] * 1e3:.0f} ms; {t['model_steps']} steps for {t['output_tokens']} tokens, "
                f"{t['forced']} forced; {captions_note(t)})" for w, t in run.items()), flush=True)
        result["engine_grammar_runs"] = runs
        for w in work:
            result[f"engine_grammar_{w}"] = {k: statistics.median(run[w][k] for run in runs) for k in keys}

    if not args.skip_naive:
        result["naive"] = {}
        for w, question in (("W1", QUESTION), ("W2", FOLLOW_UP)):
            if w not in work:
                continue
            spec = work[w]
            t = naive.naive_turn(lm, image, question, reasoning_tokens=spec["reasoning"],
                                 evidence_tokens=spec["evidence"], synthesis_tokens=spec["synthesis"],
                                 crop_boxes=geo.regions(spec["regions"]), max_pixels=geo.max_pixels,
                                 crop_max_pixels=geo.crop ** 2, crop_padding=0.0)
            result["naive"][w] = t["seconds"]
            print(f"naive {w}: {t['seconds']}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    # Last, after the results above are on disk: generate() compiles the model its own way
    # (torch.compile over HF's static cache, CUDA graphs of its own), which this process keeps.
    if not args.skip_hf_static and cuda:
        try:
            result["hf_generate_static"] = hf_generate_ms_per_token(eager, image, decode_tokens, geo.max_pixels,
                                                                    static=True)
            r = result["hf_generate_static"]
            print(f"HF generate static+compile {r['ms_per_token']:.2f} ms/token (warm call "
                  f"{r['warm_call_s']:.0f} s)", flush=True)
        except Exception as e:       # noqa: BLE001 - report (e.g. a cache this family lacks), keep the rest
            result["hf_generate_static_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("HF generate static:", result["hf_generate_static_error"], flush=True)
        out.write_text(json.dumps(result, indent=2, default=str))
    print_report(result)
    return 0


def print_report(result: dict) -> None:
    floor = result.get("floor_ms_per_token")
    x = lambda ms: f" ({ms / floor:.2f}x floor)" if floor else ""
    print("\n| measure | value |\n|---|---|")
    print(f"| device / shape | {result['device']} / {result['shape']} |")
    print(f"| tokenizer | {result['tokenizer']['kind']}: {result['tokenizer']['tokens']} tokens, "
          f"{result['tokenizer']['vocab_rows']} rows |")
    if floor:
        s = result["decode_step_bytes"]
        print(f"| bandwidth (copy) | {result['bandwidth_gbps']:.0f} GB/s |")
        print(f"| floor | {floor:.3f} ms/token (weights+lm_head only: "
              f"{result['floor_weights_only_ms_per_token']:.3f}); {s['total'] / 1e9:.3f} GB/step incl. "
              f"kv {s['kv'] / 1e6:.1f} MB, linear state {s['linear_state'] / 1e6:.1f} MB at {s['context']:.0f} tokens |")
    print(f"| decode, engine eager loop | {result['decode_ms_eager']:.2f} ms/token{x(result['decode_ms_eager'])} |")
    print(f"| decode, static (+compile+graphs on CUDA) | {result['decode_ms_static']:.2f} ms/token"
          f"{x(result['decode_ms_static'])} |")
    if "hf_generate" in result:
        ms = result["hf_generate"]["ms_per_token"]
        print(f"| decode, HF generate() | {ms:.2f} ms/token{x(ms)} |")
    if "hf_generate_static" in result:
        ms = result["hf_generate_static"]["ms_per_token"]
        print(f"| decode, HF generate() static cache + compile | {ms:.2f} ms/token{x(ms)} |")
    elif "hf_generate_static_error" in result:
        print(f"| decode, HF generate() static cache + compile | {result['hf_generate_static_error'][:120]} |")
    if "graph_replay_ms" in result:
        print(f"| graph replay alone | {result['graph_replay_ms']:.2f} ms/step{x(result['graph_replay_ms'])} |")
    print(f"| {result['captions_n']} captions / 1 caption | {result['captions_6_s']:.3f} / {result['captions_1_s']:.3f} s "
          f"= {result['captions_6_s'] / result['captions_1_s']:.2f}x |")
    for w in result["workloads"]:
        e = result[f"engine_{w}"]
        line = (f"| engine {w} (ChatSession) | {e['total']:.2f} s (1+2 {e['reasoning']:.2f}, 3 {e['evidence']:.2f}, "
                f"4 {e['synthesis']:.2f}; ttft {e['ttft'] * 1e3:.0f} ms)")
        if "naive" in result:
            n = result["naive"][w]
            line += f"; naive {n['total']:.2f} s ({n['total'] / e['total']:.1f}x slower)"
        print(line + " |")
        if f"engine_grammar_{w}" in result:
            e = result[f"engine_grammar_{w}"]
            print(f"| engine {w}, texts under the real grammar (jump-forward) | {e['total']:.2f} s (1+2 "
                  f"{e['reasoning']:.2f}, 3 {e['evidence']:.2f}, 4 {e['synthesis']:.2f}; ttft {e['ttft'] * 1e3:.0f} ms) |")
    k = result.get("linear_attention_kernels")
    if k:
        chosen = {name: v["implementation"].split(".")[0] for name, v in k.items() if isinstance(v, dict)}
        print(f"| linear-attention kernels | fla: {k['fla']}, causal_conv1d: {k['causal_conv1d']}; {chosen} |")


if __name__ == "__main__":
    sys.exit(main())
