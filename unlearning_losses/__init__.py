"""Loss functions for machine unlearning in large language models.

Every forget loss returns a value to minimize; combine it with a retain loss through
:func:`combine_with_retain`. All functions take logits (or log-probs) and labels in the Hugging
Face causal-LM convention and work in any training loop.
"""

from .losses.combine import combine_with_retain
from .losses.kl import kl_divergence, kl_loss
from .losses.linear import (
    linear_ga_loss,
    linear_kl_divergence,
    linear_kl_loss,
    linear_nll_loss,
    linear_npo_loss,
    linear_simnpo_loss,
    linear_token_logprobs,
)
from .losses.logprobs import token_logprobs
from .losses.nll import ga_loss, nll_loss
from .losses.npo import npo_loss
from .losses.simnpo import simnpo_loss
from .task_vector import apply_task_vector, negate_task_vector, task_vector

__all__ = [
    "apply_task_vector",
    "combine_with_retain",
    "ga_loss",
    "kl_divergence",
    "kl_loss",
    "linear_ga_loss",
    "linear_kl_divergence",
    "linear_kl_loss",
    "linear_nll_loss",
    "linear_npo_loss",
    "linear_simnpo_loss",
    "linear_token_logprobs",
    "negate_task_vector",
    "nll_loss",
    "npo_loss",
    "simnpo_loss",
    "task_vector",
    "token_logprobs",
]

__version__ = "0.1.0"
