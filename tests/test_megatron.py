"""Megatron-core on two CPU ranks (gloo): its tensor-parallel output layer, its context-parallel
batches and data parallelism, against one process computing the same on the whole vocabulary,
sequences and batch.

The Megatron recipe of ``docs/scaling.md`` runs as written on a batch of Megatron's own (mock)
GPT dataset, whose labels come already shifted (``labels = text[1:]``), through a float64
``ColumnParallelLinear(..., gather_output=False)``, three times: ``tp = 2`` (each rank half of
the vocabulary), ``cp = 2`` (each rank two of the four chunks of every sequence, as
``get_batch_on_this_cp_rank`` deals them) and ``dp = 2`` (each rank half the batch). The loss,
the output layer's weight gradient (this rank's rows) and the input's gradient must equal one
process at 1e-12 relative. GA, NPO, KL and NLL on the layer's slice are checked the same way, and
the NLL against Megatron's own ``vocab_parallel_cross_entropy`` (which computes in float32) at
1e-6. Negative controls: the default ``shift=True`` on the pre-shifted labels fails each
comparison (and is refused where a sequence group is given).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks

import unlearning_losses as ul

# Found, not imported: importing megatron.core takes seconds, and only the ranks need it.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("megatron.core") is None, reason="megatron-core is not installed"
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"
RECIPE = re.compile(
    r"<!-- recipe for tests/test_megatron\.py: (\w+) -->\n```python\n(.*?)```", re.DOTALL
)
VOCAB, HIDDEN, BATCH, SEQ = 64, 16, 4, 12
RTOL = 1e-12

# (logits, ref_logits, labels, **kw) -> loss; kw: shift= and, on the ranks, vocab_group=.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ga": lambda x, ref, y, **kw: ul.ga_loss(x, y, **kw),
    "npo_ref_logprobs": lambda x, ref, y, **kw: ul.npo_loss(
        x, y, ref_logprobs=ul.token_logprobs(ref, y, **kw), **kw
    ),
    "kl_loss": lambda x, ref, y, **kw: ul.kl_loss(x, ref, y, **kw),
    "kl_divergence_reverse": lambda x, ref, y, **kw: ul.kl_divergence(
        x, ref, y, direction="reverse", **kw
    ),
    "nll": lambda x, ref, y, **kw: ul.nll_loss(x, y, **kw),
}


def _recipe() -> str:
    return dict(RECIPE.findall(DOC.read_text()))["megatron"]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> float:
    """Assert ``actual`` equals ``expected`` to ``rtol`` of its largest entry; the difference."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=what)
    return (actual - expected).abs().max().item() / scale


