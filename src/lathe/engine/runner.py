"""The runner executes what the scheduler picked. It owns every piece of torch state: base
models, training adapters with their optimizers, and sampler weights.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lathe.engine import checkpoint_io, data_parallel
from lathe.engine.custom_loss import trial_run
from lathe.engine.forward_backward import Batching, Job, forward_backward
from lathe.engine.group import Group
from lathe.engine.optim import AdapterOptimizer
from lathe.engine.residency import Residency, TrainingModel
from lathe.engine.scheduler import CANCELLED, Step, co_batchable
from lathe.faults import crash_point
from lathe.models.fused import compile_elementwise
from lathe.models.layer_checkpoint import checkpoint_layers
from lathe.models.loading import LoadedModel, load_model
from lathe.models.lora import Adapter, apply_lora, new_adapter
from lathe.protocol import messages as m
from lathe.protocol.loss_graph import LossGraph, LossGraphError
from lathe.sampling.engine import SamplingEngine, Vocabulary, Weights

log = logging.getLogger(__name__)


LOST_SAMPLER = (
    "sampler {} held weights in the memory of an engine process that has since restarted; "
    "save the weights for a sampler again (or sample from a saved sampler_weights path)"
)


class UserError(Exception):
    """The request cannot be served as asked; the message goes back to the client."""


class ServerError(Exception):
    """The server could not do it (not the client's fault); the message goes back as is."""


@dataclass
class BaseModel:
    """A frozen base model shared by every adapter trained or sampled on it."""

    name: str  # what clients call it (base_model)
    loaded: LoadedModel
    vocab: Vocabulary

    @property
    def module(self) -> torch.nn.Module:
        return self.loaded.module


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The torch dtype a settings.DTYPES name stands for on `device` ("bfloat16" ->
    torch.bfloat16; "auto": float32 on a CPU, bfloat16 on a GPU)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def load_base_model(
    name: str, path: Path, dtype: torch.dtype, device: str, compiled: bool = False
) -> BaseModel:
    """A base model ready for LoRA; `compiled`: its elementwise parts fused (models/fused.py)."""
    return base_model_of(name, load_model(path, dtype=dtype, device=device), compiled)


def base_model_of(name: str, loaded: LoadedModel, compiled: bool = False) -> BaseModel:
    """A loaded model made ready to serve: LoRA applied, layers checkpointable, optionally
    compiled."""
    apply_lora(loaded.module)
    checkpoint_layers(loaded.module)  # used by micro-batches above `checkpoint_tokens`
    if compiled:
        compile_elementwise(loaded.module)
    return BaseModel(name=name, loaded=loaded, vocab=read_vocabulary(loaded))


def read_vocabulary(loaded: LoadedModel) -> Vocabulary:
    from tokenizers import Tokenizer

    tok_file = loaded.path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tok_file)) if tok_file.exists() else None
    eos: set[int] = set()
    gen_cfg = loaded.path / "generation_config.json"
    sources = [loaded.hf_config]
    if gen_cfg.exists():
        import json

        sources.append(json.loads(gen_cfg.read_text()))
    for src in sources:
        ids = src.get("eos_token_id")
        if isinstance(ids, int):
            eos.add(ids)
        elif isinstance(ids, list):
            eos.update(int(i) for i in ids)
    return Vocabulary(tokenizer=tokenizer, eos_token_ids=frozenset(eos))


