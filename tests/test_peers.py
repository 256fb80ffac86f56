"""The compat functions equal the published trainers' own ``compute_loss``, run from their files.

SOUL and open-unlearning's loss code is read at test time from the project's ``shared/peers``
folder beside the repository (or ``$UNLEARNING_PEERS``), checked byte for byte against its
manifest, and never copied here; without it (a user's clone) the module is skipped. Each trainer
runs on a tiny random ``LlamaForCausalLM`` in float64, with inputs from the trainers' own
collators (right padding, a row with a long prompt, a row without a valid label), and a reference
model whose head is ten times sharper, so that some reference probabilities fall below 1e-12.
Value and the gradient of every model parameter agree to 1e-12 relative; in float32 the value to
1e-6 and the gradients to 3e-5.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from unlearning_losses.compat import open_unlearning as ou  # noqa: E402
from unlearning_losses.compat import soul  # noqa: E402

PEERS = Path(
    os.environ.get("UNLEARNING_PEERS", Path(__file__).resolve().parents[2] / "shared" / "peers")
)
if not (PEERS / "manifest.json").exists():
    pytest.skip(
        f"the peers' code is not at {PEERS} (set UNLEARNING_PEERS)", allow_module_level=True
    )

VOCAB, HIDDEN, LAYERS = 128, 32, 2


def _blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_the_peers_files_are_the_published_bytes():
    manifest = json.loads((PEERS / "manifest.json").read_text())
    for peer in manifest.values():
        for name, blob in peer["files"].items():
            assert _blob_id(PEERS / peer["dir"] / name) == blob, f"{peer['dir']}/{name}"


@contextmanager
def _stand_ins() -> Iterator[None]:
    """Modules the peers import but no loss path uses, where not installed: present only while
    importing them."""

    def module(name: str, **attributes: object) -> types.ModuleType:
        made = types.ModuleType(name)
        made.__dict__.update(attributes)
        made.__spec__ = importlib.machinery.ModuleSpec(name, None)
        return made

    class DeepSpeedEngine:  # never an instance: isinstance() is False
        pass

    class DictConfig(dict):
        pass

    accelerate_utils = module("accelerate.utils", is_deepspeed_available=lambda: False)
    stand_ins = {
        "datasets": module("datasets"),
        "accelerate": module(
            "accelerate",
            __version__="0.0.0",
            skip_first_batches=lambda *a, **k: None,
            utils=accelerate_utils,
        ),
        "accelerate.utils": accelerate_utils,
        "deepspeed": module("deepspeed", DeepSpeedEngine=DeepSpeedEngine),
        "omegaconf": module("omegaconf", DictConfig=DictConfig),
    }
    stand_ins = {
        name: stand_in
        for name, stand_in in stand_ins.items()
        if name not in sys.modules and importlib.util.find_spec(name.split(".")[0]) is None
    }
    saved = {name: sys.modules.get(name) for name in stand_ins}
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        sys.dont_write_bytecode = writes_bytecode
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


@pytest.fixture(scope="module")
def peers() -> types.SimpleNamespace:
    with _stand_ins():
        folder = PEERS / "soul" / "src" / "unlearn"
        spec = importlib.util.spec_from_file_location(
            "soul_unlearn", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        soul_unlearn = importlib.util.module_from_spec(spec)
        sys.modules["soul_unlearn"] = soul_unlearn
        spec.loader.exec_module(soul_unlearn)
        base_spec = importlib.util.spec_from_file_location(
            "soul_dataset_base", PEERS / "soul" / "src" / "dataset" / "Base.py"
        )
        soul_data = importlib.util.module_from_spec(base_spec)
        base_spec.loader.exec_module(soul_data)
        source = str(PEERS / "open_unlearning" / "src")
        sys.path.insert(0, source)
        try:
            import data.collators as ou_collators
            import trainer as ou_trainer
        finally:
            sys.path.remove(source)
    return types.SimpleNamespace(
        soul=soul_unlearn,
        soul_collator=soul_data.unlearncollector,
        ou=ou_trainer,
        ou_collator=ou_collators.DataCollatorForSupervisedDataset,
    )


# --- models and inputs ------------------------------------------------------------------------


def _model(dtype: torch.dtype, seed: int, head_scale: float = 1.0) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        model.lm_head.weight.mul_(head_scale)
    return model


def _models(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model and a reference: the same weights, perturbed in the layers, with a head 10 times
    sharper (some reference probabilities below 1e-12)."""
    model = _model(dtype, 0)
    reference = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        reference.lm_head.weight.mul_(10.0)
        for p in reference.model.layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    for p in reference.parameters():
        p.requires_grad_(False)
    return model, reference


