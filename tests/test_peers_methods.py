"""KTO and WHP/RKLD against the published code they come from, run from its files.

The NPO authors' ``CustomTrainerForgetting.compute_loss`` (``kto_sigmoid``, ``kto_logsigmoid``,
``kto_logsigmoid_grad_diff``) and MUSE's ``WHPModelForCausalLM.forward`` are read at test time
from the project's ``shared/peers`` folder (or ``$UNLEARNING_PEERS``), checked byte for byte
against its manifest, and never copied here; without it the module is skipped. Both run on tiny
float64 language models; values and every parameter's gradient agree to 1e-12 relative, once the
documented differences (``kto_loss``'s docstring) are applied.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unlearning_losses as ul
from unlearning_losses.losses.helper_targets import whp_target_logits

pytest.importorskip("transformers")

PEERS = Path(
    os.environ.get("UNLEARNING_PEERS", Path(__file__).resolve().parents[2] / "shared" / "peers")
)
if not (PEERS / "manifest.json").exists():
    pytest.skip(
        f"the peers' code is not at {PEERS} (set UNLEARNING_PEERS)", allow_module_level=True
    )

NPO = PEERS / "npo" / "TOFU"
WHP = PEERS / "muse_bench" / "baselines" / "baselines" / "whos_harry_potter.py"
VOCAB, HIDDEN = 23, 8
TOLERANCE = {"rtol": 1e-12, "atol": 1e-12}


def _blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_the_files_compared_here_are_the_published_bytes():
    manifest = json.loads((PEERS / "manifest.json").read_text())
    for peer, names in (
        ("npo", ["TOFU/dataloader.py", "TOFU/data_module.py"]),
        ("muse_bench", ["baselines/baselines/whos_harry_potter.py"]),
    ):
        for name in names:
            path = PEERS / manifest[peer]["dir"] / name
            assert _blob_id(path) == manifest[peer]["files"][name], name


def _module(name: str, **attributes: object) -> types.ModuleType:
    made = types.ModuleType(name)
    made.__dict__.update(attributes)
    made.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return made


@contextmanager
def _importing_npo() -> Iterator[None]:
    """Stand-ins for the packages the NPO authors' trainer imports and no loss path uses (where
    not installed), and their folder on the path, while importing it; their sibling modules
    (``utils``, ``data_module``, ``evaluate_util``) leave ``sys.modules`` afterwards."""
    rouge = _module("rouge_score.rouge_scorer")
    stats = _module("scipy.stats", ks_2samp=None, hmean=None, sem=None)
    stand_ins = {
        "datasets": _module("datasets"),
        "deepspeed": _module("deepspeed"),
        "hydra": _module("hydra", main=lambda **_: lambda f: f),
        "evaluate": _module("evaluate"),
        "rouge_score": _module("rouge_score", rouge_scorer=rouge),
        "rouge_score.rouge_scorer": rouge,
        "scipy": _module("scipy", stats=stats),
        "scipy.stats": stats,
    }
    stand_ins = {
        name: module
        for name, module in stand_ins.items()
        if importlib.util.find_spec(name.split(".")[0]) is None
    }
    siblings = ("utils", "data_module", "evaluate_util")
    saved = {name: sys.modules.get(name) for name in (*stand_ins, *siblings)}
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    sys.modules.update(stand_ins)
    for name in siblings:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(NPO))
    try:
        yield
    finally:
        sys.path.remove(str(NPO))
        sys.dont_write_bytecode = writes_bytecode
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def npo_trainer() -> type:
    with _importing_npo():
        return _load("npo_tofu_dataloader", NPO / "dataloader.py").CustomTrainerForgetting


@pytest.fixture(scope="module")
def whp_model() -> type:
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        return _load("muse_whos_harry_potter", WHP).WHPModelForCausalLM
    finally:
        sys.dont_write_bytecode = writes_bytecode


class TinyLM(torch.nn.Module):
    """A float64 causal language model small enough to run in milliseconds: embeddings mixed
    with a running mean of the previous positions, a head. Its ``loss`` is Hugging Face's
    (the token mean of the shifted cross-entropy), in float64."""

    def __init__(self, seed: int, head_scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(
            torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
        )
        self.mix = torch.nn.Parameter(0.5 * torch.randn(HIDDEN, HIDDEN, generator=g).double())
        self.head = torch.nn.Parameter(
            head_scale * torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
        )

    def forward(self, input_ids, labels=None, attention_mask=None, **_):
        h = torch.tanh(self.embed[input_ids] @ self.mix)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        logits = (h.cumsum(1) / steps) @ self.head.T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return types.SimpleNamespace(logits=logits, loss=loss)


def _batch(seed: int, prompts: list[int], answers: list[int]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``(input_ids, labels, attention_mask)``, the prompt and padding at -100."""
    g = torch.Generator().manual_seed(seed)
    length = max(p + a for p, a in zip(prompts, answers, strict=True)) + 1
    ids = torch.randint(1, VOCAB, (len(prompts), length), generator=g)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        labels[row, prompt : prompt + answer] = ids[row, prompt : prompt + answer]
        mask[row, : prompt + answer] = 1
    return ids, labels, mask


def _trainer(cls: type, loss_type: str, oracle: torch.nn.Module, beta: float):
    """The trainer without ``Trainer.__init__`` (no dataset, no accelerator): the attributes its
    ``compute_loss`` reads."""
    trainer = cls.__new__(cls)
    trainer.loss_type, trainer.oracle_model, trainer.beta = loss_type, oracle, beta
    return trainer


def _kto_inputs(forget_answers: list[int]):
    idk = _batch(1, [3, 2, 4], [4, 3, 0])  # the reference point counts a row without tokens too
    forget = _batch(2, [2, 5, 1], forget_answers)
    retain = _batch(3, [4, 1, 2], [2, 6, 3])
    return idk, forget, retain


