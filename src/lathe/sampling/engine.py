"""Continuous-batching sampler: many requests, sequences and adapters share every step.

The scheduler admits a request (`SampleRequest`) when the KV blocks it may need fit its base
model's budget (engine/scheduler.py; until then its future reports `paused_capacity`) and
hands it here with `add`. An admitted request first
prefills its prompt in fixed chunks of PREFILL_CHUNK tokens (so a long prompt never stalls
the sequences that are decoding), then forks into `num_samples` sequences that each decode
one token per step. Every step packs the new tokens of all running sequences of one base
model into a single forward pass (rows of different adapters and base-model rows side by
side, see models/lora.py); a sequence leaves the batch the moment it stops and new requests
join at the next step.

Prefix sharing: a prompt is prefilled once however many samples it has, and a finished
prefill stays in a small cache, so later requests with the same prompt on the same weights
(a GRPO group sent as separate requests) skip it; `prompt_cache_hit_tokens` says how many
prompt tokens were reused.

Results do not depend on what else is in the batch: chunking depends only on the request,
matmuls run row-invariant and attention is batched by padded length (sampling/kv_cache.py),
and every sample draws from its own seeded random stream.

This file packs and runs the steps; a request's state is in jobs.py, stop handling in stops.py,
KV accounting and the prefix cache in memory.py, token drawing and results in outputs.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lathe.models.lora import Adapter, RowGroup, use_adapters
from lathe.protocol import messages as m
from lathe.sampling.budget import blocks_needed
from lathe.sampling.jobs import Job, Sequence, cache_key
from lathe.sampling.kv_cache import PackedAttention, Segment, SequenceKV
from lathe.sampling.logits import next_token_distribution
from lathe.sampling.memory import ModelMemory
from lathe.sampling.outputs import draw, result_of, row_generators, score_prompt, topk_row
from lathe.sampling.stops import StopChecker, Vocabulary

PREFILL_CHUNK = 256  # prompt tokens per prefill step of one request
STEP_TOKENS = 2048  # tokens per forward pass (decode rows first, then prefill chunks)


@dataclass(frozen=True)
class Weights:
    """What a request samples from: a base model and optionally a frozen adapter."""

    model: nn.Module
    adapter: Adapter | None
    vocab: Vocabulary
    base_name: str


class SamplingEngine:
    def __init__(self, kv_budget_tokens: int, prefix_cache_entries: int = 32) -> None:
        self.kv_budget = kv_budget_tokens  # KV positions per base model
        self.prefix_cache_entries = prefix_cache_entries
        self.memory: dict[int, ModelMemory] = {}  # by id() of the base model
        self.jobs: list[Job] = []
        self.prefill_tokens_computed = 0  # counters, for tests and status
        self.prefill_tokens_reused = 0
        self.tokens_sampled = 0

    # --- requests -----------------------------------------------------------------------

    def add(self, work_id: str, req: m.SampleRequest, weights: Weights) -> None:
        """Start a request the scheduler admitted (its KV blocks are reserved for it);
        ValueError if its stop strings cannot be checked."""
        stop = StopChecker(req.params, weights.vocab)
        mem = self.memory_of(weights.model)
        need = blocks_needed(req)
        mem.reserved += need
        while mem.reserved + mem.cached > mem.capacity and mem.cache:
            mem.evict_oldest()  # cached prefills give way to running requests
        job = Job(work_id, req, weights, stop, need)
        self.jobs.append(job)
        self.reuse_prefill(job)

    def has_work(self) -> bool:
        return bool(self.jobs)

    def memory_of(self, model: nn.Module) -> ModelMemory:
        if id(model) not in self.memory:
            self.memory[id(model)] = ModelMemory(model, self.kv_budget, self.prefix_cache_entries)
        return self.memory[id(model)]

    def finish_job(self, job: Job) -> None:
        """Give back a finished (or aborted) request's blocks and reservation."""
        self.jobs.remove(job)
        for seq in job.sequences:
            seq.kv.free()
        if job.prompt_kv is not None and not job.sequences:
            job.prompt_kv.free()
        self.memory_of(job.weights.model).reserved -= job.reserved

    def status(self) -> dict:
        blocks = [(len(mem.pool.refs), mem.pool.num_free) for mem in self.memory.values()]
        return {
            "running_requests": len(self.jobs),
            "kv_blocks_total": sum(total for total, _ in blocks),
            "kv_blocks_used": sum(total - free for total, free in blocks),
            "prefill_tokens_computed": self.prefill_tokens_computed,
            "prefill_tokens_reused": self.prefill_tokens_reused,
        }

    def abort_all(self) -> list[str]:
        """Drop every running request (after a failed step); returns their work ids."""
        ids = [job.work_id for job in self.jobs]
        for job in list(self.jobs):
            self.finish_job(job)
        return ids

    # --- one step -----------------------------------------------------------------------

    def step(self, finish: Callable[[m.Done], None]) -> None:
        """Run one packed forward pass of one base model, emit the finished requests."""
        if not self.jobs:
            return
        model = self.jobs[0].weights.model  # one base model per step, oldest request first
        plan: list[tuple[Job, Sequence | None, list[int]]] = []  # (job, seq or prefill, ids)
        budget = STEP_TOKENS
        for job in self.jobs:
            if job.weights.model is not model:
                continue
            for seq in job.sequences:
                if seq.stop_reason is None:
                    plan.append((job, seq, [seq.tokens[-1]]))
                    budget -= 1
        for job in self.jobs:
            if job.weights.model is not model or not job.prefilling:
                continue
            chunk = job.req.prompt[job.prefilled : job.prefilled + PREFILL_CHUNK]
            if len(chunk) > budget and len(plan) > 0:
                break
            plan.append((job, None, chunk))
            budget -= len(chunk)
        if plan:  # empty when every admitted request was served from the prefix cache
            self.forward(model, plan)
        for job in list(self.jobs):
            if not job.prefilling and all(s.stop_reason for s in job.sequences):
                self.finish_job(job)
                finish(m.Done(job.work_id, result=result_of(job)))

    def forward(self, model: nn.Module, plan: list[tuple[Job, Sequence | None, list[int]]]) -> None:
        # Rows of the same adapter side by side, so each adapter's delta is one matmul.
        plan.sort(key=lambda p: id(p[0].weights.adapter))
        ids: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        groups: list[RowGroup] = []
        wanted: list[list[int]] = []  # per plan entry: packed positions whose logits it needs
        for job, seq, chunk in plan:
            kv = seq.kv if seq is not None else self.prompt_kv(job)
            start = len(ids)
            ids += chunk
            positions += range(kv.length, kv.length + len(chunk))
            segments.append(Segment(kv, start, len(chunk)))
            adapter = job.weights.adapter
            if groups and groups[-1].adapter is adapter:
                groups[-1] = RowGroup(groups[-1].start, len(ids), adapter)
            else:
                groups.append(RowGroup(start, len(ids), adapter))
            every = seq is None and job.wants_prompt_logits
            wanted.append(list(range(start, len(ids))) if every else [len(ids) - 1])
        device = next(model.parameters()).device
        attention = PackedAttention(self.memory_of(model).pool, segments, device)
        with torch.no_grad(), use_adapters(groups, row_invariant=True):
            hidden = model.hidden_states(
                torch.tensor([ids], dtype=torch.long, device=device),
                torch.tensor([positions], dtype=torch.long, device=device),
                attention,
            )[0]  # (N, hidden)
        # Unembed only the positions whose logits are used (the last of each sequence, or a
        # whole prompt chunk when its logprobs are wanted), under the same adapters.
        rows = torch.tensor([i for w in wanted for i in w], device=device)
        out_groups, at = [], 0
        for (job, _, _), w in zip(plan, wanted, strict=True):
            out_groups.append(RowGroup(at, at + len(w), job.weights.adapter))
            at += len(w)
        with torch.no_grad(), use_adapters(out_groups, row_invariant=True):
            logits = model.lm_head(hidden[rows]).float()  # (outputs, V)
        for seg in segments:
            seg.kv.advance(seg.n)
        at = 0
        for (job, seq, chunk), rows_wanted in zip(plan, wanted, strict=True):
            rows = logits[at : at + len(rows_wanted)]
            at += len(rows_wanted)
            if seq is None:
                self.after_prefill_chunk(job, chunk, rows)
            else:
                self.decode(job, seq, rows[-1])

    # --- prefill ------------------------------------------------------------------------

    def prompt_kv(self, job: Job) -> SequenceKV:
        if job.prompt_kv is None:
            job.prompt_kv = SequenceKV(self.memory_of(job.weights.model).pool)
        return job.prompt_kv

    def reuse_prefill(self, job: Job) -> None:
        """Skip the prefill if the same prompt on the same weights was just prefilled."""
        if job.wants_prompt_logits:
            return  # prompt scores need the prompt's logits, which the cache does not keep
        cache = self.memory_of(job.weights.model).cache
        cached = cache.get(cache_key(job))
        if cached is None:
            return
        cache.move_to_end(cache_key(job))
        job.cache_hit = len(job.req.prompt)
        job.prefilled = len(job.req.prompt)
        self.prefill_tokens_reused += len(job.req.prompt)
        self.start_samples(job, cached.kv, cached.last_logits, keep_prompt_kv=True)

    def after_prefill_chunk(self, job: Job, chunk: list[int], rows: torch.Tensor) -> None:
        start = job.prefilled
        job.prefilled += len(chunk)
        self.prefill_tokens_computed += len(chunk)
        if job.wants_prompt_logits:
            score_prompt(job, start, rows)
        if job.prefilled == len(job.req.prompt):
            last = rows[-1]
            if not job.wants_prompt_logits:
                memory = self.memory_of(job.weights.model)
                memory.remember(cache_key(job), job.prompt_kv, last)
            self.start_samples(job, job.prompt_kv, last, keep_prompt_kv=False)

    def start_samples(
        self, job: Job, kv: SequenceKV, last_logits: torch.Tensor, keep_prompt_kv: bool
    ) -> None:
        """Fork the prompt into num_samples sequences and draw each one's first token."""
        n = job.req.num_samples
        if job.req.params.max_tokens == 0:  # scoring only: nothing to decode
            if not keep_prompt_kv:
                kv.free()
            empty = [SequenceKV(kv.pool) for _ in range(n)]
            job.sequences = [Sequence(e, torch.Generator(), stop_reason="length") for e in empty]
            return
        gens = row_generators(job.req.params.seed, n, last_logits.device)
        # Samples share the prompt's blocks; the job's own prompt table becomes the last one.
        kvs = [kv.fork() if keep_prompt_kv or i < n - 1 else kv for i in range(n)]
        job.sequences = [Sequence(kvs[i], gens[i]) for i in range(n)]
        for seq in job.sequences:
            self.decode(job, seq, last_logits)

    # --- decode -------------------------------------------------------------------------

    def decode(self, job: Job, seq: Sequence, logits: torch.Tensor) -> None:
        """Draw the next token of `seq` from the logits after its last token."""
        params = job.req.params
        # A fresh copy: reductions over a row inside a bigger tensor can split differently
        # with the row's memory alignment, which would tie results to the row's position.
        logp = next_token_distribution(logits[None].clone(), params)[0]  # (V,)
        tok = draw(logp, params.temperature, seq.generator)
        seq.tokens.append(tok)
        self.tokens_sampled += 1
        seq.logprobs.append(float(logp[tok]))
        if job.req.topk_sample_logprobs:
            seq.topk.append(topk_row(logp, job.req.topk_sample_logprobs))
        if job.stop.is_stop(seq.tokens):
            seq.stop_reason = "stop"
        elif len(seq.tokens) >= params.max_tokens:
            seq.stop_reason = "length"
