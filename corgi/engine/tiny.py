"""Tiny, randomly initialised Qwen-VL checkpoints of the real transformers classes, built offline.

A checkpoint here is an ordinary folder, written with `save_pretrained`, that loads back through
the very same calls a real checkpoint takes:

    AutoModelForImageTextToText.from_pretrained(folder)     # Qwen2_5_VL... / Qwen3VLForConditionalGeneration
    AutoTokenizer.from_pretrained(folder)                   # Qwen2Tokenizer (tokenizer.json + chat_template.jinja)
    Qwen2VLImageProcessorPil.from_pretrained(folder)        # pure PIL, no torchvision

Folder layout (what `build_tiny_checkpoint` writes):

    config.json               Qwen2_5_VLConfig / Qwen3VLConfig (text_config + vision_config), dtype float32
    generation_config.json    eos = [<|im_end|>, <|endoftext|>], pad = bos = <|endoftext|>
    model.safetensors         random weights (torch.manual_seed(seed) before init: bit-identical per seed)
    tokenizer.json            byte-level BPE (~2000 tokens) trained here on a built-in corpus + Qwen special tokens
    tokenizer_config.json     tokenizer_class Qwen2Tokenizer, eos <|im_end|>, pad <|endoftext|>
    chat_template.jinja       ChatML with <|vision_start|><|image_pad|><|vision_end|> for images
    preprocessor_config.json  Qwen2-VL image processor: patch 14 (qwen2.5-vl) / 16 (qwen3-vl), merge 2
    corgi_tiny.json           marker + metadata, written last (a folder without it is not complete)

The whole folder is written into a temporary folder beside the target and renamed into place, so a
crash never leaves a half-written checkpoint under the final name.

Like the real tokenizers, the tokenizer normalises text to Unicode NFC (Qwen2Tokenizer always installs
an NFC normaliser when it loads), so `decode(encode(s)) == s` holds for every NFC string, and a
non-NFC string comes back in its NFC form.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "FAMILIES", "SIZES", "TINY_NAMES", "FORMAT_VERSION", "MARKER_FILE", "TinySpec",
    "build_tiny_checkpoint", "ensure_tiny_checkpoint", "is_tiny_name", "parse_tiny_name",
    "tiny_checkpoint_folder", "default_cache_dir", "is_complete_checkpoint",
]

FORMAT_VERSION = 2          # bump when what gets written changes; folder names carry it
MARKER_FILE = "corgi_tiny.json"

FAMILIES = ("qwen2.5-vl", "qwen3-vl")


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of one size; the family decides the rest (patch, activations, rope, deepstack)."""
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    max_image_tokens: int          # image processor max_pixels = this many LM tokens of (patch*merge)^2 px
    # Text weights' init std. Real-model scale (0.02) makes a random model repeat its last token
    # forever; a larger one gives varied, context-dependent text, so equality tests of the
    # caches compare something that could differ.
    text_init_range: float = 0.25


SIZES: dict[str, TinySpec] = {
    # a toy: builds and loads in about a second on CPU
    "tiny": TinySpec(text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=128,
                     vision_hidden=32, vision_depth=2, vision_heads=2, max_image_tokens=256),
    # big enough for CPU timings to mean something (~45-50M parameters)
    "small": TinySpec(text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=2, text_intermediate=2816,
                      vision_hidden=256, vision_depth=4, vision_heads=4, max_image_tokens=1280),
}

TINY_NAMES = tuple(f"{size}-{family}" for size in SIZES for family in FAMILIES)

# ---- tokenizer ------------------------------------------------------------------------------

BPE_VOCAB_SIZE = 1968       # learned byte-level BPE (256 byte symbols + merges); added tokens come after

# The real Qwen2.5-VL / Qwen3-VL added tokens, in the real order (real ids start at 151643).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
_PLAIN_ADDED_TOKENS = {     # added but not special (decode(skip_special_tokens=True) keeps them)
    "qwen2.5-vl": ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                   "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"),
    "qwen3-vl": ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                 "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                 "<think>", "</think>"),
}

