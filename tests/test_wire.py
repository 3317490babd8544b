"""The grader reads what a sandbox sends as data only: round trips keep every tensor's
values, dtype, layout and flags, and a forged message is refused, never trusted."""

import json
import struct

import pytest
import torch

from transformer_course.grading.wire import WireError, decode, encode


def test_round_trip_keeps_values_layout_and_flags():
    view = torch.randn(3, 4, 5).transpose(0, 2)[1:]  # non-contiguous, offset into its storage
    sent = {
        "view": view,
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
        "meta": torch.empty(2, 3, device="meta"),
        "bool": torch.tensor([True, False]),
        "bfloat16": torch.randn(3, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "leaf": torch.randn(2, requires_grad=True),
        "plain": (None, 1.5, float("inf"), [True, 3, "s"], torch.float64, torch.device("cpu")),
    }
    got = decode(encode(sent))
    assert torch.equal(got["view"], view) and got["view"].stride() == view.stride()
    assert isinstance(got["parameter"], torch.nn.Parameter)
    assert got["meta"].is_meta and got["meta"].shape == (2, 3)
    assert torch.equal(got["bool"], sent["bool"]) and torch.equal(got["bfloat16"], sent["bfloat16"])
    assert got["empty"].shape == (0, 3)
    assert got["leaf"].requires_grad and got["leaf"].is_leaf
    assert got["plain"] == sent["plain"]


def _message(header, blobs=b""):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + blobs


FORGED = {
    "strides past the bytes": _message(
        {
            "body": {"tensor": 0, "dtype": "float32", "shape": [4], "stride": [100], "offset": 0},
            "blobs": [16],
        },
        bytes(16),
    ),  # fmt: skip
    "bytes that do not add up": _message({"body": None, "blobs": [64]}, bytes(8)),
    "an unknown dtype": _message(
        {"body": {"tensor": -1, "dtype": "object", "shape": [1], "stride": [1]}, "blobs": []}
    ),
    "a negative shape": _message(
        {"body": {"tensor": -1, "dtype": "float32", "shape": [-1], "stride": [1]}, "blobs": []}
    ),
    "a reference nobody can resolve": _message({"body": {"ref": 1}, "blobs": []}),
    "not JSON": struct.pack("<Q", 3) + b"{{{",
}


@pytest.mark.parametrize("message", FORGED.values(), ids=FORGED)
def test_a_forged_message_is_refused(message):
    with pytest.raises(WireError):
        decode(message)


def test_what_cannot_be_sent_is_refused_at_the_sender():
    with pytest.raises(TypeError, match="cannot be sent"):
        encode({"f": lambda: None})
