"""The bytes between the grader and a sandbox: JSON for structure, raw bytes for tensors.

No pickle crosses the pipe: unpickling what a learner's process sent would run its code in
the grader. A message is a JSON header followed by the bytes of each tensor's storage; the
reader checks every size, shape and stride against what actually arrived.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

MAX_MESSAGE = 2**31  # bytes: larger than any check's tensors, small enough to refuse floods
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )  # fmt: skip
}


class WireError(ValueError):
    """A message that is not what the protocol allows: a fault or a forgery by the sandbox."""


def encode(obj: Any, refs=None) -> bytes:
    """One message: obj may nest None, bool, int, float, str, list, tuple, dict (str keys),
    tensors, dtypes, devices, and what refs(obj) turns into those (None: it cannot be sent)."""
    blobs: list[bytes] = []

    def enc(o):
        if o is None or isinstance(o, (bool, int, str)):
            return o
        if isinstance(o, float):
            return o if math.isfinite(o) else {"float": repr(o)}
        if isinstance(o, torch.Tensor):
            return _tensor_header(o, blobs)
        if isinstance(o, torch.dtype):
            return {"dtype": str(o).removeprefix("torch.")}
        if isinstance(o, torch.device):
            return {"device": str(o)}
        if isinstance(o, tuple):
            return {"tuple": [enc(x) for x in o]}
        if isinstance(o, list):
            return [enc(x) for x in o]
        if isinstance(o, dict) and all(isinstance(k, str) for k in o):
            return {"dict": {k: enc(v) for k, v in o.items()}}
        plain = refs(o) if refs else None
        if plain is None:
            raise TypeError(f"a {type(o).__name__} cannot be sent to or from the sandbox")
        return {"ref": enc(plain)}

    header = json.dumps({"body": enc(obj), "blobs": [len(b) for b in blobs]}).encode()
    return b"".join([struct.pack("<Q", len(header)), header, *blobs])


def decode(data: bytes, refs=None) -> Any:
    """The inverse of encode; refs(plain) turns a reference back into an object."""
    if len(data) < 8:
        raise WireError("message too short")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as error:
        raise WireError(f"bad header: {error}") from None
    lengths = header.get("blobs", [])
    if sum(lengths) + 8 + n != len(data) or any(not isinstance(x, int) or x < 0 for x in lengths):
        raise WireError("the tensor bytes do not add up to the message")
    offsets = [8 + n]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    view = memoryview(data)

    def dec(o):
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        if isinstance(o, list):
            return [dec(x) for x in o]
        if not isinstance(o, dict) or len(o) < 1:
            raise WireError(f"unexpected {type(o).__name__}")
        if "tensor" in o:
            return _tensor(o, view, offsets)
        if "tuple" in o:
            return tuple(dec(x) for x in o["tuple"])
        if "dict" in o:
            return {str(k): dec(v) for k, v in o["dict"].items()}
        if "float" in o:
            return float(o["float"])
        if "dtype" in o:
            return _dtype(o["dtype"])
        if "device" in o:
            return torch.device(str(o["device"]))
        if "ref" in o and refs:
            return refs(dec(o["ref"]))
        raise WireError(f"unexpected entry {sorted(o)}")

    return dec(header.get("body"))


def _tensor_header(t: torch.Tensor, blobs: list[bytes]) -> dict:
    """A tensor as the bytes its view spans plus shape and strides, so that a view keeps its
    layout (a check may hand over a transposed, non-contiguous input on purpose)."""
    c = t.detach() if t.device.type == "meta" else t.detach().cpu()
    head = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(c.shape),
            "stride": list(c.stride()), "offset": 0, "device": str(t.device),
            "requires_grad": t.requires_grad, "parameter": isinstance(t, torch.nn.Parameter),
            "tensor": -1}  # fmt: skip
    if t.device.type != "meta":
        flat = c.as_strided((_span(c.shape, c.stride()),), (1,), c.storage_offset())
        head["tensor"] = len(blobs)
        blobs.append(flat.contiguous().view(torch.uint8).numpy().tobytes())
    return head


def _span(shape, stride) -> int:
    """How many storage elements a view of this layout reaches, from its first."""
    if 0 in shape:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))


def _dtype(name: Any) -> torch.dtype:
    if name not in DTYPES:
        raise WireError(f"unsupported dtype {name!r}")
    return DTYPES[name]


def _tensor(o: dict, view: memoryview, offsets: list[int]) -> torch.Tensor:
    dtype = _dtype(o.get("dtype"))
    shape, stride, offset = o.get("shape"), o.get("stride"), o.get("offset", 0)
    ints = [*shape, *stride, offset] if isinstance(shape, list) and isinstance(stride, list) else []
    if not ints or len(shape) != len(stride) or any(not isinstance(i, int) or i < 0 for i in ints):
        raise WireError("bad tensor layout")
    device = torch.device(str(o.get("device", "cpu")))
    i = o["tensor"]
    if device.type == "meta" or i == -1:
        t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    else:
        if not isinstance(i, int) or not 0 <= i < len(offsets) - 1:
            raise WireError("bad tensor index")
        raw = bytearray(view[offsets[i] : offsets[i + 1]])  # writable: torch owns a copy
        size = dtype.itemsize
        extent = offset + _span(shape, stride) if 0 not in shape else 0
        if len(raw) % size or len(raw) // size < extent:
            raise WireError("a tensor's strides reach past its bytes")
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        t = flat.as_strided(shape, stride, offset) if extent else torch.empty(shape, dtype=dtype)
        if device.type != "cpu":
            t = t.to(device)
    if o.get("parameter"):
        return torch.nn.Parameter(t, requires_grad=bool(o.get("requires_grad")))
    return t.requires_grad_(bool(o.get("requires_grad")) and t.is_floating_point())