_CHAT_TEMPLATE = (       # one line, no whitespace control: the only newlines are the literal ones
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system %}"
    "<|im_start|>system\n{{ default_system }}<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-VL's template adds a default system message; Qwen3-VL's does not.
_DEFAULT_SYSTEM = {"qwen2.5-vl": "You are a helpful assistant.", "qwen3-vl": ""}


def _chat_template(family: str) -> str:
    system = _DEFAULT_SYSTEM[family]
    return "{% set default_system = " + json.dumps(system) + " %}" + _CHAT_TEMPLATE


# ---- the built-in corpus ------------------------------------------------------------------

_ENGLISH = """\
The image shows a busy street at dusk. A red car is parked next to a blue bicycle, and a woman in a
yellow coat waits at the crossing. Above the shop on the left, a sign reads "OPEN 24 HOURS".
In the kitchen there are two white plates on the wooden table, a glass of water, and a bowl of green
apples. The cat is sleeping on the chair near the window; the dog is lying on the floor.
A man holds an umbrella while walking across the bridge. Behind him, the river reflects the lights
of the city. The clock on the tower says it is a quarter past seven.
Question: How many people are in the picture? Answer: There are three people: two adults and a child.
Question: What is written on the bottle? Answer: The label says "Spring Water, 500 ml".
Question: What color is the bus? Answer: The bus is orange with a white stripe.
The chart has four bars. The tallest bar is labelled 2021 and reaches about 80 percent.
The table lists prices: coffee $3.50, tea $2.75, cake $4.25. The total at the bottom is $10.50.
Let me look at the region around the door. The number above the door is 42.
First I find the person on the right, then I read the text on the shirt, then I compare the sizes.
I cannot see the license plate clearly, so I will not guess the number.
Step 1 locates the traffic light; step 2 reads its color; step 3 decides whether cars may go.
It's a sunny day, and they're playing football in the park. We've seen the goal; you'll see the ball.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 20 24 28 32 64 100 112 128 224 256 336 448 512 640 1000 1024.
Punctuation: , . ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `
"""

