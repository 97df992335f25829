"""Tiny offline Qwen-VL checkpoints: build, load back through from_pretrained, run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from corgi.engine import tiny
from corgi.engine.twin_tokenizer import added_tokens, chat_template

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    # The twins the rest of the suite runs (built once into the cache): the same build, paid once.
    return {fam: tiny.ensure_tiny_checkpoint(f"tiny-{fam}") for fam in tiny.FAMILIES}


@pytest.fixture(scope="module")
def loaded(built):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    out = {}
    for fam, folder in built.items():
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        ip = AutoImageProcessor.from_pretrained(folder, backend="pil")
        out[fam] = (model, tok, ip)
    return out


def _image(w=300, h=200, seed=0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _inputs(model, tok, ip, image):
    from corgi import prompts
    px = ip(images=image, return_tensors="pt")
    merge = model.config.vision_config.spatial_merge_size
    n = int(px["image_grid_thw"].prod()) // merge ** 2
    before, after = prompts.conversation_head()
    text = before + prompts.IMAGE_PAD * n + after + "<|im_start|>user\nWhat is on the sign?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(text)])
    assert int((ids == model.config.image_token_id).sum()) == n
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px["pixel_values"],
                image_grid_thw=px["image_grid_thw"],
                mm_token_type_ids=(ids == model.config.image_token_id).to(torch.int32))


# ---- files and configs --------------------------------------------------------------------

@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_folder_and_config(built, loaded, family):
    folder = built[family]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", "generation_config.json", tiny.MARKER_FILE} <= names
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]   # no temp leftovers
    assert tiny.is_complete_checkpoint(folder)

    model, tok, ip = loaded[family]
    b = tiny._BUILDS[family]
    assert type(model).__name__ == b.model_class
    # what AutoTokenizer picks for the config's model_type (Qwen3.5: transformers' Qwen3_5Tokenizer, which
    # rebuilds the BPE without tokenizer.json's ignore_merges; see engine/twin_tokenizer.py)
    assert type(tok).__name__ == ("Qwen3_5Tokenizer" if b.tokenizer == "qwen3.5" else "Qwen2Tokenizer")
    assert type(ip).__name__ == "Qwen2VLImageProcessorPil"
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.eos_token_id == tc.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tc.vocab_size == b.vocab_size == (248320 if b.tokenizer == "qwen3.5" else 151936)  # real rows
    assert len(tok) <= tc.vocab_size
    # the real checkpoints' ids (Qwen2/2.5/3-VL: 151655, 151656, 151652, 151653; Qwen3.5 from 248044)
    real = {content: i for i, content, _ in added_tokens(b.tokenizer)}
    if b.tokenizer != "qwen3.5":
        assert (real["<|image_pad|>"], real["<|video_pad|>"], real["<|vision_start|>"]) == (151655, 151656, 151652)
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == \
        (real["<|image_pad|>"], real["<|video_pad|>"], real["<|vision_start|>"], real["<|vision_end|>"])
    assert (tc.bos_token_id, tc.eos_token_id, tok.pad_token_id) == \
        (real["<|endoftext|>"], real["<|im_end|>"], real["<|endoftext|>"])
    out_width = vc.hidden_size if family == "qwen2-vl" else vc.out_hidden_size   # Qwen2-VL: merger output
    assert out_width == tc.hidden_size
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rotary = int(head_dim * tc.rope_parameters.get("partial_rotary_factor", 1.0))
    assert sum(tc.rope_parameters["mrope_section"]) == rotary // 2
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.dtype == torch.float32
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    assert vc.patch_size == ip.patch_size == b.patch == (14 if family in ("qwen2-vl", "qwen2.5-vl") else 16)
    assert vc.spatial_merge_size == ip.merge_size == 2
    if family.startswith("qwen3.5"):
        assert tc.rope_parameters["mrope_interleaved"] is True
        assert not getattr(vc, "deepstack_visual_indexes", None)
    elif family.startswith("qwen3-vl"):
        assert tc.rope_parameters["mrope_interleaved"] is True
        assert vc.deepstack_visual_indexes and max(vc.deepstack_visual_indexes) < vc.depth
        assert len(vc.deepstack_visual_indexes) <= tc.num_hidden_layers
        side = int(vc.num_position_embeddings ** 0.5)
        assert side * side == vc.num_position_embeddings
    elif family == "qwen2.5-vl":
        assert max(vc.fullatt_block_indexes) < vc.depth
    else:                                   # the Qwen2-VL tower: embed_dim wide, mlp_ratio, quick_gelu
        assert vc.embed_dim % vc.num_heads == 0 and vc.mlp_ratio == 4 and vc.hidden_act == "quick_gelu"
    assert model.generation_config.eos_token_id[0] == tok.eos_token_id


def test_sizes_and_names():
    assert set(tiny.SIZES) == {"tiny", "small"}
    assert tiny.FAMILIES[:3] == ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
    assert tiny.TINY_NAMES == tuple(f"{s}-{f}" for s in tiny.SIZES for f in tiny.FAMILIES)
    for name in ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "small-qwen2-vl", "small-qwen2.5-vl",
                 "small-qwen3-vl"):
        assert tiny.is_tiny_name(name)
    assert tiny.parse_tiny_name("small-qwen3-vl") == ("qwen3-vl", "small")
    assert tiny.parse_tiny_name("tiny-qwen2-vl") == ("qwen2-vl", "tiny")
    for name in ("Qwen/Qwen2.5-VL-3B-Instruct", "tiny-qwen9-vl", "", None, "tiny"):
        assert not tiny.is_tiny_name(name)
    with pytest.raises(ValueError):
        tiny.build_tiny_checkpoint("qwen9-vl", Path("/nonexistent/x"))
    with pytest.raises(ValueError):
        tiny.build_tiny_checkpoint("qwen3-vl", Path("/nonexistent/x"), size="huge")


# ---- determinism and atomicity ----------------------------------------------------------

def test_same_seed_same_bits(built, tmp_path):
    from safetensors.torch import load_file
    family = "qwen3-vl"
    state = torch.random.get_rng_state()
    again = tiny.build_tiny_checkpoint(family, tmp_path / "again", seed=0)
    other = tiny.build_tiny_checkpoint(family, tmp_path / "other", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())        # the caller's RNG is left alone
    a, b, c = (load_file(str(f / "model.safetensors")) for f in (built[family], again, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    for name in ("tokenizer.json", "config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (built[family] / name).read_bytes() == (again / name).read_bytes(), name


def test_build_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    real = tiny._write_checkpoint

    def crash(family, size, seed, folder):
        real(family, size, seed, folder)
        raise RuntimeError("crash after writing")

    monkeypatch.setattr(tiny, "_write_checkpoint", crash)
    with pytest.raises(RuntimeError):
        tiny.build_tiny_checkpoint("qwen2.5-vl", target)
    assert list(tmp_path.iterdir()) == []                          # neither the folder nor a temp one
    monkeypatch.setattr(tiny, "_write_checkpoint", real)
    tiny.build_tiny_checkpoint("qwen2.5-vl", target)
    (target / "stale.txt").write_text("old")
    tiny.build_tiny_checkpoint("qwen2.5-vl", target, seed=3)        # replaces an existing folder
    assert not (target / "stale.txt").exists()
    assert json.loads((target / tiny.MARKER_FILE).read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ---- tokenizer -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tokenizer(loaded, family):
    _, tok, _ = loaded[family]
    kind = tiny._BUILDS[family].tokenizer
    ranks = 248044 if kind == "qwen3.5" else 151643
    assert len(tok) == ranks + len(added_tokens(kind))            # Qwen2/2.5-VL 151665, Qwen3-VL 151669
    decoder = tok.added_tokens_decoder
    assert [(i, decoder[i].content, decoder[i].special) for i in sorted(decoder)] == added_tokens(kind)
    rng = np.random.RandomState(7)
    samples = [
        'Hello, world! {"steps": [{"statement": "a red car", "kind": "object", "bbox_2d": [12, 34, 56, 78]}]}',
        "caf\u00e9 \u4e2d\u6587 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \U0001f600\U0001f44d\U0001f3fd \u2192 \u20ac \x00\x07\x7f",
        "  leading, trailing  \n\n\t tabs\r\n and\u00a0nbsp\u200b ",
        "<think>maybe</think>\n<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|><|im_end|>",
        "".join(chr(c) for c in rng.randint(0x20, 0x2FFF, size=300)),
        "".join(chr(c) for c in rng.randint(0x1F300, 0x1FAFF, size=50)),
    ]
    for s in samples:
        s = unicodedata.normalize("NFC", s)
        assert tok.decode(tok.encode(s)) == s, s
    # like the real Qwen tokenizers, input is NFC-normalised first
    assert tok.decode(tok.encode("e\u0301")) == "\u00e9"
    for t in tiny.SPECIAL_TOKENS:
        ids = tok.encode(t)
        assert len(ids) == 1 and ids[0] == tok.convert_tokens_to_ids(t)
        assert tok.decode(ids) == t
    assert tok.encode("") == []
    assert tok.decode(tok.encode("x<|im_end|>y"), skip_special_tokens=True) == "xy"
    think = tok.encode("<think>")
    assert (len(think) == 1) == (kind in ("qwen3-vl", "qwen3.5"))   # as in the real tokenizers


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_chat_template(loaded, family):
    _, tok, _ = loaded[family]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    body = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n"
    # Qwen2-VL's and Qwen2.5-VL's templates add a default system message; Qwen3-VL's and Qwen3.5's do not;
    # Qwen3.5's opens the think block itself
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if family in ("qwen2-vl", "qwen2.5-vl") else ""
    opened = "<think>\n" if tiny._BUILDS[family].tokenizer == "qwen3.5" else ""
    assert text == system + body + opened
    assert tok.chat_template == chat_template(tiny._BUILDS[family].tokenizer)
    sys_msg = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(sys_msg, tokenize=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


# ---- image processor ----------------------------------------------------------------------

@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_image_processor(built, loaded, family):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    _, _, ip = loaded[family]
    direct = Qwen2VLImageProcessorPil.from_pretrained(built[family])
    assert direct.to_dict() == ip.to_dict()
    out = ip(images=_image(500, 300), return_tensors="pt")
    patch = ip.patch_size
    t, h, w = out["image_grid_thw"][0].tolist()
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    assert out["pixel_values"].shape == (h * w, 3 * 2 * patch * patch)
    clip = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    mean, std, min_pixels = clip + (3136,) if patch == 14 else ([0.5] * 3, [0.5] * 3, 65536)
    assert (list(ip.image_mean), list(ip.image_std), ip.temporal_patch_size) == (mean, std, 2)
    assert ip.size["shortest_edge"] == min_pixels          # min_pixels is stored as size.shortest_edge
    small = Qwen2VLImageProcessorPil.from_pretrained(built[family], min_pixels=4 * (2 * patch) ** 2,
                                                      max_pixels=16 * (2 * patch) ** 2)
    assert int(small(images=_image(500, 300), return_tensors="pt")["image_grid_thw"].prod()) // 4 <= 16


# ---- running the model --------------------------------------------------------------------

@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_forward_and_generate(loaded, family):
    model, tok, ip = loaded[family]
    inputs = _inputs(model, tok, ip, _image())
    with torch.no_grad():
        model.model.rope_deltas = None
        logits = model(**inputs).logits
    L = inputs["input_ids"].shape[1]
    assert logits.shape == (1, L, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1 and L < out.shape[1] <= L + 5
    assert torch.equal(out[:, :L], inputs["input_ids"])
    tok.decode(out[0, L:])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_precomputed_vision_and_positions(loaded, family):
    """What the engine relies on: skip the vision tower, pass 3-D positions explicitly."""
    model, tok, ip = loaded[family]
    inputs = _inputs(model, tok, ip, _image(260, 330, seed=1))
    ids, mask, thw, mm = (inputs[k] for k in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids"))
    with torch.no_grad():
        model.model.rope_deltas = None
        ref = model(**inputs).logits
        feats = model.model.get_image_features(inputs["pixel_values"], thw)
        n = int(thw.prod()) // 4
        assert isinstance(feats.pooler_output, tuple) and feats.pooler_output[0].shape == (n, model.config.text_config.hidden_size)
        if family == "qwen3-vl":
            levels = model.config.vision_config.deepstack_visual_indexes
            assert len(feats.deepstack_features) == len(levels)
            assert all(lvl[0].shape == (n, model.config.text_config.hidden_size) for lvl in feats.deepstack_features)
        model.model.rope_deltas = None
        skip = model(input_ids=ids, attention_mask=mask, image_grid_thw=thw, mm_token_type_ids=mm,
                     mm_encoder_outputs={"image": feats}).logits
        torch.testing.assert_close(skip, ref, rtol=0, atol=0)
        with pytest.raises(ValueError):
            model(**inputs, mm_encoder_outputs={"image": feats})
        pos, deltas = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=thw, attention_mask=mask)
        assert pos.shape == (3, 1, ids.shape[1]) and deltas.shape == (1, 1)
        three = model(input_ids=ids, attention_mask=mask, position_ids=pos, mm_encoder_outputs={"image": feats}).logits
        torch.testing.assert_close(three, ref, rtol=0, atol=0)
        text_row = torch.arange(ids.shape[1]).view(1, 1, -1)
        four = model(input_ids=ids, attention_mask=mask, position_ids=torch.cat([text_row, pos]),
                     mm_encoder_outputs={"image": feats}).logits
        torch.testing.assert_close(four, ref, rtol=0, atol=0)


# ---- the named cache ----------------------------------------------------------------------

def test_ensure_tiny_checkpoint(tmp_path, monkeypatch):
    folder = tiny.ensure_tiny_checkpoint("tiny-qwen2.5-vl", cache_dir=tmp_path)
    assert folder.is_dir() and tiny.is_complete_checkpoint(folder)
    assert folder.is_relative_to(tmp_path) and f"-v{tiny.FORMAT_VERSION}-" in folder.name
    marker = folder / tiny.MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    assert tiny.ensure_tiny_checkpoint("tiny-qwen2.5-vl", cache_dir=tmp_path) == folder
    assert marker.stat().st_mtime_ns == stamp                       # reused, not rebuilt
    meta = json.loads(marker.read_text())
    assert (meta["family"], meta["size"], meta["seed"]) == ("qwen2.5-vl", "tiny", 0)
    marker.unlink()                                                 # incomplete -> rebuilt
    assert tiny.ensure_tiny_checkpoint("tiny-qwen2.5-vl", cache_dir=tmp_path) == folder
    assert marker.exists()
    monkeypatch.setenv("CORGI_CACHE", str(tmp_path / "env"))
    assert tiny.tiny_checkpoint_folder("tiny-qwen3-vl").is_relative_to(tmp_path / "env")
    with pytest.raises(ValueError):
        tiny.ensure_tiny_checkpoint("tiny-qwen9-vl", cache_dir=tmp_path)


def test_ensure_races(tmp_path):
    """Processes that ask at the same moment: one builds, the others wait for it and reuse it."""
    n = 2
    code = (
        "import os, sys, time; from pathlib import Path; from corgi.engine import tiny\n"
        "root = Path(sys.argv[1]); gate = root / 'gate'\n"
        "real = tiny.build_tiny_checkpoint\n"
        "def counted(*a, **k):\n"
        "    print('BUILT', flush=True); time.sleep(0.5); return real(*a, **k)\n"
        "tiny.build_tiny_checkpoint = counted\n"
        "(gate / str(os.getpid())).touch()\n"
        "deadline = time.time() + 60\n"
        f"while len(list(gate.iterdir())) < {n} and time.time() < deadline: time.sleep(0.01)\n"
        "print(tiny.ensure_tiny_checkpoint('tiny-qwen3-vl', cache_dir=root / 'cache'))\n"
    )
    (tmp_path / "gate").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(n)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = [o[0].split() for o in outs]
    assert sum(line.count("BUILT") for line in lines) == 1
    folders = {line[-1] for line in lines}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert tiny.is_complete_checkpoint(folder)
    leftovers = [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_checkpoint_holds_the_twin_tokenizer(built, family, tmp_path):
    """The folder's tokenizer files are exactly the family's real (twin) tokenizer."""
    from corgi.engine.twin_tokenizer import build_tokenizer
    kind = tiny._BUILDS[family].tokenizer
    build_tokenizer(kind).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (built[family] / name).read_bytes() == (tmp_path / name).read_bytes(), name
    if kind == "qwen3.5":
        # tokenizer.json as written keeps tiktoken's whole-piece rule (one id for 加拿大); AutoTokenizer on
        # this folder picks Qwen3_5Tokenizer by model_type, whose rebuilt BPE drops it (three ids)
        from transformers import TokenizersBackend
        assert TokenizersBackend.from_pretrained(built[family]).encode("加拿大") == [108918]
