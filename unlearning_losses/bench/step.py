"""``unlearning-losses bench --step``: one unlearning step of a Hugging Face causal LM, with the
model's own loss, the library's logits and fused-linear losses, Liger-Kernel and
``torch.compile``.

The model is built from a config, nothing downloaded: ``--model llama | qwen2 | gemma2`` with
``--layers``, ``--hidden`` (heads of 64 dimensions where the size allows, a quarter as many
key-value heads, an MLP four times as wide, tied embeddings as the small Llama 3.2, Qwen 2.5 and
Gemma 2 models have), ``--vocabs`` and ``--seq`` positions. The frozen reference is the model as
built; the model trained is that model with its weights perturbed (it has moved from the
reference, so the KL and NPO terms are not at their trivial point). The forget and the retain
batch are each ``--batch`` random sequences of ``--seq`` tokens, their labels the tokens
themselves with the first quarter of each sequence ignored (a prompt).

One step: the reference's forward on the retain batch where the method needs it (GA+KL), the
model's forward on both batches, the loss (the methods and implementations are described in
:mod:`.step_providers`), the backward, plain SGD (no optimiser state) and the gradients set to
None; each with gradient checkpointing off and on. Every implementation starts from the same
weights. Reported per method, implementation and checkpointing:

- **step ms**: the median of ``--repeats`` timed steps after a first one; the implementations
  take turns, one step each per round, so that a change in a shared machine's load reaches all
  of them alike;
- **loss part ms** and its share of the step: the head and the loss inside those same steps, from
  the end of the trunks' forward to the end of the loss's forward, plus from the start of the
  backward to the start of the trunks' backward (autograd runs the loss's nodes first: they
  were made after the trunks');
- **peak extra MiB**: memory beyond what the step finds allocated (the models, the batch, the
  cached reference log-probs), the median over the timed steps (the CUDA allocator's peak; on
  Linux CPUs the resident-set peak, as ``bench`` measures it);
- **compile s** for ``torch.compile``: the warm-up step's time beyond the median (0 where it
  was not slower), on the row where its terms were first compiled in the run; Inductor's
  on-disk cache, warm from an earlier run, shortens it;
- **error vs float64**: the warm-up step's loss (at the starting weights) against the same loss
  evaluated in float64 from the hidden states the model gives at those weights (head and loss in
  float64; the trunk in the run's dtype).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import importlib.metadata
import math
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import unlearning_losses as ul

from .._progress import progress
from ..head_config import logit_options
from . import report
from .arguments import DTYPES, at_least, device, machine, out_folder
from .measure import Clock, peak_extra_bytes
from .providers import BETA, SIMNPO_BETA
from .step_providers import (
    BASELINE,
    IGNORE,
    IMPLEMENTATIONS,
    METHODS,
    Head,
    Implementation,
    Inputs,
    implementations,
)

MODELS = ("llama", "qwen2", "gemma2")
CHECKPOINTING = ("off", "on")
#: Defaults per device: about two minutes on two CPU cores; on a GPU, a model shaped like Llama
#: 3.2 1B (16 layers, H = 2048, 32 heads, 8 key-value heads, MLP 8192, V = 128256).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {
        "model": "llama",
        "layers": 2,
        "hidden": 256,
        "vocabs": [32000],
        "seq": 512,
        "batch": 2,
        "dtypes": ["float32"],
        "repeats": 3,
    },
    "cuda": {
        "model": "llama",
        "layers": 16,
        "hidden": 2048,
        "vocabs": [128256],
        "seq": 1024,
        "batch": 4,
        "dtypes": ["bfloat16"],
        "repeats": 5,
    },
}
#: The options only ``--step`` takes, and those only ``bench`` without it takes.
STEP_ONLY = {
    "model": "--model",
    "layers": "--layers",
    "seq": "--seq",
    "batch": "--batch",
    "methods": "--methods",
    "checkpointing": "--checkpointing",
}
WITHOUT_STEP = {"losses": "--losses", "tokens": "--tokens"}
LEARNING_RATE = 1e-4
PERTURBATION = 0.01  # the trained model's distance from the reference, per weight
PROMPT = 4  # the first 1/PROMPT of each sequence's labels is ignored
FLOAT64_CHUNK = 2**22  # float64 logits per chunk of the float64 evaluation (32 MiB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--step",
        action="store_true",
        help="time one unlearning step of a Hugging Face model instead (options below)",
    )
    group = parser.add_argument_group("--step", "also --hidden, --vocabs, --dtypes, --repeats")
    group.add_argument("--model", choices=MODELS, help="the architecture (default llama)")
    group.add_argument("--layers", type=int, help="decoder layers (cuda 16, cpu 2)")
    group.add_argument("--seq", type=int, help="tokens per sequence (cuda 1024, cpu 512)")
    group.add_argument(
        "--batch", type=int, help="sequences in the forget and in the retain batch (cuda 4, cpu 2)"
    )
    group.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all")
    group.add_argument(
        "--checkpointing",
        nargs="+",
        choices=CHECKPOINTING,
        help="gradient checkpointing (default: off and on)",
    )


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """``bench --step``'s arguments, checked, with the device's defaults filled in."""

    device: torch.device
    model: str
    layers: int
    hidden: int
    vocabs: tuple[int, ...]
    seq: int
    batch: int
    dtypes: tuple[str, ...]
    methods: tuple[str, ...]
    implementations: tuple[str, ...] | None
    checkpointing: tuple[str, ...]
    repeats: int
    compiled: bool
    out: Path | None
    quiet: bool


def refuse_step_arguments(args: argparse.Namespace) -> None:
    """``bench`` without ``--step``: its options are refused by name."""
    for name, flag in STEP_ONLY.items():
        if getattr(args, name) is not None:
            raise ValueError(f"{flag}: only with --step")


def check_arguments(args: argparse.Namespace) -> StepSettings:
    """The arguments checked before any model is built, a ValueError naming the first bad one."""
    for name, flag in WITHOUT_STEP.items():
        if getattr(args, name) is not None:
            raise ValueError(f"{flag}: not with --step (it takes --methods and the model's sizes)")
    found = device(args.device)
    for flag, values, least in (
        ("--layers", [args.layers], 1),
        ("--hidden", [args.hidden], 2),
        ("--vocabs", args.vocabs, 1),
        ("--seq", [args.seq], 2),  # one scored label at least
        ("--batch", [args.batch], 1),
        ("--repeats", [args.repeats], 1),
    ):
        at_least(flag, values, least)
    if args.hidden is not None and args.hidden % 2:
        raise ValueError(
            f"--hidden must be even with --step (rotary embeddings), not {args.hidden}"
        )
    unknown = [name for name in args.implementations or [] if name not in IMPLEMENTATIONS]
    if unknown:
        known = ", ".join(map(repr, IMPLEMENTATIONS))
        raise ValueError(
            f"--implementations: unknown {', '.join(map(repr, unknown))} with --step; "
            f"known: {known}"
        )
    defaults = DEFAULTS[found.type]

    def given(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    return StepSettings(
        device=found,
        model=given("model"),
        layers=given("layers"),
        hidden=given("hidden"),
        vocabs=tuple(given("vocabs")),
        seq=given("seq"),
        batch=given("batch"),
        dtypes=tuple(given("dtypes")),
        methods=tuple(args.methods or METHODS),
        implementations=tuple(args.implementations) if args.implementations else None,
        checkpointing=tuple(args.checkpointing or CHECKPOINTING),
        repeats=given("repeats"),
        compiled=True if args.compile is None else args.compile,
        out=None if args.out is None else out_folder(args.out),
        quiet=args.quiet,
    )


def config(name: str, layers: int, hidden: int, vocab: int, seq: int) -> Any:
    """The Hugging Face config of ``name`` at these sizes."""
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    heads = _heads(hidden)
    key_value_heads = max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)
    sizes: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key_value_heads,
        "max_position_embeddings": seq,
        "tie_word_embeddings": True,
        "use_cache": False,
    }
    if name == "gemma2":
        head_dim = hidden // heads
        return Gemma2Config(**sizes, head_dim=head_dim, query_pre_attn_scalar=head_dim)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[name](**sizes)


def _heads(hidden: int) -> int:
    """Heads of about 64 dimensions, each of an even size (rotary embeddings halve it)."""
    for heads in range(max(1, hidden // 64), 0, -1):
        if hidden % heads == 0 and hidden // heads % 2 == 0:
            return heads
    raise ValueError(f"--hidden must be even with --step, not {hidden}")


def build(
    name: str, layers: int, hidden: int, vocab: int, seq: int, dtype: torch.dtype, on: torch.device
) -> tuple[Any, Any]:
    """The model to train and its frozen reference, seeded: the reference as built, the model
    that reference with every weight moved by ``PERTURBATION`` times a standard normal."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # Gemma 2 softcaps its attention scores, which only the eager attention applies.
    attention = "eager" if name == "gemma2" else "sdpa"
    with on:
        model = AutoModelForCausalLM.from_config(
            config(name, layers, hidden, vocab, seq), attn_implementation=attention
        )
    model.to(dtype)
    reference = copy.deepcopy(model).requires_grad_(False)
    generator = torch.Generator(device=on).manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(
                torch.randn(p.shape, generator=generator, device=on, dtype=p.dtype),
                alpha=PERTURBATION,
            )
    model.train()
    return model, reference


