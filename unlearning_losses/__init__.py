"""Loss functions for machine unlearning in large language models.

Every forget loss returns a value to minimize; combine it with a retain loss through
:func:`combine_with_retain`. All functions take logits (or log-probs) and labels in the Hugging
Face causal-LM convention and work in any training loop.
"""

from .losses.combine import combine_with_retain
from .losses.kl import kl_divergence, kl_loss
from .losses.logprobs import token_logprobs
from .losses.nll import ga_loss, nll_loss
from .losses.npo import npo_loss
from .losses.simnpo import simnpo_loss

__all__ = [
    "combine_with_retain",
    "ga_loss",
    "kl_divergence",
    "kl_loss",
    "nll_loss",
    "npo_loss",
    "simnpo_loss",
    "token_logprobs",
]

__version__ = "0.1.0"
