"""Checks for chapter 3: `sinusoidal_positional_encoding`, `SinusoidalPositionalEncoding`,
`LearnedPositionalEmbedding` and `apply_rotary_embedding`.

References are float64 closed forms written here, independently of the course's solutions:
the sinusoidal table as PE[pos, j] = sin(pos·ω_j + (j mod 2)·π/2), and RoPE as one explicit
block-diagonal rotation matrix per position, as in the RoFormer paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import model
from .core import (
    Case,
    CheckFailed,
    Exercise,
    Mistake,
    attempt,
    expect_close,
    expect_device,
    expect_on_meta,
    expect_shape,
    expect_value_error,
    on_meta,
    randn,
)


def table_atol(max_position: int) -> float:
    """Absolute tolerance on sin and cos of pos·ω computed in float32, for pos ≤ max_position.

    float32 rounds the angle pos·ω, and ω itself however it is computed (10000**(-2i/d),
    exp(-2i·ln(10000)/d), ...), to a relative 6e-8, so the error grows with the position.
    Correct float32 variants measure up to 8.2e-8·pos (8.2e-4 at position 10000); 3e-7·pos
    leaves a 3-4x margin, while each catalogued wrong table is off by 0.9 or more somewhere.
    float64 gets the same tolerance: a table built in float32 and then cast is correct (the
    module's buffer after .to(torch.float64) is one), so only float32 accuracy is asked for.
    """
    return 1e-6 + 3e-7 * max_position


# bfloat16 keeps 8 significant bits: below 8 in magnitude, x + PE is off by up to 1/64 from the
# rounding of the sum, plus up to 1/512 from the cast of the table.
BFLOAT16_ATOL = 5e-2


def _frequencies(dim):
    """ω_j for each column j: 10000^(-2i/dim) with i = j // 2, in float64."""
    j = torch.arange(dim, dtype=torch.float64)
    return 10000.0 ** (-(j - j % 2) / dim)


def reference_table(num_positions, dim):
    """PE[pos, j] = sin(pos·ω_j + (j mod 2)·π/2): sin in the even columns, cos in the odd."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    return torch.sin(pos * _frequencies(dim) + (j % 2) * (math.pi / 2))


def _rotations(positions, dim):
    """(L, dim, dim): 2x2 rotations by pos·ω_i on the diagonal, in float64 on the CPU."""
    theta = positions.double().cpu()[:, None] * _frequencies(dim)[0::2]  # (L, dim/2)
    c, s = theta.cos(), theta.sin()
    blocks = torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)  # (L, d/2, 2, 2)
    return torch.stack([torch.block_diag(*b) for b in blocks])


def reference_rope(x, positions=None):
    positions = torch.arange(x.shape[-2]) if positions is None else positions
    return (_rotations(positions, x.shape[-1]) @ x.double().cpu().unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------
# sinusoidal_positional_encoding. `_table` is correct with its defaults; each mistake turns
# one knob. Column j belongs to the pair i = j // 2, whose exponent is 2i/d = (j - j % 2)/d.


def _table(num_positions, dim, *, start=0, exponent=lambda j, d: (j - j % 2) / d, divide=True,
           layout="interleaved", dtype=torch.float32, check_dim=True, device=None):  # fmt: skip
    if check_dim and dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    pos = torch.arange(start, start + num_positions, dtype=dtype, device=device)[:, None]
    j = torch.arange(dim, dtype=dtype, device=device)
    scale = 10000.0 ** exponent(j, dim)
    angle = pos / scale if divide else pos * scale  # (P, dim): the angle of column j
    if layout == "halves":
        return torch.cat((angle[:, 0::2].sin(), angle[:, 0::2].cos()), dim=1)
    sin_first = layout == "interleaved"
    return torch.where((j % 2 == 0) == sin_first, angle.sin(), angle.cos())


TABLE_MISTAKES = (
    Mistake(
        "exponent_i_over_d",
        "the exponent is i/d with i counting the pairs (0, 1, 2, ...); in the paper's 2i/d, 2i is "
        "the column of the pair's sin, so the frequency of pair i is 10000^(-2i/d).",
        lambda n, d: _table(n, d, exponent=lambda j, d: (j // 2) / d),
    ),
    Mistake(
        "cos_uses_own_exponent",
        "column 2i+1 (the cos) uses the exponent (2i+1)/d; both columns of a pair share one "
        "frequency, 10000^(-2i/d), so that each pair is a point on one circle.",
        lambda n, d: _table(n, d, exponent=lambda j, d: j / d),
    ),
    Mistake(
        "halves_not_interleaved",
        "sin fills the first half of the columns and cos the second; the paper interleaves them: "
        "sin in the even columns 0, 2, 4, ..., cos in the odd columns 1, 3, 5, ...",
        lambda n, d: _table(n, d, layout="halves"),
    ),
    Mistake(
        "sin_cos_swapped",
        "cos is in the even columns and sin in the odd ones; PE[pos, 2i] is the sin.",
        lambda n, d: _table(n, d, layout="swapped"),
    ),
    Mistake(
        "positions_from_one",
        "the positions start at 1; the first row is position 0 (every sin 0, every cos 1).",
        lambda n, d: _table(n, d, start=1),
    ),
    Mistake(
        "multiplied_not_divided",
        "the position is multiplied by 10000^(2i/d) instead of divided by it: the frequencies "
        "must fall from 1 (columns 0 and 1) towards 1/10000, not grow.",
        lambda n, d: _table(n, d, divide=False),
    ),
    Mistake(
        "float64_table",
        "the table is float64 (numpy's default, or dtype=torch.float64); return float32.",
        lambda n, d: _table(n, d, dtype=torch.float64),
    ),
    Mistake(
        "odd_dim_accepted",
        "an odd dim is not rejected: sin and cos come in pairs, so check dim % 2 first and "
        'raise ValueError("dim must be even ...").',
        lambda n, d: _table(n, d, check_dim=False),
    ),
)
TABLE_MISTAKE = {m.id: m for m in TABLE_MISTAKES}


def _call_table(fn, num_positions, dim):
    def rerun(impl):
        return impl(num_positions, dim)

    what = f"table for num_positions={num_positions}, dim={dim}"
    table = attempt(rerun, fn, TABLE_MISTAKES, what)
    if isinstance(table, torch.Tensor) and table.dtype == torch.float64:
        raise CheckFailed(f"{what}: yours is float64, expected float32.",
                          TABLE_MISTAKE["float64_table"])  # fmt: skip
    expect_shape(what, table, (num_positions, dim), torch.float32)
    return table, rerun


def _compare_table(fn, num_positions, dim, reveal, expected=None):
    table, rerun = _call_table(fn, num_positions, dim)
    expected = reference_table(num_positions, dim) if expected is None else expected
    expect_close(
        f"table for num_positions={num_positions}, dim={dim}", table, expected.float(),
        atol=table_atol(num_positions - 1), rtol=0, reveal=reveal, rerun=rerun,
        mistakes=TABLE_MISTAKES,
    )  # fmt: skip


def _table_shapes(fn, reveal):
    for num_positions, dim in ((5, 8), (1, 2), (3, 10)):
        _call_table(fn, num_positions, dim)


def _table_by_hand(fn, reveal):
    # dim = 4: the frequencies are 1 and 10000^(-2/4) = 1/100, so row pos is
    # [sin(pos), cos(pos), sin(pos/100), cos(pos/100)]: row 0 is [0, 1, 0, 1], row 1 is
    # [0.8415, 0.5403, 0.0100, 0.99995], row 2 is [0.9093, -0.4161, 0.0200, 0.9998].
    table, rerun = _call_table(fn, 3, 4)
    for p in range(3):  # row by row, so that the feedback shows the values of a wrong row
        row = torch.tensor([math.sin(p), math.cos(p), math.sin(p / 100), math.cos(p / 100)])
        expect_close(f"row {p} (position {p}) of the table for num_positions=3, dim=4", table[p],
                     row, atol=1e-6, rtol=0, reveal=True, rerun=lambda impl, p=p: rerun(impl)[p],
                     mistakes=TABLE_MISTAKES)  # fmt: skip


def _table_closed_form(fn, reveal):
    _compare_table(fn, 50, 16, reveal)


def _table_many_sizes(fn, reveal):
    for n, dim in ((1, 2), (9, 2), (10, 6), (100, 10), (512, 64), (2048, 512), (10000, 8)):
        _compare_table(fn, n, dim, reveal)


def _table_odd_dim(fn, reveal):
    for dim in (1, 3, 7):
        expect_value_error(lambda d=dim: fn(4, d), f"dim={dim}", TABLE_MISTAKE["odd_dim_accepted"])


def _shift_map(k, dim):
    """M_k, with PE[pos + k] = M_k PE[pos]: per pair, [sin(a + b), cos(a + b)] with a = pos·ω,
    b = k·ω is [[cos b, sin b], [-sin b, cos b]] times [sin a, cos a]."""
    b = k * _frequencies(dim)[0::2]
    c, s = b.cos(), b.sin()
    return torch.block_diag(*torch.stack((torch.stack((c, s), -1), torch.stack((-s, c), -1)), -2))


def _table_rotation(fn, reveal):
    n, dim = 64, 16
    _call_table(fn, n, dim)
    for k in (1, 2, 7, 31):
        m = _shift_map(k, dim)

        def residual(impl, k=k, m=m):
            table = impl(n, dim).double()
            return table[k:] - table[:-k] @ m.T

        expect_close(
            f"PE[pos + {k}] - M_{k} PE[pos] for pos < {n - k} (M_{k}: 2x2 rotations by {k}·ω_i)",
            attempt(residual, fn, TABLE_MISTAKES), torch.zeros(n - k, dim, dtype=torch.float64),
            atol=3 * table_atol(n), rtol=0, reveal=reveal, rerun=residual, mistakes=TABLE_MISTAKES,
        )  # fmt: skip


SINUSOIDAL_POSITIONAL_ENCODING = Exercise(
    "sinusoidal_positional_encoding",
    (
        Case("returns a float32 tensor of shape (num_positions, dim)", "visible", _table_shapes),
        Case("the hand-checkable table (3 positions, dim 4)", "visible", _table_by_hand),
        Case("agrees with the float64 closed form (50 x 16)", "visible", _table_closed_form),
        Case("many sizes, dim = 2 and positions up to 9999", "hidden", _table_many_sizes),
        Case("an odd dim raises ValueError", "hidden", _table_odd_dim),
        Case("PE[pos + k] is a fixed rotation M_k of PE[pos]", "hidden", _table_rotation),
    ),
    TABLE_MISTAKES,
    reference=model.sinusoidal_positional_encoding,
)


# ---------------------------------------------------------------------------------------
# SinusoidalPositionalEncoding. `_Encoding` is correct; each mistake overrides one step.


class _Encoding(nn.Module):
    make_table = staticmethod(_table)

    def __init__(self, dim, max_len=5000, dropout=0.0):
        super().__init__()
        self.dropout, self.max_len = nn.Dropout(dropout), max_len
        self.store(self.make_table(max_len, dim))

    def store(self, table):
        self.register_buffer("pe", table)

    def rows(self, x):  # PE[:L], (L, dim), in x's dtype
        return self.pe[: x.shape[1]].to(x.dtype)

    def add(self, x):
        if x.shape[1] > self.max_len:
            raise ValueError(f"sequence length {x.shape[1]} > max_len {self.max_len}")
        return x + self.rows(x)

    def forward(self, x):
        return self.dropout(self.add(x))


class _ParameterTable(_Encoding):
    def store(self, table):
        self.pe = nn.Parameter(table)


class _PlainAttribute(_Encoding):
    def store(self, table):
        self.pe = table


class _NotPersistent(_Encoding):
    def store(self, table):
        self.register_buffer("pe", table, persistent=False)


class _NoBuffer(_Encoding):
    def store(self, table):
        pass

    def rows(self, x):
        return _table(x.shape[1], x.shape[2], device=x.device).to(x.dtype)


class _TableOnCpuInForward(_NoBuffer):
    def rows(self, x):
        return _table(x.shape[1], x.shape[2]).to(x.dtype)


class _SequenceFirst(_Encoding):
    def store(self, table):  # PyTorch's tutorial: (max_len, 1, dim), for x of shape (L, B, dim)
        self.register_buffer("pe", table[:, None, :])

    def rows(self, x):
        return self.pe[: x.size(0)].to(x.dtype)


class _NoCast(_Encoding):
    def rows(self, x):
        return self.pe[: x.shape[1]]


class _NoLengthCheck(_Encoding):
    def add(self, x):
        return x + self.rows(x)


class _DropoutInEval(_Encoding):
    def forward(self, x):
        return F.dropout(self.add(x), self.dropout.p)


class _DropoutIgnored(_Encoding):
    def forward(self, x):
        return self.add(x)


class _DropoutBeforeAdding(_Encoding):
    def forward(self, x):
        return self.add(self.dropout(x))


def _with_table(mistake):
    cls = type(f"_Encoding_{mistake.id}", (_Encoding,), {"make_table": staticmethod(mistake.impl)})
    return Mistake(f"module_{mistake.id}", "the table is wrong: " + mistake.explanation, cls)


ENCODING_MISTAKES = (
    Mistake(
        "parameter_not_buffer",
        "the table is an nn.Parameter, so the optimizer would train it. It is fixed: "
        "self.register_buffer('pe', table) makes it part of the module without training it.",
        _ParameterTable,
    ),
    Mistake(
        "plain_attribute",
        "the table is a plain attribute (self.pe = table): module.to(device) and .double() leave "
        "it behind and state_dict() misses it. Use self.register_buffer('pe', table).",
        _PlainAttribute,
    ),
    Mistake(
        "buffer_not_persistent",
        "the buffer is registered with persistent=False, so state_dict() misses it; keep "
        "persistent at its default, True.",
        _NotPersistent,
    ),
    Mistake(
        "no_buffer",
        "the table is rebuilt in every forward call; build it once in __init__ for max_len "
        "positions, register it as a buffer, and add its first L rows in forward.",
        _NoBuffer,
    ),
    Mistake(
        "table_on_cpu_in_forward",
        "forward builds a table on the CPU (without device=x.device) and adds it to x, which fails "
        "for x on a GPU. Add rows of the registered buffer instead: it moves with the module.",
        _TableOnCpuInForward,
    ),
    Mistake(
        "sequence_first",
        "the table is sliced with x.size(0), the batch size, as in PyTorch's tutorial, where x is "
        "(L, B, dim). Here x is (B, L, dim): add the first x.size(1) rows.",
        _SequenceFirst,
    ),
    Mistake(
        "dtype_promoted",
        "x + table promotes a bfloat16 (or float16) x to the table's float32; cast the rows "
        "with .to(x.dtype) before adding them.",
        _NoCast,
    ),
    Mistake(
        "no_length_check",
        "a sequence longer than max_len is not rejected: slicing quietly returns fewer rows. "
        "Compare L with max_len and raise a ValueError that says so.",
        _NoLengthCheck,
    ),
    Mistake(
        "dropout_in_eval",
        "dropout still drops in eval mode: F.dropout(x, p) defaults to training=True. Use an "
        "nn.Dropout module, or pass training=self.training.",
        _DropoutInEval,
    ),
    Mistake("dropout_ignored", "the dropout argument is not used.", _DropoutIgnored),
    Mistake(
        "dropout_before_adding",
        "dropout is applied to x before PE is added; apply it to the sum, x + PE.",
        _DropoutBeforeAdding,
    ),
    *(_with_table(TABLE_MISTAKE[name]) for name in ("exponent_i_over_d", "cos_uses_own_exponent",
      "halves_not_interleaved", "sin_cos_swapped", "positions_from_one", "multiplied_not_divided")),
)  # fmt: skip
ENCODING_MISTAKE = {m.id: m for m in ENCODING_MISTAKES}


def _expect_buffer(module, max_len, dim):
    """The table must be a registered buffer, not a parameter nor a plain attribute."""
    params = [name for name, _ in module.named_parameters()]
    if params:
        raise CheckFailed(f"Your module has parameters {params}; the table should be a buffer.",
                          ENCODING_MISTAKE["parameter_not_buffer"])  # fmt: skip
    tables = [b for b in module.buffers() if b.is_floating_point() and b.numel() == max_len * dim]
    if tables:
        return tables[0]
    plain = [n for m in module.modules() for n, v in vars(m).items() if torch.is_tensor(v)]
    if plain:
        raise CheckFailed(f"self.{plain[0]} is a plain tensor attribute, not a buffer.",
                          ENCODING_MISTAKE["plain_attribute"])  # fmt: skip
    raise CheckFailed(f"No registered buffer holds a table of {max_len} x {dim} values.",
                      ENCODING_MISTAKE["no_buffer"])  # fmt: skip


def _moved(module, device):
    """module.to(device); a tensor attribute left behind is not registered."""
    module = module.to(device)
    for m in module.modules():
        for name, value in vars(m).items():
            if torch.is_tensor(value) and value.device.type != device:
                raise CheckFailed(f"module.to({device!r}) left self.{name} on {value.device}.",
                                  ENCODING_MISTAKE["plain_attribute"])  # fmt: skip
    return module


def _encode(cls, x, max_len=5000, dropout=0.0, mode=None, dtype=None):
    """The learner's module on x, and its rerun for diagnosis. Dropout draws from a fixed seed,
    so a mistake that drops the same tensor as the learner's code drops the same entries."""

    def rerun(impl):
        module = impl(x.shape[-1], max_len=max_len, dropout=dropout).to(dtype=dtype)
        if mode is not None:
            module.train(mode == "train")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _moved(module, x.device.type)(x.clone())

    return attempt(rerun, cls, ENCODING_MISTAKES, f"x {tuple(x.shape)}, max_len={max_len}"), rerun


def _compare_encoding(cls, x, reveal, what, expected=None, **kwargs):
    out, rerun = _encode(cls, x, **kwargs)
    expect_device("Your output", out, x.device.type)
    if isinstance(out, torch.Tensor) and out.dtype == torch.float32 != x.dtype:
        raise CheckFailed(f"{what}: yours is float32 for a {x.dtype} x.",
                          ENCODING_MISTAKE["dtype_promoted"])  # fmt: skip
    if expected is None:
        expected = (x.double().cpu() + reference_table(x.shape[1], x.shape[2])).to(x.dtype)
    atol = BFLOAT16_ATOL if x.dtype == torch.bfloat16 else table_atol(x.shape[1])
    expect_close(what, out, expected, atol=atol, rtol=0, reveal=reveal, rerun=rerun,
                 mistakes=ENCODING_MISTAKES)  # fmt: skip
    return out


def _encoding_shape(cls, reveal):
    out, _ = _encode(cls, randn(2, 10, 16, seed=300))
    expect_shape("output for x of shape (2, 10, 16)", out, (2, 10, 16), torch.float32)


def _encoding_adds(cls, reveal):
    _compare_encoding(cls, randn(3, 7, 16, seed=301), reveal, "x + PE[:7] for x (3, 7, 16)")


def _encoding_buffer(cls, reveal):
    _expect_buffer(cls(16, max_len=100), 100, 16)


def _encoding_lengths(cls, reveal):
    for i, (b, n, dim, max_len) in enumerate(((1, 1, 2, 5), (4, 9, 6, 9), (2, 33, 10, 100),
                                              (1, 5000, 8, 5000))):  # fmt: skip
        x = randn(b, n, dim, seed=310 + i)
        _compare_encoding(cls, x, reveal, f"x {tuple(x.shape)}, max_len={max_len}", max_len=max_len)


def _encoding_state(cls, reveal):
    module = cls(8, max_len=20)
    _expect_buffer(module, 20, 8)
    if not any(v.numel() == 160 and v.is_floating_point() for v in module.state_dict().values()):
        raise CheckFailed("state_dict() has no entry with the 20 x 8 table.",
                          ENCODING_MISTAKE["buffer_not_persistent"])  # fmt: skip
    dtype = _expect_buffer(module.to(torch.float64), 20, 8).dtype
    if dtype != torch.float64:
        raise CheckFailed(f"After module.to(torch.float64) the table is {dtype}.")


def _encoding_float64(cls, reveal):
    x = randn(2, 12, 8, seed=320, dtype=torch.float64)
    _compare_encoding(cls, x, reveal, "float64 module and x", max_len=50, dtype=torch.float64)


def _encoding_bfloat16(cls, reveal):
    x = randn(2, 6, 8, seed=321, dtype=torch.bfloat16)
    _compare_encoding(cls, x, reveal, "float32 module, bfloat16 x", max_len=50)


def _encoding_too_long(cls, reveal):
    _compare_encoding(cls, randn(2, 10, 8, seed=322), reveal, "L = max_len = 10", max_len=10)
    expect_value_error(lambda: cls(8, max_len=10)(randn(2, 11, 8, seed=323)),
                        "L = 11 > max_len = 10", ENCODING_MISTAKE["no_length_check"])  # fmt: skip


def _encoding_eval(cls, reveal):
    x = randn(2, 10, 16, seed=330)
    _compare_encoding(
        cls, x, reveal, "eval mode, dropout=0.5", max_len=50, dropout=0.5, mode="eval"
    )


def _encoding_train(cls, reveal):
    x = randn(4, 10, 16, seed=331) + 3.0  # so that no x + PE is 0
    out, _ = _encode(cls, x, max_len=50, dropout=0.5, mode="train")
    expect_shape("output in training mode", out, x.shape, x.dtype)
    # What nn.Dropout does: each entry is 0 (dropped) or 2·(x + PE) (kept, scaled by 1/(1 - p)).
    kept = out != 0
    expected = torch.where(kept, 2 * (x + reference_table(10, 16).float()), 0.0)
    _compare_encoding(cls, x, reveal, "training mode, dropout=0.5: each entry 0 or 2·(x + PE)",
                      expected, max_len=50, dropout=0.5, mode="train")  # fmt: skip
    if not 0.3 < kept.double().mean() < 0.7:
        raise CheckFailed(f"With dropout=0.5, {1 - kept.double().mean():.0%} of the entries are "
                          "zero in training mode; expected about half.")  # fmt: skip


def _encoding_on_device(device):
    def run(cls, reveal):
        if device != "meta":
            x = randn(2, 7, 8, seed=340).to(device)
            return _compare_encoding(cls, x, reveal, f"on {device}", max_len=50)
        x = torch.empty(2, 7, 8, device="meta")

        def call(impl):
            return _moved(impl(8, max_len=50), "meta")(x)

        out = attempt(on_meta(call), cls, ENCODING_MISTAKES, "module and x on the meta device")
        expect_on_meta("output", out, (2, 7, 8))

    return run


SINUSOIDAL_POSITIONAL_ENCODING_MODULE = Exercise(
    "sinusoidal_positional_encoding_module",
    (
        Case("output shape and dtype", "visible", _encoding_shape),
        Case("adds the encoding: x + PE[:L]", "visible", _encoding_adds),
        Case("the table is a registered buffer, not a parameter", "visible", _encoding_buffer),
        Case("lengths from 1 to max_len, batch ≠ L", "hidden", _encoding_lengths),
        Case("in state_dict, not in parameters(), follows .to(float64)", "hidden", _encoding_state),
        Case("float64 module and input", "hidden", _encoding_float64),
        Case("a bfloat16 x keeps its dtype", "hidden", _encoding_bfloat16),
        Case("L > max_len raises ValueError", "hidden", _encoding_too_long),
        Case("eval mode: x + PE, even with dropout=0.5", "hidden", _encoding_eval),
        Case("training mode: dropout=0.5 drops about half", "hidden", _encoding_train),
        Case("creates nothing on the CPU (meta device)", "hidden", _encoding_on_device("meta"),
             "meta"),
        Case("runs on CUDA", "hidden", _encoding_on_device("cuda"), "cuda"),
    ),
    ENCODING_MISTAKES,
    reference=model.SinusoidalPositionalEncoding,
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# LearnedPositionalEmbedding. `_Learned` is correct; each mistake overrides one step.


class _Learned(nn.Module):
    def __init__(self, max_len, dim):
        super().__init__()
        self.embedding = nn.Embedding(max_len, dim)

    def positions(self, x):
        return torch.arange(x.shape[1], device=x.device)

    def lookup(self, x):
        return self.embedding(self.positions(x))

    def forward(self, x):
        if x.shape[1] > self.embedding.num_embeddings:
            raise ValueError(f"sequence length {x.shape[1]} > max_len")
        return x + self.lookup(x)


class _OwnParameter(_Learned):
    def __init__(self, max_len, dim):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.randn(max_len, dim))

    def forward(self, x):
        return x + self.weight[: x.shape[1]]


class _ArgsSwapped(_Learned):
    def __init__(self, max_len, dim):
        super().__init__(dim, max_len)


class _LearnedFromOne(_Learned):
    def positions(self, x):
        return torch.arange(1, x.shape[1] + 1, device=x.device)


class _PositionsOnCpu(_Learned):
    def positions(self, x):
        return torch.arange(x.shape[1])


class _LearnedNoLengthCheck(_Learned):
    def forward(self, x):
        return x + self.lookup(x)


class _Detached(_Learned):
    def lookup(self, x):
        return super().lookup(x).detach()


LEARNED_MISTAKES = (
    Mistake(
        "no_embedding_module",
        "the table is a bare nn.Parameter; the exercise asks for an nn.Embedding(max_len, dim), "
        "looked up with the positions 0, 1, ..., L-1.",
        _OwnParameter,
    ),
    Mistake(
        "embedding_args_swapped",
        "nn.Embedding(dim, max_len): its arguments are (number of rows, size of a row), so one "
        "row per position is nn.Embedding(max_len, dim).",
        _ArgsSwapped,
    ),
    Mistake(
        "learned_positions_from_one",
        "the positions start at 1; the first token is position 0, row 0 of the embedding.",
        _LearnedFromOne,
    ),
    Mistake(
        "learned_positions_on_cpu",
        "the positions are made with torch.arange(L) without device=x.device: looking up a GPU "
        "embedding with CPU positions fails.",
        _PositionsOnCpu,
    ),
    Mistake(
        "learned_no_length_check",
        "a sequence longer than max_len is not rejected with a ValueError. Looking up a missing "
        "row is an IndexError on the CPU, and on a GPU an assert that breaks the whole session.",
        _LearnedNoLengthCheck,
    ),
    Mistake(
        "embedding_detached",
        "the result is cut off from autograd (.detach(), .data or torch.no_grad()), so the "
        "position vectors would never be trained.",
        _Detached,
    ),
)
LEARNED_MISTAKE = {m.id: m for m in LEARNED_MISTAKES}


def _build_learned(cls, max_len, dim, weight):
    """The learner's module, with `weight` copied into its one nn.Embedding."""
    module = cls(max_len, dim)
    found = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if len(found) != 1:
        raise CheckFailed(f"Your module has {len(found)} nn.Embedding submodules; expected one.",
                          None if found else LEARNED_MISTAKE["no_embedding_module"])  # fmt: skip
    shape = tuple(found[0].weight.shape)
    if shape != (max_len, dim):
        swapped = LEARNED_MISTAKE["embedding_args_swapped"] if shape == (dim, max_len) else None
        raise CheckFailed(f"For max_len={max_len}, dim={dim} the embedding's weight has shape "
                          f"{shape}, expected {(max_len, dim)}.", swapped)  # fmt: skip
    module = module.to(weight.dtype)
    with torch.no_grad():
        found[0].weight.copy_(weight)
    return module, found[0]


def _compare_learned(cls, x, max_len, reveal, what):
    weight = randn(max_len, x.shape[-1], seed=400, dtype=x.dtype)

    def rerun(impl):
        return _build_learned(impl, max_len, x.shape[-1], weight)[0].to(x.device)(x.clone())

    out = attempt(rerun, cls, LEARNED_MISTAKES, f"x {tuple(x.shape)}, max_len={max_len}")
    expect_device("Your output", out, x.device.type)
    expected = (x.double().cpu() + weight.double()[: x.shape[1]]).to(x.dtype)
    expect_close(what, out, expected, atol=1e-6, rtol=1e-6, reveal=reveal, rerun=rerun,
                 mistakes=LEARNED_MISTAKES)  # fmt: skip


def _learned_structure(cls, reveal):
    _build_learned(cls, 12, 6, randn(12, 6, seed=0))


def _learned_adds(cls, reveal):
    _compare_learned(cls, randn(3, 5, 8, seed=401), 12, reveal, "x + embedding(0..4), x (3, 5, 8)")


def _learned_lengths(cls, reveal):
    for i, (b, n, dim, max_len) in enumerate(((1, 1, 4, 1), (2, 7, 3, 7), (4, 30, 16, 64))):
        x = randn(b, n, dim, seed=410 + i)
        _compare_learned(cls, x, max_len, reveal, f"x {tuple(x.shape)}, max_len={max_len}")


def _learned_float64(cls, reveal):
    x = randn(2, 6, 8, seed=420, dtype=torch.float64)
    _compare_learned(cls, x, 10, reveal, "float64 module and x")


def _learned_too_long(cls, reveal):
    module, _ = _build_learned(cls, 10, 8, randn(10, 8, seed=0))
    expect_value_error(lambda: module(randn(2, 11, 8, seed=421)), "L = 11 > max_len = 10",
                        LEARNED_MISTAKE["learned_no_length_check"])  # fmt: skip


def _learned_gradients(cls, reveal):
    module, embedding = _build_learned(cls, 10, 8, randn(10, 8, seed=0))
    x, g = randn(3, 6, 8, seed=430).requires_grad_(), randn(3, 6, 8, seed=431)
    out = module(x)
    if out.requires_grad:
        (out * g).sum().backward()
    if embedding.weight.grad is None:
        raise CheckFailed("No gradient reached the embedding's weight.",
                          LEARNED_MISTAKE["embedding_detached"])  # fmt: skip
    expected = torch.cat((g.sum(0), torch.zeros(4, 8)))  # rows 6..9 are never looked up
    expect_close("gradient of the embedding's weight", embedding.weight.grad, expected,
                 atol=1e-6, rtol=1e-6, reveal=reveal)  # fmt: skip


def _learned_on_device(device):
    def run(cls, reveal):
        if device != "meta":
            x = randn(2, 7, 8, seed=440).to(device)
            return _compare_learned(cls, x, 12, reveal, f"on {device}")
        weight, x = randn(12, 8, seed=0), torch.empty(2, 7, 8, device="meta")

        def call(impl):
            return _build_learned(impl, 12, 8, weight)[0].to("meta")(x)

        out = attempt(on_meta(call), cls, LEARNED_MISTAKES, "module and x on the meta device")
        expect_on_meta("output", out, (2, 7, 8))

    return run


LEARNED_POSITIONAL_EMBEDDING = Exercise(
    "learned_positional_embedding",
    (
        Case("has one nn.Embedding(max_len, dim)", "visible", _learned_structure),
        Case("adds the embedding of positions 0..L-1", "visible", _learned_adds),
        Case("lengths from 1 to max_len", "hidden", _learned_lengths),
        Case("float64 module and input", "hidden", _learned_float64),
        Case("L > max_len raises ValueError", "hidden", _learned_too_long),
        Case("gradients reach the embedding", "hidden", _learned_gradients),
        Case("creates nothing on the CPU (meta device)", "hidden", _learned_on_device("meta"),
             "meta"),
        Case("runs on CUDA", "hidden", _learned_on_device("cuda"), "cuda"),
    ),
    LEARNED_MISTAKES,
    reference=model.LearnedPositionalEmbedding,
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# apply_rotary_embedding. `_rope` is correct with its defaults; each mistake turns one knob.


def _rope(x, positions=None, *, pairs="adjacent", sign=1.0, exponent=lambda i, d: 2 * i / d,
          start=0, use_positions=True, on_device=True, length_dim=-2, table_dtype=torch.float32,
          check_dim=True, in_place=False):  # fmt: skip
    d = x.shape[-1]
    if check_dim and d % 2:
        raise ValueError(f"dim must be even, got {d}")
    device = x.device if on_device else None
    if positions is None or not use_positions:
        positions = torch.arange(start, start + x.shape[length_dim], device=device)
    i = torch.arange(d // 2, dtype=table_dtype, device=device)
    angle = sign * positions.to(table_dtype)[:, None] / 10000.0 ** exponent(i, d)  # (L, d/2)
    cos, sin = angle.cos(), angle.sin()
    if table_dtype == torch.float32:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if pairs == "halves":  # GPT-NeoX: x[i] pairs with x[i + d/2]
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    if pairs == "repeated_frequencies":  # cos and sin laid out [ω0, ω1, ..., ω0, ω1, ...]
        turned = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return x * cos.repeat(1, 2) + turned * sin.repeat(1, 2)
    a, b = x[..., 0::2], x[..., 1::2]
    new_a, new_b = a * cos - b * sin, a * sin + b * cos
    if in_place:
        x[..., 0::2], x[..., 1::2] = new_a, new_b
        return x
    return torch.stack((new_a, new_b), dim=-1).flatten(-2)


ROPE_MISTAKES = (
    Mistake(
        "rope_halves",
        "x[..., i] is paired with x[..., i + dim/2] (the 'rotate_half' layout of GPT-NeoX and "
        "LLaMA in transformers); this exercise rotates adjacent pairs (x[..., 2i], x[..., 2i+1]).",
        lambda x, p=None: _rope(x, p, pairs="halves"),
    ),
    Mistake(
        "rope_wrong_sign",
        "the pairs are turned by -θ: (a, b) must become (a cos θ - b sin θ, a sin θ + b cos θ).",
        lambda x, p=None: _rope(x, p, sign=-1.0),
    ),
    Mistake(
        "rope_repeated_frequencies",
        "cos and sin are laid out [ω0, ω1, ..., ω0, ω1, ...] (torch.cat or .repeat), but both "
        "entries of pair i need ω_i: [ω0, ω0, ω1, ω1, ...] (.repeat_interleave(2)).",
        lambda x, p=None: _rope(x, p, pairs="repeated_frequencies"),
    ),
    Mistake(
        "rope_exponent_i_over_d",
        "the frequency of pair i is 10000^(-i/d); it is 10000^(-2i/d).",
        lambda x, p=None: _rope(x, p, exponent=lambda i, d: i / d),
    ),
    Mistake(
        "rope_positions_from_one",
        "the default positions start at 1; they are 0, 1, ..., L-1.",
        lambda x, p=None: _rope(x, p, start=1),
    ),
    Mistake(
        "rope_positions_ignored",
        "the positions argument is ignored: when it is given, turn row l by positions[l]·ω.",
        lambda x, p=None: _rope(x, p, use_positions=False),
    ),
    Mistake(
        "rope_length_from_dim_1",
        "the length is read from x.shape[1], which is L only for 3-D x: use x.shape[-2].",
        lambda x, p=None: _rope(x, p, length_dim=1),
    ),
    Mistake(
        "rope_positions_on_cpu",
        "the positions (or frequencies) are made without device=x.device, so the code fails for x "
        "on a GPU.",
        lambda x, p=None: _rope(x, p, on_device=False),
    ),
    Mistake(
        "rope_float64_tables",
        "cos and sin are float64 (numpy, or dtype=torch.float64), which promotes a float32 x to "
        "float64; cast them to x.dtype.",
        lambda x, p=None: _rope(x, p, table_dtype=torch.float64),
    ),
    Mistake(
        "rope_odd_dim_accepted",
        'an odd dim is not rejected: check dim % 2 first and raise ValueError("dim must be even").',
        lambda x, p=None: _rope(x, p, check_dim=False),
    ),
    Mistake(
        "rope_modifies_input",
        "x is changed in place (x[..., 0::2] = ...); build a new tensor, the caller still needs x.",
        lambda x, p=None: _rope(x, p, in_place=True),
    ),
)
ROPE_MISTAKE = {m.id: m for m in ROPE_MISTAKES}


def _call_rope(fn, x, positions=None):
    def rerun(impl):
        return impl(x.clone()) if positions is None else impl(x.clone(), positions.clone())

    where = f"x {tuple(x.shape)}, {'default' if positions is None else 'given'} positions"
    out = attempt(rerun, fn, ROPE_MISTAKES, where)
    if isinstance(out, torch.Tensor) and out.dtype == torch.float64 != x.dtype:
        raise CheckFailed(f"For x {tuple(x.shape)}, {x.dtype}, yours is float64.",
                          ROPE_MISTAKE["rope_float64_tables"])  # fmt: skip
    return out, rerun


def _compare_rope(fn, x, reveal, what, positions=None):
    out, rerun = _call_rope(fn, x, positions)
    expect_device("Your output", out, x.device.type)
    max_position = x.shape[-2] - 1 if positions is None else int(positions.max())
    pair_norm = x.double().cpu().unflatten(-1, (-1, 2)).norm(dim=-1).max().item()
    expected = reference_rope(x, None if positions is None else positions.cpu()).to(x.dtype)
    expect_close(
        what, out, expected, atol=table_atol(max_position) * max(pair_norm, 1.0), rtol=0,
        reveal=reveal, rerun=rerun, mistakes=ROPE_MISTAKES,
    )  # fmt: skip


def _rope_shape(fn, reveal):
    out, _ = _call_rope(fn, randn(2, 5, 8, seed=500))
    expect_shape("output for x of shape (2, 5, 8)", out, (2, 5, 8), torch.float32)


def _rope_by_hand(fn, reveal):
    # dim = 4: the frequencies are 1 and 1/100. Every row of x is [1, 0, 1, 0], so the row at
    # position p turns into [cos p, sin p, cos(p/100), sin(p/100)].
    out, rerun = _call_rope(fn, torch.tensor([[[1.0, 0.0, 1.0, 0.0]] * 3]))
    for p in range(3):
        row = torch.tensor([math.cos(p), math.sin(p), math.cos(p / 100), math.sin(p / 100)])
        expect_close(f"x[0, {p}] = [1, 0, 1, 0] turned at position {p}", out[0, p], row,
                     atol=1e-6, rtol=0, reveal=True, rerun=lambda impl, p=p: rerun(impl)[0, p],
                     mistakes=ROPE_MISTAKES)  # fmt: skip


def _rope_closed_form(fn, reveal):
    _compare_rope(fn, randn(2, 6, 8, seed=501), reveal, "x (2, 6, 8)")


def _expect_norms(fn, x, reveal, positions=None):
    out, rerun = _call_rope(fn, x, positions)
    expect_shape("output", out, x.shape, x.dtype)

    def norms(impl):
        return rerun(impl).double().norm(dim=-1)

    expect_close(
        f"norm of each vector, x {tuple(x.shape)}", norms(fn), x.double().norm(dim=-1),
        atol=1e-6, rtol=1e-5, reveal=reveal, rerun=norms, mistakes=ROPE_MISTAKES,
    )  # fmt: skip


def _rope_norms_small(fn, reveal):
    _expect_norms(fn, randn(2, 5, 8, seed=502), reveal)


def _rope_shapes(fn, reveal):
    for i, shape in enumerate(((6, 8), (2, 3, 5, 4), (2, 1, 3, 4, 6), (3, 2), (1, 2048, 16))):
        _compare_rope(fn, randn(*shape, seed=510 + i), reveal, f"x {shape}")


def _rope_float64(fn, reveal):
    _compare_rope(fn, randn(2, 7, 10, seed=520, dtype=torch.float64), reveal, "float64 x")


def _rope_positions(fn, reveal):
    positions = torch.tensor([7, 0, 3, 100, 2047])
    _compare_rope(fn, randn(2, 5, 8, seed=521), reveal, "positions [7, 0, 3, 100, 2047]", positions)


def _rope_relative(fn, reveal):
    """⟨rope(q, m), rope(k, n)⟩ = ⟨R(m - n) q, k⟩ depends on m - n only."""
    d, n = 16, 24
    q, k = randn(d, seed=530), randn(d, seed=531)
    atol = 4 * q.norm().item() * k.norm().item() * table_atol(2003)

    def diagonals(impl):  # q and k repeated at positions 0..n-1: scores[m, n] - scores[m+1, n+1]
        s = impl(q.expand(n, d).clone()).double() @ impl(k.expand(n, d).clone()).double().T
        return s[1:, 1:] - s[:-1, :-1]

    expect_close(
        f"⟨rope(q, m), rope(k, n)⟩ - ⟨rope(q, m+1), rope(k, n+1)⟩ for m, n < {n - 1}",
        attempt(diagonals, fn, ROPE_MISTAKES, f"q, k repeated along ({n}, {d})"),
        torch.zeros(n - 1, n - 1, dtype=torch.float64), atol=atol, rtol=0, reveal=reveal,
        rerun=diagonals, mistakes=ROPE_MISTAKES,
    )  # fmt: skip
    pairs = ((3, 0), (10, 7), (500, 497), (2003, 2000))

    def dots(impl):
        return torch.stack([impl(q[None].clone(), torch.tensor([m])).double()[0]
                            @ impl(k[None].clone(), torch.tensor([n])).double()[0]
                            for m, n in pairs])  # fmt: skip

    expected = (_rotations(torch.tensor([3]), d)[0] @ q.double()) @ k.double()
    expect_close(
        f"⟨rope(q, m), rope(k, n)⟩ for (m, n) in {list(pairs)}",
        attempt(dots, fn, ROPE_MISTAKES, "q and k at one position each"), expected.repeat(4),
        atol=atol, rtol=0, reveal=reveal, rerun=dots, mistakes=ROPE_MISTAKES,
    )  # fmt: skip


def _rope_norms(fn, reveal):
    _expect_norms(fn, randn(3, 4, 64, 32, seed=540), reveal)
    _expect_norms(fn, randn(300, 6, seed=541), reveal, torch.arange(0, 3000, 10))


def _rope_odd_dim(fn, reveal):
    for dim in (1, 5):
        expect_value_error(lambda d=dim: fn(randn(2, 3, d, seed=550)), f"x (2, 3, {dim})",
                            ROPE_MISTAKE["rope_odd_dim_accepted"])  # fmt: skip


def _rope_input_unchanged(fn, reveal):
    x = randn(2, 4, 8, seed=551)
    fn(x)
    if not torch.equal(x, randn(2, 4, 8, seed=551)):
        raise CheckFailed("Your function changed x.", ROPE_MISTAKE["rope_modifies_input"])


def _rope_on_device(device):
    def run(fn, reveal):
        positions = torch.tensor([4, 0, 9, 2, 31], device=device)
        if device != "meta":  # x is 3-D: a crash here is then about devices, not shapes
            x = randn(2, 5, 8, seed=560).to(device)
            _compare_rope(fn, x, reveal, f"on {device}")
            return _compare_rope(fn, x, reveal, f"on {device}, with positions", positions)
        x = torch.empty(2, 3, 5, 8, device="meta")
        for p, what in ((None, "default positions"), (positions, "positions given")):
            call = on_meta(lambda impl, p=p: impl(x) if p is None else impl(x, p))
            out = attempt(call, fn, ROPE_MISTAKES, f"x on the meta device, {what}")
            expect_on_meta("output", out, x.shape, x.dtype)

    return run


APPLY_ROTARY_EMBEDDING = Exercise(
    "apply_rotary_embedding",
    (
        Case("output shape and dtype", "visible", _rope_shape),
        Case("the hand-checkable example (dim 4)", "visible", _rope_by_hand),
        Case("agrees with the float64 closed form", "visible", _rope_closed_form),
        Case("keeps the norm of every vector", "visible", _rope_norms_small),
        Case("any number of leading dimensions, dim = 2, L = 2048", "hidden", _rope_shapes),
        Case("float64 in, float64 out", "hidden", _rope_float64),
        Case("honours an explicit positions argument", "hidden", _rope_positions),
        Case("⟨rope(q, m), rope(k, n)⟩ depends only on m - n", "hidden", _rope_relative),
        Case("keeps norms, positions up to 2990", "hidden", _rope_norms),
        Case("an odd dim raises ValueError", "hidden", _rope_odd_dim),
        Case("x is not modified", "hidden", _rope_input_unchanged),
        Case("creates nothing on the CPU (meta device)", "hidden", _rope_on_device("meta"), "meta"),
        Case("runs on CUDA", "hidden", _rope_on_device("cuda"), "cuda"),
    ),
    ROPE_MISTAKES,
    reference=model.apply_rotary_embedding,
)

check_sinusoidal_positional_encoding = SINUSOIDAL_POSITIONAL_ENCODING.check
check_sinusoidal_positional_encoding_module = SINUSOIDAL_POSITIONAL_ENCODING_MODULE.check
check_learned_positional_embedding = LEARNED_POSITIONAL_EMBEDDING.check
check_apply_rotary_embedding = APPLY_ROTARY_EMBEDDING.check
