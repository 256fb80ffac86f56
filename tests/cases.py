"""Hypothesis strategies: random logits/labels cases covering the shapes and values of SPEC §1.

A case draws its shape, dtype and flags from Hypothesis and its numbers from a seeded generator
(fast to draw, still reproducible from the seed Hypothesis shrinks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Loss values are compared to float32 accuracy whatever the dtype (accumulation is float32).
VALUE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
VALUE_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
# Gradients come back in the logits' dtype: one rounding of each element.
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@dataclass
class Case:
    logits: torch.Tensor
    labels: torch.Tensor
    ref_logits: torch.Tensor
    shift: bool
    upstream: float

    @property
    def dtype(self) -> torch.dtype:
        return self.logits.dtype


@st.composite
def cases(
    draw,
    *,
    min_vocab: int = 1,
    three_d: bool | None = None,
    dtypes=DTYPES,
    batch: int | None = None,
    shift: bool | None = None,
    scales=(1.0, 5.0, 1e4),
) -> Case:
    dtype = draw(st.sampled_from(dtypes))
    is_3d = draw(st.booleans()) if three_d is None else three_d
    vocab = draw(st.integers(min_vocab, 37))
    batch = draw(st.integers(1, 3)) if batch is None else batch
    length = draw(st.integers(1, 6))
    if shift is None:
        shift = draw(st.booleans()) if is_3d else False
    scale = draw(st.sampled_from(scales))
    ignore_frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    mask_vocab = draw(st.booleans()) and vocab > 2 and dtype != torch.float16
    seed = draw(st.integers(0, 2**31 - 1))
    upstream = draw(st.sampled_from([1.0, -0.7, 3.0]))

    g = torch.Generator().manual_seed(seed)
    shape = (batch, length) if is_3d else (batch * length,)
    logits = torch.randn(*shape, vocab, generator=g) * scale
    ref_logits = logits + torch.randn(*shape, vocab, generator=g) * min(scale, 2.0)
    labels = torch.randint(0, vocab, shape, generator=g)
    if mask_vocab:
        # Masked vocabulary: -inf entries shared by model and reference, never at a label.
        masked = torch.rand(*shape, vocab, generator=g) < 0.3
        masked.scatter_(-1, labels.unsqueeze(-1), False)
        if shift:  # row t scores labels[:, t + 1]
            masked[:, :-1].scatter_(-1, labels[:, 1:].unsqueeze(-1), False)
        logits = logits.masked_fill(masked, float("-inf"))
        ref_logits = ref_logits.masked_fill(masked, float("-inf"))
    ignored = torch.rand(shape, generator=g) < ignore_frac
    labels = labels.masked_fill(ignored, -100)
    return Case(logits.to(dtype), labels, ref_logits.to(dtype), shift, upstream)
