"""copy_weights: a checkpoint (the caller's, or a published one) copied into a new training
run of the caller's, in a new session that is already finished (nothing trains it)."""

from __future__ import annotations

import shutil

from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.checkpoint_ttl import expires_after
from lathe.api.deps import Caller
from lathe.protocol.messages import LoraConfig
from lathe.store import tinker_paths
from lathe.store.atomic import atomic_dir
from lathe.store.db import TrainingRunRow


def copy_weights(caller: Caller, body: s.CopyWeights) -> r.CopiedWeights:
    src = caller.checkpoint(body.source_path)
    store = caller.state.store
    source_run = store.get(TrainingRunRow, src.model_id)
    lora = LoraConfig(
        source_run.lora_rank,
        source_run.train_attn,
        source_run.train_mlp,
        source_run.train_unembed,
    )
    model_id = store.add_finished_run(
        caller.user_id,
        source_run.base_model,
        lora,
        {"copied_from": body.source_path},
        body.destination_project_id,
    )
    dst = tinker_paths.checkpoint_dir(
        caller.state.settings.checkpoint_dir, model_id, src.kind, src.name
    )
    # Complete or absent: a crash mid-copy leaves no half-written folder behind.
    with atomic_dir(dst) as tmp:
        shutil.copytree(src.directory_path, tmp, dirs_exist_ok=True)
    store.upsert_checkpoint(
        model_id,
        caller.user_id,
        src.kind,
        src.name,
        str(dst),
        src.size_bytes,
        expires_after(body.ttl_seconds),
        src.user_metadata,
    )
    return r.CopiedWeights(tinker_path=tinker_paths.format_path(model_id, src.kind, src.name))
