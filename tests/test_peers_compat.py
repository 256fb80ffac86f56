"""Every loss of MUSE, the NPO authors' code, TOFU and Unlearn-Simple, run from their own files,
against the library's function that gives its number (a main function or ``compat.muse`` /
``compat.npo``), or shown impossible to run.

Their loss code is read at test time from the project's ``shared/peers`` folder beside the
repository (or ``$UNLEARNING_PEERS``; ``tests/test_peers.py`` checks its bytes against the
manifest) and never copied here; without it the module is skipped. Each trainer's
``compute_loss`` runs on a tiny random ``LlamaForCausalLM`` in float64 with batches laid out as
its own collator lays them out (TOFU's: question masked, answer, end-of-sequence label, right
padding, and a row whose question fills it; MUSE's: ``labels = input_ids``), against a reference
whose head is ten times sharper. Value and the gradient of every parameter agree to 1e-12
relative.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import unlearning_losses as ul  # noqa: E402
from unlearning_losses.compat import muse, npo  # noqa: E402

PEERS = Path(
    os.environ.get("UNLEARNING_PEERS", Path(__file__).resolve().parents[2] / "shared" / "peers")
)
if not (PEERS / "manifest.json").exists():
    pytest.skip(
        f"the peers' code is not at {PEERS} (set UNLEARNING_PEERS)", allow_module_level=True
    )

VOCAB, HIDDEN, LENGTH = 128, 32, 10
RTOL = 1e-12


# --- importing their code ---------------------------------------------------------------------


def _module(name: str, **attributes: object) -> types.ModuleType:
    made = types.ModuleType(name)
    made.__dict__.update(attributes)
    made.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return made


#: The TOFU folders' modules, imported by these top-level names.
TOFU_MODULES = ("dataloader", "data_module", "evaluate_util", "utils")


@contextmanager
def _importing() -> Iterator[None]:
    """While importing their files: stand-ins for the packages they import that no loss path
    uses (only where not installed), and no bytecode written beside them. Afterwards the
    stand-ins and the TOFU folders' top-level names (``utils``, ``data_module``, ..., which
    clash with each other) leave ``sys.modules``, and ``sys.path`` is given back (WMDP's
    ``base.py`` appends to it); the installed packages they imported stay imported."""
    from transformers import Trainer  # noqa: F401  (before any stand-in: it probes packages)

    stand_ins = {
        "datasets": _module("datasets"),
        "scipy": _module("scipy"),
        "scipy.stats": _module("scipy.stats", ks_2samp=None, hmean=None, sem=None),
        "hydra": _module("hydra", main=lambda **kwargs: lambda function: function),
        "evaluate": _module("evaluate"),
        "rouge_score": _module("rouge_score"),
        "rouge_score.rouge_scorer": _module("rouge_score.rouge_scorer"),
        "natsort": _module("natsort", natsorted=sorted),
    }
    stand_ins = {
        name: stand_in
        for name, stand_in in stand_ins.items()
        if name not in sys.modules and importlib.util.find_spec(name.split(".")[0]) is None
    }
    saved = {name: sys.modules.get(name) for name in [*stand_ins, *TOFU_MODULES]}
    path = list(sys.path)
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        sys.dont_write_bytecode = writes_bytecode
        sys.path[:] = path
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _tofu_family(folder: Path) -> types.ModuleType:
    """``dataloader.py`` of a TOFU-family folder, which imports its siblings by top-level name."""
    for name in TOFU_MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(folder))
    return importlib.import_module("dataloader")


def _package(alias: str, folder: Path) -> types.ModuleType:
    """A folder of relative imports, loaded as a package under ``alias``."""
    spec = importlib.util.spec_from_file_location(
        alias, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[alias] = package
    spec.loader.exec_module(package)
    return package


@pytest.fixture(scope="module")
def peers() -> types.SimpleNamespace:
    loaded = {}
    for name, folder in (
        ("npo", PEERS / "npo" / "TOFU"),
        ("tofu", PEERS / "tofu"),
        ("simple_tofu", PEERS / "unlearn_simple" / "TOFU"),
    ):
        with _importing():
            loaded[name] = _tofu_family(folder)
    with _importing():
        for name, folder in (
            ("muse", PEERS / "muse_bench" / "baselines" / "baselines"),
            ("simple_muse", PEERS / "unlearn_simple" / "MUSE" / "baselines" / "baselines"),
        ):
            package = _package(f"peer_{name}", folder)
            loaded[name] = package.iterative
            loaded[f"{name}_dataset"] = package.dataset
            loaded[f"{name}_task_vector"] = package.task_vector
        loaded["wmdp"] = _package(
            "peer_wmdp", PEERS / "unlearn_simple" / "WMDP" / "src" / "unlearn"
        )
        spec = importlib.util.spec_from_file_location(
            "peer_wmdp_dataset", PEERS / "unlearn_simple" / "WMDP" / "src" / "dataset" / "Base.py"
        )
        wmdp_dataset = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(wmdp_dataset)
        loaded["wmdp_collator"] = wmdp_dataset.unlearncollector
    return types.SimpleNamespace(**loaded)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: one intra-op thread runs them several times faster than many (whose
    start-up dominates), on a busy machine most of all."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models and batches -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny random Llama in float64 and a reference: the same weights, perturbed in the layers,
    with a head ten times sharper. Shared: no test changes their weights (each clears the
    gradients it reads)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    reference = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        reference.lm_head.weight.mul_(10.0)
        for p in reference.model.layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    for p in reference.parameters():
        p.requires_grad_(False)
    return model, reference


EOS = 2


def _tofu_example(g: torch.Generator, question: int, answer: int) -> tuple[torch.Tensor, ...]:
    """One example as TOFU's ``convert_raw_data_to_model_format`` makes it: the encoded question
    and answer, padded with end-of-sequence tokens; labels ``-100`` on the question, then the
    answer and one end-of-sequence label, ``-100`` on the rest of the padding."""
    encoded = torch.randint(3, VOCAB, (min(question + answer, LENGTH),), generator=g)
    pad = LENGTH - len(encoded)
    ids = torch.cat([encoded, torch.full((pad,), EOS)])
    mask = torch.cat(
        [torch.ones(len(encoded), dtype=torch.long), torch.zeros(pad, dtype=torch.long)]
    )
    labels = (
        ids.clone()
        if pad == 0
        else torch.cat([encoded, torch.tensor([EOS]), torch.full((pad - 1,), -100)])
    )
    labels[:question] = -100
    return ids, labels, mask


#: (question, answer) lengths: a short answer, a long question, and a question that fills the
#: whole length (truncated: no valid label).
SHAPES = ((3, 4), (5, 2), (LENGTH, 0))


def _tofu_split(seed: int, shapes=SHAPES) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [_tofu_example(g, q, a) for q, a in shapes]


def _tofu_inputs(peers, splits: int, shapes=SHAPES) -> list[tuple[torch.Tensor, ...]]:
    """``custom_data_collator_forget`` over ``splits`` (2: forget or refusals, retain; 3:
    refusals, forget, retain) aligned splits."""
    columns = [_tofu_split(seed, shapes) for seed in range(1, splits + 1)]
    return peers.npo.custom_data_collator_forget(list(zip(*columns, strict=True)))


def _muse_inputs(peers, codebase: str):
    """MUSE's collator over fixed-length forget and retain token blocks; the second forget block
    ends in padding (``pad_or_trim_tensor``), which its labels keep."""
    dataset_class = getattr(peers, f"{codebase}_dataset").ForgetRetainDataset
    dataset = dataset_class.__new__(dataset_class)
    dataset.retain_exists = True
    g = torch.Generator().manual_seed(4)
    forget, retain = (
        [torch.randint(1, VOCAB, (LENGTH,), generator=g) for _ in range(2)] for _ in range(2)
    )
    forget[1][6:] = 0
    return dataset.get_collate_fn()(list(zip(forget, retain, strict=True)))


def _wmdp_inputs(peers) -> dict:
    def examples(seed: int) -> list[dict[str, torch.Tensor]]:
        return [
            {
                "input_ids": ids,
                "attention_mask": mask,
                "label": labels,
                "refused_label": labels,
                "question_length": torch.tensor(0),
            }
            for ids, labels, mask in _tofu_split(seed)
        ]

    return peers.wmdp_collator(
        [
            {"forget": f, "retain": r, "perturb": None}
            for f, r in zip(examples(1), examples(2), strict=True)
        ]
    )


# --- running theirs and ours ------------------------------------------------------------------


@contextmanager
def _float64_cross_entropy() -> Iterator[None]:
    """Hugging Face's causal-LM loss calls ``logits.float()``: an identity for float64 here."""
    original = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: (
        self if self.dtype == torch.float64 else original(self, *a, **k)
    )
    try:
        yield
    finally:
        torch.Tensor.float = original