def _sequences(seed: int) -> list[dict[str, torch.Tensor]]:
    """Prompt + answer examples: a short one, one with a long prompt, one without a valid label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, answer in ((3, 5), (11, 2), (4, 0)):
        ids = torch.randint(1, VOCAB, (prompt + answer,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


class _Tokenizer:
    pad_token_id = 0


def _ou_batch(peers, seed: int) -> dict[str, torch.Tensor]:
    return peers.ou_collator(_Tokenizer())(_sequences(seed))


def _ou_inputs(peers, method: str) -> dict:
    if method == "DPO":
        forget = {"original": _ou_batch(peers, 1), "alternate": _ou_batch(peers, 3)}
        return {"forget": forget, "retain": _ou_batch(peers, 2)}
    return {"forget": _ou_batch(peers, 1), "retain": _ou_batch(peers, 2)}


def _soul_inputs(peers) -> dict:
    """SOUL's collator stacks fixed-length examples: pad them to one length first."""

    def examples(seed: int) -> list[dict[str, torch.Tensor]]:
        batch = _ou_batch(peers, seed)
        return [
            {
                "input_ids": ids,
                "attention_mask": mask.long(),
                "label": labels,
                "refused_label": labels,
                "question_length": torch.tensor(0),
            }
            for ids, mask, labels in zip(
                batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
            )
        ]

    forget, retain = examples(1), examples(2)
    return peers.soul_collator(
        [{"forget": f, "retain": r} for f, r in zip(forget, retain, strict=True)]
    )


def _hf_fields(batch) -> dict[str, torch.Tensor]:
    if isinstance(batch, tuple):  # SOUL: (input_ids, attention_mask, labels, ...)
        return {"input_ids": batch[0], "attention_mask": batch[1], "labels": batch[2]}
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


# --- running a trainer's compute_loss and ours ----------------------------------------------


def _trainer(cls, model, reference, **attributes):
    """A trainer without ``Trainer.__init__``: only what ``compute_loss`` reads."""
    obj = cls.__new__(cls)
    obj.model, obj.ref_model, obj.infer_model = model, reference, reference
    obj.__dict__.update(attributes)
    return obj


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


def _assert_same(theirs, ours, rtol: float) -> None:
    (their_value, their_grads), (our_value, our_grads) = theirs, ours
    float32 = our_value.dtype == torch.float32
    # float32: the value within 1e-6 (absolute or relative); the gradients, through the whole
    # network in float32, within 3e-5 relative (measured up to 1.1e-5).
    torch.testing.assert_close(our_value, their_value, rtol=rtol, atol=rtol if float32 else 0.0)
    grad_rtol = 30 * rtol if float32 else rtol
    for name, grad in their_grads.items():
        scale = grad.abs().max().clamp(min=torch.finfo(grad.dtype).tiny)
        error = (our_grads[name] - grad).abs().max() / scale
        assert error <= grad_rtol, f"gradient of {name}: {error:.3g} relative"


def _logits(model, batch) -> torch.Tensor:
    return model(**_hf_fields(batch)).logits


def _ref_logits(reference, batch) -> torch.Tensor:
    with torch.no_grad():
        return reference(**_hf_fields(batch)).logits


def _activations(model, batch, layer: int) -> torch.Tensor:
    captured = []
    hook = model.model.layers[layer].register_forward_hook(
        lambda module, args, output: captured.append(
            output[0] if isinstance(output, tuple) else output
        )
    )
    try:
        model(**_hf_fields(batch))
    finally:
        hook.remove()
    return captured[0]


# --- the cases --------------------------------------------------------------------------------