_WORDS = {
    "color": ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "gray", "brown", "pink"],
    "size": ["small", "large", "tall", "short", "tiny", "huge", "long", "wide", "narrow"],
    "object": ["car", "bicycle", "person", "dog", "cat", "sign", "table", "chair", "window", "door", "tree",
               "bus", "truck", "bottle", "cup", "plate", "book", "phone", "laptop", "clock", "bird", "horse",
               "boat", "building", "street", "traffic light", "umbrella", "bag", "hat", "shirt", "label",
               "menu", "screen", "banner", "poster", "shelf", "box", "house", "bridge", "flower", "ball"],
    "place": ["on the left", "on the right", "in the center", "at the top", "at the bottom", "behind the tree",
              "next to the door", "under the table", "near the window", "in the background",
              "in the foreground", "above the sign", "below the clock", "between the cars"],
    "verb": ["is holding", "is standing next to", "is looking at", "is sitting on", "is parked near",
             "is hanging above", "is leaning against", "is lying under", "is walking toward", "covers"],
    "text": ["STOP", "EXIT", "OPEN", "SALE 50%", "Main St.", "No Parking", "Caf\u00e9", "Gate 12",
             "Welcome", "Total: 12.99", "Hello, world!", "Z\u00fcrich", "Platform 9", "Fresh Bread"],
    "common": list(dict.fromkeys("""about above across action activity actually add address admit adult affect after again against age agency agent ago agree ahead air allow almost alone along already also although always among amount analysis animal another answer anyone anything appear apply approach area argue arm around arrive art article artist ask assume attack attention audience author available avoid away baby back bad balance bank bar base beach bear beat beautiful because become bed before begin behavior behind believe benefit best better between beyond big bill bit black blood board body born both bottom brother budget build business buy call camera campaign cancer candidate capital card care career carry case catch cause cell center central century certain chair challenge chance change character charge check child choice choose church citizen city civil claim class clear close coach cold collection college color come commercial common community company compare computer concern condition conference consider consumer contain continue control cost could country couple course court cover create crime cultural culture current customer cut dark data daughter dead deal death debate decade decide decision deep defense degree democratic describe design despite detail determine develop difference different difficult dinner direction director discover discuss disease doctor door down draw dream drive drop drug during each early east easy eat economic economy edge education effect effort eight either election else employee end energy enjoy enough enter entire environment environmental especially establish even evening event ever every everybody everyone everything evidence exactly example executive exist expect experience expert explain eye face fact factor fail fall family far fast father fear federal feel feeling few field fight figure fill film final finally financial find fine finger finish fire firm first fish five floor fly focus follow food foot force foreign forget form former forward four free friend from front full fund future game garden gas general generation girl give glass goal good government great ground group grow growth guess gun guy hair half hand hang happen happy hard have head health hear heart heat heavy help here herself high himself history hold home hope hospital hot hotel hour however huge human hundred husband idea identify image imagine impact important improve include including increase indeed indicate individual industry information inside instead institution interest interesting international interview into investment involve issue item itself job join just keep kid kill kind kitchen know knowledge land language large last late later laugh lawyer lead leader learn least leave left legal less letter level lie life light like likely line list listen little live local long look lose loss lot love machine magazine main maintain major majority make manage management manager many market marriage material matter maybe mean measure media medical meet meeting member memory mention message method middle might military million mind minute miss mission model modern moment money month more morning most mother mouth move movement movie much music must myself name nation national natural nature near nearly necessary need network never news newspaper next nice night none north note nothing notice number occur offer office officer official often once only onto open operation opportunity option order organization other others outside over own owner page pain painting paper parent part participant particular partner party pass past patient pattern pay peace people perform performance perhaps period person personal phone physical pick picture piece place plan plant play player point police policy political politics poor popular population position positive possible power practice prepare present president pressure pretty prevent price private probably problem process produce product production professional professor program project property protect prove provide public pull purpose push quality quickly quite race radio raise range rate rather reach read ready real reality realize really reason receive recent recently recognize record reduce reflect region relate relationship religious remain remember remove report represent require research resource respond response rest result return reveal rich right rise risk road rock role room rule safe same save scene school science scientist score season seat second section security seek seem sell send senior sense series serious serve service seven several shake share shoot short shot should shoulder show side sign significant similar simple simply since sing single sister site situation six size skill skin small smile social society soldier some somebody someone something sometimes song soon sort sound source south southern space speak special specific speech spend sport spring staff stage stand standard star start state statement station stay step still stock stop store story strategy street strong structure student study stuff style subject success successful such suddenly suffer suggest summer support sure surface system take talk task teach teacher team technology television tell tend term test than thank that their them themselves then theory there these they thing think third this those though thought thousand threat three through throughout throw thus time today together tonight total tough toward town trade traditional training travel treat treatment trial trip trouble true truth turn type under understand unit until upon usually value various very victim view violence visit voice vote wait walk wall want watch water weapon wear week weight well west western what whatever when where whether which while white whole whom whose why wide wife will win wind window wish with within without woman wonder word work worker world worry would write writer wrong yard yeah year young yourself zone kilometer meter centimeter inch pixel corner edge middle left right upper lower diagonal rectangle circle triangle square oval shadow reflection background foreground horizon mountain river lake ocean forest desert island valley hill sky cloud rain snow sun moon star grass leaf branch stone brick metal wood plastic paper glass fabric leather concrete sand ice steam smoke dust mirror lamp candle bottle jar basket bucket ladder fence gate roof wall floor ceiling stairs elevator escalator platform tunnel highway sidewalk crosswalk parking airport harbor station market bakery pharmacy library museum stadium theater restaurant kitchen bedroom bathroom office classroom hospital farm factory warehouse garage helmet jacket sweater trousers jeans skirt dress shoes boots gloves scarf glasses watch necklace ring bracelet wallet backpack suitcase keyboard mouse monitor printer camera microphone speaker headphones charger cable battery remote controller tablet calculator scissors knife fork spoon chopsticks bowl pan pot kettle oven fridge microwave toaster blender sink faucet towel soap toothbrush pillow blanket sofa couch armchair bench stool desk cabinet drawer wardrobe curtain carpet painting statue fountain bicycle motorcycle scooter skateboard airplane helicopter train tram subway taxi ambulance tractor elephant giraffe zebra lion tiger bear monkey rabbit squirrel deer sheep cow pig goat chicken duck goose owl eagle parrot pigeon fish shark whale dolphin turtle frog snake spider butterfly bee ant apple banana orange lemon grape strawberry cherry peach pear pineapple watermelon tomato potato carrot onion pepper cucumber lettuce broccoli corn bread cheese butter egg milk coffee tea juice wine beer water sandwich pizza burger noodles rice soup salad cake cookie chocolate candy sugar salt""".split())),
    "question": ["What color is the {o}?", "How many {o}s are there?", "What does the {o} say?",
                 "Is the {o} {p}?", "What is {p}?", "Which {o} is bigger?", "Where is the {o}?",
                 "What is written on the {o}?", "Is there a {c} {o} in the image?"],
}