def _value_and_grads(model, loss_of: Callable[[], torch.Tensor]):
    model.zero_grad(set_to_none=True)
    with _float64_cross_entropy():
        value = loss_of()
    value.backward()
    return value.detach(), {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
    }


def _assert_same(theirs, ours) -> None:
    (their_value, their_grads), (our_value, our_grads) = theirs, ours
    assert our_value.dtype == torch.float64
    torch.testing.assert_close(our_value, their_value, rtol=RTOL, atol=0.0)
    for name, grad in their_grads.items():
        scale = grad.abs().max().clamp(min=torch.finfo(grad.dtype).tiny)
        error = (our_grads[name] - grad).abs().max() / scale
        assert error <= RTOL, f"gradient of {name}: {error:.3g} relative"


def _trainer(cls, **attributes):
    """A trainer without ``Trainer.__init__``: only what ``compute_loss`` reads."""
    trainer = cls.__new__(cls)
    trainer.__dict__.update(attributes)
    return trainer


def _logits(model, batch) -> torch.Tensor:
    ids, _, mask = batch
    return model(ids, attention_mask=mask).logits


def _ref(reference, batch) -> torch.Tensor:
    with torch.no_grad():
        return _logits(reference, batch)


def _without_empty_rows(inputs):
    keep = torch.stack([batch[1] for batch in inputs]).ne(-100).any(-1).all(0)
    return [tuple(t[keep] for t in batch) for batch in inputs]


