"""What a Hugging Face model does to its head's output, read from its config, for the fused-linear
losses' ``logit_scale`` and ``logit_softcap``.

The attribute names do not say how a model uses them: Granite divides its logits by
``logits_scaling`` where HyperCLOVA X multiplies by it. So the scale is read per model type, and a
config that carries a scale-like attribute for a type not listed here is refused rather than
guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Model type -> the factor its causal-LM head multiplies the logits by, from its config.
SCALES: dict[str, Callable[[Any], float]] = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), lambda c: c.logit_scale),
    **dict.fromkeys(
        ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa"),
        lambda c: 1.0 / c.logits_scaling,
    ),
    "hyperclovax": lambda c: c.logits_scaling,
    "falcon_h1": lambda c: c.lm_head_multiplier,
}
_SCALE_LIKE = ("logit_scale", "logits_scaling", "lm_head_multiplier")


def logit_options(config: Any) -> dict[str, float]:
    """``logit_scale`` and ``logit_softcap`` of the model ``config`` describes, as keyword
    arguments of the fused-linear losses (empty for a plain head).

    Reads ``final_logit_softcapping`` (Gemma 2 and 3, also in a ``text_config``) and the scale of
    the model types in :data:`SCALES` (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``,
    HyperCLOVA X's ``logits_scaling``, Falcon-H1's ``lm_head_multiplier``).

    Args:
        config: a Hugging Face model config (``model.config``), or anything with its attributes.

    Returns:
        ``{"logit_scale": s, "logit_softcap": c}``, each key only where the model uses it.

    Raises:
        ValueError: the config has a scale-like attribute but its model type is not known here
            (pass ``logit_scale=`` yourself, as the model's forward applies it).

    Example:
        >>> from transformers import Gemma2Config
        >>> logit_options(Gemma2Config(final_logit_softcapping=30.0))
        {'logit_softcap': 30.0}
    """
    config = getattr(config, "text_config", None) or config
    options: dict[str, float] = {}
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        options["logit_softcap"] = float(softcap)
    model_type = getattr(config, "model_type", None)
    if model_type in SCALES:
        options["logit_scale"] = float(SCALES[model_type](config))
    else:
        present = [name for name in _SCALE_LIKE if getattr(config, name, None) is not None]
        if present:
            raise ValueError(
                f"config (model type {model_type!r}) has {', '.join(present)}, and how its head "
                "applies it is not known here: pass logit_scale= as the model's forward does"
            )
    return options