class _Setup:
    """Megatron's parallel state and, the same on every rank: a batch of Megatron's mock GPT
    dataset, the model's and a frozen reference's output layers (float64 ``ColumnParallelLinear``
    initialised on the CPU) and embeddings standing in for their decoders."""

    def __init__(self, tp: int, cp: int = 1) -> None:
        # Megatron warns that Transformer Engine and Apex are absent, and of CUDA settings.
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|CUDA_DEVICE_MAX).*")
        from megatron.core import parallel_state

        self.parallel_state = parallel_state
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, context_parallel_size=cp
        )
        self.tp = tp
        self.batch = self._gpt_batch()
        self.labels = self.batch["labels"].masked_fill(self.batch["loss_mask"] == 0, -100)
        self.output_layer, self.weight = self._output_layer(seed=0)
        self.reference_layer, self.ref_weight = self._output_layer(seed=1)
        self.reference_layer.requires_grad_(False)
        self.embedding = self._embedding(seed=2)
        self.reference_embedding = self._embedding(seed=3).requires_grad_(False)

    def close(self) -> None:
        self.parallel_state.destroy_model_parallel()

    @staticmethod
    def _gpt_batch() -> dict[str, torch.Tensor]:
        """Four samples (a ``NullTokenizer`` whose end-of-document token is the vocabulary's last
        id; ``eod_mask_loss`` zeroes the loss mask there)."""
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        config = GPTDatasetConfig(
            random_seed=0,
            sequence_length=SEQ,
            tokenizer=NullTokenizer(VOCAB - 1),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=True,
            split="1,0,0",
        )
        train, _, _ = BlendedMegatronDatasetBuilder(
            MockGPTDataset, [BATCH, None, None], lambda: True, config
        ).build()
        samples = [train[i] for i in range(BATCH)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask")}
        # What the recipe relies on: Megatron pre-shifts the labels and masks some positions.
        assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
        assert (batch["loss_mask"] == 0).any() and (batch["loss_mask"] == 1).any()
        return batch

    def _output_layer(self, seed: int):
        """The layer, and the whole float32 matrix Megatron cuts every rank's rows from
        (``keep_master_weight_for_test`` keeps it), in float64."""
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear

        config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp,
            use_cpu_initialization=True,
            params_dtype=torch.float64,
        )
        torch.manual_seed(seed)
        layer = ColumnParallelLinear(
            HIDDEN,
            VOCAB,
            config=config,
            init_method=functools.partial(torch.nn.init.normal_, std=0.5),
            bias=False,
            gather_output=False,
            keep_master_weight_for_test=True,
        )
        whole = layer.master_weight.to(torch.float64)
        assert torch.equal(layer.weight, whole[self.rows])  # contiguous slices in rank order
        return layer, whole

    @staticmethod
    def _embedding(seed: int) -> torch.nn.Embedding:
        torch.manual_seed(seed)
        return torch.nn.Embedding(VOCAB, HIDDEN, dtype=torch.float64)

    @property
    def rows(self) -> slice:
        """This rank's rows of the output layer: its slice of the vocabulary."""
        start = VOCAB // self.tp * self.parallel_state.get_tensor_model_parallel_rank()
        return slice(start, start + VOCAB // self.tp)

    def one_process(self, loss_fn: Callable[..., torch.Tensor]):
        """``loss_fn(logits, ref_logits, labels)`` on the whole vocabulary and sequences; the
        loss and the gradients of this rank's rows of the output layer and of the embedding."""
        weight = self.weight.clone().requires_grad_(True)
        table = self.embedding.weight.detach().clone().requires_grad_(True)
        tokens = self.batch["tokens"]
        with torch.no_grad():
            ref_logits = self.reference_embedding.weight[tokens] @ self.ref_weight.T
        loss = loss_fn(table[tokens] @ weight.T, ref_logits, self.labels)
        loss.backward()
        return loss.detach(), weight.grad[self.rows], table.grad

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's and the reference's outputs on this rank, as ``(b, s, V / tp)`` views of
        Megatron's ``[s, b, V / tp]``."""
        tokens = self.batch["tokens"]
        output, _ = self.output_layer(self.embedding(tokens).transpose(0, 1))
        assert output.shape == (SEQ, BATCH, VOCAB // self.tp)
        with torch.no_grad():
            ref_output, _ = self.reference_layer(self.reference_embedding(tokens).transpose(0, 1))
        return output.transpose(0, 1), ref_output.transpose(0, 1)

    def sharded(self, loss_fn: Callable[..., torch.Tensor], shift: bool):
        """``loss_fn`` on this rank's slice of the vocabulary (whole sequences); the loss and the
        gradients of the output layer's rows and of the embedding."""
        self.output_layer.zero_grad()
        self.embedding.zero_grad()
        loss = loss_fn(
            *self.outputs(),
            self.labels,
            shift=shift,
            vocab_group=self.parallel_state.get_tensor_model_parallel_group(),
        )
        loss.backward()
        return loss.detach(), self.output_layer.weight.grad, self.embedding.weight.grad


def _compare(got, expected, what: str, rtol: float = RTOL) -> float:
    parts = ("loss", "output layer weight grad", "input grad")
    return max(
        _close(g, e, f"{what}: {p}", rtol) for g, e, p in zip(got, expected, parts, strict=True)
    )


def _run_recipe(setup: _Setup, recipe: str) -> float:
    """Run ``recipe`` on this rank, with its data-parallel share of the batch; its largest
    relative difference from one process on the whole batch."""
    state = setup.parallel_state
    dp, dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    namespace = {
        "torch": torch,
        "batch": {k: v[rows] for k, v in setup.batch.items()},
        "embedding": setup.embedding,
        "reference_embedding": setup.reference_embedding,
        "output_layer": setup.output_layer,
        "reference_layer": setup.reference_layer,
    }
    setup.output_layer.zero_grad()
    setup.embedding.zero_grad()
    exec(compile(recipe, "docs/scaling.md:megatron", "exec"), namespace)
    # Each data-parallel rank's loss is its share of the global mean; the gradients are summed
    # over the data- and context-parallel ranks (Megatron's DDP, with the scaling of the page).
    got = [namespace["loss"].detach(), setup.output_layer.weight.grad, setup.embedding.weight.grad]
    dist.all_reduce(got[0], group=state.get_data_parallel_group())
    for grad in got[1:]:
        dist.all_reduce(grad, group=state.get_data_parallel_group(with_context_parallel=True))
    expected = setup.one_process(
        lambda x, ref, y: LOSSES["npo_ref_logprobs"](x, ref, y, shift=False)
    )
    return _compare(got, expected, "the recipe")


def _check_recipe(tp: int, cp: int, rank: int) -> None:
    """The recipe with ``tp`` tensor-parallel and ``cp`` context-parallel ranks, data parallel
    over the rest."""
    setup = _Setup(tp, cp)
    try:
        recipe = _recipe()
        print(f"rank {rank}, tp={tp} cp={cp}: recipe {_run_recipe(setup, recipe):.1e}")
        # The control: the default shift on Megatron's pre-shifted labels would score the wrong
        # tokens (``_check_losses`` shows it); next to a sequence group the losses refuse it.
        assert recipe.count("shift=False") == 3
        with pytest.raises(ValueError, match="shift=False"):
            _run_recipe(setup, recipe.replace("shift=False", "shift=True"))
    finally:
        setup.close()


def _check_losses(rank: int) -> None:
    """GA, NPO, KL and NLL on the output layer's slice (tp = 2) equal one process on the whole
    vocabulary; the NLL equals Megatron's ``vocab_parallel_cross_entropy``, per token and in the
    gradients of its masked mean."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy

    setup = _Setup(tp=2)
    try:
        worst = 0.0
        for name, fn in LOSSES.items():
            expected = setup.one_process(functools.partial(fn, shift=False))
            worst = max(worst, _compare(setup.sharded(fn, shift=False), expected, name))
            with pytest.raises(AssertionError):  # the control: the labels shifted again
                _compare(setup.sharded(fn, shift=True), expected, f"{name} (control)")

        # Megatron's cross-entropy takes [s, b] targets and returns [s, b] float32 values; its
        # GPT examples' loss function takes their mean over the loss mask.
        def megatron_per_token(logits: torch.Tensor) -> torch.Tensor:
            targets = setup.batch["labels"].T.contiguous()
            return vocab_parallel_cross_entropy(logits.transpose(0, 1), targets).T

        def megatron_mean(logits, ref_logits, labels, **kw):
            mask = setup.batch["loss_mask"]
            return ((megatron_per_token(logits) * mask).sum() / mask.sum()).double()

        gradients = _compare(
            setup.sharded(LOSSES["nll"], shift=False),
            setup.sharded(megatron_mean, shift=False),
            "NLL vs Megatron's cross-entropy",
            rtol=1e-6,
        )
        tp_group = setup.parallel_state.get_tensor_model_parallel_group()
        with torch.no_grad():
            logits, _ = setup.outputs()
            theirs = megatron_per_token(logits)

            def ours(shift: bool) -> torch.Tensor:
                nll = ul.nll_loss(
                    logits, setup.labels, reduction="none", shift=shift, vocab_group=tp_group
                )
                return nll.float()

            counted = setup.batch["loss_mask"] == 1
            tokens = _close(ours(shift=False)[counted], theirs[counted], "per token", 1e-6)
            with pytest.raises(AssertionError):  # the control: the labels shifted again
                counted = counted[:, :-1]
                _close(ours(shift=True)[counted], theirs[:, :-1][counted], "control", 1e-6)
        print(
            f"rank {rank}: losses {worst:.1e}; NLL vs Megatron's cross-entropy: "
            f"per token {tokens:.1e}, gradients {gradients:.1e}"
        )

        # A vocabulary that does not divide by the ranks: Megatron refuses it (Megatron-LM pads
        # the vocabulary to a multiple of the tensor-parallel size instead).
        config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
        with pytest.raises(AssertionError, match=f"{VOCAB - 1} is not divisible by 2"):
            ColumnParallelLinear(
                HIDDEN, VOCAB - 1, config=config, init_method=torch.nn.init.normal_
            )
    finally:
        setup.close()


CHECKS = {
    "recipe_tensor_parallel": functools.partial(_check_recipe, 2, 1),
    "recipe_context_parallel": functools.partial(_check_recipe, 1, 2),
    "recipe_data_parallel": functools.partial(_check_recipe, 1, 1),
    "losses_and_megatron_cross_entropy": _check_losses,
}


def test_the_page_has_the_megatron_recipe():
    assert "shift=False" in _recipe()


@pytest.mark.slow
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_megatron_on_two_ranks_equals_one_process(check, tmp_path):
    run_on_ranks(CHECKS[check], 2, tmp_path)