# --- the TOFU trainer: TOFU, the NPO authors, Unlearn-Simple ----------------------------------

BETA, NPO_COEFF, GRAD_DIFF_COEFF, KL_COEFF, GAMMA = 0.5, 0.7, 1.3, 0.6, 0.3


def _tofu_cases():
    """Each ``forget_loss``: the splits its inputs hold, and ours from (model, reference, inputs)."""
    reverse_kl = lambda m, ref, b: ul.kl_divergence(  # noqa: E731
        _logits(m, b), _ref(ref, b), direction="reverse"
    )

    def idk(m, ref, i):
        joined = [torch.cat(pair) for pair in zip(i[0], i[1], strict=True)]
        return ul.nll_loss(_logits(m, joined), joined[1])

    def forget_kl(m, ref, i):
        f = _logits(m, i[0])
        return ul.combine_with_retain(
            ul.ga_loss(f, i[0][1]), ul.kl_divergence(f, _ref(ref, i[0]), direction="reverse")
        )

    def answers(m, ref, i):  # (idk, forget, retain): the forget answers and the refusals
        idk_, forget = i[0], i[1]
        return (
            _logits(m, forget), _ref(ref, forget), forget[1],
            _logits(m, idk_), _ref(ref, idk_), idk_[1],
        )  # fmt: skip

    def npo_forget(m, ref, i):
        return _logits(m, i[0]), _ref(ref, i[0]), i[0][1]

    return {
        "grad_ascent": (2, lambda m, ref, i: ul.ga_loss(_logits(m, i[0]), i[0][1])),
        "grad_ascent_forgetKL": (2, forget_kl),
        "grad_diff": (
            2,
            lambda m, ref, i: ul.combine_with_retain(
                ul.ga_loss(_logits(m, i[0]), i[0][1]), ul.nll_loss(_logits(m, i[1]), i[1][1])
            ),
        ),
        "KL": (
            2,
            lambda m, ref, i: ul.combine_with_retain(
                ul.ga_loss(_logits(m, i[0]), i[0][1]), reverse_kl(m, ref, i[1])
            ),
        ),
        "idk": (2, idk),
        "fine_tuned": (2, lambda m, ref, i: ul.nll_loss(_logits(m, i[1]), i[1][1])),
        "dpo": (3, lambda m, ref, i: npo.dpo_loss(*answers(m, ref, i), beta=BETA)),
        "dpo_grad_diff": (
            3,
            lambda m, ref, i: npo.dpo_grad_diff_loss(
                *answers(m, ref, i), _logits(m, i[2]), i[2][1], beta=BETA
            ),
        ),
        "dpo_KL": (
            3,
            lambda m, ref, i: npo.dpo_kl_loss(
                *answers(m, ref, i), _logits(m, i[2]), _ref(ref, i[2]), beta=BETA
            ),
        ),
        "npo": (2, lambda m, ref, i: npo.npo_loss(*npo_forget(m, ref, i), beta=BETA)),
        "npo_grad_diff": (
            2,
            lambda m, ref, i: npo.npo_grad_diff_loss(
                *npo_forget(m, ref, i),
                _logits(m, i[1]),
                i[1][1],
                beta=BETA,
                npo_coeff=NPO_COEFF,
                grad_diff_coeff=GRAD_DIFF_COEFF,
            ),
        ),
        "npo_KL": (
            2,
            lambda m, ref, i: npo.npo_kl_loss(
                *npo_forget(m, ref, i),
                _logits(m, i[1]),
                _ref(ref, i[1]),
                beta=BETA,
                npo_coeff=NPO_COEFF,
                kl_coeff=KL_COEFF,
            ),
        ),
        "simnpo": (
            2,
            lambda m, ref, i: npo.simnpo_loss(_logits(m, i[0]), i[0][1], beta=BETA, gamma=GAMMA),
        ),
        "simnpo_grad_diff": (
            2,
            lambda m, ref, i: npo.simnpo_grad_diff_loss(
                _logits(m, i[0]),
                i[0][1],
                _logits(m, i[1]),
                i[1][1],
                beta=BETA,
                gamma=GAMMA,
                npo_coeff=NPO_COEFF,
                grad_diff_coeff=GRAD_DIFF_COEFF,
            ),
        ),
        "kto_sigmoid": (3, lambda m, ref, i: npo.kto_sigmoid_loss(*answers(m, ref, i), beta=BETA)),
        "kto_logsigmoid": (
            3,
            lambda m, ref, i: npo.kto_logsigmoid_loss(*answers(m, ref, i), beta=BETA),
        ),
        "kto_logsigmoid_grad_diff": (
            3,
            lambda m, ref, i: npo.kto_logsigmoid_grad_diff_loss(
                *answers(m, ref, i), _logits(m, i[2]), i[2][1], beta=BETA
            ),
        ),
    }