@dataclasses.dataclass
class Setup:
    """One model and everything its steps read, for one vocabulary and dtype."""

    model: Any
    reference: Any
    optimizer: torch.optim.Optimizer
    initial: dict[str, Tensor]
    forget_ids: Tensor
    retain_ids: Tensor
    inputs: Inputs
    device: torch.device
    clock: Clock


def setup(settings: StepSettings, vocab: int, dtype: torch.dtype) -> Setup:
    on = settings.device
    model, reference = build(
        settings.model, settings.layers, settings.hidden, vocab, settings.seq, dtype, on
    )
    generator = torch.Generator().manual_seed(2)
    forget_ids, retain_ids = (
        torch.randint(0, vocab, (settings.batch, settings.seq), generator=generator).to(on)
        for _ in range(2)
    )
    softcap = logit_options(model.config).get("logit_softcap")
    head = Head(model.get_output_embeddings().weight, softcap)
    ref_head = Head(reference.get_output_embeddings().weight, softcap)
    forget_labels = _labels(forget_ids)
    with torch.no_grad():  # the reference's log-probs, cached once as NPO users do
        ref_hidden = reference.base_model(forget_ids).last_hidden_state
        ref_logprobs = ul.token_logprobs(ref_head.logits(ref_hidden), forget_labels)
    inputs = Inputs(
        forget_labels, _labels(retain_ids), ref_logprobs, head, ref_head, model.loss_function
    )
    return Setup(
        model,
        reference,
        torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
        {name: t.detach().clone() for name, t in model.state_dict().items()},
        forget_ids,
        retain_ids,
        inputs,
        on,
        Clock(on),
    )


