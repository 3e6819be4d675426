"""Server-side custom losses as data: the graph of a traced loss, checked against an allowlist.

The SDK (0.38, `create_custom_loss`) traces a per-datum loss `f(logprobs, *inputs) ->
(loss, {"custom/<name>:sum|mean": scalar})` with torch.fx and sends its nodes. This module
turns that JSON into a `LossGraph` after checking its structure and that every operation is
on the allowlist (names only, no torch here); engine/custom_loss.py runs it.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

MAX_NODES = 1000
MAX_ARG_DEPTH = 8
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
ENCODED_FLOATS = ("inf", "-inf", "nan")
DTYPE_NAMES = ("float32", "float64", "int64", "bool", "float16", "bfloat16")

TORCH_FUNCTIONS = tuple(
    (
        "exp exp2 expm1 log log1p log2 sigmoid tanh abs sqrt rsqrt square neg sign relu clamp "
        "clip minimum maximum where sum mean amax amin max min logsumexp softmax log_softmax "
        "cumsum var std prod stack cat zeros_like ones_like full_like pow mul add sub div dot "
        "matmul isfinite isnan nan_to_num lt le gt ge eq ne logical_and logical_or "
        "logical_not gather squeeze unsqueeze flatten reshape transpose detach"
    ).split()
)
FUNCTIONAL = ("logsigmoid", "softplus", "relu", "sigmoid", "log_softmax", "softmax")
MATH = ("log", "exp", "sqrt", "log1p", "expm1")
OPERATORS = tuple(
    (
        "add sub mul truediv floordiv mod pow neg pos abs getitem lt le gt ge eq ne and_ or_ invert"
    ).split()
)
# Qualified names as the SDK sends them (torch.fx's, with _operator spelled operator).
FUNCTION_NAMES = frozenset(
    [f"torch.{n}" for n in TORCH_FUNCTIONS]
    + [f"torch.nn.functional.{n}" for n in FUNCTIONAL]
    + [f"math.{n}" for n in MATH]
    + [f"operator.{n}" for n in OPERATORS]
)

# torch.fx's own spellings of some of those functions (where they are defined), accepted too;
# engine/custom_loss.py checks at import that its interpreter resolves exactly these names.
FX_SPELLINGS = frozenset(
    [f"_operator.{n}" for n in OPERATORS] + ["torch._C._nn.log_sigmoid", "torch._C._nn.softplus"]
)
ALLOWED_FUNCTIONS = FUNCTION_NAMES | FX_SPELLINGS


class LossGraphError(ValueError):
    """The graph is not allowed or failed; the message is for the client."""


METHODS = frozenset(
    (
        "sum mean exp log log1p sigmoid tanh abs sqrt square neg clamp clip clamp_min "
        "clamp_max pow softmax log_softmax logsumexp max min amax amin cumsum var std prod "
        "view reshape unsqueeze squeeze flatten transpose permute t float double to detach "
        "size dim numel mul add sub div masked_fill where gather sign relu isfinite "
        "nan_to_num type_as bool long eq ne lt gt le ge any all dot matmul contiguous"
    ).split()
)
ATTRIBUTES = frozenset({"shape", "dtype", "ndim", "T", "mT"})


@dataclass(frozen=True)
class Node:
    op: str  # placeholder | call_function | call_method | output
    name: str
    target: str
    args: list[Any]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class LossGraph:
    """A custom loss as validated plain data."""

    name: str
    input_names: tuple[str, ...]  # "logprobs", then the loss_fn_inputs it reads
    input_ranks: tuple[int, ...]  # 0 scalar, 1 [T], 2 [T, K]
    nodes: tuple[Node, ...]


def parse_graph(
    name: str,
    inputs: list[dict[str, Any]],
    graph: dict[str, Any],
    functions: Collection[str] = ALLOWED_FUNCTIONS,
) -> LossGraph:
    """Structure and allowlist checks on the wire form; raises LossGraphError.

    `functions` are the allowed call_function targets.
    """
    if graph.get("format") != 1:
        raise LossGraphError("custom loss graph format must be 1")
    raw_nodes = graph.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise LossGraphError("custom loss graph has no nodes")
    if len(raw_nodes) > MAX_NODES:
        raise LossGraphError(f"custom loss graph has {len(raw_nodes)} nodes; at most {MAX_NODES}")
    names = tuple(str(i.get("name")) for i in inputs)
    ranks = tuple(i.get("rank") for i in inputs)
    if not names or names[0] != "logprobs" or any(r not in (0, 1, 2) for r in ranks):
        raise LossGraphError("inputs must start with logprobs and have ranks 0, 1 or 2")
    if len(set(names)) != len(names) or len(names) > 16:
        raise LossGraphError("inputs must be at most 16 distinct names")
    seen: set[str] = set()
    nodes = []
    placeholders = []
    for raw in raw_nodes:
        node = Node(
            op=str(raw.get("op")),
            name=str(raw.get("name")),
            target=str(raw.get("target")),
            args=list(raw.get("args") or []),
            kwargs=dict(raw.get("kwargs") or {}),
        )
        check_node(node, seen, functions)
        if node.op == "placeholder":
            placeholders.append(node.target)
        seen.add(node.name)
        nodes.append(node)
    if tuple(placeholders) != names:
        raise LossGraphError(f"graph parameters {placeholders} do not match inputs {list(names)}")
    if nodes[-1].op != "output":
        raise LossGraphError("the last node must be the output")
    return LossGraph(name=name, input_names=names, input_ranks=ranks, nodes=tuple(nodes))  # type: ignore[arg-type]


def check_node(node: Node, seen: set[str], functions: Collection[str]) -> None:
    if node.name in seen:
        raise LossGraphError(f"node name {node.name!r} repeats")
    if node.op == "call_function":
        if node.target == "builtins.getattr":
            attr = node.args[1] if len(node.args) == 2 else None
            if attr not in ATTRIBUTES:
                raise LossGraphError(f"attribute {attr!r} is not allowed in a custom loss")
        elif node.target not in functions:
            raise LossGraphError(f"function {node.target!r} is not allowed in a custom loss")
    elif node.op == "call_method":
        if node.target not in METHODS:
            raise LossGraphError(f"tensor method {node.target!r} is not allowed in a custom loss")
    elif node.op not in ("placeholder", "output"):
        raise LossGraphError(f"graph operation {node.op!r} is not allowed in a custom loss")
    for arg in [*node.args, *node.kwargs.values()]:
        check_arg(arg, seen, 0)


def check_arg(arg: Any, seen: set[str], depth: int) -> None:
    if depth > MAX_ARG_DEPTH:
        raise LossGraphError("arguments are nested too deeply")
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return
    if isinstance(arg, list):
        for a in arg:
            check_arg(a, seen, depth + 1)
        return
    if not (isinstance(arg, dict) and len(arg) == 1):
        raise LossGraphError(f"unrecognised argument {arg!r}")
    ((kind, value),) = arg.items()
    if kind == "ref":
        if value not in seen:
            raise LossGraphError(f"argument refers to {value!r} before it is defined")
    elif kind in ("tuple", "slice"):
        for a in value:
            check_arg(a, seen, depth + 1)
    elif kind == "dict":
        for a in value.values():
            check_arg(a, seen, depth + 1)
    elif kind == "float":
        if value not in ENCODED_FLOATS:
            raise LossGraphError(f"unrecognised float {value!r}")
    elif kind == "dtype":
        if value not in DTYPE_NAMES:
            raise LossGraphError(f"dtype {value!r} is not allowed")
    elif kind not in ("ellipsis", "device", "layout", "memory_format"):
        raise LossGraphError(f"unrecognised argument kind {kind!r}")
