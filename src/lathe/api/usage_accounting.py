"""What each request used, for GET /billing/usage/events (SDK 0.38 AdminClient.get_billing_usage).

A request's usage is counted when it succeeds, in the same database transaction as its
result (store/db.py UsageRow): forward and forward_backward count their tokens as training;
a sample counts its prompt as prefill (the tokens served from the prefix cache apart) and its
generated tokens as sampled. Checkpoints are counted from the audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lathe.protocol import messages as m


@dataclass(frozen=True)
class Usage:
    """Attribution of one request, fixed when it is submitted."""

    kind: str  # training | sampling
    session_id: str  # the session it is attributed to
    base_model: str
    tokens: int  # training: its tokens; sampling: its prompt's tokens

    def rows(self, result: Any) -> list[tuple[str, bool, int]]:
        """(event type, cached, count) of a successful result."""
        if self.kind == "training":
            return [("training", False, self.tokens)]
        assert isinstance(result, m.SampleResult)
        cached = min(result.prompt_cache_hit_tokens, self.tokens)
        sampled = sum(len(seq.tokens) for seq in result.sequences)
        rows = [
            ("sampling_prefill", False, self.tokens - cached),
            ("sampling_sample", False, sampled),
        ]
        if cached:
            rows.append(("sampling_prefill", True, cached))
        return [row for row in rows if row[2] > 0]