def _labels(ids: Tensor) -> Tensor:
    labels = ids.clone()
    labels[:, : ids.shape[1] // PROMPT] = IGNORE
    return labels


def step(s: Setup, implementation: Implementation, method: str) -> tuple[float, float, Tensor]:
    """One training step: its milliseconds, those of its loss part, and the loss (detached)."""
    clock = s.clock
    start = clock.mark()
    inputs = s.inputs
    if METHODS[method][1] == "kl":
        with torch.no_grad():
            ref_hidden = s.reference.base_model(s.retain_ids).last_hidden_state
            if implementation.reads == "logits":
                ref_hidden = inputs.ref_head.logits(ref_hidden)
        inputs = dataclasses.replace(inputs, reference=ref_hidden)
    forget = s.model.base_model(s.forget_ids).last_hidden_state
    retain = s.model.base_model(s.retain_ids).last_hidden_state
    trunk_done = clock.mark()
    reached: list[Any] = []
    for hidden in (forget, retain):
        hidden.register_hook(lambda _: reached.append(clock.mark()))
    loss = implementation.loss(method, forget, retain, inputs)
    loss_done = clock.mark()
    loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    end = clock.mark()
    # A tensor's hook runs just before the node that made it: the first is the trunk's backward
    # starting. The engine runs the most recently made ready node first, so by then every node
    # of the loss (made after both trunks' forward) has run.
    loss_ms = clock.ms(trunk_done, loss_done) + clock.ms(loss_done, reached[0])
    return clock.ms(start, end), loss_ms, loss.detach()


def measure(
    s: Setup,
    implementations: list[Implementation],
    method: str,
    checkpointing: bool,
    repeats: int,
    compiles: bool,
) -> dict[str, dict[str, float]]:
    """By implementation name: a first step of each from the starting weights (its loss, and for
    ``torch.compile``, where ``compiles``, the compile time), then ``repeats`` rounds of one timed
    step of each, their order rotated every round, so that a change in the machine's load
    reaches every implementation alike."""
    _checkpointing(s.model, checkpointing)
    first, losses = [], []
    for implementation in implementations:
        s.model.load_state_dict(s.initial)
        ms, _, loss = step(s, implementation, method)
        first.append(ms)
        losses.append(loss.item())
    steps: list[list[tuple[float, float, Tensor]]] = [[] for _ in implementations]
    peaks: list[list[float]] = [[] for _ in implementations]
    for round_ in range(repeats):
        for k in range(len(implementations)):
            i = (round_ + k) % len(implementations)
            timed = functools.partial(_append_step, steps[i], s, implementations[i], method)
            peaks[i].append(peak_extra_bytes(timed, s.device))
    results = {}
    for i, implementation in enumerate(implementations):
        step_ms = statistics.median(ms for ms, _, _ in steps[i])
        loss_ms = statistics.median(ms for _, ms, _ in steps[i])
        compiled = compiles and implementation.name.startswith("torch.compile")
        results[implementation.name] = {
            "step_ms": step_ms,
            "loss_ms": loss_ms,
            "loss_share": loss_ms / step_ms,
            "peak_extra_mib": statistics.median(peaks[i]) / 2**20,
            "compile_s": max(0.0, first[i] - step_ms) / 1e3 if compiled else math.nan,
            "loss": losses[i],
        }
    return results


def _append_step(
    steps: list[tuple[float, float, Tensor]], s: Setup, implementation: Implementation, method: str
) -> None:
    steps.append(step(s, implementation, method))


def _checkpointing(model: Any, on: bool) -> None:
    """Gradient checkpointing of every decoder layer, non-reentrant, on or off (transformers 5
    renamed it activation checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def float64_values(s: Setup, methods: tuple[str, ...]) -> dict[str, float]:
    """Each method's loss at the starting weights, the head and the loss in float64 on the
    hidden states the model (in its dtype, checkpointing off) gives for the two batches."""
    s.model.load_state_dict(s.initial)
    _checkpointing(s.model, False)
    inputs = s.inputs
    with torch.no_grad():
        forget = s.model.base_model(s.forget_ids).last_hidden_state
        retain = s.model.base_model(s.retain_ids).last_hidden_state
        ref_retain = s.reference.base_model(s.retain_ids).last_hidden_state
        forget_lp = _rows64(forget, inputs.forget_labels, inputs.head, "logprobs")
        retain_lp = _rows64(retain, inputs.retain_labels, inputs.head, "logprobs")
        retain_kl = None
        if any(METHODS[m][1] == "kl" for m in methods):
            pair = (inputs.head, inputs.ref_head, ref_retain)
            retain_kl = _rows64(retain, inputs.retain_labels, pair, "kl")
    forget_valid = inputs.forget_labels[:, 1:] != IGNORE
    retain_valid = inputs.retain_labels[:, 1:] != IGNORE
    log_ratio = torch.where(forget_valid, forget_lp - inputs.ref_logprobs.double(), 0).sum(-1)
    mean_nll = -(forget_lp * forget_valid).sum(-1) / forget_valid.sum(-1)
    forget_terms = {
        "ga": lambda: forget_lp[forget_valid].mean(),
        "npo": lambda: (2 / BETA * F.softplus(BETA * log_ratio)).mean(),
        "simnpo": lambda: (2 / SIMNPO_BETA * F.softplus(-SIMNPO_BETA * mean_nll)).mean(),
    }
    retain_terms = {
        "nll": lambda: -retain_lp[retain_valid].mean(),
        "kl": lambda: retain_kl[retain_valid].mean(),  # type: ignore[index]
    }
    values = {}
    for method in methods:
        forget_term, retain_term = METHODS[method]
        values[method] = (forget_terms[forget_term]() + retain_terms[retain_term]()).item()
    return values


def _rows64(hidden: Tensor, labels: Tensor, head: Any, what: str) -> Tensor:
    """Per scored position ``(B, T - 1)`` in float64: the label's log-probability
    (``what="logprobs"``, ``head`` a :class:`Head`) or KL(P ‖ P_ref) (``"kl"``, ``head`` the
    pair of heads and the reference's hidden states); chunks of rows keep the float64 logits
    small."""
    batch, positions = labels.shape[0], labels.shape[1] - 1
    rows = max(1, FLOAT64_CHUNK // _vocab(head))
    out = torch.zeros(batch, positions, dtype=torch.float64, device=hidden.device)
    for b in range(batch):
        for start in range(0, positions, rows):
            at = slice(start, min(start + rows, positions))
            if what == "logprobs":
                logp = _logits64(head, hidden[b, at]).log_softmax(-1)
                target = labels[b, 1:][at].clamp(min=0)
                out[b, at] = logp.gather(-1, target[:, None]).squeeze(-1)
            else:
                model_head, ref_head, ref_hidden = head
                logp = _logits64(model_head, hidden[b, at]).log_softmax(-1)
                logq = _logits64(ref_head, ref_hidden[b, at]).log_softmax(-1)
                out[b, at] = (logp.exp() * (logp - logq)).sum(-1)
    return out


def _vocab(head: Any) -> int:
    return (head if isinstance(head, Head) else head[0]).weight.shape[0]


def _logits64(head: Head, hidden: Tensor) -> Tensor:
    logits = F.linear(hidden.double(), head.weight.double())
    return logits if head.softcap is None else head.softcap * torch.tanh(logits / head.softcap)


def run(settings: StepSettings) -> list[dict]:
    """Measure every method and implementation, print the table, write the files; the records."""
    found = implementations(settings.device, settings.compiled, settings.implementations)
    plan = [(vocab, dtype) for vocab in settings.vocabs for dtype in settings.dtypes]
    per_model = sum(
        len(settings.checkpointing) for m in settings.methods for i in found if i.computes(m)
    )
    records = []
    with progress(len(plan) * per_model, "bench --step", "measurement", not settings.quiet) as bar:
        for vocab, dtype_name in plan:
            s = setup(settings, vocab, DTYPES[dtype_name])
            expected = float64_values(s, settings.methods)
            for method in settings.methods:
                here = [i for i in found if i.computes(method)]
                runnable = [i for i in here if not i.available]
                for n, checkpointing in enumerate(settings.checkpointing):
                    # The compiled terms compile at their first call: checkpointing's first setting.
                    measured = measure(
                        s, runnable, method, checkpointing == "on", settings.repeats, n == 0
                    )
                    for implementation in here:
                        values = measured.get(implementation.name, _UNMEASURED)
                        records.append(
                            {
                                **values,
                                "method": method,
                                "model": settings.model,
                                "vocab": vocab,
                                "dtype": dtype_name,
                                "checkpointing": checkpointing,
                                "implementation": implementation.name,
                                "error_vs_float64": abs(values["loss"] - expected[method]),
                                "note": implementation.available or "",
                            }
                        )
                    bar.update(len(here))
            del s
    records = [{column: r[column] for column in report.STEP_COLUMNS} for r in _ratios(records)]
    header = _header(settings)
    print(report.step_markdown(records, header))
    if settings.out:
        for path in report.write_step(records, header, settings.out):
            print(f"wrote {path}")
    return records


_UNMEASURED = dict.fromkeys(
    ("step_ms", "loss_ms", "loss_share", "peak_extra_mib", "compile_s", "loss"), math.nan
)


def _ratios(records: list[dict]) -> list[dict]:
    """Each record's time and memory against the model loss's in the same setting."""
    key = ("method", "vocab", "dtype", "checkpointing")
    baselines = {tuple(r[k] for k in key): r for r in records if r["implementation"] == BASELINE}
    for r in records:
        baseline = baselines[tuple(r[k] for k in key)]
        r["time_vs_model"] = r["step_ms"] / baseline["step_ms"]
        r["memory_vs_model"] = r["peak_extra_mib"] / baseline["peak_extra_mib"]
    return records


def _header(settings: StepSettings) -> str:
    c = config(settings.model, settings.layers, settings.hidden, settings.vocabs[0], settings.seq)
    versions = ", ".join(
        f"{name} {_version(package)}"
        for name, package in (
            ("torch", "torch"),
            ("transformers", "transformers"),
            ("Liger-Kernel", "liger-kernel"),
        )
    )
    return (
        f"{machine(settings.device)}; {versions}, Python {platform.python_version()}; "
        f"{settings.model}: {settings.layers} layers, H = {settings.hidden}, "
        f"{c.num_attention_heads} heads ({c.num_key_value_heads} key-value), MLP "
        f"{c.intermediate_size}, tied embeddings; forget and retain batches of {settings.batch} × "
        f"{settings.seq} tokens (the first {settings.seq // PROMPT} labels of each ignored); "
        f"SGD; median of {settings.repeats} steps after a warm-up, the implementations in turn; "
        f"{datetime.date.today().isoformat()}"
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
