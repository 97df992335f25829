"""The grammar's per-vocabulary tables, kept on disk between processes.

Building them is Python work over the whole vocabulary: at Qwen3.5's 248k tokens xgrammar's
`TokenizerInfo.from_huggingface` takes ~1.3 s and the length tables ~2.2 s, paid by every CLI
run and server start. Loaded back they cost ~0.2 s. One file per tokenizer content (its
serialised `tokenizers` JSON, so added tokens and normalisers count), vocabulary size, stop ids,
xgrammar version and this format: a changed tokenizer gets new tables, never stale ones. The
cache is best effort: an unreadable, corrupt or unwritable file means the tables are built here.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import xgrammar as xgr
from safetensors.numpy import load_file, save_file

FORMAT = 1
TABLES = ("think", "plain", "esc", "first")

log = logging.getLogger(__name__)


def cache_key(tokenizer, vocab_size: int | None, stop_token_ids: Sequence[int]) -> str | None:
    """None where the tokenizer has no serialisable backend (then nothing is cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return None
    digest = hashlib.sha256(to_str().encode())
    digest.update(repr((FORMAT, importlib.metadata.version("xgrammar"), vocab_size, list(stop_token_ids), len(tokenizer))).encode())
    return digest.hexdigest()[:32]


def _path(key: str) -> Path:
    from ..tiny import default_cache_dir
    return default_cache_dir() / "grammar" / f"tables-{key}.safetensors"   # no pickle, ever


def load(key: str) -> tuple[xgr.TokenizerInfo, list[bytes], dict[str, np.ndarray]] | None:
    """(TokenizerInfo, its decoded vocabulary, the length tables), or None."""
    path = _path(key)
    try:
        found = load_file(path)
        info = xgr.TokenizerInfo.deserialize_json(found["info"].tobytes().decode())
        tables = {name: found[name] for name in TABLES}
        # The decoded vocabulary as one byte string and offsets: slicing it back is ~20x
        # faster than xgrammar's decoded_vocab property at 248k tokens.
        blob, ends = found["pieces"].tobytes(), found["ends"].tolist()
    except FileNotFoundError:
        return None
    except Exception as exc:      # truncated, corrupt, another format: build instead
        log.warning("grammar tables in %s unusable (%s): building them", path, type(exc).__name__)
        return None
    decoded = [blob[start:end] for start, end in zip([0] + ends[:-1], ends)]
    if len(decoded) != info.vocab_size or any(len(tables[name]) != len(decoded) for name in TABLES):
        return None
    return info, decoded, tables


def store(key: str, info: xgr.TokenizerInfo, decoded: Sequence[bytes], tables: dict[str, np.ndarray]) -> None:
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        info_bytes = np.frombuffer(info.serialize_json().encode(), dtype=np.uint8)
        pieces = np.frombuffer(b"".join(decoded), dtype=np.uint8)
        ends = np.cumsum([len(piece) for piece in decoded], dtype=np.int64)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            os.close(fd)
            save_file({"info": info_bytes, "pieces": pieces, "ends": ends,
                       **{name: np.ascontiguousarray(tables[name]) for name in TABLES}}, tmp)
            os.replace(tmp, path)        # readers see a whole file or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.info("grammar tables not cached (%s)", exc.strerror or type(exc).__name__)
