"""Data for the course's experiments, made on the spot or shipped with a package: nothing is
downloaded."""

from __future__ import annotations

import torch


def reversal_batch(batch_size, length=8, vocab_size=10, generator=None, device=None):
    """(inputs, targets), each (batch_size, length): random digits and the same digits reversed.

    Position i of the output must copy position length - 1 - i of the input: a task no
    position-wise layer can do alone, and one attention solves with a single pattern.
    """
    inputs = torch.randint(vocab_size, (batch_size, length), generator=generator)
    return inputs.to(device), inputs.flip(-1).to(device)


def sorting_batch(batch_size, length=8, vocab_size=10, generator=None, device=None):
    """(inputs, targets), each (batch_size, length): random digits and the same digits sorted.

    Output position i holds the i-th smallest digit: each position has to compare its digit
    with every other one, which is what attention does.
    """
    inputs = torch.randint(vocab_size, (batch_size, length), generator=generator)
    return inputs.to(device), inputs.sort(dim=-1).values.to(device)