def _corpus() -> list[str]:
    """The training text of the BPE: English, the CoRGI prompts, and the JSON the model must write."""
    rng = random.Random(20240601)          # fixed: the corpus, hence the tokenizer, never changes by itself
    w = _WORDS
    texts = [_ENGLISH]
    texts.extend(_prompt_texts())

    def box() -> list[int]:
        x1, y1 = rng.randint(0, 900), rng.randint(0, 900)
        return [x1, y1, x1 + rng.randint(5, 1000 - x1), y1 + rng.randint(5, 1000 - y1)]

    def sentence() -> str:
        c, s, o, p, v = (rng.choice(w[k]) for k in ("color", "size", "object", "place", "verb"))
        o2 = rng.choice(w["object"])
        forms = [f"The {c} {o} {p} {v} the {o2}.", f"A {s} {c} {o} is {p}.",
                 f"There is a {o} {p}, and it is {c}.", f"I can see a {s} {o} {p}.",
                 f"The sign on the {o} reads \"{rng.choice(w['text'])}\".",
                 f"The {o} {v} a {s} {o2} {p}."]
        return rng.choice(forms)

    def question() -> str:
        return rng.choice(w["question"]).format(o=rng.choice(w["object"]), p=rng.choice(w["place"]),
                                                c=rng.choice(w["color"]))

    for _ in range(700):
        texts.append(" ".join(sentence() for _ in range(rng.randint(1, 4))))
    common = w["common"]
    for _ in range(3):             # every common word, several times, in shuffled little "sentences"
        order = common[:]
        rng.shuffle(order)
        for i in range(0, len(order), 9):
            chunk = order[i:i + 9]
            texts.append(chunk[0].capitalize() + " " + " ".join(chunk[1:]) + rng.choice([".", ",", "?", "!", ";"]))
    for _ in range(300):
        kinds = ["object", "text", "reasoning"]
        steps = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(kinds)
            steps.append({"statement": sentence(), "kind": kind,
                          "bbox_2d": None if kind == "reasoning" else box()})
        think = " ".join(sentence() for _ in range(rng.randint(1, 3)))
        texts.append(f"<think>{think}</think>\n" + json.dumps({"steps": steps}))
    for _ in range(200):
        key = [{"description": sentence(), "bbox_2d": box()} for _ in range(rng.randint(1, 3))]
        texts.append(json.dumps({"answer": rng.choice(w["color"] + w["object"] + w["text"]),
                                 "explanation": sentence() + " " + sentence(), "key_evidence": key}))
    for _ in range(150):
        texts.append(json.dumps([{"bbox_2d": box(), "label": rng.choice(w["object"])}
                                 for _ in range(rng.randint(1, 3))]))
        texts.append(f"Question: {question()}\nAnswer: {sentence()}")
    texts.append("Unicode: caf\u00e9 na\u00efve \u00fcber \u00c5ngstr\u00f6m \u4e2d\u6587 \u65e5\u672c\u8a9e "
                 "\ud55c\uad6d\uc5b4 \u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u03b5\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac "
                 "\u2192 \u2264 \u2265 \u00b0 \u20ac \u00a3 \u2713 \U0001f600")
    return texts


