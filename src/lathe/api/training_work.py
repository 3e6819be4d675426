"""Training work: checks a request and submits the engine message that creates a model, runs
forward/backward, steps the optimizer or loads a checkpoint (saves: checkpoint_saves.py).

Each function returns the route's sync answer; what the engine computes reaches the client
through the future its finisher completes.
"""

from __future__ import annotations

from fastapi import HTTPException
from sqlalchemy import func, select

from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.custom_loss_work import graph_of
from lathe.api.deps import Caller
from lathe.api.futures import Finisher
from lathe.api.step_metrics import Step
from lathe.api.submit import (
    creation_key,
    fingerprint,
    is_retry,
    ordered_key,
    refusal_uses_seq_id,
    submit,
)
from lathe.api.usage_accounting import Usage
from lathe.api.validation import check_batch
from lathe.api.wire import codec
from lathe.api.wire.compression import decompress
from lathe.protocol import messages as m
from lathe.protocol.loss_graph import LossGraph
from lathe.protocol.messages import LoraConfig
from lathe.store import checkpoint_files, tinker_paths
from lathe.store.db import CheckpointRow, SessionRow, TrainingRunRow


def check_run_limit(caller: Caller) -> None:
    """Training runs in a user's unfinished sessions are capped (max_training_runs)."""
    limit = caller.state.settings.limits.max_training_runs
    with caller.state.store.session() as db:
        q = (
            select(func.count(TrainingRunRow.model_id))
            .join(SessionRow, TrainingRunRow.session_id == SessionRow.session_id)
            .where(TrainingRunRow.owner_id == caller.user_id, SessionRow.finished_at.is_(None))
        )
        if (db.scalar(q) or 0) >= limit:
            raise HTTPException(
                400,
                f"too many training runs in unfinished sessions (limit max_training_runs="
                f"{limit}); finish a session (ServiceClient.close) to free them",
            )


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


def create_model(caller: Caller, body: s.CreateModel) -> r.QueuedForModel:
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
        r.result(lambda _: r.ModelCreated(model_id=model_id)),
        fingerprint(body),
    )
    if created:
        add_training_run(
            caller, model_id, body.session_id, body.base_model, lora, body.user_metadata
        )
    return r.QueuedForModel(request_id=request_id, model_id=model_id)


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


def forward_backward(caller: Caller, body: bytes, encoding: str) -> r.QueuedForModel:
    """A protobuf ForwardBackwardRequest (maybe zstd): CPU work, run it off the event loop."""
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
    tokens = sum(len(d.tokens) for d in req.data)
    usage = Usage("training", run.session_id, run.base_model, tokens)
    step = Step(req.model_id, req.seq_id, kind)
    request_id, _ = submit(
        caller, kind, key, work, codec.forward_backward_payload, req.fingerprint, usage, step
    )
    return r.QueuedForModel(request_id=request_id, model_id=req.model_id)


def custom_loss_for(caller: Caller, run: TrainingRunRow, config: dict) -> LossGraph:
    loss_id = config.get("loss_id")
    if not isinstance(loss_id, str) or set(config) != {"loss_id"}:
        raise HTTPException(400, "loss_fn 'custom' takes exactly loss_fn_config {'loss_id': id}")
    graph = graph_of(caller, loss_id, run.session_id)
    if graph is None:
        raise HTTPException(404, f"custom loss {loss_id!r} not found in this session")
    return graph


def optim_step(caller: Caller, body: s.OptimStep) -> r.QueuedForModel:
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
        r.result(lambda done: r.OptimStepDone(metrics=done.metrics)),
        fingerprint(body),
        step=Step(body.model_id, body.seq_id, "optim_step"),
    )
    return r.QueuedForModel(request_id=request_id, model_id=body.model_id)


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


def load_weights(caller: Caller, body: s.LoadWeights) -> r.QueuedForModel:
    """Two addressing modes: session_id + model_seq_id creates the model from the checkpoint
    (0.38's from_state); model_id + seq_id loads into an existing one (legacy load_state)."""
    if body.session_id is not None and body.model_seq_id is not None:
        return create_from_checkpoint(caller, body, body.session_id, body.model_seq_id)
    if body.model_id is None or body.seq_id is None:
        raise HTTPException(400, "send model_id and seq_id, or session_id and model_seq_id")
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
    request_id, _ = submit(caller, "load_weights", key, request, loaded(body), fingerprint(body))
    return r.QueuedForModel(request_id=request_id, model_id=run.model_id)


def create_from_checkpoint(
    caller: Caller, body: s.LoadWeights, session_id: str, model_seq_id: int
) -> r.QueuedForModel:
    """create-via-load: this request creates the model, as its seq 0."""
    caller.session(session_id)
    model_id = tinker_paths.model_id_for(session_id, model_seq_id)
    key = creation_key(model_id)
    if not is_retry(caller.state, key):
        check_run_limit(caller)
    ckpt, meta = loadable_checkpoint(caller, body)
    base_model = meta["base_model"]
    request = m.LoadRequest(model_id, 0, ckpt.directory_path, body.optimizer, True, base_model)
    request_id, created = submit(
        caller, "load_weights", key, request, loaded(body), fingerprint(body)
    )
    if created:
        lora = LoraConfig(**meta["lora"])
        add_training_run(caller, model_id, session_id, base_model, lora, body.user_metadata)
    return r.QueuedForModel(request_id=request_id, model_id=model_id)


def loaded(body: s.LoadWeights) -> Finisher:
    return r.result(lambda _: r.WeightsLoaded(path=body.path))
