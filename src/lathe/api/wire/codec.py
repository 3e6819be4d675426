"""Protobuf <-> engine messages, for the three payloads the SDK sends as protobuf.

Decoding checks everything that could make the engine misbehave (dtypes, shapes, lengths,
token ranges) and raises `WireError` with a message meant for the client.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from lathe.api.wire import tinker_wire_pb2 as pb
from lathe.protocol import messages as m

PROTOBUF = "application/x-protobuf"

DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
}


class WireError(ValueError):
    """The payload is malformed or inconsistent; the message says how."""


@dataclass(frozen=True)
class DecodedForwardBackward:
    model_id: str
    seq_id: int
    data: list[m.Datum]
    loss_fn: str
    loss_config: dict[str, float | str]
    forward_only: bool
    fingerprint: str  # hash of the canonical encoding: equal for a retried POST


def decode_forward_backward(body: bytes) -> DecodedForwardBackward:
    try:
        req = pb.ForwardBackwardRequest.FromString(body)
    except DecodeError as e:
        raise WireError(f"body is not a valid ForwardBackwardRequest protobuf: {e}") from None
    config: dict[str, float | str] = dict(req.loss_fn_config)
    for key, value in req.loss_fn_config_v2.items():  # v2 carries strings too and wins
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    data = [decode_datum(d, i) for i, d in enumerate(req.data)]
    return DecodedForwardBackward(
        model_id=req.model_id,
        seq_id=req.seq_id,
        data=data,
        loss_fn=req.loss_fn,
        loss_config=config,
        forward_only=req.forward_only,
        fingerprint=hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest(),
    )


def decode_datum(d: pb.Datum, index: int) -> m.Datum:
    tokens: list[int] = []
    for chunk in d.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise WireError(f"datum {index}: {kind or 'empty'} chunks are not supported")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise WireError(f"datum {index}: token bytes are not a whole number of int32")
        tokens.extend(np.frombuffer(raw, dtype="<i4").tolist())
    inputs = {}
    for name, tensor in d.loss_fn_inputs.items():
        arr = decode_tensor(tensor, f"datum {index} input {name!r}")
        if arr.ndim > 2:
            raise WireError(f"datum {index} input {name!r}: at most 2 dimensions, got {arr.shape}")
        inputs[name] = arr
    return m.Datum(tokens=tokens, loss_inputs=inputs)


def decode_tensor(t: pb.Tensor, what: str) -> np.ndarray:
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        name = pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else str(t.dtype)
        raise WireError(f"{what}: unsupported dtype {name}")
    shape = tuple(t.shape)
    if any(s < 0 for s in shape):
        raise WireError(f"{what}: negative dimension in shape {shape}")
    encoding = t.WhichOneof("encoding")
    if encoding == "sparse_csr":
        return decode_csr(t.sparse_csr, dtype, shape, what)
    raw = t.dense if encoding == "dense" else b""
    if len(raw) % dtype.itemsize:
        raise WireError(f"{what}: {len(raw)} bytes is not a whole number of {dtype.name}")
    arr = np.frombuffer(raw, dtype=dtype)
    if not shape:
        return arr.copy()  # the SDK omits shape for user-built 1-D tensors
    if math.prod(shape) != arr.size:
        raise WireError(f"{what}: shape {shape} does not match {arr.size} values")
    return arr.reshape(shape).copy()


def decode_csr(csr: pb.SparseCsr, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    if len(shape) != 2:
        raise WireError(f"{what}: sparse tensors must be 2-D, got shape {shape}")
    try:
        values = np.frombuffer(csr.values, dtype=dtype)
        crow = np.frombuffer(csr.crow_indices, dtype="<i8")
        col = np.frombuffer(csr.col_indices, dtype="<i8")
    except ValueError as e:
        raise WireError(f"{what}: malformed sparse tensor: {e}") from None
    dense = np.zeros(shape, dtype=dtype)
    try:
        fill_csr(dense, values, crow, col)
    except WireError as e:
        raise WireError(f"{what}: {e}") from None
    return dense


# --- results --------------------------------------------------------------------------------


def encode_forward_backward_output(result: m.ForwardBackwardResult) -> bytes:
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for start, stop in runs_of_same_layout(result.outputs):
        outputs = result.outputs[start:stop]
        record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(outputs))
        for name in outputs[0]:
            arrays = [np.ascontiguousarray(o[name], dtype="<f4") for o in outputs]
            offsets = np.zeros(len(arrays) + 1, dtype="<i8")
            offsets[1:] = np.cumsum([a.nbytes for a in arrays])
            record.fields[name].CopyFrom(
                pb.BatchedTensor(
                    data=b"".join(a.tobytes() for a in arrays),
                    offsets=offsets.tobytes(),
                    dtype=pb.DTYPE_FLOAT32,
                    trailing_shape=list(arrays[0].shape[1:]),
                )
            )
    for key, value in result.metrics.items():
        out.metrics[key] = value
    return out.SerializeToString()


def runs_of_same_layout(outputs: list[dict[str, np.ndarray]]) -> list[tuple[int, int]]:
    """Consecutive datums whose fields share names and trailing shapes go in one record."""

    def layout(o: dict[str, np.ndarray]) -> tuple:
        return tuple((k, v.shape[1:]) for k, v in o.items())

    runs: list[tuple[int, int]] = []
    for i, o in enumerate(outputs):
        if runs and layout(outputs[runs[-1][0]]) == layout(o):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def forward_backward_payload(result: m.ForwardBackwardResult) -> tuple[str, bytes]:
    """The retrieve_future answer for forward/forward_backward (a future finisher)."""
    return PROTOBUF, encode_forward_backward_output(result)


def sample_payload(result: m.SampleResult, target_layout: dict | None = None) -> tuple[str, bytes]:
    """The retrieve_future answer for sampling (a future finisher)."""
    return PROTOBUF, encode_sample_response(result, target_layout)


def encode_sample_response(result: m.SampleResult, target_layout: dict | None = None) -> bytes:
    out = pb.SampleResponse(prompt_cache_hit_tokens=result.prompt_cache_hit_tokens)
    for seq in result.sequences:
        msg = out.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq.tokens, dtype="<i4").tobytes(),
            logprobs=np.asarray(seq.logprobs, dtype="<f4").tobytes(),
        )
        if seq.topk is not None:
            msg.topk_sampled_logprobs.CopyFrom(encode_topk(seq.topk))
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(result.prompt_logprobs, dtype="<f4").tobytes()
    if result.prompt_topk is not None:
        out.topk_prompt_logprobs.CopyFrom(encode_topk(result.prompt_topk))
    if result.target_prompt_logprobs is not None:
        out.target_prompt_logprobs.CopyFrom(
            encode_like(result.target_prompt_logprobs, target_layout or {})
        )
    return out.SerializeToString()


def encode_topk(topk: m.TopK) -> pb.TopkLogprobs:
    n, k = topk.token_ids.shape
    return pb.TopkLogprobs(
        token_ids=np.ascontiguousarray(topk.token_ids, dtype="<i4").tobytes(),
        logprobs=np.ascontiguousarray(topk.logprobs, dtype="<f4").tobytes(),
        k=k,
        length=n,
    )


def decode_tensor_json(obj: dict, pad: float) -> tuple[np.ndarray, bool]:
    """A TensorData JSON object as a dense array (CSR cells not listed take `pad`).

    Returns (array, was_sparse).
    """
    dtype = {"int64": np.int64, "float32": np.float32}.get(obj.get("dtype", ""))
    if dtype is None:
        raise WireError(f"dtype must be int64 or float32, got {obj.get('dtype')!r}")
    try:
        data = np.asarray(obj.get("data", []), dtype=dtype)
        shape = tuple(int(x) for x in obj.get("shape") or [data.size])
    except (TypeError, ValueError) as e:
        raise WireError(f"malformed tensor: {e}") from None
    if data.ndim != 1 or any(d < 0 for d in shape) or math.prod(shape) > 1 << 26:
        raise WireError(f"malformed tensor of shape {shape}")
    if obj.get("sparse_crow_indices") is None:
        if data.size != math.prod(shape):
            raise WireError(f"shape {shape} does not match {data.size} values")
        return data.reshape(shape), False
    if len(shape) != 2:
        raise WireError("sparse tensors must be 2-D")
    crow = np.asarray(obj["sparse_crow_indices"], dtype=np.int64)
    col = np.asarray(obj.get("sparse_col_indices") or [], dtype=np.int64)
    dense = np.full(shape, pad, dtype=dtype)
    fill_csr(dense, data, crow, col)
    return dense, True


def fill_csr(dense: np.ndarray, values: np.ndarray, crow: np.ndarray, col: np.ndarray) -> None:
    rows, cols = dense.shape
    ok = (
        len(crow) == rows + 1
        and len(col) == len(values)
        and (len(crow) == 0 or (crow[0] == 0 and crow[-1] == len(values)))
        and np.all(np.diff(crow) >= 0)
        and (len(col) == 0 or (col.min() >= 0 and col.max() < cols))
    )
    if not ok:
        raise WireError(f"inconsistent sparse (CSR) indices for shape {dense.shape}")
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values


def encode_like(values: np.ndarray, layout: dict) -> pb.Tensor:
    """float32 `values` in the layout of the request's tensor: dense, or the same CSR cells."""
    shape = list(values.shape)
    if layout.get("sparse_crow_indices") is None:
        return pb.Tensor(
            dense=np.ascontiguousarray(values, dtype="<f4").tobytes(),
            dtype=pb.DTYPE_FLOAT32,
            shape=shape,
        )
    crow = np.asarray(layout["sparse_crow_indices"], dtype="<i8")
    col = np.asarray(layout.get("sparse_col_indices") or [], dtype="<i8")
    picked = values[np.repeat(np.arange(values.shape[0]), np.diff(crow)), col]
    csr = pb.SparseCsr(
        values=picked.astype("<f4").tobytes(),
        crow_indices=crow.tobytes(),
        col_indices=col.tobytes(),
    )
    return pb.Tensor(sparse_csr=csr, dtype=pb.DTYPE_FLOAT32, shape=shape)
