"""Running a custom loss graph (engine/custom_loss_graph.py) with torch, safely.

Nothing in a graph is executable by itself: the interpreter maps each allowed name to a
torch or Python callable itself (no imports, no attribute access beyond a few tensor
properties) and works out the size of every intermediate on the meta device before computing
it, so a graph cannot run arbitrary code or allocate without bound. `trial_run` does this on
meta tensors of a long sequence when the loss is created, so blow-ups are refused then.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.node import _get_qualified_name

from lathe.protocol.loss_graph import (
    ALLOWED_FUNCTIONS,
    FUNCTION_NAMES,
    FUNCTIONAL,
    MATH,
    METRIC_KEY,
    OPERATORS,
    TORCH_FUNCTIONS,
    LossGraph,
    LossGraphError,
    Node,
)

MIN_ELEMENT_LIMIT = 4 * 2**20  # an intermediate may always hold this many elements ...
ELEMENT_FACTOR = 4  # ... or this many times the largest input
TRIAL_LENGTH = 4096  # sequence length of the trial run at creation
TRIAL_K = 8  # trailing size of rank-2 inputs in the trial run

FUNCTIONS: dict[str, Any] = {
    **{f"torch.{n}": getattr(torch, n) for n in TORCH_FUNCTIONS},
    **{f"torch.nn.functional.{n}": getattr(F, n) for n in FUNCTIONAL},
    **{f"math.{n}": getattr(math, n) for n in MATH},
    **{f"operator.{n}": getattr(operator, n) for n in OPERATORS},
}
assert set(FUNCTIONS) == FUNCTION_NAMES
# torch.fx names some functions by where they are defined (F.logsigmoid is
# torch._C._nn.log_sigmoid); accept those spellings of the same allowed functions too.
FUNCTIONS.update(
    {
        _get_qualified_name(fn): fn
        for fn in list(FUNCTIONS.values())
        if callable(fn) and not isinstance(fn, type)
    }
)
assert set(FUNCTIONS) == ALLOWED_FUNCTIONS, set(FUNCTIONS) ^ ALLOWED_FUNCTIONS
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "bool": torch.bool,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ENCODED_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def decode(arg: Any, env: dict[str, Any]) -> Any:
    if isinstance(arg, list):
        return [decode(a, env) for a in arg]
    if not isinstance(arg, dict):
        return arg
    ((kind, value),) = arg.items()
    match kind:
        case "ref":
            return env[value]
        case "tuple":
            return tuple(decode(a, env) for a in value)
        case "dict":
            return {k: decode(a, env) for k, a in value.items()}
        case "slice":
            return slice(*(decode(a, env) for a in value))
        case "ellipsis":
            return Ellipsis
        case "float":
            return ENCODED_FLOATS[value]
        case "dtype":
            return DTYPES[value]
        case "device":
            return None  # tensors stay where the engine put them
        case _:
            return None  # layout / memory_format: defaults only


def decode_kwargs(kwargs: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    return {k: decode(v, env) for k, v in kwargs.items()}


def element_limit(inputs: list[torch.Tensor]) -> int:
    return max(MIN_ELEMENT_LIMIT, ELEMENT_FACTOR * max((t.numel() for t in inputs), default=0))


def call(node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
    if node.op == "call_method":
        if node.target == "to":  # only dtype conversions: devices are the engine's business
            args = [a for a in args if not isinstance(a, (str, torch.device))]
            kwargs = {k: v for k, v in kwargs.items() if k == "dtype"}
        self_, *rest = args
        if not isinstance(self_, torch.Tensor):
            raise LossGraphError(f"{node.target}() called on a {type(self_).__name__}")
        return getattr(self_, node.target)(*rest, **kwargs)
    if node.target == "builtins.getattr":
        obj, attr = args
        if not isinstance(obj, torch.Tensor):
            raise LossGraphError("attributes may only be read from tensors")
        return getattr(obj, attr)
    return FUNCTIONS[node.target](*args, **kwargs)


def to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    if isinstance(x, (list, tuple)):
        return type(x)(to_meta(a) for a in x)
    if isinstance(x, dict):
        return {k: to_meta(v) for k, v in x.items()}
    return x


def has_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (list, tuple)):
        return any(has_tensor(a) for a in x)
    if isinstance(x, dict):
        return any(has_tensor(a) for a in x.values())
    return False


def guard_size(node: Node, args: list[Any], kwargs: dict[str, Any], limit: int) -> None:
    """Work out the result's size on the meta device before computing it for real."""
    try:
        out = call(node, to_meta(args), to_meta(kwargs))
    except LossGraphError:
        raise
    except Exception as e:
        raise LossGraphError(f"node {node.name} ({node.target}) failed: {e}") from None
    outs = out if isinstance(out, (list, tuple)) else [out]
    for o in outs:
        if isinstance(o, torch.Tensor) and o.numel() > limit:
            raise LossGraphError(
                f"node {node.name} ({node.target}) would make a tensor of shape "
                f"{tuple(o.shape)}; custom losses may not exceed {limit} elements"
            )


def run_loss(
    graph: LossGraph, inputs: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Evaluate the loss on one datum's tensors (logprobs first)."""
    limit = element_limit(inputs)
    env: dict[str, Any] = {}
    bound = iter(inputs)
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node.name] = next(bound)
            continue
        args = decode(node.args, env)
        kwargs = decode_kwargs(node.kwargs, env)
        if node.op == "output":
            return check_output(graph, args[0])
        if has_tensor(args) or has_tensor(kwargs):
            guard_size(node, args, kwargs, limit)
        try:
            env[node.name] = call(node, args, kwargs)
        except LossGraphError:
            raise
        except Exception as e:
            raise LossGraphError(f"node {node.name} ({node.target}) failed: {e}") from None
    raise LossGraphError("the graph has no output")


def check_output(graph: LossGraph, out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
        raise LossGraphError(f"loss {graph.name!r} must return (loss, metrics)")
    loss, metrics = out
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise LossGraphError(f"loss {graph.name!r} must return a scalar tensor loss")
    for key, value in metrics.items():
        if not METRIC_KEY.fullmatch(str(key)):
            raise LossGraphError(f"metric {key!r} must be named custom/<name>:sum or :mean")
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise LossGraphError(f"metric {key!r} must be a scalar tensor")
    return loss, metrics


def trial_run(graph: LossGraph) -> None:
    """Run the graph on meta tensors of a long sequence: catches failures and blow-ups early."""
    shapes = {0: (), 1: (TRIAL_LENGTH,), 2: (TRIAL_LENGTH, TRIAL_K)}
    inputs = [torch.empty(shapes[r], device="meta") for r in graph.input_ranks]
    limit = element_limit(inputs)
    env: dict[str, Any] = {}
    bound = iter(inputs)
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node.name] = next(bound)
            continue
        args, kwargs = decode(node.args, env), decode_kwargs(node.kwargs, env)
        if node.op == "output":
            out = args[0]
            if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
                raise LossGraphError(f"loss {graph.name!r} must return (loss, metrics)")
            return
        guard_size(node, args, kwargs, limit)
        env[node.name] = call(node, to_meta(args), to_meta(kwargs))
    raise LossGraphError("the graph has no output")
