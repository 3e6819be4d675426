"""Lay out a local model folder as a Hugging Face hub cache entry under a hub name.

Client-side tools that look a tokenizer up by model name (tinker-cookbook's `get_tokenizer`,
`AutoTokenizer.from_pretrained("Qwen/Qwen3-4B-Instruct-2507")`) then find it offline
(`HF_HUB_OFFLINE=1`), while `lathe serve --model NAME=FOLDER` serves the same folder under
that name. The entry is what `huggingface_hub` itself writes: `models--ORG--NAME/refs/main`
holding a revision, and `snapshots/<revision>/` holding the files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from lathe.store.atomic import atomic_dir

# What a tokenizer and config lookup reads; the weights are not needed on the client side.
FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def default_hub_cache() -> Path:
    """Where huggingface_hub looks: $HF_HUB_CACHE, $HF_HOME/hub, or ~/.cache/huggingface/hub."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache)
    if home := os.environ.get("HF_HOME"):
        return Path(home) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "huggingface" / "hub"


def repo_folder(name: str) -> str:
    """`Qwen/Qwen3-4B-Instruct-2507` -> `models--Qwen--Qwen3-4B-Instruct-2507`."""
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise ValueError(f"a hub model name is ORG/NAME, got {name!r}")
    return "models--" + "--".join(parts)


def install(model_dir: Path, name: str, cache_dir: Path | None = None) -> Path:
    """Copy the folder's tokenizer and config files into the cache as `name`; the snapshot path.

    The revision is a hash of the files, so installing the same folder again is a no-op and a
    different folder under the same name becomes the new `main`.
    """
    model_dir = Path(model_dir)
    present = [f for f in FILES if (model_dir / f).is_file()]
    if "tokenizer.json" not in present or "config.json" not in present:
        raise ValueError(f"{model_dir} needs tokenizer.json and config.json")
    digest = hashlib.sha1()
    for f in present:
        digest.update(f.encode() + b"\0" + (model_dir / f).read_bytes())
    revision = digest.hexdigest()
    repo = (cache_dir or default_hub_cache()) / repo_folder(name)
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        with atomic_dir(snapshot) as tmp:
            for f in present:
                shutil.copyfile(model_dir / f, tmp / f)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
