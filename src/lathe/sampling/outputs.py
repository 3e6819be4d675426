"""What the sampler makes of a request's prompt logits (scores, top-k rows), and its result.

Sampled tokens are drawn in draw.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lathe.models.transfer import fetch, to_device
from lathe.protocol import messages as m
from lathe.sampling.jobs import Job

TOPK_PAD = (0, -99999.0)  # the SDK's marker for an empty top-k cell


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
    They stay on the device; `result_of` fetches them when the request finishes.
    """
    prompt = job.req.prompt
    logp = torch.log_softmax(rows.clone(), dim=-1)  # (n, V); a copy, as in decode
    stop = min(start + rows.shape[0], len(prompt) - 1)
    if stop <= start:
        return
    used = logp[: stop - start]
    nxt = to_device(prompt[start + 1 : stop + 1], torch.long, rows.device)
    job.prompt_scores.append(used.gather(-1, nxt[:, None])[:, 0])
    if job.req.topk_prompt_logprobs:
        top = torch.topk(used, min(job.req.topk_prompt_logprobs, used.shape[-1]), dim=-1)
        job.prompt_topk.append((top.indices, top.values))
    if job.req.target_prompt_ids is not None:
        ids = to_device(job.req.target_prompt_ids[start:stop], torch.long, rows.device)
        got = used.gather(-1, ids.clamp(min=0))
        job.target_scores.append(torch.where(ids >= 0, got, 0.0))


def progress_of(job: Job) -> m.SampleProgress:
    """The tokens each sequence drew since the last report (a streamed request's progress)."""
    tokens, logprobs = [], []
    for seq in job.sequences:
        tokens.append(seq.tokens[seq.reported :])
        logprobs.append(seq.logprobs[seq.reported :])
        seq.reported = len(seq.tokens)
    return m.SampleProgress(tokens, logprobs)


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
    # the prompt's scores, per prefill chunk, in one transfer
    n_scores, n_topk = len(job.prompt_scores), len(job.prompt_topk)
    host = fetch(
        [*job.prompt_scores, *(t for pair in job.prompt_topk for t in pair), *job.target_scores]
    )
    prompt_scores = [float(x) for chunk in host[:n_scores] for x in chunk]
    topk_flat = host[n_scores : n_scores + 2 * n_topk]  # (ids, logprobs) of each chunk
    topk_chunks = list(zip(topk_flat[0::2], topk_flat[1::2], strict=True))
    target_chunks = host[n_scores + 2 * n_topk :]
    scores = None
    if req.prompt_logprobs:
        scores = [math.nan, *prompt_scores]
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
        rows = [
            topk_cells(i, v, k) for ids, lps in topk_chunks for i, v in zip(ids, lps, strict=True)
        ]
        prompt_topk = m.TopK(
            np.concatenate([pad_ids, *[r[0][None] for r in rows]]),
            np.concatenate([pad_lps, *[r[1][None] for r in rows]]),
        )
    target = None
    if req.target_prompt_ids is not None:
        target = (
            np.concatenate(target_chunks).astype(np.float32)
            if target_chunks
            else (np.zeros(req.target_prompt_ids.shape, np.float32))
        )
    return m.SampleResult(seqs, scores, prompt_topk, target, job.cache_hit)
