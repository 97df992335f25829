"""The family registry: every entry is a real transformers class with a twin, and a checkpoint
of another model type fails with one line naming its type and the supported families."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers

from conftest import ALL_TWINS, ROOT
from corgi import families
from corgi.engine import tiny


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_every_family_has_its_class_and_a_twin(family):
    assert hasattr(transformers, family.model_class)
    config_class = transformers.AutoConfig.for_model(family.model_type).__class__
    assert config_class.model_type == family.model_type
    assert f"tiny-{family.name}" in tiny.TINY_NAMES and f"tiny-{family.name}" in ALL_TWINS
    assert family.box_style in ("pixels", "rel1000") and family.state in ("kv", "hybrid")
    if family.moe:
        assert not family.static_decode, "the compiled step covers dense text stacks only"


def test_a_twin_loads_as_its_family():
    from conftest import loaded_model
    lm = loaded_model("tiny-qwen3.5")
    assert lm.family is families.BY_NAME["qwen3.5"] and lm.family.hybrid
    assert (lm.patch_size, lm.merge_size) == (16, 2)
    assert "<think>" in lm.added_tokens and "<|im_end|>" in lm.added_tokens


def test_unsupported_model_type_is_one_clear_line(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}))
    proc = subprocess.run([sys.executable, "-m", "corgi", "run", "--image", str(ROOT / "assets" / "shapes.png"),
                           "--question", "hi", "--model", str(folder)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'llama'" in lines[0] and "qwen3.5 (qwen3_5)" in lines[0] and "qwen2-vl" in lines[0]
    assert "Traceback" not in proc.stderr