class Runner:
    def __init__(
        self,
        base_models: dict[str, BaseModel],
        token_budget: int = 16384,
        deterministic: bool = False,
        checkpoint_tokens: int = 8192,
        max_resident_adapters: int = 1 << 30,
        swap_dir: Path | None = None,
        kv_budget_tokens: int = 65536,
        lost_sampler_ids: list[str] | tuple[str, ...] = (),
        group: Group | None = None,
    ) -> None:
        self.base_models = base_models
        self.training = Batching(token_budget, deterministic, checkpoint_tokens)
        self.models = Residency(max_resident_adapters, swap_dir)
        self.samplers: dict[str, Weights] = {}
        self.inflight: dict[str, Weights] = {}  # training model -> its latest inflight weights
        self.inflight_samplers: dict[str, str] = {}  # inflight sampler -> its training model
        self.kv_budget_tokens = kv_budget_tokens  # KV positions per base model
        self.lost_samplers = set(lost_sampler_ids)  # in-memory snapshots of a dead engine
        self.failed_samplers: dict[str, str] = {}  # sampler -> why it could not be loaded
        self.sampling = SamplingEngine(kv_budget_tokens)
        self.group = group  # the engine group this rank belongs to (engine/group.py), if any
        self.writes_files = group is None or group.writes_files  # rank 0 of a group writes

    def execute(self, step: Step) -> StepResult:
        """Run what the scheduler picked: the batch, then the sampling pass."""
        out = StepResult()
        if len(step.batch) > 1 and co_batchable(step.batch[0].request):
            out.done += self.execute_co_batch(step.batch)  # forward(_backward)s of several models
        elif step.batch and isinstance(step.batch[0].request, m.CancelRequest):
            stopped = self.sampling.cancel(step.batch[0].request.request_ids)
            out.done += [m.Done(rid, error=CANCELLED) for rid in stopped]
            out.finished_samples += stopped
        else:  # one request, or optim_steps of several models
            out.done += [self.run_one(work) for work in step.batch]
        out.done += [m.Done(w.request_id, error=why, category="user") for w, why in step.refuse]
        for work in step.admit:
            if (failed := self.admit_sample(work)) is not None:
                out.done.append(failed)
                out.finished_samples.append(work.request_id)
        if step.decode:
            before = self.sampling.tokens_sampled
            sampled = self.sampling_step()
            out.sampled_tokens = self.sampling.tokens_sampled - before
            out.done += sampled
            out.finished_samples += [d.request_id for d in sampled if not d.is_progress]
        return out

    def run_one(self, work: m.Work) -> m.Done:
        """Run one request; its failure is its answer, and the engine keeps serving."""
        try:
            return m.Done(work.request_id, result=self._dispatch(work.request))
        except (UserError, checkpoint_io.CorruptCheckpoint) as e:
            return m.Done(work.request_id, error=str(e), category="user")
        except ServerError as e:
            log.error("request %s failed: %s", work.request_id, e)
            return m.Done(work.request_id, error=str(e), category="server")
        except Exception as e:  # a bug or resource failure: report it, keep serving
            log.error("request %s failed:\n%s", work.request_id, traceback.format_exc())
            return m.Done(work.request_id, error=f"internal error: {e}", category="server")

    def _dispatch(self, req: m.Request) -> m.Result:
        match req:
            case m.ForwardBackwardRequest():
                return self.forward_backward(req)
            case m.OptimStepRequest():
                return self.optim_step(req)
            case m.CreateModelRequest():
                return self.create_model(req)
            case m.SaveRequest():
                return self.save(req)
            case m.SnapshotRequest():
                return self.snapshot(req)
            case m.LoadRequest():
                return self.load(req)
            case m.CreateSamplerRequest():
                return self.create_sampler(req)
            case m.SkipRequest():
                return m.Empty()
            case m.CheckLossRequest():
                return check_loss(req.graph)
            case m.UnloadRequest():
                for model_id in req.model_ids:
                    self.models.drop(model_id)
                    self.inflight.pop(model_id, None)
                for sampler_id in req.sampler_ids:
                    self.samplers.pop(sampler_id, None)
                    self.inflight_samplers.pop(sampler_id, None)
                    self.failed_samplers.pop(sampler_id, None)
                return m.Empty()
        raise TypeError(f"unknown request {type(req).__name__}")

    # --- training -------------------------------------------------------------------------

    def _training(self, model_id: str) -> TrainingModel:
        tm = self.models.get(model_id)  # swapped in if it was idle on disk
        if tm is None:
            raise UserError(f"model {model_id} is not loaded (its session may have ended)")
        return tm

    def _base(self, name: str) -> BaseModel:
        base = self.base_models.get(name)
        if base is None:
            raise UserError(f"unknown base model {name!r}")
        return base

    def create_model(self, req: m.CreateModelRequest) -> m.Empty:
        base = self._base(req.base_model)
        adapter = new_adapter(base.module, req.lora, req.seed)
        self.models.put(
            TrainingModel(req.model_id, base, adapter, AdapterOptimizer(adapter), req.lora)
        )
        return m.Empty()

    def forward_backward(self, req: m.ForwardBackwardRequest) -> m.ForwardBackwardResult:
        tm = self._training(req.model_id)
        return self._forward_backward(tm.base.module, [Job(tm.adapter, req)])[0]

    def _forward_backward(self, model: nn.Module, jobs: list[Job]) -> list[m.ForwardBackwardResult]:
        """On an engine group each rank runs its share of the datums (data_parallel.py)."""
        crash_point("forward_backward")
        if self.group is not None and self.group.world > 1:
            return data_parallel.forward_backward(model, jobs, self.training, self.group)
        return forward_backward(model, jobs, self.training)

    def execute_co_batch(self, batch: list[m.Work]) -> list[m.Done]:
        """forward/forward_backward requests of several models run as one batch.

        A failure (a model that is not loaded, say) fails just that request: the others are
        run again without it.
        """
        jobs, works, done = [], [], []
        pinned = {w.request.model_id for w in batch}  # type: ignore[attr-defined]
        for work in batch:
            req = work.request
            assert isinstance(req, m.ForwardBackwardRequest)
            tm = self.models.get(req.model_id, pinned)
            if tm is None:
                done.append(
                    m.Done(
                        work.request_id,
                        error=f"model {req.model_id} is not loaded",
                        category="user",
                    )
                )
            else:
                jobs.append(Job(tm.adapter, req))
                works.append(work)
        if not jobs:
            return done
        try:
            model = self.models.get(jobs[0].req.model_id, pinned).base.module
            results = self._forward_backward(model, jobs)
        except Exception:  # isolate the failure: run each on its own
            log.warning("co-batch failed; running its requests one by one")
            return done + [self.run_one(w) for w in works]
        return done + [m.Done(w.request_id, result=r) for w, r in zip(works, results, strict=True)]

    def optim_step(self, req: m.OptimStepRequest) -> m.OptimStepResult:
        tm = self._training(req.model_id)
        crash_point("optim_step")
        return m.OptimStepResult(metrics=tm.optimizer.step(req.adam))

    def save(self, req: m.SaveRequest) -> m.SavedCheckpoint:
        tm = self._training(req.model_id)
        if not self.writes_files:  # rank 0 of the group writes the (replicated) adapter
            return m.SavedCheckpoint(directory=req.directory, size_bytes=0)
        opt_state = tm.optimizer.state_tensors() if req.kind == "training" else None
        try:
            size = checkpoint_io.write_checkpoint(
                req.directory, tm.adapter, tm.base.name, req.metadata, opt_state
            )
        except OSError as e:  # e.g. a full disk: nothing already saved was touched
            raise ServerError(
                f"could not write the checkpoint ({e}); earlier checkpoints are intact"
            ) from e
        return m.SavedCheckpoint(directory=req.directory, size_bytes=size)

    def snapshot(self, req: m.SnapshotRequest) -> m.Empty:
        """A new sampler on the current weights, frozen; or, inflight, the model's new shared
        target, which every inflight sampler of the model starts its next requests on."""
        tm = self._training(req.model_id)
        weights = weights_of(tm.base, tm.adapter.frozen_copy())
        if req.inflight:
            self.inflight[req.model_id] = weights
            self.inflight_samplers[req.sampler_id] = req.model_id
        else:
            self.samplers[req.sampler_id] = weights
        return m.Empty()

    def load(self, req: m.LoadRequest) -> m.Empty:
        base = self._base(req.base_model)
        device = next(base.module.parameters()).device
        adapter = checkpoint_io.read_adapter(req.directory, device)
        optimizer = AdapterOptimizer(adapter)
        if req.with_optimizer:
            state = checkpoint_io.read_optimizer_state(req.directory)
            if state is None:
                raise UserError("checkpoint has no optimizer state (it is a sampler checkpoint)")
            optimizer.load_state_tensors(state)
        if not req.create:
            self._training(req.model_id)  # must exist
        self.models.put(TrainingModel(req.model_id, base, adapter, optimizer, adapter.config))
        return m.Empty()

    # --- sampling -------------------------------------------------------------------------

    def create_sampler(self, req: m.CreateSamplerRequest) -> m.Empty:
        base = self._base(req.base_model)
        adapter = None
        if req.directory is not None:
            device = next(base.module.parameters()).device
            try:
                adapter = checkpoint_io.read_adapter(req.directory, device).frozen_copy()
            except checkpoint_io.CorruptCheckpoint as e:
                self.failed_samplers[req.sampler_id] = str(e)  # its samples say why
                raise
        self.failed_samplers.pop(req.sampler_id, None)
        self.samplers[req.sampler_id] = weights_of(base, adapter)
        return m.Empty()

    def status(self) -> dict:
        models = list(self.models)
        resident = [tm for tm in models if tm.adapter is not None]
        memory = {"rss_bytes": rss_bytes()}
        if torch.cuda.is_available():
            memory["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        return {
            "base_models": list(self.base_models),
            "training": {
                "adapters": len(models),
                "resident": len(resident),
                "swapped_to_disk": len(models) - len(resident),
                "max_resident": self.models.max_resident,
                "adapter_bytes_resident": sum(
                    t.numel() * 4 * 4 for tm in resident for t in tm.adapter.parameters()
                ),  # weights, gradients and two moments, fp32
            },
            "samplers": len(self.samplers) + len(self.inflight_samplers),
            "sampling": self.sampling.status(),
            "memory": memory,
        }

    def admit_sample(self, work: m.Work) -> m.Done | None:
        """Start an admitted sample request; a Done if it cannot start."""
        req = work.request
        assert isinstance(req, m.SampleRequest)
        weights = self.samplers.get(req.sampler_id)
        inflight = self.inflight_samplers.get(req.sampler_id)
        if inflight is not None:  # the latest weights its training model published
            weights = self.inflight.get(inflight)
        if weights is None:
            if req.sampler_id in self.lost_samplers:
                return m.Done(work.request_id, error=LOST_SAMPLER.format(req.sampler_id))
            if why := self.failed_samplers.get(req.sampler_id):  # the SDK did not wait for it
                return m.Done(work.request_id, error=f"sampler {req.sampler_id}: {why}")
            return m.Done(work.request_id, error=f"sampler {req.sampler_id} is not loaded")
        try:
            namespace = req.sampler_id if inflight is not None else None  # fresh per session
            self.sampling.add(work.request_id, req, weights, namespace)
        except ValueError as e:
            return m.Done(work.request_id, error=str(e), category="user")
        return None

    def sampling_step(self) -> list[m.Done]:
        """One continuous-batching pass; a failure ends the requests of that pass."""
        finished: list[m.Done] = []
        try:
            self.sampling.step(finished.append)
        except Exception as e:  # a bug or resource failure: fail its requests, keep serving
            log.error("sampling step failed:\n%s", traceback.format_exc())
            for job in self.sampling.abort_all():
                finished.append(m.Done(job, error=f"internal error: {e}", category="server"))
        return finished


@dataclass
class StepResult:
    """What a step produced."""

    done: list[m.Done] = field(default_factory=list)  # answers, in the order they came
    finished_samples: list[str] = field(default_factory=list)  # sample requests that ended
    sampled_tokens: int = 0  # tokens drawn by the sampling pass


def check_loss(graph: LossGraph) -> m.Empty:
    """A custom loss's trial run on meta tensors; whatever it provokes is the graph's fault."""
    try:
        trial_run(graph)
    except LossGraphError as e:
        raise UserError(f"custom loss {graph.name!r} refused: {e}") from None
    except Exception as e:
        raise UserError(f"custom loss {graph.name!r} refused: {type(e).__name__}: {e}") from None
    return m.Empty()


def rss_bytes() -> int:
    """This process's resident memory (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def weights_of(base: BaseModel, adapter: Adapter | None) -> Weights:
    return Weights(base.module, adapter, base.vocab, base.name)
