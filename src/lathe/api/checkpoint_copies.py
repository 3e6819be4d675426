"""copy_weights: a checkpoint (the caller's, or a published one) copied into a new training
run of the caller's, in a new session that is already finished (nothing trains it)."""

from __future__ import annotations

import shutil

from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.checkpoint_ttl import expires_after
from lathe.api.deps import Caller
from lathe.store import tinker_paths
from lathe.store.atomic import atomic_dir
from lathe.store.db import SessionRow, TrainingRunRow, utcnow


def copy_weights(caller: Caller, body: s.CopyWeights) -> r.CopiedWeights:
    src = caller.checkpoint(body.source_path)
    store = caller.state.store
    source_run = store.get(TrainingRunRow, src.model_id)
    session_id = tinker_paths.new_session_id()
    model_id = tinker_paths.model_id_for(session_id, 0)
    store.add(
        SessionRow(
            session_id=session_id,
            owner_id=caller.user_id,
            project_id=body.destination_project_id,
            finished_at=utcnow(),
            user_metadata={"copied_from": body.source_path},
        )
    )
    store.add(
        TrainingRunRow(
            model_id=model_id,
            owner_id=caller.user_id,
            session_id=session_id,
            base_model=source_run.base_model,
            lora_rank=source_run.lora_rank,
            train_attn=source_run.train_attn,
            train_mlp=source_run.train_mlp,
            train_unembed=source_run.train_unembed,
        )
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
