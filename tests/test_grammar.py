"""Grammar-constrained decoding (corgi/engine/grammar/) under random logits, early closing,
caching and sharing, masks, and a Qwen-sized (151,936) synthetic vocabulary. CPU only."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch

from corgi.boxes import REL1000, BoxConvention, pixel_convention
from corgi.engine import grammar as G
from corgi.engine.grammar.lengths import ESC, STR, THINK

PIXELS = pixel_convention(644, 476)
CONVENTIONS = {"pixels": PIXELS, "rel1000": REL1000}
MAX_STEPS = 4
THINK_CHARS = 60
SEEDS = range(10)          # x families x phases x conventions: 80 sampled decodes per test
PAD = 37                       # model vocab = tokenizer + padding, like real lm_heads


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The helpers run small tensor ops over 151k-entry rows per token; with 2 intra-op threads
    on a busy 2-core machine each waits for a stalled thread (measured: isfinite 17 ms instead
    of 0.5 ms), so this module runs them on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- tokenizers ------------------------------------------------------------------------

def _tokenizer(family: str):
    from corgi.engine.tiny import _build_tokenizer         # the tiny checkpoints' (real) tokenizer
    return _build_tokenizer(family)


_caches: dict[str, G.GrammarCache] = {}


def grammar_cache(family: str) -> G.GrammarCache:
    if family not in _caches:
        tok = _tokenizer(family)
        _caches[family] = G.GrammarCache(tok, vocab_size=len(tok) + PAD)
    return _caches[family]


FAMILIES = ("qwen2.5-vl", "qwen3-vl")


# ---- helpers ---------------------------------------------------------------------------

def allowed_ids(decoder: G.ConstrainedDecoder) -> set[int]:
    logits = torch.zeros(1, decoder.cache.vocab_size)
    decoder.mask(logits)
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def sample_run(decoder: G.ConstrainedDecoder, seed: int, max_tokens: int | None = None,
               check_mask: bool = False) -> list[int]:
    """Uniform random logits under the mask (argmax of uniform noise = a uniform pick)."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    limit = decoder.spec.max_bytes + 1
    cache = decoder.cache
    while not decoder.is_finished():
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        assert len(ids) < limit, "ran past the computed token bound"
        logits = torch.rand(1, cache.vocab_size, generator=gen)
        decoder.mask(logits)
        assert torch.isfinite(logits).any(), f"empty mask after {decoder.text()!r}"
        if check_mask:
            ok = torch.isfinite(logits[0])
            assert not ok[sorted(cache.banned_ids)].any(), "a special token is allowed"
            assert not ok[cache.stop_token_ids].any(), "a stop token is allowed before the end"
        token = int(torch.argmax(logits))
        assert decoder.accept(token)
        ids.append(token)
    return ids


def split_think(text: str) -> tuple[str, str]:
    assert text.startswith("<think>")
    think, body = text[len("<think>"):].split("</think>\n", 1)
    return think, body


def check_box(box, convention: BoxConvention) -> None:
    assert isinstance(box, list) and len(box) == 4
    assert all(type(v) is int for v in box)
    x1, y1, x2, y2 = box
    assert 0 <= x1 <= convention.x_range and 0 <= x2 <= convention.x_range
    assert 0 <= y1 <= convention.y_range and 0 <= y2 <= convention.y_range


def check_reasoning(text: str, convention: BoxConvention, max_steps: int, think_chars: int) -> dict:
    think, body = split_think(text)
    assert "<" not in think and len(think) <= think_chars
    value = json.loads(body)
    assert body == json.dumps(value, ensure_ascii=False) or "\\" in body   # one fixed style
    assert list(value) == ["steps"]
    steps = value["steps"]
    assert 1 <= len(steps) <= max_steps
    for step in steps:
        assert list(step) == ["statement", "kind", "bbox_2d"]
        assert isinstance(step["statement"], str) and len(step["statement"]) <= G.MAX_STRING_CHARS
        assert step["kind"] in ("object", "text", "reasoning")
        if step["kind"] == "reasoning":
            assert step["bbox_2d"] is None
        else:
            check_box(step["bbox_2d"], convention)
    return value