def _soul_cases(peers):
    S = peers.soul
    f = lambda inputs: inputs["forget"]  # noqa: E731
    r = lambda inputs: inputs["retain"]  # noqa: E731
    return {
        "soul GA+FT": (
            S.GA_FT,
            {"gamma": 0.7},
            lambda m, ref, i: soul.ga_ft_loss(
                _logits(m, f(i)), f(i)[2], _logits(m, r(i)), r(i)[2], gamma=0.7
            ),
        ),
        "soul GA+KL": (
            S.GA_KL,
            {"gamma": 0.7},
            lambda m, ref, i: soul.ga_kl_loss(
                _logits(m, f(i)), f(i)[2], _logits(m, r(i)), _ref_logits(ref, r(i)), gamma=0.7
            ),
        ),
        "soul KL": (
            S.KL,
            {"gamma": 0.7},
            lambda m, ref, i: soul.kl_loss(
                _logits(m, f(i)),
                _ref_logits(ref, f(i)),
                _logits(m, r(i)),
                _ref_logits(ref, r(i)),
                gamma=0.7,
            ),
        ),
        "soul NPO": (
            S.NPO,
            {"gamma": 0.7},
            lambda m, ref, i: soul.npo_loss(
                _logits(m, f(i)),
                _ref_logits(ref, f(i)),
                f(i)[2],
                _logits(m, r(i)),
                r(i)[2],
                gamma=0.7,
            ),
        ),
    }


def _retain(ref, i, retain_loss_type: str) -> dict:
    if retain_loss_type == "NLL":
        return {}
    return {"retain_loss_type": "KL", "ref_retain_logits": _ref_logits(ref, i["retain"])}


def _ou_cases(peers, retain_loss_type: str):
    T = peers.ou
    f = lambda i: i["forget"]  # noqa: E731
    r = lambda i: i["retain"]  # noqa: E731
    common = {"gamma": 0.8, "alpha": 0.6, "retain_loss_type": retain_loss_type}

    def two_sided(fn, **kw):
        return lambda m, ref, i: fn(
            _logits(m, f(i)),
            f(i)["labels"],
            _logits(m, r(i)),
            r(i)["labels"],
            gamma=0.8,
            alpha=0.6,
            **_retain(ref, i, retain_loss_type),
            **kw,
        )

    def with_reference(fn, **kw):
        return lambda m, ref, i: fn(
            _logits(m, f(i)),
            _ref_logits(ref, f(i)),
            f(i)["labels"],
            _logits(m, r(i)),
            r(i)["labels"],
            gamma=0.8,
            alpha=0.6,
            **_retain(ref, i, retain_loss_type),
            **kw,
        )

    def dpo(m, ref, i):
        original, alternate = f(i)["original"], f(i)["alternate"]
        return ou.dpo_loss(
            _logits(m, original),
            _ref_logits(ref, original),
            original["labels"],
            _logits(m, alternate),
            _ref_logits(ref, alternate),
            alternate["labels"],
            _logits(m, r(i)),
            r(i)["labels"],
            beta=0.5,
            gamma=0.8,
            alpha=0.6,
            **_retain(ref, i, retain_loss_type),
        )

    def rmu(m, ref, i):
        control = CONTROL.to(m.dtype)
        return ou.rmu_loss(
            _activations(m, f(i), RMU_LAYER),
            f(i)["labels"],
            _activations(m, r(i), RMU_LAYER),
            _activations(ref, r(i), RMU_LAYER).detach(),
            r(i)["labels"],
            control.reshape(-1),
            gamma=0.8,
            alpha=0.6,
        )

    return {
        "GradDiff": (T.GradDiff, common, two_sided(ou.grad_diff_loss)),
        "DPO": (T.DPO, {**common, "beta": 0.5}, dpo),
        "CEU": (
            T.CEU,
            {"ignore_first_n_answer_tokens": 1},
            lambda m, ref, i: ou.ceu_loss(_logits(m, f(i)), f(i)["labels"]),
        ),
        "RMU": (
            T.RMU,
            {
                **common,
                "retain_loss_type": "EMBED_DIFF",
                "steering_coeff": 2.0,
                "control_vec": CONTROL,
                "module_layer": RMU_LAYER,
            },
            rmu,
        ),
        "NPO": (T.NPO, {**common, "beta": 0.5}, with_reference(ou.npo_loss, beta=0.5)),
        "SimNPO": (
            T.SimNPO,
            {**common, "beta": 0.5, "delta": 0.2},
            two_sided(ou.simnpo_loss, beta=0.5, delta=0.2),
        ),
        "WGA": (T.WGA, {**common, "beta": 0.5}, two_sided(ou.wga_loss, beta=0.5)),
        "SatImp": (
            T.SatImp,
            {**common, "beta1": 2.0, "beta2": 1.5},
            two_sided(ou.satimp_loss, beta1=2.0, beta2=1.5),
        ),
        "UNDIAL": (T.UNDIAL, {**common, "beta": 3.0}, with_reference(ou.undial_loss, beta=3.0)),
        "PDU": (
            T.PDU,
            {
                **common,
                "preferences": [0.8, 0.6],
                "retain_loss_eps": 0.3,
                "primal_dual": False,
                "loss_names": ["forget_loss", "retain_loss"],
                "log": lambda *a, **k: None,
            },
            lambda m, ref, i: ou.pdu_loss(
                _logits(m, f(i)),
                f(i)["labels"],
                _logits(m, r(i)),
                r(i)["labels"],
                dual=0.6,
                gamma=0.8,
                retain_loss_eps=0.3,
                **_retain(ref, i, retain_loss_type),
            ),
        ),
    }