#: The ``forget_loss`` names each codebase's ``compute_loss`` knows (TOFU's ``dpo`` crashes:
#: ``test_tofus_dpo_branch_cannot_run``).
TOFU_LOSSES = ["grad_ascent", "grad_diff", "KL", "idk"]
NPO_LOSSES = [
    *TOFU_LOSSES,
    "grad_ascent_forgetKL",
    *("dpo", "dpo_grad_diff", "dpo_KL", "npo", "npo_grad_diff", "npo_KL"),
    *("kto_sigmoid", "kto_logsigmoid", "kto_logsigmoid_grad_diff"),
]
SIMPLE_TOFU_LOSSES = [*NPO_LOSSES, "fine_tuned", "simnpo", "simnpo_grad_diff"]
#: Where their value is NaN with a row without a valid label (0 / 0): compared without it.
NAN_ON_AN_EMPTY_ROW = {"simnpo", "simnpo_grad_diff"}


def _tofu_trainer(peers, codebase: str, loss_type: str, reference):
    return _trainer(
        getattr(peers, codebase).CustomTrainerForgetting,
        loss_type=loss_type,
        oracle_model=reference,
        beta=BETA,
        gamma=GAMMA,
        npo_coeff=NPO_COEFF,
        grad_diff_coeff=GRAD_DIFF_COEFF,
        KL_coeff=KL_COEFF,
        ref_policy="fine_tuned",
    )