def check_synthesis(text: str, convention: BoxConvention) -> dict:
    value = json.loads(text)
    assert list(value) == ["answer", "explanation", "key_evidence"]
    assert isinstance(value["answer"], str) and len(value["answer"]) <= G.MAX_STRING_CHARS
    assert isinstance(value["explanation"], str)
    assert len(value["explanation"]) <= G.MAX_EXPLANATION_CHARS
    assert 0 <= len(value["key_evidence"]) <= G.MAX_EVIDENCE_ITEMS
    for item in value["key_evidence"]:
        assert list(item) == ["description", "bbox_2d"]
        assert len(item["description"]) <= G.MAX_STRING_CHARS
        if item["bbox_2d"] is not None:
            check_box(item["bbox_2d"], convention)
    return value


def check_parser(phase: str, text: str, convention: BoxConvention) -> None:
    try:
        from corgi.parsing import parse_reasoning, parse_synthesis
    except ImportError:
        return
    if phase == "reasoning":
        result = parse_reasoning(text, convention, MAX_STEPS)
        assert len(result.steps) <= MAX_STEPS
    else:
        result = parse_synthesis(text, convention)
    bad = [w for w in result.warnings if re.search(r"malformed|cut off|No .*JSON found", w)]
    assert not bad, bad


def make_decoder(family: str, phase: str, convention: BoxConvention) -> G.ConstrainedDecoder:
    cache = grammar_cache(family)
    if phase == "reasoning":
        return cache.reasoning_decoder(MAX_STEPS, convention, THINK_CHARS)
    return cache.synthesis_decoder(convention)


def check_output(phase: str, text: str, convention: BoxConvention) -> dict:
    if phase == "reasoning":
        return check_reasoning(text, convention, MAX_STEPS, THINK_CHARS)
    return check_synthesis(text, convention)


# ---- grammar text --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 5, 9, 10, 11, 99, 100, 101, 476, 644, 999, 1000, 1023, 2048])
def test_integer_ranges_are_exact(n):
    from corgi.engine.grammar.schemas import _int_range_alternatives
    alts = _int_range_alternatives(n)
    pattern = re.compile("|".join("(?:" + a.replace('"', "").replace(" ", "") + ")" for a in alts))
    accepted = {v for v in range(0, n * 2 + 20) if pattern.fullmatch(str(v))}
    assert accepted == set(range(n + 1))
    assert not pattern.fullmatch("0" + str(n)) and not pattern.fullmatch("-1")


def test_sources_compile_and_do_not_depend_on_thinking_limit():
    import xgrammar as xgr
    a = G.reasoning_grammar_source(3, PIXELS, 10)
    assert a == G.reasoning_grammar_source(3, PIXELS, 500)      # the limit lives in the decoder
    assert a != G.reasoning_grammar_source(3, REL1000, 10)
    for source in (a, G.synthesis_grammar_source(PIXELS), G.reasoning_grammar_source(1, REL1000, 0)):
        xgr.Grammar.from_ebnf(source)


# ---- (a) random sampling ---------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("phase", ["reasoning", "synthesis"])
@pytest.mark.parametrize("conv_name", list(CONVENTIONS))
def test_random_sampling_always_valid(family, phase, conv_name):
    convention = CONVENTIONS[conv_name]
    tok = grammar_cache(family).tokenizer
    lengths = []
    for seed in SEEDS:
        decoder = make_decoder(family, phase, convention)
        ids = sample_run(decoder, seed, check_mask=(seed < 3))
        assert decoder.is_finished() and decoder.completion_text() == ""
        text = decoder.text()
        assert tok.decode(ids) == text                  # our byte tracking matches the tokenizer
        assert len(ids) <= len(text.encode()) <= decoder.spec.max_bytes
        check_output(phase, text, convention)
        check_parser(phase, text, convention)
        lengths.append(len(ids))
    assert max(lengths) <= decoder.spec.max_bytes


def test_limits_are_reached_and_hold():
    """Uniform picks from ~2000 tokens rarely close a string: strings run to their limits."""
    cache = grammar_cache("qwen2.5-vl")
    saw_full = False
    for seed in range(6):
        decoder = cache.reasoning_decoder(2, REL1000, THINK_CHARS)
        sample_run(decoder, 100 + seed)
        think, body = split_think(decoder.text())
        assert len(think) <= THINK_CHARS
        for step in json.loads(body)["steps"]:
            saw_full |= len(step["statement"]) >= G.MAX_STRING_CHARS * 3 // 4
        saw_full |= len(think) >= THINK_CHARS * 3 // 4
    assert saw_full