def _ours(model, oracle, inputs, beta: float, variant: str, reduction: str = "mean"):
    """The NPO authors' terms from this library: their KL term is kto_reference_point's
    unclamped estimate on the IDK answers; it enters without the factor beta."""
    (idk_ids, idk_labels, _), (ids, labels, _), _ = inputs
    with torch.no_grad():
        z0 = ul.kto_reference_point(
            ul.token_logprobs(model(idk_ids).logits, idk_labels),
            ul.token_logprobs(oracle(idk_ids).logits, idk_labels),
            clamp=False,
        )
        ref_logprobs = ul.token_logprobs(oracle(ids).logits, labels)
    loss = ul.kto_loss(
        model(ids).logits,
        labels,
        ref_logprobs=ref_logprobs,
        reference_point=z0 / beta,
        beta=beta,
        variant=variant,
        reduction=reduction,
    )
    return loss, z0


def _gradients(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters()), retain_graph=True))


@pytest.mark.parametrize("beta", [0.1, 2.0])
@pytest.mark.parametrize("loss_type", ["kto_sigmoid", "kto_logsigmoid", "kto_logsigmoid_grad_diff"])
def test_kto_equals_the_npo_authors_kto(npo_trainer, loss_type, beta, capsys):
    model, oracle = TinyLM(0), TinyLM(1, head_scale=1.5).requires_grad_(False)
    inputs = _kto_inputs([4, 2, 3])  # every forget row holds an answer token
    theirs = _trainer(npo_trainer, loss_type, oracle, beta).compute_loss(model, inputs)
    capsys.readouterr()  # their grad-diff variant prints its KL term
    variant = "sigmoid" if loss_type == "kto_sigmoid" else "logsigmoid"
    mine, _ = _ours(model, oracle, inputs, beta, variant)
    if variant == "sigmoid":
        expected = 1.0 - 2.0 / beta + 2.0 / beta * mine
    else:
        expected = 1.0 + mine
    if loss_type.endswith("grad_diff"):
        retain_ids, retain_labels, _ = inputs[2]
        expected = ul.combine_with_retain(
            expected, ul.nll_loss(model(retain_ids).logits, retain_labels)
        )
    torch.testing.assert_close(theirs, expected, **TOLERANCE)
    for got, want in zip(_gradients(theirs, model), _gradients(expected, model), strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)


def test_the_npo_authors_mean_counts_forget_rows_without_tokens(npo_trainer):
    """The documented difference: their mean runs over every row, a row without an answer token
    adding sigma(z0') (its log-ratio is 0); kto_loss leaves it out."""
    beta = 0.5
    model, oracle = TinyLM(0), TinyLM(1, head_scale=1.5).requires_grad_(False)
    inputs = _kto_inputs([4, 0, 3])
    theirs = _trainer(npo_trainer, "kto_sigmoid", oracle, beta).compute_loss(model, inputs)
    per_sequence, z0 = _ours(model, oracle, inputs, beta, "sigmoid", reduction="none")
    nonempty = torch.tensor([True, False, True])
    desirable = torch.where(nonempty, 1.0 - per_sequence, torch.sigmoid(z0))
    torch.testing.assert_close(theirs, 1.0 - 2.0 / beta * desirable.mean(), **TOLERANCE)
    mine, _ = _ours(model, oracle, inputs, beta, "sigmoid")
    assert not torch.allclose(theirs, 1.0 - 2.0 / beta + 2.0 / beta * mine)


@pytest.mark.parametrize("alpha", [1.0, 5.0])
def test_whp_and_rkld_targets_equal_muses_whp_logits(whp_model, alpha):
    """MUSE's WHP model serves z* = z_ref - alpha relu(z_reinf - z_ref) as its logits: our
    target logits equal them, WHP trains toward their argmax and RKLD toward their softmax."""
    baseline = TinyLM(1).requires_grad_(False)
    reinforced = TinyLM(1, head_scale=1.3).requires_grad_(False)
    with torch.no_grad():
        reinforced.mix.add_(0.2)
    muse = whp_model.__new__(whp_model)
    torch.nn.Module.__init__(muse)
    muse.baseline, muse.reinforced, muse.alpha = baseline, reinforced, alpha
    ids, labels, mask = _batch(4, [3, 1, 6], [5, 7, 2])
    with torch.no_grad():
        generic = muse.forward(input_ids=ids, attention_mask=mask).logits
        ref_logits, reinforced_logits = baseline(ids).logits, reinforced(ids).logits
    built = whp_target_logits(torch.empty_like(ref_logits), ref_logits, reinforced_logits, alpha)
    torch.testing.assert_close(built, generic, **TOLERANCE)

    model = TinyLM(0)
    logits = model(ids).logits
    helpers = {"ref_logits": ref_logits, "reinforced_logits": reinforced_logits, "alpha": alpha}
    valid = labels[:, 1:] != -100
    rows, targets = logits[:, :-1][valid], generic[:, :-1][valid]
    checks = {
        "whp": (
            ul.whp_loss(logits, labels, **helpers),
            F.cross_entropy(rows, targets.argmax(-1)),
        ),
        "rkld": (
            ul.rkld_loss(logits, labels, **helpers),
            F.kl_div(
                targets.log_softmax(-1), rows.log_softmax(-1), log_target=True, reduction="sum"
            )
            / valid.sum(),
        ),
    }
    for name, (got, expected) in checks.items():
        torch.testing.assert_close(got, expected, **TOLERANCE, msg=name)
        for a, b in zip(_gradients(got, model), _gradients(expected, model), strict=True):
            torch.testing.assert_close(a, b, **TOLERANCE, msg=name)