def _without_empty_rows(inputs: dict) -> dict:
    def kept(batch: dict) -> dict:
        keep = (batch["labels"] != -100).any(-1)
        return {k: v[keep] for k, v in batch.items()}

    return {name: kept(batch) for name, batch in inputs.items()}


def _run_case(peers, cls, attributes, ours, inputs, dtype, rtol):
    model, reference = _models(dtype)
    attributes = dict(attributes)
    if "module_layer" in attributes:  # RMU: the hooked layer of each model
        layer = attributes.pop("module_layer")
        attributes["model_module"] = model.model.layers[layer]
        attributes["ref_module"] = reference.model.layers[layer]
        attributes["control_vec"] = attributes["control_vec"].to(dtype)
    trainer = _trainer(cls, model, reference, **attributes)
    theirs = _value_and_grads(model, lambda: trainer.compute_loss(model, inputs))
    mine = _value_and_grads(model, lambda: ours(model, reference, inputs))
    if theirs[0].isnan() and cls.__name__ in NAN_ON_AN_EMPTY_ROW:
        # Documented difference: a row without a valid label makes theirs NaN, not ours.
        assert mine[0].isfinite()
        inputs = _without_empty_rows(inputs)
        theirs = _value_and_grads(model, lambda: trainer.compute_loss(model, inputs))
        mine = _value_and_grads(model, lambda: ours(model, reference, inputs))
    _assert_same(theirs, mine, rtol)


#: Trainers whose value is NaN when a row has no valid label (0 / 0 per sequence).
NAN_ON_AN_EMPTY_ROW = {"SimNPO", "RMU"}
RMU_LAYER = 1
CONTROL = torch.rand(1, 1, HIDDEN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("method", ["soul GA+FT", "soul GA+KL", "soul KL", "soul NPO"])
def test_soul_compat_equals_souls_compute_loss(peers, method, dtype):
    cls, attributes, ours = _soul_cases(peers)[method]
    _run_case(peers, cls, attributes, ours, _soul_inputs(peers), dtype, TOLERANCE[dtype])


OU_METHODS = ["GradDiff", "NPO", "SimNPO", "DPO", "WGA", "SatImp", "UNDIAL", "CEU", "PDU", "RMU"]
#: Methods without a NLL / KL retain choice (CE-U has no retain term; RMU matches activations).
ONE_RETAIN = {"CEU", "RMU"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("retain_loss_type", ["NLL", "KL"])
@pytest.mark.parametrize("method", OU_METHODS)
def test_open_unlearning_compat_equals_its_compute_loss(peers, method, retain_loss_type, dtype):
    if method in ONE_RETAIN and retain_loss_type == "KL":
        pytest.skip(f"{method} has no KL retain variant")
    cls, attributes, ours = _ou_cases(peers, retain_loss_type)[method]
    _run_case(peers, cls, attributes, ours, _ou_inputs(peers, method), dtype, TOLERANCE[dtype])


def test_the_reference_reaches_the_far_tail(peers):
    """The sharper reference head puts some probabilities below SOUL's 1e-12, where its epsilon
    moves the value (the SOUL cases above run on these inputs)."""
    _, reference = _models(torch.float64)
    inputs = _soul_inputs(peers)
    with torch.no_grad():
        q = torch.softmax(_ref_logits(reference, inputs["forget"]), -1)
    assert (q < 1e-12).any()
