"""Per-adapter AdamW: exactly `torch.optim.AdamW`, with the request's hyper-parameters.

Each adapter owns one optimizer over its own fp32 tensors, so a step of one adapter never
reads or writes another's weights or moments.
"""

from __future__ import annotations

import torch

from lathe.models.lora import Adapter
from lathe.models.transfer import fetch
from lathe.protocol.messages import AdamParams


class AdapterOptimizer:
    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.params = adapter.parameters()
        d = AdamParams()  # placeholders: every step sets the request's hyper-parameters
        self.torch_opt = torch.optim.AdamW(
            self.params,
            lr=d.learning_rate,
            betas=(d.beta1, d.beta2),
            eps=d.eps,
            weight_decay=d.weight_decay,
        )

    def has_gradients(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def step(self, hp: AdamParams) -> dict[str, float]:
        """One AdamW step on the accumulated gradients, which are then cleared."""
        for group in self.torch_opt.param_groups:
            group.update(
                lr=hp.learning_rate,
                betas=(hp.beta1, hp.beta2),
                eps=hp.eps,
                weight_decay=hp.weight_decay,
            )
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return {"grad_norm": 0.0, "learning_rate": hp.learning_rate, "skipped": 1.0}
        if hp.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, hp.grad_clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        self.torch_opt.step()
        self.torch_opt.zero_grad(set_to_none=True)
        grad_norm = fetch([norm])[0]  # the step's one transfer
        return {"grad_norm": float(grad_norm), "learning_rate": hp.learning_rate}

    def zero_grad(self) -> None:
        self.torch_opt.zero_grad(set_to_none=True)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW state keyed by adapter tensor name, for checkpoints."""
        out: dict[str, torch.Tensor] = {}
        for name, kind, p in self.adapter.named_tensors():
            for key, value in self.torch_opt.state.get(p, {}).items():
                out[f"{name}.{kind}.{key}"] = torch.as_tensor(value).detach().cpu()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, kind, p in self.adapter.named_tensors():
            prefix = f"{name}.{kind}."
            state = {
                k[len(prefix) :]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)
            }
            if state:
                # torch keeps `step` as a CPU float tensor unless capturable/fused.
                state["step"] = state["step"].cpu().float()
                self.torch_opt.state[p] = state
