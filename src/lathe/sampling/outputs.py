"""What the sampler makes of a request's prompt logits (scores, top-k rows), and its result.

Sampled tokens are drawn in draw.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lathe.protocol import messages as m
from lathe.sampling.jobs import Job

TOPK_PAD = (0, -99999.0)  # the SDK's marker for an empty top-k cell


def topk_row(logp: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    top = torch.topk(logp, min(k, logp.shape[-1]))
    return topk_cells(top.indices.cpu().numpy(), top.values.cpu().numpy(), k)


def topk_cells(ids: np.ndarray, lps: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k of a row's top entries, padded with the SDK's empty-cell marker."""
    real = min(k, len(ids))
    out_ids = np.full(k, TOPK_PAD[0], np.int32)
    out_lps = np.full(k, TOPK_PAD[1], np.float32)
    out_ids[:real] = ids[:real]
    out_lps[:real] = lps[:real]
    return out_ids, out_lps


def score_prompt(job: Job, start: int, rows: torch.Tensor) -> None:
    """Prompt logprobs from the logits at prompt positions start .. start+len(rows)-1.

    The logits at position i predict prompt token i + 1 (the last one predicts the first
    sampled token and scores nothing here). Prompt scores are untempered (temperature 1).
    """
    prompt = job.req.prompt
    logp = torch.log_softmax(rows.clone(), dim=-1)  # (n, V); a copy, as in decode
    stop = min(start + rows.shape[0], len(prompt) - 1)
    if stop <= start:
        return
    used = logp[: stop - start]
    nxt = torch.tensor(prompt[start + 1 : stop + 1], device=rows.device)
    job.prompt_scores += used.gather(-1, nxt[:, None])[:, 0].tolist()
    if job.req.topk_prompt_logprobs:
        job.prompt_topk += [topk_row(r, job.req.topk_prompt_logprobs) for r in used]
    if job.req.target_prompt_ids is not None:
        ids = torch.from_numpy(job.req.target_prompt_ids[start:stop]).to(rows.device)
        got = used.gather(-1, ids.clamp(min=0))
        job.target_scores.append(torch.where(ids >= 0, got, 0.0).cpu().numpy())


def result_of(job: Job) -> m.SampleResult:
    req = job.req
    seqs = []
    for s in job.sequences:
        topk = None
        if req.topk_sample_logprobs:
            k = req.topk_sample_logprobs
            ids = np.stack([t[0] for t in s.topk]) if s.topk else np.zeros((0, k), np.int32)
            lps = np.stack([t[1] for t in s.topk]) if s.topk else np.zeros((0, k), np.float32)
            topk = m.TopK(ids, lps)
        seqs.append(m.SampledSequence(s.tokens, s.logprobs, s.stop_reason or "length", topk))
    scores = None
    if req.prompt_logprobs:
        scores = [math.nan, *job.prompt_scores]
        if req.prompt_logprobs_last_n is not None:
            keep = len(req.prompt) - req.prompt_logprobs_last_n
            scores = [math.nan if i < keep else x for i, x in enumerate(scores)]
    prompt_topk = None
    if req.topk_prompt_logprobs:
        k = req.topk_prompt_logprobs
        pad_ids, pad_lps = (
            np.full((1, k), TOPK_PAD[0], np.int32),
            np.full((1, k), TOPK_PAD[1], np.float32),
        )
        prompt_topk = m.TopK(
            np.concatenate([pad_ids, *[t[0][None] for t in job.prompt_topk]]),
            np.concatenate([pad_lps, *[t[1][None] for t in job.prompt_topk]]),
        )
    target = None
    if req.target_prompt_ids is not None:
        target = (
            np.concatenate(job.target_scores).astype(np.float32)
            if job.target_scores
            else (np.zeros(req.target_prompt_ids.shape, np.float32))
        )
    return m.SampleResult(seqs, scores, prompt_topk, target, job.cache_hit)
