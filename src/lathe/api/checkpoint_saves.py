"""Checkpoint saves: save_state (weights), save_weights_for_sampler and exports, checked here
and written by the engine; the finisher records the checkpoint once its files are complete."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException

from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.checkpoint_ttl import check_ttl, expires_after
from lathe.api.deps import Caller
from lathe.api.submit import fingerprint, is_retry, ordered_key, refusal_uses_seq_id, submit
from lathe.protocol import messages as m
from lathe.store import tinker_paths
from lathe.store.db import SamplingSessionRow, TrainingRunRow


@dataclass(frozen=True)
class NamedSave:
    """A named checkpoint save, as every save endpoint asks for it."""

    kind: str  # path segment: weights | sampler_weights | external_weights
    name: str
    overwrite: bool
    user_metadata: dict | None
    response_type: str  # "save_weights" | "save_weights_for_sampler" | "save_weights_external"
    content_hash: str  # fingerprint of the POST, to tell a retry from a different request
    ttl_seconds: int | None = None  # the checkpoint expires this long after it is saved


def save_weights(caller: Caller, body: s.SaveWeights) -> r.QueuedForModel:
    run = caller.active_training_run(body.model_id)
    name = body.path or f"checkpoint-{body.seq_id:06d}"
    save = NamedSave(
        "weights",
        name,
        body.overwrite,
        body.user_metadata,
        "save_weights",
        fingerprint(body),
        body.ttl_seconds,
    )
    return save_checkpoint(caller, run, body.seq_id, save)


def save_weights_external(caller: Caller, body: s.SaveWeightsExternal) -> r.QueuedForModel:
    """A downloadable PEFT adapter folder (`external_weights_urls` lists its files)."""
    run = caller.active_training_run(body.model_id)
    kind = "save_weights_external"
    if body.age_encryption_recipients:
        with refusal_uses_seq_id(caller, kind, run.model_id, body.seq_id):
            raise HTTPException(400, "age-encrypted exports are not supported by this server")
    save = NamedSave(
        "external_weights", body.path, True, None, kind, fingerprint(body), body.ttl_seconds
    )
    return save_checkpoint(caller, run, body.seq_id, save)


def save_weights_for_sampler(caller: Caller, body: s.SaveWeightsForSampler) -> r.QueuedForModel:
    """Named: a sampler checkpoint. Unnamed: a new sampling session on the current weights."""
    run = caller.active_training_run(body.model_id)
    kind = "save_weights_for_sampler"
    if body.path:
        save = NamedSave(
            "sampler_weights",
            body.path,
            True,
            body.user_metadata,
            kind,
            fingerprint(body),
            body.ttl_seconds,
        )
        return save_checkpoint(caller, run, body.seq_id, save)
    with refusal_uses_seq_id(caller, kind, run.model_id, body.seq_id):
        if body.sampling_session_seq_id is None:
            raise HTTPException(400, "send either path (a name) or sampling_session_seq_id")
    sampler_id = tinker_paths.sampler_id_for(run.session_id, body.sampling_session_seq_id)
    # "snapshot": frozen weights. "inflight": the model's shared target, which every inflight
    # sampler of the model follows from its next request on (each with its own KV namespace).
    inflight = body.kind == "inflight"
    request_id, created = submit(
        caller,
        kind,
        ordered_key(run.model_id, body.seq_id),
        m.SnapshotRequest(run.model_id, body.seq_id, sampler_id, inflight),
        r.result(lambda _: r.SamplerSaved(sampling_session_id=sampler_id)),
        fingerprint(body),
    )
    if created and caller.state.store.get(SamplingSessionRow, sampler_id) is None:
        caller.state.store.add(
            SamplingSessionRow(
                sampler_id=sampler_id,
                owner_id=caller.user_id,
                session_id=run.session_id,
                base_model=run.base_model,
            )
        )
    return r.QueuedForModel(request_id=request_id, model_id=run.model_id)


def check_storage(caller: Caller) -> None:
    limit = caller.state.settings.limits.max_checkpoint_bytes
    used = caller.state.store.checkpoint_bytes_of(caller.user_id)
    if used >= limit:
        raise HTTPException(
            400,
            f"checkpoint storage is full: {used} bytes used (limit "
            f"max_checkpoint_bytes={limit}); delete checkpoints first",
        )


def save_checkpoint(
    caller: Caller, run: TrainingRunRow, seq_id: int, save: NamedSave
) -> r.QueuedForModel:
    state = caller.state
    key = ordered_key(run.model_id, seq_id)
    with refusal_uses_seq_id(caller, save.response_type, run.model_id, seq_id):
        tinker_paths.check_name(save.name)
        check_ttl(save.ttl_seconds)
        retry = is_retry(state, key)
        existing = state.store.find_checkpoint(run.model_id, save.kind, save.name)
        # A retried POST of a save that already ran finds its own checkpoint: not a conflict.
        if existing and not save.overwrite and not retry:
            raise HTTPException(
                400, f"checkpoint {existing.tinker_path} exists; pass overwrite=True to replace it"
            )
        if not retry:
            check_storage(caller)
    directory = tinker_paths.checkpoint_dir(
        state.settings.checkpoint_dir, run.model_id, save.kind, save.name
    )
    path = str(tinker_paths.TinkerPath(run.model_id, save.kind, save.name))

    def finish(result: m.SavedCheckpoint) -> r.CheckpointSaved:
        state.store.upsert_checkpoint(
            run.model_id,
            run.owner_id,
            save.kind,
            save.name,
            str(result.directory),
            result.size_bytes,
            expires_after(save.ttl_seconds),  # counted from the save, not the request
            save.user_metadata,
        )
        exported = save.kind == "external_weights"
        return r.CheckpointSaved(
            path=path,
            type=save.response_type,
            size_bytes=result.size_bytes if exported else None,
        )

    request = m.SaveRequest(
        run.model_id,
        seq_id,
        "training" if save.kind == "weights" else "sampler",
        directory,
        {
            "model_id": run.model_id,
            "name": save.name,
            "user_metadata": save.user_metadata or {},
            # where the base weights were: `lathe checkpoint merge` finds them by this
            "base_model_path": str(state.catalog[run.base_model].path),
        },
    )
    request_id, _ = submit(
        caller, save.response_type, key, request, r.result(finish), save.content_hash
    )
    return r.QueuedForModel(request_id=request_id, model_id=run.model_id)