@pytest.mark.parametrize(
    ("codebase", "loss_type"),
    [
        *(("tofu", name) for name in TOFU_LOSSES),
        *(("npo", name) for name in NPO_LOSSES),
        *(("simple_tofu", name) for name in SIMPLE_TOFU_LOSSES),
    ],
)
def test_the_tofu_trainers_losses_equal_ours(peers, models, codebase, loss_type):
    splits, ours = _tofu_cases()[loss_type]
    model, reference = models
    trainer = _tofu_trainer(peers, codebase, loss_type, reference)
    inputs = _tofu_inputs(peers, splits)
    theirs = _value_and_grads(model, lambda: trainer.compute_loss(model, inputs))
    if loss_type in NAN_ON_AN_EMPTY_ROW:
        assert theirs[0].isnan()
        mine = _value_and_grads(model, lambda: ours(model, reference, inputs))
        assert mine[0].isfinite()  # documented difference: that row's length counts as 1
        inputs = _without_empty_rows(inputs)
        theirs = _value_and_grads(model, lambda: trainer.compute_loss(model, inputs))
    _assert_same(theirs, _value_and_grads(model, lambda: ours(model, reference, inputs)))


def test_tofus_dpo_branch_cannot_run(peers, models):
    """TOFU's ``dpo`` reads ``labels``, assigned only in other branches."""
    model, reference = models
    trainer = _tofu_trainer(peers, "tofu", "dpo", reference)
    with pytest.raises(UnboundLocalError, match="labels"):
        trainer.compute_loss(model, _tofu_inputs(peers, 3))


def test_their_sequence_losses_equal_the_main_functions_without_empty_rows(peers, models):
    """On batches where every row has an answer, their NPO is ``npo_loss``, their DPO ``2/beta``
    times ``dpo_loss``, and Unlearn-Simple's SimNPO ``simnpo_loss`` with ``delta=gamma`` (not the
    paper's ``gamma / beta``)."""
    model, reference = models
    inputs = _tofu_inputs(peers, 3, shapes=SHAPES[:2])
    idk_, forget = inputs[0], inputs[1]

    def theirs(codebase: str, loss_type: str, batches):
        trainer = _tofu_trainer(peers, codebase, loss_type, reference)
        return _value_and_grads(model, lambda: trainer.compute_loss(model, batches))

    _assert_same(
        theirs("npo", "npo", inputs[1:]),
        _value_and_grads(
            model,
            lambda: ul.npo_loss(
                _logits(model, forget), forget[1], ref_logits=_ref(reference, forget), beta=BETA
            ),
        ),
    )
    _assert_same(
        theirs("npo", "dpo", inputs),
        _value_and_grads(
            model,
            lambda: (
                (2 / BETA)
                * ul.dpo_loss(
                    _logits(model, idk_),
                    idk_[1],
                    _logits(model, forget),
                    forget[1],
                    ref_chosen_logits=_ref(reference, idk_),
                    ref_rejected_logits=_ref(reference, forget),
                    beta=BETA,
                )
            ),
        ),
    )
    simnpo = theirs("simple_tofu", "simnpo", inputs[1:])
    _assert_same(
        simnpo,
        _value_and_grads(
            model, lambda: ul.simnpo_loss(_logits(model, forget), forget[1], beta=BETA, delta=GAMMA)
        ),
    )
    as_the_paper = ul.simnpo_loss(
        _logits(model, forget), forget[1], beta=BETA, delta=GAMMA / BETA
    ).detach()
    assert not torch.isclose(as_the_paper, simnpo[0], rtol=1e-3)