def _prompt_texts() -> list[str]:
    """The exact prompt texts of `corgi.prompts`, so the prompts tokenize into few tokens."""
    texts: list[str] = []
    try:
        from .. import prompts
        from ..boxes import REL1000, pixel_convention
        from ..types import Box, Evidence, StepKind
    except Exception:            # the corpus must not depend on the prompts module being importable
        return texts
    for name in ("SYSTEM", "CROP_SYSTEM"):
        if isinstance(getattr(prompts, name, None), str):
            texts.append(getattr(prompts, name))
    calls = [
        lambda: "".join(prompts.conversation_head()),
        lambda: "".join(prompts.crop_head()),
        lambda: prompts.reasoning_prompt("What is written on the red sign?", 4, REL1000),
        lambda: prompts.reasoning_prompt("How many dogs are there?", 6, pixel_convention(448, 336)),
        lambda: prompts.synthesis_prompt("What is written on the red sign?", [
            Evidence(1, Box(0.1, 0.2, 0.5, 0.6), StepKind.TEXT, "STOP"),
            Evidence(2, Box(0.3, 0.3, 0.9, 0.8), StepKind.OBJECT, "A red octagonal sign on a pole.")], REL1000),
        lambda: prompts.synthesis_prompt("How many dogs are there?", [], pixel_convention(448, 336)),
        lambda: prompts.crop_instruction(StepKind.TEXT, "The sign says something."),
        lambda: prompts.crop_instruction(StepKind.OBJECT, "A dog is lying on the grass."),
    ]
    for call in calls:
        try:
            text = call()
        except Exception:
            continue
        if isinstance(text, str):
            texts.append(text)
    return texts


def _corpus_digest() -> str:
    return hashlib.sha256("\x00".join(_corpus()).encode("utf-8")).hexdigest()


def _build_tokenizer(family: str):
    """Train the byte-level BPE and wrap it as the transformers `Qwen2Tokenizer` (what real checkpoints load as)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    # Exactly the pipeline Qwen2Tokenizer rebuilds on load: NFC, Qwen's split regex, byte level.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in model["merges"]]

    # Added tokens get the ids right after the BPE vocabulary, in the real order. They go into the
    # vocabulary itself so that every load path maps them to these ids.
    added = list(SPECIAL_TOKENS) + list(_PLAIN_ADDED_TOKENS[family])
    base = len(vocab)
    for i, token in enumerate(added):
        vocab[token] = base + i
    extra_special = [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens=extra_special, model_max_length=32768,
                         clean_up_tokenization_spaces=False)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _PLAIN_ADDED_TOKENS[family]])
    tok.chat_template = _chat_template(family)
    for i, token in enumerate(added):
        got = tok.convert_tokens_to_ids(token)
        if got != base + i:
            raise RuntimeError(f"tokenizer: {token} got id {got}, expected {base + i}")
    return tok


# ---- image processor ----------------------------------------------------------------------

_PATCH = {"qwen2.5-vl": 14, "qwen3-vl": 16}
_MERGE = 2


def _build_image_processor(family: str, spec: TinySpec):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = _PATCH[family]
    token_px = (patch * _MERGE) ** 2
    if family == "qwen2.5-vl":      # real: min_pixels 56*56 (4 tokens), CLIP mean/std
        return Qwen2VLImageProcessorPil(min_pixels=4 * token_px, max_pixels=spec.max_image_tokens * token_px,
                                        patch_size=patch, merge_size=_MERGE, temporal_patch_size=2)
    # qwen3-vl real: shortest_edge 65536 (64 tokens of 32x32 px), mean/std 0.5
    return Qwen2VLImageProcessorPil(min_pixels=64 * token_px, max_pixels=spec.max_image_tokens * token_px,
                                    patch_size=patch, merge_size=_MERGE, temporal_patch_size=2,
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


# ---- model config -------------------------------------------------------------------------

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _mrope_section(family: str, head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in the real checkpoints' proportions."""
    half = head_dim // 2
    if family == "qwen2.5-vl":      # real [16, 24, 24] of 64
        t = half // 4
        hw = (half - t) // 2
        section = [half - 2 * hw, hw, hw]
    else:                           # real [24, 20, 20] of 64, interleaved
        hw = round(half * 20 / 64)
        section = [half - 2 * hw, hw, hw]
        if 3 * hw > half:
            raise ValueError(f"interleaved mrope needs 3*{hw} <= {half}")
    if sum(section) != half or min(section) <= 0:
        raise ValueError(f"bad mrope section {section} for head_dim {head_dim}")
    return section