def test_zero_thinking_and_one_step():
    cache = grammar_cache("qwen2.5-vl")
    for seed in range(5):
        decoder = cache.reasoning_decoder(1, REL1000, 0)
        sample_run(decoder, seed)
        assert len(check_reasoning(decoder.text(), REL1000, 1, 0)["steps"]) == 1


def test_at_thinking_limit_only_the_closing_tag_can_follow():
    cache = grammar_cache("qwen3-vl")
    decoder = cache.reasoning_decoder(2, PIXELS, 5)
    for token in cache.tokenizer.encode("<think>abcde", add_special_tokens=False):
        assert decoder.accept(token)
    allowed = allowed_ids(decoder)
    assert allowed and all(cache.decoded_vocab[t].startswith(b"<") for t in allowed)
    assert not decoder.accept(cache.tokenizer.convert_tokens_to_ids("f"))
    assert decoder.accept(cache.tokenizer.convert_tokens_to_ids("</think>"))   # qwen3: one token


def test_escapes_inside_strings():
    cache = grammar_cache("qwen2.5-vl")
    decoder = cache.synthesis_decoder(REL1000)
    text = '{"answer": "a \\"quoted\\" word\\n", "explanation": "back\\\\slash", "key_evidence": []}'
    for token in cache.tokenizer.encode(text, add_special_tokens=False):
        assert decoder.accept(token), decoder.text()
    assert decoder.is_finished()
    assert json.loads(decoder.text())["answer"] == 'a "quoted" word\n'
    for wrong in ['{"answer": "\\u0041', '{"answer": "a\tb']:
        d = cache.synthesis_decoder(REL1000)
        ids = cache.tokenizer.encode(wrong, add_special_tokens=False)
        assert not all(d.accept(t) for t in ids)     # \u escapes, raw control characters


# ---- termination / EOS ---------------------------------------------------------------------

def test_finished_right_after_last_brace_and_stop_tokens_only_then():
    cache = grammar_cache("qwen3-vl")
    decoder = cache.synthesis_decoder(PIXELS)
    text = '{"answer": "red", "explanation": "It is red.", "key_evidence": [{"description": "car", "bbox_2d": null}]}'
    ids = cache.tokenizer.encode(text, add_special_tokens=False)
    for i, token in enumerate(ids):
        assert not decoder.is_finished()
        assert decoder.accept(token)
    assert decoder.is_finished()
    assert allowed_ids(decoder) == set(cache.stop_token_ids)   # xgrammar: only stop tokens remain
    im_end = cache.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert not decoder.accept(im_end)                          # the engine appends it itself
    assert decoder.is_finished()
    decoder.rollback(1)
    assert not decoder.is_finished() and text.startswith(decoder.text())
    assert json.loads(decoder.closed_text()) == json.loads(text)


def test_special_tokens_never_allowed_in_strings():
    cache = grammar_cache("qwen2.5-vl")
    decoder = cache.synthesis_decoder(REL1000)
    for token in cache.tokenizer.encode('{"answer": "', add_special_tokens=False):
        assert decoder.accept(token)
    allowed = allowed_ids(decoder)
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|vision_start|>"):
        tid = cache.tokenizer.convert_tokens_to_ids(name)
        assert tid not in allowed and not decoder.accept(tid), name
    assert not allowed & set(range(len(cache.tokenizer), cache.vocab_size))    # padding ids
    assert cache.tokenizer.convert_tokens_to_ids("<") in allowed


# ---- (b) closing early --------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("phase", ["reasoning", "synthesis"])
def test_completion_after_random_cut(family, phase):
    rng = random.Random(7)
    tok = grammar_cache(family).tokenizer
    for seed in SEEDS:
        convention = CONVENTIONS["pixels" if seed % 2 else "rel1000"]
        full = sample_run(make_decoder(family, phase, convention), seed)
        cut = rng.randrange(0, len(full))
        decoder = make_decoder(family, phase, convention)
        ids = sample_run(decoder, seed, max_tokens=cut)
        assert ids == full[:cut]
        closing = decoder.completion_text()
        closed = decoder.closed_text()
        assert closed == decoder.text() + closing
        check_output(phase, closed, convention)
        check_parser(phase, closed, convention)
        extra = decoder.finish()                    # the tokens the engine would append
        assert decoder.is_finished() and decoder.text() == closed
        assert tok.decode(ids + extra) == closed