@pytest.mark.parametrize("loss_type", ["simnpo", "simnpo_grad_diff"])
def test_unlearn_simples_simnpo_counts_the_unshifted_labels(peers, models, loss_type):
    """A row whose first label is valid (no question): their length counts it, unscored; so
    does ``compat.npo``, and ``simnpo_loss`` (the shifted labels' count) differs."""
    model, reference = models
    trainer = _tofu_trainer(peers, "simple_tofu", loss_type, reference)
    inputs = _tofu_inputs(peers, 2, shapes=((0, 6), (2, 4)))
    theirs = _value_and_grads(model, lambda: trainer.compute_loss(model, inputs))
    ours = _tofu_cases()[loss_type][1]
    _assert_same(theirs, _value_and_grads(model, lambda: ours(model, reference, inputs)))
    if loss_type == "simnpo":
        forget = inputs[0]
        shifted = ul.simnpo_loss(_logits(model, forget), forget[1], beta=BETA, delta=GAMMA)
        assert not torch.isclose(shifted.detach(), theirs[0], rtol=1e-6)


# --- MUSE and Unlearn-Simple's MUSE -----------------------------------------------------------

MUSE_BETA, COEFF, MUSE_NPO_COEFF, MUSE_GAMMA = 0.5, 0.7, 1.3, 0.2


def _muse_cases(coefficients: bool):
    """Ours for each MUSE algorithm; Unlearn-Simple's copy weighs the terms (``coefficients``)."""
    gdr = {"npo_coeff": MUSE_NPO_COEFF, "coeff": COEFF} if coefficients else {}
    klr = {"coeff": COEFF} if coefficients else {}
    simnpo = {"beta": MUSE_BETA, "gamma": MUSE_GAMMA}

    def f(m, x):
        return m(x[0]["input_ids"], attention_mask=x[0]["attention_mask"]).logits

    def r(m, x):
        return m(x[1]["input_ids"], attention_mask=x[1]["attention_mask"]).logits

    def ref_f(ref, x):
        with torch.no_grad():
            return f(ref, x)

    def ref_r(ref, x):
        with torch.no_grad():
            return r(ref, x)

    return {
        "ga": lambda m, ref, x: muse.ga_loss(f(m, x), x[0]["labels"]),
        "ga_gdr": lambda m, ref, x: muse.ga_gdr_loss(
            f(m, x), x[0]["labels"], r(m, x), x[1]["labels"], **gdr
        ),
        "ga_klr": lambda m, ref, x: muse.ga_klr_loss(
            f(m, x), x[0]["labels"], r(m, x), ref_r(ref, x), **klr
        ),
        "npo": lambda m, ref, x: muse.npo_loss(f(m, x), ref_f(ref, x), beta=MUSE_BETA),
        "npo_gdr": lambda m, ref, x: muse.npo_gdr_loss(
            f(m, x), ref_f(ref, x), r(m, x), x[1]["labels"], beta=MUSE_BETA, **gdr
        ),
        "npo_klr": lambda m, ref, x: muse.npo_klr_loss(
            f(m, x), ref_f(ref, x), r(m, x), ref_r(ref, x), beta=MUSE_BETA, **klr
        ),
        "simnpo": lambda m, ref, x: muse.simnpo_loss(f(m, x), **simnpo),
        "simnpo_gdr": lambda m, ref, x: muse.simnpo_gdr_loss(
            f(m, x), r(m, x), x[1]["labels"], **simnpo, **gdr
        ),
        "simnpo_klr": lambda m, ref, x: muse.simnpo_klr_loss(
            f(m, x), r(m, x), ref_r(ref, x), **simnpo, **klr
        ),
    }


MUSE_LOSSES = ["ga", "ga_gdr", "ga_klr", "npo", "npo_gdr", "npo_klr"]


@pytest.mark.parametrize(
    ("codebase", "loss_type"),
    [
        *(("muse", name) for name in MUSE_LOSSES),
        *(("simple_muse", name) for name in [*MUSE_LOSSES, "simnpo", "simnpo_gdr", "simnpo_klr"]),
    ],
)
def test_muses_losses_equal_compat_muse(peers, models, codebase, loss_type):
    model, reference = models
    trainer = _trainer(
        getattr(peers, codebase).IterativeUnlearner,
        loss_type=loss_type,
        ref_model=reference,
        beta=MUSE_BETA,
        coeff=COEFF,
        npo_coeff=MUSE_NPO_COEFF,
        gamma=MUSE_GAMMA,
    )
    inputs = _muse_inputs(peers, codebase)
    ours = _muse_cases(coefficients=codebase == "simple_muse")[loss_type]
    _assert_same(
        _value_and_grads(model, lambda: trainer.compute_loss(model, inputs)),
        _value_and_grads(model, lambda: ours(model, reference, inputs)),
    )


