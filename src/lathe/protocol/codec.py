"""The bytes of every message on the channel between the API and an engine in its own process.

Each frame is a MessagePack array `[kind, ...]`; what follows the kind is fixed per kind and
typed by the dataclasses of protocol/messages.py, which msgspec checks field by field on the
way in (a frame that does not match its schema is refused with `msgspec.ValidationError`).
Nothing is pickled, so either side could be on another machine or in another language.

    API -> engine   ["work", request_id, tenant, request_type, request]
                    ["stop"]
    engine -> API   ["done", request_id, error, category, result_type, result]
                    (result_type SampleProgress: a streamed sample's progress, more follows)
                    ["status", status_dict, paused_request_ids]
    API -> service  ["hello"]   (a replica of a shared engine: "send me status")

The engine process reads its `EngineSpec` (one msgpack map) from standard input at start.
numpy arrays travel as [dtype, shape, raw bytes]; paths as strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from lathe.protocol import messages as m

# The one table of what may cross: message type name -> class.
REQUESTS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        m.CreateModelRequest,
        m.ForwardBackwardRequest,
        m.OptimStepRequest,
        m.SaveRequest,
        m.SnapshotRequest,
        m.LoadRequest,
        m.SkipRequest,
        m.CancelRequest,
        m.UnloadRequest,
        m.CreateSamplerRequest,
        m.SampleRequest,
        m.CheckLossRequest,
    )
}
RESULTS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        m.ForwardBackwardResult,
        m.OptimStepResult,
        m.SavedCheckpoint,
        m.SampleResult,
        m.SampleProgress,
        m.Empty,
    )
}


def _encode_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return (obj.dtype.str, list(obj.shape), np.ascontiguousarray(obj).tobytes())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot send {type(obj).__name__} to the engine")


def _decode_hook(kind: type, obj: Any) -> Any:
    if kind is np.ndarray:
        dtype, shape, raw = obj
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
    if kind is Path:
        return Path(obj)
    raise NotImplementedError(f"cannot receive {kind}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_hook)
_frame = msgspec.msgpack.Decoder(list[msgspec.Raw])
_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


def _decode_as(raw: msgspec.Raw, kind: Any) -> Any:
    if kind not in _decoders:
        _decoders[kind] = msgspec.msgpack.Decoder(kind, dec_hook=_decode_hook)
    return _decoders[kind].decode(raw)


def _str(raw: msgspec.Raw) -> str:
    return _decode_as(raw, str)


def encode_work(work: m.Work) -> bytes:
    name = type(work.request).__name__
    if name not in REQUESTS:
        raise TypeError(f"{name} is not a request the engine takes")
    return _encoder.encode(["work", work.request_id, work.tenant, name, work.request])


def encode_stop() -> bytes:
    return _encoder.encode(["stop"])


def encode_hello() -> bytes:
    return _encoder.encode(["hello"])


def encode_done(done: m.Done) -> bytes:
    result_type = type(done.result).__name__ if done.result is not None else ""
    return _encoder.encode(
        ["done", done.request_id, done.error, done.category, result_type, done.result]
    )


def encode_status(status: dict[str, Any], paused: frozenset[str]) -> bytes:
    return _encoder.encode(["status", status, sorted(paused)])


def decode(frame: bytes) -> tuple[str, Any]:
    """(kind, message): a Work for "work", a Done for "done", (status, paused) for "status"."""
    parts = _frame.decode(frame)
    kind = _str(parts[0])
    if kind == "work" and len(parts) == 5:
        request_type = _str(parts[3])
        if request_type not in REQUESTS:
            raise msgspec.ValidationError(f"unknown request type {request_type!r}")
        request = _decode_as(parts[4], REQUESTS[request_type])
        return kind, m.Work(_str(parts[1]), request, tenant=_str(parts[2]))
    if kind == "done" and len(parts) == 6:
        result_type = _str(parts[4])
        result = None
        if result_type:
            if result_type not in RESULTS:
                raise msgspec.ValidationError(f"unknown result type {result_type!r}")
            result = _decode_as(parts[5], RESULTS[result_type])
        error = _decode_as(parts[2], str | None)
        category = _decode_as(parts[3], m.Category)
        return kind, m.Done(_str(parts[1]), result=result, error=error, category=category)
    if kind == "status" and len(parts) == 3:
        paused = frozenset(_decode_as(parts[2], list[str]))
        return kind, (_decode_as(parts[1], dict[str, Any]), paused)
    if kind in ("stop", "hello") and len(parts) == 1:
        return kind, None
    raise msgspec.ValidationError(f"malformed {kind!r} frame")


def encode_value(value: Any) -> bytes:
    """Any value of the message types (numpy arrays included), e.g. results between ranks."""
    return _encoder.encode(value)


def decode_value(raw: bytes, kind: Any) -> Any:
    """What encode_value wrote, checked against the type `kind`."""
    return _decode_as(msgspec.Raw(raw), kind)


def encode_spec(spec: m.EngineSpec) -> bytes:
    return _encoder.encode(spec)


def decode_spec(raw: bytes) -> m.EngineSpec:
    return _decode_as(msgspec.Raw(raw), m.EngineSpec)