def test_completion_inside_thinking_and_at_start():
    cache = grammar_cache("qwen2.5-vl")
    decoder = cache.reasoning_decoder(3, PIXELS, 100)
    assert decoder.completion_text() == ('<think></think>\n{"steps": [{"statement": "", '
                                         '"kind": "reasoning", "bbox_2d": null}]}')
    for token in cache.tokenizer.encode("<think>I see a", add_special_tokens=False):
        assert decoder.accept(token)
    assert decoder.completion_text() == ('</think>\n{"steps": [{"statement": "", '
                                         '"kind": "reasoning", "bbox_2d": null}]}')
    synth = cache.synthesis_decoder(REL1000)
    assert synth.completion_text() == '{"answer": "", "explanation": "", "key_evidence": []}'


@pytest.mark.parametrize("prefix, closing", [
    ('<think>x</think>\n{"steps": [{"statement": "a cat', '", "kind": "reasoning", "bbox_2d": null}]}'),
    ('<think>x</think>\n{"steps": [{"statement": "a\\', '"", "kind": "reasoning", "bbox_2d": null}]}'),
    ('<think>x</think>\n{"steps": [{"statement": "a", "kind": "ob', 'ject", "bbox_2d": [0, 0, 0, 0]}]}'),
    ('<think>x</think>\n{"steps": [{"statement": "a", "kind": "text", "bbox_2d": [12', ', 0, 0, 0]}]}'),
    ('<think>x</think>\n{"steps": [{"statement": "a", "kind": "reasoning", "bbox_2d": null}', "]}"),
])
def test_completion_examples(prefix, closing):
    cache = grammar_cache("qwen2.5-vl")
    decoder = cache.reasoning_decoder(3, PIXELS, 100)
    for token in cache.tokenizer.encode(prefix, add_special_tokens=False):
        assert decoder.accept(token), (prefix, decoder.text())
    assert decoder.completion_text() == closing
    check_reasoning(decoder.closed_text(), PIXELS, 3, 100)


def test_completion_in_the_middle_of_a_utf8_character():
    cache = grammar_cache("qwen2.5-vl")
    decoder = cache.synthesis_decoder(REL1000)
    for token in cache.tokenizer.encode('{"answer": "ok ', add_special_tokens=False):
        assert decoder.accept(token)
    assert decoder.accept(cache.byte_token("中".encode()[0]))     # half a character
    assert decoder.text().endswith("ok ")
    closing = decoder.completion_text()
    assert closing[0] not in '"\ufffd' and closing[1:].startswith('", "explanation"')
    check_synthesis(decoder.closed_text(), REL1000)
    ids = decoder.finish()
    assert decoder.is_finished() and json.loads(decoder.text())["answer"].startswith("ok ")
    assert ids[0] == cache.byte_token(0x80)


# ---- (c) caching, masks, batches ---------------------------------------------------------------

def test_compiled_grammar_is_cached():
    cache = grammar_cache("qwen3-vl")
    source = G.reasoning_grammar_source(5, pixel_convention(320, 240), 10)
    first = cache.get(source)
    assert cache.get(source) is first and source in cache
    a, b = cache.reasoning_decoder(5, pixel_convention(320, 240), 10), \
        cache.reasoning_decoder(5, pixel_convention(320, 240), 99)
    assert a.compiled is first and b.compiled is first and a.matcher is not b.matcher
    small = G.GrammarCache(cache.tokenizer, vocab_size=cache.vocab_size, max_entries=2)
    s1, s2, s3 = (G.synthesis_grammar_source(pixel_convention(w, 100)) for w in (100, 200, 300))
    c1 = small.get(s1)
    small.get(s2)
    assert small.get(s1) is c1          # s1 is now the most recent
    small.get(s3)                       # evicts s2
    assert s1 in small and s2 not in small and s3 in small and len(small) == 2


