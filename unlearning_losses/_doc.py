"""Argument descriptions the public losses share, written once.

A docstring line ``name: {name}`` in an ``Args:`` section becomes that argument's description
(``help()`` and the generated API page show it in full); ``shared_arguments`` fills them in.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

ARGUMENTS = {
    "logits": "``(B, T, V)`` or ``(N, V)``, any float dtype.",
    "labels": "``(B, T)`` or ``(N,)`` integer, ``ignore_index`` at prompt and padding.",
    "ignore_index": "the label value of ignored positions.",
    "shift": "Hugging Face causal-LM shift for 3-D input (``logits[:, t]`` scores "
    "``labels[:, t+1]``).",
    "reduction": '``"mean"`` over valid tokens, ``"sum"``, or ``"none"`` (per token, 0 at '
    "ignored).",
    "num_items_in_batch": "divide the sum by this instead of the local count (gradient "
    'accumulation, data parallel; as Hugging Face Trainer passes it). ``"mean"`` only.',
    "backend": '``"auto"``, ``"torch"`` or ``"triton"``.',
    "validate": "check the label range on CUDA too (a host sync).",
    "inplace_backward": "write the gradient into the logits' buffer (see "
    ":func:`token_logprobs` for the hazard).",
    "vocab_group": "a ``torch.distributed`` process group over which the vocabulary is sharded "
    "(tensor parallel): ``logits`` hold this rank's ``V / world`` columns, ``labels`` index the "
    "whole vocabulary, and every rank gets the same loss.",
    "hidden": "``(B, T, H)`` or ``(N, H)``, the last hidden states.",
    "weight": "the output head ``(V, H)``, same dtype and device.",
    "bias": "optional ``(V,)``.",
    "chunk_rows": "rows per chunk (default: as many as 128 MiB of float32 logits hold).",
    "head_vocab_group": "the process group over which the head's rows (the vocabulary) are "
    "split, ``weight`` and ``bias`` holding this rank's contiguous slice, in rank order, of any "
    "width (tensor parallel); a DTensor ``Shard(0)`` weight brings its group itself.",
    "logit_scale": "the factor the model multiplies its head's output by (Cohere's "
    "``logit_scale``; default 1).",
    "logit_softcap": "``c`` of the model's soft cap ``c * tanh(z / c)`` on its logits, after "
    "the scale (Gemma 2/3's ``final_logit_softcapping``; default none).",
}

_PLACEHOLDER = re.compile(r"^(?P<indent> +)(?P<name>\w+): \{(?P=name)\}$", re.MULTILINE)
_WIDTH = 100


def _expanded(match: re.Match) -> str:
    indent, name = match["indent"], match["name"]
    words = f"{name}: {ARGUMENTS[name]}".split()
    lines, line = [], indent + words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) > _WIDTH:
            lines.append(line)
            line = indent + "    " + word
        else:
            line += " " + word
    return "\n".join([*lines, line])


def shared_arguments(function: F) -> F:
    """Fill the ``name: {name}`` lines of ``function``'s docstring from ``ARGUMENTS``."""
    if function.__doc__:
        function.__doc__ = _PLACEHOLDER.sub(_expanded, function.__doc__)
    return function
