"""Training models: create, describe, forward/backward, optimizer steps, save and load."""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

import zstandard
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from lathe.api import schemas as s
from lathe.api.deps import Caller, CallerDep
from lathe.api.routers import custom_losses
from lathe.api.submit import (
    creation_key,
    fingerprint,
    is_retry,
    json_result,
    ordered_key,
    refusal_uses_seq_id,
    submit,
)
from lathe.api.validation import check_batch
from lathe.api.wire import codec
from lathe.protocol import messages as m
from lathe.protocol.loss_graph import LossGraph
from lathe.protocol.messages import LoraConfig
from lathe.store import checkpoint_files, tinker_paths
from lathe.store.db import (
    CheckpointRow,
    SamplingSessionRow,
    SessionRow,
    TrainingRunRow,
    utcnow,
)

router = APIRouter(tags=["training"])


def check_run_limit(caller: Caller) -> None:
    """Training runs in a user's unfinished sessions are capped (max_training_runs)."""
    limit = caller.state.settings.limits.max_training_runs
    with caller.state.store.session() as db:
        q = (
            select(func.count(TrainingRunRow.model_id))
            .join(SessionRow, TrainingRunRow.session_id == SessionRow.session_id)
            .where(TrainingRunRow.owner_id == caller.user_id, SessionRow.finished_at.is_(None))
        )
        if db.scalar(q) >= limit:
            raise HTTPException(
                400,
                f"too many training runs in unfinished sessions (limit max_training_runs="
                f"{limit}); finish a session (ServiceClient.close) to free them",
            )


@router.post("/create_model")
def create_model(body: s.CreateModel, caller: CallerDep) -> dict:
    state = caller.state
    caller.session(body.session_id)
    model_id = tinker_paths.model_id_for(body.session_id, body.model_seq_id)
    if not is_retry(state, creation_key(model_id)):
        check_run_limit(caller)
    if body.base_model not in state.catalog:
        raise HTTPException(
            400, f"unknown base_model {body.base_model!r}; served: {', '.join(state.catalog)}"
        )
    lc = body.lora_config
    if not 1 <= lc.rank <= state.settings.max_lora_rank:
        raise HTTPException(
            400, f"LoRA rank must be between 1 and {state.settings.max_lora_rank}, got {lc.rank}"
        )
    if not (lc.train_attn or lc.train_mlp or lc.train_unembed):
        raise HTTPException(400, "at least one of train_attn, train_mlp, train_unembed is needed")
    opt_type = (body.optimizer_config or {}).get("type", "adamw")
    if opt_type != "adamw":
        raise HTTPException(400, f"optimizer {opt_type!r} is not supported; use adamw")
    lora = LoraConfig(lc.rank, lc.train_attn, lc.train_mlp, lc.train_unembed)
    request_id, created = submit(
        caller,
        "create_model",
        creation_key(model_id),
        m.CreateModelRequest(model_id, body.base_model, lora, lc.seed),
        json_result(lambda _: {"model_id": model_id, "type": "create_model"}),
        fingerprint(body),
    )
    if created:
        add_training_run(
            caller, model_id, body.session_id, body.base_model, lora, body.user_metadata
        )
    return {"request_id": request_id, "model_id": model_id}


def add_training_run(
    caller: Caller,
    model_id: str,
    session_id: str,
    base_model: str,
    lora: LoraConfig,
    user_metadata: dict | None,
) -> None:
    row = TrainingRunRow.of_adapter(
        model_id, caller.user_id, session_id, base_model, lora, user_metadata
    )
    caller.state.store.add(row)


