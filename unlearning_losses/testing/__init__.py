"""Property-based testing against float64 reference math, for the library and for your losses.

Needs the ``testing`` extra (``pip install "unlearning_losses[testing]"``: Hypothesis);
``import unlearning_losses`` never imports this package.

- :mod:`~unlearning_losses.testing.reference`: float64 reference math of every loss, written
  from the formulas and importing nothing else from the package;
- :mod:`~unlearning_losses.testing.strategies`: Hypothesis strategies for logits and labels,
  references near, far or underflowing, hidden states with heads, state-dict pairs;
- :func:`assert_close_to_reference`: values and gradients against the reference, tolerances from
  the dtype, failures that name the worst element;
- :func:`check_loss`: the whole property test of a loss in one call;
- :mod:`~unlearning_losses.testing.registry`: every public loss once, with how to call it on a
  :class:`Batch`, the options it takes and its reference (:func:`entries`, :func:`entry`), so
  that a test of "every loss" cannot miss one.
"""

from . import reference, registry, strategies
from .check import check_loss
from .compare import assert_close_to_reference, value_and_grad
from .registry import Batch, Entry, entries, entry
from .strategies import Case, batches, linear_batches, state_dict_pairs

__all__ = [
    "Batch",
    "Case",
    "Entry",
    "assert_close_to_reference",
    "batches",
    "check_loss",
    "entries",
    "entry",
    "linear_batches",
    "reference",
    "registry",
    "state_dict_pairs",
    "strategies",
    "value_and_grad",
]