def _bfloat16_pair(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base = {n: t.to(torch.bfloat16) for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    finetuned = {
        n: (t.double() + 0.01 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(
            torch.bfloat16
        )
        for n, t in base.items()
    }
    return base, finetuned


@pytest.mark.parametrize("codebase", ["muse", "simple_muse"])
def test_muses_task_vector_equals_compat_muse_bit_for_bit(peers, models, codebase):
    base, finetuned = _bfloat16_pair(models[0])
    TaskVector = getattr(peers, f"{codebase}_task_vector").TaskVector
    vector = TaskVector(pretrained_state_dict=base, finetuned_state_dict=finetuned)
    holder = types.SimpleNamespace(state_dict=lambda: base)
    theirs = (-vector).apply_to(pretrained_model=holder, scaling_coef=5.0)
    ours = muse.negate_task_vector(base, finetuned, 5.0)
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], theirs[name]), name
    # Rounded once instead, a few percent of the elements move by an ulp or a few.
    once = muse.negate_task_vector(base, finetuned, 5.0, rounding="once")
    differ = sum(int((once[n] != ours[n]).sum()) for n in ours)
    assert 0 < differ < 0.1 * sum(t.numel() for t in ours.values())


# --- Unlearn-Simple's WMDP trainers -----------------------------------------------------------

WMDP_GAMMA = 0.7


def _wmdp_cases():
    def shifted(labels: torch.Tensor) -> torch.Tensor:
        return F.pad(labels[:, 1:], (0, 1), value=-100)

    def f(m, x):
        return m(x["forget"][0], attention_mask=x["forget"][1]).logits

    def r(m, x):
        return m(x["retain"][0], attention_mask=x["retain"][1]).logits

    def with_retain(forget, m, x):
        return ul.combine_with_retain(
            forget, ul.nll_loss(r(m, x), x["retain"][2]), retain_weight=WMDP_GAMMA
        )

    def ref_f(ref, x):
        with torch.no_grad():
            return f(ref, x)

    return {
        "GA": lambda m, ref, x: ul.ga_loss(f(m, x), x["forget"][2]),
        "GA_FT": lambda m, ref, x: with_retain(ul.ga_loss(f(m, x), x["forget"][2]), m, x),
        "NPO_FT": lambda m, ref, x: with_retain(
            ul.npo_loss(
                f(m, x), x["forget"][2], ref_logits=ref_f(ref, x), beta=BETA, granularity="batch"
            ),
            m,
            x,
        ),
        # One mean NLL over the whole batch: the batch as one aligned sequence.
        "SimNPO_FT": lambda m, ref, x: with_retain(
            ul.simnpo_loss(f(m, x).flatten(0, 1), shifted(x["forget"][2]).flatten(), beta=BETA),
            m,
            x,
        ),
        "FT": lambda m, ref, x: ul.nll_loss(r(m, x), x["retain"][2]),
        "Relearn": lambda m, ref, x: ul.nll_loss(f(m, x), x["forget"][2]),
    }


@pytest.mark.parametrize("method", ["GA", "GA_FT", "NPO_FT", "SimNPO_FT", "FT", "Relearn"])
def test_unlearn_simples_wmdp_losses_equal_the_main_functions(peers, models, method):
    model, reference = models
    trainer = _trainer(
        getattr(peers.wmdp, method), gamma=WMDP_GAMMA, beta=BETA, infer_model=reference
    )
    inputs = _wmdp_inputs(peers)
    ours = _wmdp_cases()[method]
    _assert_same(
        _value_and_grads(model, lambda: trainer.compute_loss(model, inputs)),
        _value_and_grads(model, lambda: ours(model, reference, inputs)),
    )