def test_mask_shapes_and_dtypes():
    cache = grammar_cache("qwen2.5-vl")
    reference = allowed_ids(cache.synthesis_decoder(REL1000))
    assert cache.tokenizer.convert_tokens_to_ids("{") in reference
    assert all(cache.decoded_vocab[t].startswith(b"{") for t in reference)
    for shape, dtype in [((cache.vocab_size,), torch.float32), ((1, cache.vocab_size), torch.bfloat16),
                         ((1, cache.vocab_size + 64), torch.float32), ((cache.vocab_size,), torch.float16)]:
        logits = torch.zeros(shape, dtype=dtype)
        cache.synthesis_decoder(REL1000).mask(logits)
        assert set(torch.nonzero(torch.isfinite(logits.view(-1))).flatten().tolist()) == reference
    with pytest.raises(ValueError):
        cache.synthesis_decoder(REL1000).mask(torch.zeros(1, cache.vocab_size - 1))


def test_mask_batch_matches_single_masks():
    cache = grammar_cache("qwen2.5-vl")
    decoders = [cache.reasoning_decoder(3, PIXELS, 30), None, cache.synthesis_decoder(REL1000)]
    sample_run(decoders[0], 1, max_tokens=25)
    sample_run(decoders[2], 2, max_tokens=9)
    logits = torch.rand(3, cache.vocab_size + 5, generator=torch.Generator().manual_seed(0))
    untouched = logits[1].clone()
    G.mask_batch(decoders, logits)
    assert torch.equal(logits[1], untouched)
    for row in (0, 2):
        single = torch.zeros(1, cache.vocab_size + 5)
        decoders[row].mask(single)
        assert torch.equal(torch.isfinite(logits[row]), torch.isfinite(single[0]))


def test_reject_leaves_state_unchanged():
    cache = grammar_cache("qwen2.5-vl")
    decoder = cache.synthesis_decoder(REL1000)
    assert not decoder.accept(cache.tokenizer.convert_tokens_to_ids("a"))
    assert decoder.num_tokens == 0 and decoder.text() == ""
    assert not decoder.accept(cache.vocab_size + 3) and not decoder.accept(-1)


# ---- (d) a Qwen-sized vocabulary ------------------------------------------------------------------

def test_qwen_sized_vocabulary():
    """Full decodes with Qwen2.5's real tokenizer at its checkpoint's vocabulary size. Speed is
    measured by benchmarks/structured_cost.py; here, the properties it rests on: no bounded
    repetition over a character class in the EBNF (those take seconds to compile at this size), no
    Python pass over the vocabulary after the tables are built, and the tables built once per
    tokenizer."""
    tok = _tokenizer("qwen2.5-vl")               # a fresh tokenizer object: its own tables
    assert len(tok) == 151665
    cache = G.GrammarCache(tok, vocab_size=151936)
    lengths = cache.vocab.lengths
    passes = lengths.passes
    assert passes in (0, 1)                  # 0: the tables came from the disk cache
    specs = [G.reasoning_spec(6, PIXELS, 300), G.synthesis_spec(PIXELS), G.reasoning_spec(6, REL1000, 300)]
    for spec in specs:
        assert not re.search(r"\][*+?]?\{\d", spec.source), spec.source
    tokens = 0
    for spec, convention, seed in zip(specs, (PIXELS, PIXELS, REL1000), (0, 1, 2)):
        decoder = cache.decoder(spec)
        gen = torch.Generator().manual_seed(seed)
        while not decoder.is_finished():
            logits = torch.rand(1, cache.vocab_size, generator=gen)
            decoder.mask(logits)
            assert decoder.accept(int(torch.argmax(logits)))
        tokens += decoder.num_tokens
        text = decoder.text()
        if spec.think_chars is None:
            check_synthesis(text, convention)
        else:
            check_reasoning(text, convention, 6, 300)
        assert decoder.num_tokens <= spec.max_bytes
    assert tokens > 100
    assert lengths.passes == passes          # decoding never walks the whole vocabulary again
    again = G.GrammarCache(tok, vocab_size=151936)
    shared = G.GrammarCache.for_tokenizer(tok, 151936)
    assert again.vocab is cache.vocab and shared.vocab is cache.vocab
    assert G.GrammarCache.for_tokenizer(tok, 151936) is shared
    shared.reasoning_decoder(6, PIXELS, 99).mask(torch.zeros(cache.vocab_size))
    assert lengths.passes == passes