def _model_config(family: str, spec: TinySpec, tok):
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = _round_up(len(tok), 64)
    head_dim = spec.text_hidden // spec.text_heads
    if spec.text_hidden % spec.text_heads or head_dim % 2:
        raise ValueError("text hidden size must split into heads of even size")
    if (spec.vision_hidden // spec.vision_heads) % 4:
        raise ValueError("vision head dim must be a multiple of 4 (2-D axial rope)")
    common_text = dict(vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       num_key_value_heads=spec.text_kv_heads, hidden_act="silu", max_position_embeddings=32768,
                       initializer_range=spec.text_init_range, use_cache=True, tie_word_embeddings=True,
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], dtype="float32")
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  tie_word_embeddings=True, dtype="float32")
    depth = spec.vision_depth
    if family == "qwen2.5-vl":
        text = dict(common_text, rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=spec.text_layers,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": _mrope_section(family, head_dim)})
        # real: 32 blocks, window attention except every 8th (full); here every 2nd and the last
        full = [i for i in range(depth) if i % 2 == 1 or i == depth - 1]
        vision = dict(depth=depth, hidden_size=spec.vision_hidden, hidden_act="silu",
                      intermediate_size=_round_up(spec.vision_hidden * 8 // 3, 16), num_heads=spec.vision_heads,
                      in_channels=3, patch_size=_PATCH[family], spatial_merge_size=_MERGE, temporal_patch_size=2,
                      tokens_per_second=2, window_size=112, out_hidden_size=spec.text_hidden,
                      fullatt_block_indexes=full, initializer_range=0.02)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    text = dict(common_text, head_dim=head_dim, rms_norm_eps=1e-6, attention_bias=False,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                 "mrope_section": _mrope_section(family, head_dim), "mrope_interleaved": True})
    deepstack = list(range(min(3, depth, spec.text_layers)))   # real: 3 levels [5, 11, 17] of 24
    # 2304 = 48*48 learned positions: a 768x768 px grid at patch 16, as in the real checkpoints
    vision = dict(depth=depth, hidden_size=spec.vision_hidden, hidden_act="gelu_pytorch_tanh",
                  intermediate_size=4 * spec.vision_hidden, num_heads=spec.vision_heads, in_channels=3,
                  patch_size=_PATCH[family], spatial_merge_size=_MERGE, temporal_patch_size=2,
                  out_hidden_size=spec.text_hidden, num_position_embeddings=2304,
                  deepstack_visual_indexes=deepstack, initializer_range=0.02)
    return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)


