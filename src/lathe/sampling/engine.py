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

from lathe.models.lora import ROW_BLOCK, Adapter, RowGroup, use_adapters
from lathe.models.transfer import to_device
from lathe.protocol import messages as m
from lathe.sampling.budget import blocks_needed
from lathe.sampling.draw import DrawRow, draw_all, sample_streams
from lathe.sampling.jobs import Job, Sequence, cache_key
from lathe.sampling.kv_cache import PackedAttention, Segment, SequenceKV
from lathe.sampling.memory import ModelMemory
from lathe.sampling.outputs import progress_of, result_of, score_prompt
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
        self.cancelled = 0  # running requests stopped because their clients abandoned them

    # --- requests -----------------------------------------------------------------------

    def add(
        self, work_id: str, req: m.SampleRequest, weights: Weights, namespace: str | None = None
    ) -> None:
        """Start a request the scheduler admitted (its KV blocks are reserved for it);
        ValueError if its stop strings cannot be checked. `namespace`: reuse cached prompt
        prefixes only of requests with the same one (an inflight sampling session's)."""
        stop = StopChecker(req.params, weights.vocab)
        mem = self.memory_of(weights.model)
        need = blocks_needed(req)
        mem.reserved += need
        while mem.reserved + mem.cached > mem.capacity and mem.cache:
            mem.evict_oldest()  # cached prefills give way to running requests
        job = Job(work_id, req, weights, stop, need, namespace=namespace)
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
            "cancelled_requests": self.cancelled,
        }

    def cancel(self, work_ids: list[str]) -> list[str]:
        """Stop these running requests (their KV blocks are freed); returns those stopped."""
        wanted = set(work_ids)
        stopped = [job for job in self.jobs if job.work_id in wanted]
        for job in stopped:
            self.finish_job(job)
        self.cancelled += len(stopped)
        return [job.work_id for job in stopped]

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
        draws: list[tuple[Job, Sequence, torch.Tensor]] = []  # first tokens from cached logits
        budget = STEP_TOKENS
        for job in self.jobs:
            if job.weights.model is not model:
                continue
            for seq in job.sequences:
                if seq.first_logits is not None:
                    draws.append((job, seq, seq.first_logits))
                    seq.first_logits = None
                elif seq.stop_reason is None:
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
            draws += self.forward(model, plan)
        self.draw(draws)
        for job in list(self.jobs):
            if not job.prefilling and all(s.stop_reason for s in job.sequences):
                self.finish_job(job)
                finish(m.Done(job.work_id, result=result_of(job)))
            elif job.req.stream and any(len(q.tokens) > q.reported for q in job.sequences):
                finish(m.Done(job.work_id, result=progress_of(job)))  # only when it drew some

    def forward(
        self, model: nn.Module, plan: list[tuple[Job, Sequence | None, list[int]]]
    ) -> list[tuple[Job, Sequence, torch.Tensor]]:
        """One forward pass over the plan; returns the draws it makes due (sample, logits)."""
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
        # Pad the row once to a multiple of ROW_BLOCK tokens (base-model rows in no segment:
        # they write no keys and attend to nothing), so no matmul pads its input again.
        pad = -len(ids) % ROW_BLOCK
        if pad:
            ids += [0] * pad
            positions += [0] * pad
            groups.append(RowGroup(len(ids) - pad, len(ids), None))
        device = next(model.parameters()).device
        attention = PackedAttention(self.memory_of(model).pool, segments, device)
        with torch.no_grad(), use_adapters(groups, row_invariant=True):
            hidden = model.hidden_states(
                to_device([ids], torch.long, device),
                to_device([positions], torch.long, device),
                attention,
            )[0]  # (N, hidden)
        # Unembed only the positions whose logits are used (the last of each sequence, or a
        # whole prompt chunk when its logprobs are wanted), under the same adapters.
        rows = to_device([i for w in wanted for i in w], torch.long, device)
        out_groups, at = [], 0
        for (job, _, _), w in zip(plan, wanted, strict=True):
            out_groups.append(RowGroup(at, at + len(w), job.weights.adapter))
            at += len(w)
        with torch.no_grad(), use_adapters(out_groups, row_invariant=True):
            logits = model.lm_head(hidden[rows]).float()  # (outputs, V)
        for seg in segments:
            seg.kv.advance(seg.n)
        draws: list[tuple[Job, Sequence, torch.Tensor]] = []
        at = 0
        for (job, seq, chunk), rows_wanted in zip(plan, wanted, strict=True):
            rows = logits[at : at + len(rows_wanted)]
            at += len(rows_wanted)
            if seq is None:
                draws += self.after_prefill_chunk(job, chunk, rows)
            else:
                draws.append((job, seq, rows[-1]))
        return draws

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
        for seq in self.start_samples(job, cached.kv, keep_prompt_kv=True):
            seq.first_logits = cached.last_logits  # drawn in the next step

    def after_prefill_chunk(
        self, job: Job, chunk: list[int], rows: torch.Tensor
    ) -> list[tuple[Job, Sequence, torch.Tensor]]:
        start = job.prefilled
        job.prefilled += len(chunk)
        self.prefill_tokens_computed += len(chunk)
        if job.wants_prompt_logits:
            score_prompt(job, start, rows)
        if job.prefilled < len(job.req.prompt):
            return []
        last = rows[-1]
        if not job.wants_prompt_logits:
            memory = self.memory_of(job.weights.model)
            memory.remember(cache_key(job), job.prompt_kv, last)
        return [(job, seq, last) for seq in self.start_samples(job, job.prompt_kv, False)]

    def start_samples(self, job: Job, kv: SequenceKV, keep_prompt_kv: bool) -> list[Sequence]:
        """Fork the prompt into num_samples sequences; returns those that decode."""
        n = job.req.num_samples
        if job.req.params.max_tokens == 0:  # scoring only: nothing to decode
            if not keep_prompt_kv:
                kv.free()
            empty = [SequenceKV(kv.pool) for _ in range(n)]
            job.sequences = [Sequence(e, 0, stop_reason="length") for e in empty]
            return []
        streams = sample_streams(job.req.params.seed, n)
        # Samples share the prompt's blocks; the job's own prompt table becomes the last one.
        kvs = [kv.fork() if keep_prompt_kv or i < n - 1 else kv for i in range(n)]
        job.sequences = [Sequence(kvs[i], streams[i]) for i in range(n)]
        return job.sequences

    # --- decode -------------------------------------------------------------------------

    def draw(self, draws: list[tuple[Job, Sequence, torch.Tensor]]) -> None:
        """Draw the next token of every sample in `draws` from its logits, all at once."""
        rows = [
            DrawRow(job.req.params, seq.stream, len(seq.tokens), job.req.topk_sample_logprobs)
            for job, seq, _ in draws
        ]
        drawn = draw_all([logits for _, _, logits in draws], rows)
        for (job, seq, _), got in zip(draws, drawn, strict=True):
            seq.tokens.append(got.token)
            seq.logprobs.append(got.logprob)
            if got.topk is not None:
                seq.topk.append(got.topk)
            self.tokens_sampled += 1
            if job.stop.is_stop(seq.tokens):
                seq.stop_reason = "stop"
            elif len(seq.tokens) >= job.req.params.max_tokens:
                seq.stop_reason = "length"