def test_tables_come_back_from_the_disk_cache_equal(tmp_path, monkeypatch):
    """The next process loads the per-vocabulary tables instead of building them: the same
    tables; a corrupt file is rebuilt, a tokenizer with another token gets its own file."""
    from corgi.engine.grammar.decoder import default_stop_token_ids
    monkeypatch.setenv("CORGI_CACHE", str(tmp_path))
    tok = _tokenizer("qwen2.5-vl")
    make = lambda: G.Vocabulary(tok, len(tok) + PAD, default_stop_token_ids(tok))   # noqa: E731
    built = make()
    assert built.lengths.passes == 1
    [path] = (tmp_path / "grammar").glob("tables-*.safetensors")
    loaded = make()
    assert loaded.lengths.passes == 0
    assert loaded.decoded_vocab == built.decoded_vocab and loaded.vocab_size == built.vocab_size
    assert loaded.tokenizer_info.dump_metadata() == built.tokenizer_info.dump_metadata()
    assert loaded.tokenizer_info.stop_token_ids == built.tokenizer_info.stop_token_ids
    assert torch.equal(loaded.allow_row, built.allow_row) and loaded.banned_ids == built.banned_ids
    for table in (THINK, STR, ESC):
        for remaining in (0, 3, 40):
            a, b = loaded.lengths.row(table, remaining), built.lengths.row(table, remaining)
            assert (a is None and b is None) or torch.equal(a, b)
    path.write_bytes(path.read_bytes()[:4096])           # a truncated file (a crash mid-write elsewhere)
    assert make().lengths.passes == 1 and make().lengths.passes == 0   # rebuilt, and written whole again
    tok.add_tokens(["<corgi-test-token>"])
    assert make().lengths.passes == 1                    # another tokenizer: not the old tables
    assert len(list((tmp_path / "grammar").glob("tables-*.safetensors"))) == 2


def test_tables_shared_per_tokenizer_thread_safe_and_freed_with_it():
    import gc
    import threading
    import weakref
    tok = _tokenizer("qwen3-vl")                 # a fresh tokenizer object
    vocab_size = len(tok) + PAD
    barrier = threading.Barrier(4)
    got: list[G.GrammarCache] = []

    def build():
        barrier.wait()
        got.append(G.GrammarCache.for_tokenizer(tok, vocab_size))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared = got[0]
    assert all(c is shared for c in got)
    own = G.GrammarCache(tok, vocab_size=vocab_size, max_entries=1)
    assert own is not shared and own.vocab is shared.vocab and own.tokenizer is tok
    source = G.synthesis_grammar_source(REL1000)
    shared.get(source)
    assert source in shared and source not in own            # own compiled-grammar LRU
    assert G.GrammarCache(tok, vocab_size=vocab_size + 32).vocab is not shared.vocab
    refs = [weakref.ref(tok), weakref.ref(shared.vocab), weakref.ref(shared)]
    del tok, got, threads, build, shared, own
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_opening_rows_match_their_definition():
    """The rows used while "<think>" is written look only at tokens that can continue it."""
    from corgi.engine.grammar import lengths as L
    cache = grammar_cache("qwen3-vl")
    tables = cache.vocab.lengths
    for left in range(1, len(G.THINK_OPEN) + 1):
        for remaining in (0, 2):
            row = tables.row(L.OPENING_TABLE - left, remaining)
            bits = torch.ones(cache.words * 32, dtype=torch.bool)
            for tid, piece in enumerate(cache.decoded_vocab):
                if L.opening_cost(piece, left) > remaining:
                    bits[tid] = False
            assert torch.equal(row, L.pack(bits)), (left, remaining)


# ---- several images in a turn: "image": N before every box -------------------------------------

TWO_IMAGES = ((1, pixel_convention(644, 476)), (2, pixel_convention(300, 900)))


def _accepts(decoder, text: str) -> bool:
    ids = decoder.cache.tokenizer.encode(text, add_special_tokens=False)
    return all(decoder.accept(t) for t in ids)