def _model_class(family: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration if family == "qwen2.5-vl" else Qwen3VLForConditionalGeneration


# ---- building -----------------------------------------------------------------------------

def _check(family: str, size: str) -> TinySpec:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    return SIZES[size]


def _digest(family: str, size: str, seed: int) -> str:
    import tokenizers
    import transformers
    payload = {"format": FORMAT_VERSION, "family": family, "size": size, "seed": seed,
               "spec": asdict(SIZES[size]), "bpe_vocab": BPE_VOCAB_SIZE, "corpus": _corpus_digest(),
               "template": _chat_template(family), "transformers": transformers.__version__,
               "tokenizers": tokenizers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or info logs while saving; the previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _write_checkpoint(family: str, size: str, seed: int, folder: Path) -> dict:
    import torch
    from transformers import GenerationConfig

    spec = _check(family, size)
    start = time.perf_counter()
    tok = _build_tokenizer(family)
    image_processor = _build_image_processor(family, spec)
    config = _model_config(family, spec, tok)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):      # leave the caller's RNG state alone
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)   # the same bits whatever the caller's default dtype
        try:
            with torch.device("cpu"):
                model = _model_class(family)(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model = model.to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")])
    with _quiet_transformers():
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        image_processor.save_pretrained(folder)
    meta = {
        "format_version": FORMAT_VERSION, "family": family, "size": size, "seed": seed,
        "model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.text_config.vocab_size, "tokenizer_length": len(tok),
        "patch_size": _PATCH[family], "merge_size": _MERGE,
        "digest": _digest(family, size, seed), "build_seconds": round(time.perf_counter() - start, 3),
    }
    (folder / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def is_complete_checkpoint(folder: Path) -> bool:
    """True when `folder` holds a checkpoint this module finished writing (marker present and current)."""
    try:
        meta = json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == FORMAT_VERSION


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` to `folder`, replacing whatever is there."""
    for _ in range(5):
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if not folder.exists():
                raise
        # something is in the way: move it aside (atomically), then delete it
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        try:
            os.rename(folder, aside / "x")
        except FileNotFoundError:
            pass                   # someone else moved it already
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not move the new checkpoint into {folder}")


def build_tiny_checkpoint(family: str, folder: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build a random checkpoint of `family` ("qwen2.5-vl" | "qwen3-vl") and `size` into `folder`.

    The same (family, size, seed) gives bit-identical weights and an identical tokenizer. The folder
    appears all at once (built beside it, then renamed); an existing folder of that name is replaced.
    Returns the folder.
    """
    _check(family, size)
    folder = Path(folder).expanduser().absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_checkpoint(family, size, seed, tmp)
        os.chmod(tmp, 0o755)       # mkdtemp makes it 0700
        _publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---- the named cache ----------------------------------------------------------------------

def is_tiny_name(name: str) -> bool:
    """True for "tiny-qwen2.5-vl", "tiny-qwen3-vl", "small-qwen2.5-vl", "small-qwen3-vl"."""
    return isinstance(name, str) and name in TINY_NAMES


def parse_tiny_name(name: str) -> tuple[str, str]:
    """"small-qwen3-vl" -> ("qwen3-vl", "small")."""
    if not is_tiny_name(name):
        raise ValueError(f"not a tiny checkpoint name: {name!r}; expected one of {TINY_NAMES}")
    size, family = name.split("-", 1)
    return family, size


def default_cache_dir() -> Path:
    env = os.environ.get("CORGI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "corgi"


def tiny_checkpoint_folder(name: str, cache_dir: Path | None = None) -> Path:
    """Where `ensure_tiny_checkpoint(name, cache_dir)` keeps the checkpoint (built or not).

    The folder name carries FORMAT_VERSION and a digest of everything that decides the content
    (dimensions, corpus, chat template, transformers/tokenizers versions), so a change builds anew.
    """
    family, size = parse_tiny_name(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root.absolute() / "tiny" / f"{name}-v{FORMAT_VERSION}-{_digest(family, size, 0)[:12]}"


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:            # no fcntl (Windows): rely on the atomic rename alone
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _clean_stale_temps(folder: Path, older_than_s: float = 3600.0) -> None:
    now = time.time()
    for prefix in (f".{folder.name}.tmp-", f".{folder.name}.old-"):
        for p in folder.parent.glob(prefix + "*"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)


def ensure_tiny_checkpoint(name: str, cache_dir: Path | None = None) -> Path:
    """The folder of the named tiny checkpoint (seed 0), built on first use.

    Cache: `cache_dir`, else $CORGI_CACHE, else ~/.cache/corgi. Safe when processes race: the build
    runs under an exclusive file lock, and a folder only ever appears complete.
    """
    folder = tiny_checkpoint_folder(name, cache_dir)
    if is_complete_checkpoint(folder):
        return folder
    family, size = parse_tiny_name(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if is_complete_checkpoint(folder):       # another process built it while we waited
            return folder
        _clean_stale_temps(folder)
        build_tiny_checkpoint(family, folder, size=size, seed=0)
    return folder