@router.post("/get_info")
def get_info(body: s.ModelRef, caller: CallerDep) -> dict:
    run = caller.training_run(body.model_id)
    info = caller.state.catalog.get(run.base_model)
    return {
        "type": "get_info",
        "model_id": run.model_id,
        "model_data": {
            "arch": info.arch if info else None,
            "model_name": run.base_model,
            # A local folder: AutoTokenizer.from_pretrained loads it on this machine.
            "tokenizer_id": str(info.path) if info else None,
        },
        "is_lora": True,
        "lora_rank": run.lora_rank,
        "model_name": run.base_model,
        # Not in the SDK's model (it ignores them); which modules carry adapters.
        "train_attn": run.train_attn,
        "train_mlp": run.train_mlp,
        "train_unembed": run.train_unembed,
    }


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo `Content-Encoding: zstd` (advertised to the SDK), capped against zstd bombs."""
    if encoding.lower() != "zstd":
        return body
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
        while chunk := reader.read(1 << 20):
            out += chunk
            if len(out) > limit:
                raise HTTPException(
                    413, f"decompressed body exceeds {limit} bytes (limit max_body_bytes)"
                )
    except zstandard.ZstdError as e:
        raise HTTPException(400, f"body is not valid zstd: {e}") from None
    return bytes(out)


@router.post("/forward_backward")
async def forward_backward(request: Request, caller: CallerDep) -> dict:
    body = await request.body()
    # Decoding and checking a large batch is CPU work: keep it off the event loop.
    encoding = request.headers.get("content-encoding", "")
    return await run_in_threadpool(submit_forward_backward, caller, body, encoding)


def check_request_size(caller: Caller, data: list[m.Datum]) -> None:
    limits = caller.state.settings.limits
    if len(data) > limits.max_datums_per_request:
        raise HTTPException(
            400,
            f"{len(data)} datums in one request (limit "
            f"max_datums_per_request={limits.max_datums_per_request})",
        )
    tokens = sum(len(d.tokens) for d in data)
    if tokens > limits.max_tokens_per_request:
        raise HTTPException(
            400,
            f"{tokens} tokens in one request (limit "
            f"max_tokens_per_request={limits.max_tokens_per_request})",
        )


def submit_forward_backward(caller: Caller, body: bytes, encoding: str) -> dict:
    state = caller.state
    try:
        raw = decompress(body, encoding, state.settings.limits.max_body_bytes)
        req = codec.decode_forward_backward(raw)
    except codec.WireError as e:
        raise HTTPException(400, str(e)) from None
    run = caller.active_training_run(req.model_id)
    if not 1 <= req.seq_id < 2**31:
        raise HTTPException(400, f"seq_id must be at least 1, got {req.seq_id}")
    kind = "forward" if req.forward_only else "forward_backward"
    with refusal_uses_seq_id(caller, kind, req.model_id, req.seq_id):
        check_request_size(caller, req.data)
        graph = None
        if req.loss_fn == "custom":
            graph = custom_loss_for(caller, run, req.loss_config)
        info = state.catalog[run.base_model]
        if err := check_batch(req.data, req.loss_fn, req.loss_config, info, graph):
            raise HTTPException(400, err)
    work = m.ForwardBackwardRequest(
        req.model_id,
        req.seq_id,
        req.data,
        req.loss_fn,
        req.loss_config,
        req.forward_only,
        graph,
        run.base_model,
    )
    key = ordered_key(req.model_id, req.seq_id)
    request_id, _ = submit(caller, kind, key, work, codec.forward_backward_payload, req.fingerprint)
    return {"request_id": request_id, "model_id": req.model_id}


def custom_loss_for(caller: Caller, run: TrainingRunRow, config: dict) -> LossGraph:
    loss_id = config.get("loss_id")
    if not isinstance(loss_id, str) or set(config) != {"loss_id"}:
        raise HTTPException(400, "loss_fn 'custom' takes exactly loss_fn_config {'loss_id': id}")
    graph = custom_losses.graph_of(caller, loss_id, run.session_id)
    if graph is None:
        raise HTTPException(404, f"custom loss {loss_id!r} not found in this session")
    return graph


@router.post("/optim_step")
def optim_step(body: s.OptimStep, caller: CallerDep) -> dict:
    caller.active_training_run(body.model_id)
    with refusal_uses_seq_id(caller, "optim_step", body.model_id, body.seq_id):
        if body.adam_params is None and (body.optimizer_params or body.optim_params):
            params = body.optimizer_params or body.optim_params or {}
            raise HTTPException(
                400, f"optimizer {params.get('type')!r} is not supported; send adam_params"
            )
    adam = m.AdamParams(**(body.adam_params or s.AdamParamsIn()).model_dump())
    request_id, _ = submit(
        caller,
        "optim_step",
        ordered_key(body.model_id, body.seq_id),
        m.OptimStepRequest(body.model_id, body.seq_id, adam),
        json_result(lambda r: {"type": "optim_step", "metrics": r.metrics}),
        fingerprint(body),
    )
    return {"request_id": request_id, "model_id": body.model_id}


@dataclass(frozen=True)
class NamedSave:
    """A named checkpoint save, as both save endpoints ask for it."""

    kind: str  # path segment: weights | sampler_weights
    name: str
    overwrite: bool
    user_metadata: dict | None
    response_type: str  # "save_weights" | "save_weights_for_sampler" | "save_weights_external"
    content_hash: str  # fingerprint of the POST, to tell a retry from a different request
    ttl_seconds: int | None = None  # the checkpoint expires this long after it is saved


def check_storage(caller: Caller) -> None:
    limit = caller.state.settings.limits.max_checkpoint_bytes
    used = caller.state.store.checkpoint_bytes_of(caller.user_id)
    if used >= limit:
        raise HTTPException(
            400,
            f"checkpoint storage is full: {used} bytes used (limit "
            f"max_checkpoint_bytes={limit}); delete checkpoints first",
        )


def save_checkpoint(caller: Caller, run: TrainingRunRow, seq_id: int, save: NamedSave) -> dict:
    state = caller.state
    key = ordered_key(run.model_id, seq_id)
    with refusal_uses_seq_id(caller, save.response_type, run.model_id, seq_id):
        tinker_paths.check_name(save.name)
        if save.ttl_seconds is not None and not 1 <= save.ttl_seconds <= 10 * 365 * 86400:
            raise HTTPException(
                400, f"ttl_seconds must be between 1 and 10 years, got {save.ttl_seconds}"
            )
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

    def finish(result: m.SavedCheckpoint) -> dict:
        expires = None
        if save.ttl_seconds is not None:
            expires = utcnow() + dt.timedelta(seconds=save.ttl_seconds)
        state.store.upsert_checkpoint(
            run.model_id,
            run.owner_id,
            save.kind,
            save.name,
            str(result.directory),
            result.size_bytes,
            expires,
            save.user_metadata,
        )
        out = {"path": path, "type": save.response_type}
        if save.kind == "external_weights":
            out["size_bytes"] = result.size_bytes
        return out

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
        caller, save.response_type, key, request, json_result(finish), save.content_hash
    )
    return {"request_id": request_id, "model_id": run.model_id}


@router.post("/save_weights")
def save_weights(body: s.SaveWeights, caller: CallerDep) -> dict:
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


@router.post("/save_weights_external")
def save_weights_external(body: s.SaveWeightsExternal, caller: CallerDep) -> dict:
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


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(body: s.SaveWeightsForSampler, caller: CallerDep) -> dict:
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
    # Both kinds freeze the current weights: an "inflight" sampler is then at least as new as
    # its creation, which is all the contract asks.
    request_id, created = submit(
        caller,
        kind,
        ordered_key(run.model_id, body.seq_id),
        m.SnapshotRequest(run.model_id, body.seq_id, sampler_id),
        json_result(lambda _: {"sampling_session_id": sampler_id, "type": kind}),
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
    return {"request_id": request_id, "model_id": run.model_id}


def loadable_checkpoint(caller: Caller, body: s.LoadWeights) -> tuple[CheckpointRow, dict]:
    """The checkpoint to load and its metadata, or a 4xx saying why it cannot be loaded."""
    ckpt = caller.checkpoint(body.path)
    meta = checkpoint_files.read_metadata(ckpt.directory_path)
    if body.optimizer and not meta.get("has_optimizer"):
        raise HTTPException(400, f"{body.path} has no optimizer state (save it with save_state)")
    base_model = meta["base_model"]
    if body.base_model and body.base_model != base_model:
        raise HTTPException(
            400, f"{body.path} was trained on {base_model!r}, not {body.base_model!r}"
        )
    if base_model not in caller.state.catalog:
        raise HTTPException(400, f"{body.path} needs base model {base_model!r}, not served here")
    return ckpt, meta


@router.post("/load_weights")
def load_weights(body: s.LoadWeights, caller: CallerDep) -> dict:
    finisher = json_result(lambda _: {"path": body.path, "type": "load_weights"})
    if body.session_id is not None and body.model_seq_id is not None:
        # create-via-load: this request creates the model, as its seq 0
        caller.session(body.session_id)
        model_id = tinker_paths.model_id_for(body.session_id, body.model_seq_id)
        key = creation_key(model_id)
        if not is_retry(caller.state, key):
            check_run_limit(caller)
        ckpt, meta = loadable_checkpoint(caller, body)
        base_model = meta["base_model"]
        request = m.LoadRequest(model_id, 0, ckpt.directory_path, body.optimizer, True, base_model)
        request_id, created = submit(
            caller, "load_weights", key, request, finisher, fingerprint(body)
        )
        if created:
            lora = LoraConfig(**meta["lora"])
            add_training_run(
                caller, model_id, body.session_id, base_model, lora, body.user_metadata
            )
        return {"request_id": request_id, "model_id": model_id}
    if body.model_id is None or body.seq_id is None:
        raise HTTPException(400, "send model_id and seq_id, or session_id and model_seq_id")
    # legacy load_state: an ordered request of an existing model
    run = caller.active_training_run(body.model_id)
    with refusal_uses_seq_id(caller, "load_weights", run.model_id, body.seq_id):
        ckpt, meta = loadable_checkpoint(caller, body)
        if run.base_model != meta["base_model"]:
            raise HTTPException(
                400,
                f"{body.path} was trained on {meta['base_model']!r}; {run.model_id} uses "
                f"{run.base_model!r}",
            )
    request = m.LoadRequest(
        run.model_id, body.seq_id, ckpt.directory_path, body.optimizer, False, run.base_model
    )
    key = ordered_key(run.model_id, body.seq_id)
    request_id, _ = submit(caller, "load_weights", key, request, finisher, fingerprint(body))
    return {"request_id": request_id, "model_id": run.model_id}


@router.post("/weights_info")
def weights_info(body: s.WeightsInfo, caller: CallerDep) -> dict:
    ckpt = caller.checkpoint(body.tinker_path)
    meta = checkpoint_files.read_metadata(ckpt.directory_path)
    lora = meta["lora"]
    return {
        "base_model": meta["base_model"],
        "is_lora": True,
        "lora_rank": lora["rank"],
        "train_attn": lora["train_attn"],
        "train_mlp": lora["train_mlp"],
        "train_unembed": lora["train_unembed"],
    }