def test_image_field_per_box_in_both_phases():
    import xgrammar as xgr
    from corgi.parsing import ImageConventions, parse_reasoning, parse_synthesis
    cache = grammar_cache("qwen2.5-vl")
    for source in (G.reasoning_grammar_source(3, PIXELS, 10, TWO_IMAGES), G.synthesis_grammar_source(PIXELS, TWO_IMAGES)):
        xgr.Grammar.from_ebnf(source)
    steps = ('<think>x</think>\n{"steps": [{"statement": "a", "kind": "object", "image": 2, "bbox_2d": [1, 2, 299, 899]}, '
             '{"statement": "b", "kind": "reasoning", "bbox_2d": null}]}')
    decoder = cache.reasoning_decoder(3, PIXELS, 10, TWO_IMAGES)
    assert _accepts(decoder, steps) and decoder.is_finished()
    images = ImageConventions({0: TWO_IMAGES[0][1], 1: TWO_IMAGES[1][1]})
    (first, _) = parse_reasoning(steps, PIXELS, 3, images=images).steps
    assert first.bbox.image == 1 and abs(first.bbox.y2 - 899 / 900) < 1e-6     # image 2's own scale
    # A box must name an image of the turn, and stays in that image's range.
    assert not _accepts(cache.reasoning_decoder(3, PIXELS, 10, TWO_IMAGES),
                        '<think>x</think>\n{"steps": [{"statement": "a", "kind": "object", "image": 3')
    assert not _accepts(cache.reasoning_decoder(3, PIXELS, 10, TWO_IMAGES),
                        '<think>x</think>\n{"steps": [{"statement": "a", "kind": "object", "image": 1, '
                        '"bbox_2d": [1, 2, 3, 899')                                   # 899 > image 1's 476
    answer = ('{"answer": "red", "explanation": "e", "key_evidence": [{"description": "car", "image": 1, '
              '"bbox_2d": [0, 0, 10, 10]}, {"description": "sky", "bbox_2d": null}]}')
    decoder = cache.synthesis_decoder(PIXELS, TWO_IMAGES)
    assert _accepts(decoder, answer) and decoder.is_finished()
    assert parse_synthesis(answer, PIXELS, images=images).key_evidence[0].bbox.image == 0


@pytest.mark.parametrize("phase", ["reasoning", "synthesis"])
def test_random_sampling_with_two_images_parses(phase):
    from corgi.parsing import ImageConventions, parse_reasoning, parse_synthesis
    cache = grammar_cache("qwen3-vl")
    images = ImageConventions({0: TWO_IMAGES[0][1], 1: TWO_IMAGES[1][1]})
    for seed in range(4):
        decoder = (cache.reasoning_decoder(MAX_STEPS, PIXELS, THINK_CHARS, TWO_IMAGES) if phase == "reasoning"
                   else cache.synthesis_decoder(PIXELS, TWO_IMAGES))
        sample_run(decoder, seed)
        assert decoder.is_finished() and len(decoder.text().encode()) <= decoder.spec.max_bytes
        if phase == "reasoning":
            result = parse_reasoning(decoder.text(), PIXELS, MAX_STEPS, images=images)
            boxes = [s.bbox for s in result.steps if s.bbox]
        else:
            result = parse_synthesis(decoder.text(), PIXELS, images=images)
            boxes = [k.bbox for k in result.key_evidence if k.bbox]
        assert result.ok and not [w for w in result.warnings if "image" in w]
        assert all(b.image in (0, 1) for b in boxes)


def test_a_budget_cut_at_an_image_number_still_closes():
    """Out of tokens right after `"image": ` of a turn about images 2 and 3 (a joined pair):
    the closing text names one of them, and the whole output parses."""
    from corgi.parsing import ImageConventions, parse_reasoning
    cache = grammar_cache("qwen2.5-vl")
    later = tuple((n + 1, convention) for n, (_, convention) in enumerate(TWO_IMAGES, 1))     # images 2, 3
    decoder = cache.reasoning_decoder(3, PIXELS, 10, later)
    assert _accepts(decoder, '<think>x</think>\n{"steps": [{"statement": "a", "kind": "object", "image": ')
    closed = decoder.closed_text()
    assert closed.split('"image": ', 1)[1][:1] in "23"
    images = ImageConventions({1: TWO_IMAGES[0][1], 2: TWO_IMAGES[1][1]})
    assert parse_reasoning(closed, PIXELS, 3, images=images).ok
