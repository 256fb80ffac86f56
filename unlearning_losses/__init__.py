"""Loss functions for machine unlearning in large language models.

Every forget loss returns a value to minimize; combine it with a retain loss through
:func:`combine_with_retain`. All functions take logits (or log-probs) and labels in the Hugging
Face causal-LM convention and work in any training loop.
"""

from .distributed import GlobalCounts, global_counts
from .head_config import logit_options
from .losses.combine import combine_with_retain
from .losses.dpo import dpo_loss
from .losses.flat import flat_loss
from .losses.helper_targets import elm_loss, rkld_loss, whp_loss
from .losses.ihl import ihl_loss
from .losses.jsd import jsd_loss
from .losses.kl import kl_divergence, kl_loss
from .losses.kto import kto_loss, kto_reference_point
from .losses.linear import (
    linear_ga_loss,
    linear_kl_divergence,
    linear_kl_loss,
    linear_nll_loss,
    linear_npo_loss,
    linear_simnpo_loss,
    linear_token_logprobs,
)
from .losses.linear_me import linear_me_loss
from .losses.logprobs import token_logprobs
from .losses.me import me_loss
from .losses.nll import ga_loss, idk_loss, nll_loss
from .losses.npo import npo_loss
from .losses.pdu import logit_margin_loss, pdu_dual_update, pdu_loss
from .losses.rmu import rmu_control_vector, rmu_loss
from .losses.simnpo import simnpo_loss
from .losses.soft_targets import ceu_loss, undial_loss
from .losses.weighted import satimp_loss, tnpo_loss, wga_loss
from .task_vector import apply_task_vector, negate_task_vector, task_vector

__all__ = [
    "GlobalCounts",
    "apply_task_vector",
    "ceu_loss",
    "combine_with_retain",
    "dpo_loss",
    "elm_loss",
    "flat_loss",
    "ga_loss",
    "global_counts",
    "idk_loss",
    "ihl_loss",
    "jsd_loss",
    "kl_divergence",
    "kl_loss",
    "kto_loss",
    "kto_reference_point",
    "linear_ga_loss",
    "linear_kl_divergence",
    "linear_kl_loss",
    "linear_me_loss",
    "linear_nll_loss",
    "linear_npo_loss",
    "linear_simnpo_loss",
    "linear_token_logprobs",
    "logit_margin_loss",
    "logit_options",
    "me_loss",
    "negate_task_vector",
    "nll_loss",
    "npo_loss",
    "pdu_dual_update",
    "pdu_loss",
    "rkld_loss",
    "rmu_control_vector",
    "rmu_loss",
    "satimp_loss",
    "simnpo_loss",
    "task_vector",
    "tnpo_loss",
    "token_logprobs",
    "undial_loss",
    "wga_loss",
    "whp_loss",
]

__version__ = "0.2.0"
