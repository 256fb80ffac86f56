"""The GPU check: correctness and speed of the fused kernels against what users run today.

One command on a lent GPU (torch + triton, nothing to install; Liger-Kernel used when importable):

    python benchmarks/gpu_check.py OUT_DIR

It measures the device-to-device copy bandwidth; checks the kernels against a float64 reference on
sampled rows at N = 8192 tokens and V in {32000, 128256, 256000}, bfloat16 and float32; and times
forward, backward and forward+backward (CUDA events, median after warm-up, rotating inputs) of
GA, NPO (cached reference log-probs), forward KL and UNDIAL for: ours (Triton), ours with
``inplace_backward``, eager PyTorch as research code writes it, ``torch.compile`` of that (at the
``--compile-vocabs`` only: compiling every shape would not fit the time), and Liger-Kernel's
cross-entropy for GA. Achieved GB/s counts the bytes that must move (per logit: log-prob forward
1, backward 2 reads/writes of the logits' dtype, KL forward 2, backward 3) as a fraction of the
measured copy bandwidth. Last, GA, NPO and KL from hidden states (H = 4096, V = 128256,
bfloat16): the fused ``linear_*`` losses against materialised logits, and for GA PyTorch's
``linear_cross_entropy``. Writes
gpu_check.md and gpu_check.csv to OUT_DIR.

Runs on the CPU too (``--device cpu`` with ``TRITON_INTERPRET=1`` and tiny ``--tokens/--vocabs``),
to check the script itself.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table

import unlearning_losses as ul

SEQUENCES = 8
BETA = 0.1
UNDIAL_BETA = 10.0
# Logit reads/writes per element (in the logits' dtype) that each pass must make.
TRAFFIC = {"logprobs": {"fwd": 1, "bwd": 2, "fwd+bwd": 3}, "kl": {"fwd": 2, "bwd": 3, "fwd+bwd": 5}}
TWO_INPUT_LOSSES = ("kl", "undial")  # read the reference's logits too


class Timer:
    """Milliseconds of a callable: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def copy_bandwidth(device: torch.device, timer: Timer, megabytes: int) -> float:
    """Device-to-device copy GB/s (bytes read + written), median of 20 copies."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(20))
    return 2 * src.nbytes / ms / 1e6


# --- the losses, ours and as research code writes them ----------------------------------------


def eager_logprobs(logits, labels):
    flat = logits.float().view(-1, logits.shape[-1])
    return -F.cross_entropy(flat, labels.view(-1), reduction="none").view(labels.shape)


def eager_ga(logits, labels, ref_logprobs, ref_logits):
    return eager_logprobs(logits, labels).mean()


def eager_npo(logits, labels, ref_logprobs, ref_logits):
    delta = (eager_logprobs(logits, labels) - ref_logprobs).sum(-1)
    return (-F.logsigmoid(-BETA * delta) * 2 / BETA).mean()


def eager_kl(logits, labels, ref_logprobs, ref_logits):
    logp = F.log_softmax(logits.float(), -1)
    logq = F.log_softmax(ref_logits.float(), -1)
    return -(logp.exp() * (logp - logq)).sum(-1).mean()


def eager_undial(logits, labels, ref_logprobs, ref_logits):
    """UNDIAL as research code writes it: a float32 one-hot, the adjusted softmax, soft-label CE."""
    lowered = F.one_hot(labels, logits.shape[-1]).float() * UNDIAL_BETA
    target = F.softmax(ref_logits.float() - lowered, -1)
    flat = logits.float().view(-1, logits.shape[-1])
    return F.cross_entropy(flat, target.view(flat.shape))


def ours(inplace: bool):
    options = {"shift": False, "backend": "triton", "inplace_backward": inplace}
    return {
        "ga": lambda x, y, r, q: ul.ga_loss(x, y, **options),
        "npo": lambda x, y, r, q: ul.npo_loss(x, y, ref_logprobs=r, beta=BETA, **options),
        "kl": lambda x, y, r, q: ul.kl_loss(x, q, y, **options),
        **(
            {}
            if inplace
            else {
                "undial": lambda x, y, r, q: ul.undial_loss(
                    x, q, y, beta=UNDIAL_BETA, shift=False, backend="triton"
                )
            }
        ),
    }


def liger_ga():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerCrossEntropyLoss()
    return lambda x, y, r, q: -loss(x.view(-1, x.shape[-1]), y.view(-1))


# --- checks -----------------------------------------------------------------------------------


def check_rows(logits, ref_logits, labels, rows: torch.Tensor) -> dict[str, float]:
    """Max relative error of our per-token values and gradients on ``rows`` vs float64."""
    x = logits.detach().requires_grad_(True)
    upstream = torch.randn(labels.shape, device=logits.device)
    lp = ul.token_logprobs(x, labels, shift=False, backend="triton")
    (grad_lp,) = torch.autograd.grad((lp * upstream).sum(), x)
    kl = ul.kl_divergence(x, ref_logits, labels, shift=False, reduction="none", backend="triton")
    (grad_kl,) = torch.autograd.grad((kl * upstream).sum(), x)
    undial = ul.undial_loss(
        x, ref_logits, labels, beta=UNDIAL_BETA, shift=False, reduction="none", backend="triton"
    )
    (grad_undial,) = torch.autograd.grad((undial * upstream).sum(), x)

    flat = logits.view(-1, logits.shape[-1])[rows].double()
    ref_flat = ref_logits.view(-1, logits.shape[-1])[rows].double()
    targets, g = labels.view(-1)[rows], upstream.view(-1)[rows].double()
    logp, logq = flat.log_softmax(-1), ref_flat.log_softmax(-1)
    p = logp.exp()
    ref_lp = logp.gather(1, targets[:, None]).squeeze(1)
    onehot = F.one_hot(targets, flat.shape[-1]).double()
    ref_grad_lp = g[:, None] * (onehot - p)
    ref_kl = (p * (logp - logq)).sum(-1)
    ref_grad_kl = g[:, None] * p * (logp - logq - ref_kl[:, None])
    soft_target = (ref_flat - UNDIAL_BETA * onehot).softmax(-1)
    ref_undial = -(soft_target * logp).sum(-1)
    ref_grad_undial = g[:, None] * (p - soft_target)

    def err(got, want):
        return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()

    size = logits.shape[-1]
    return {
        "logprob": err(lp.view(-1)[rows], ref_lp),
        "logprob grad": err(grad_lp.view(-1, size)[rows], ref_grad_lp),
        "kl": err(kl.view(-1)[rows], ref_kl),
        "kl grad": err(grad_kl.view(-1, size)[rows], ref_grad_kl),
        "undial": err(undial.view(-1)[rows], ref_undial),
        "undial grad": err(grad_undial.view(-1, size)[rows], ref_grad_undial),
    }


def _one_pass(mode: str, fn, x, y, r, q) -> Callable[[], object]:
    """The work that ``mode`` times on one set of inputs."""
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                return fn(x, y, r, q)

        return forward
    if mode == "bwd":
        out = fn(x, y, r, q)
        return lambda: torch.autograd.grad(out, x, retain_graph=True)
    return lambda: torch.autograd.grad(fn(x, y, r, q), x)


def time_modes(fn, inputs, timer: Timer, repeats: int) -> dict[str, float]:
    """Median ms of forward, backward (retained graph) and forward+backward, rotating inputs."""
    results = {}
    for mode in ("fwd", "bwd", "fwd+bwd"):
        samples = [timer(_one_pass(mode, fn, *inputs[i % len(inputs)])) for i in range(repeats + 3)]
        results[mode] = statistics.median(samples[3:])  # the first 3 warm up
    return results


def peak_extra_bytes(fn, inputs, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    x, y, r, q = inputs[0]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.grad(fn(x, y, r, q), x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def fused_linear_rows(device, timer: Timer, repeats: int, tokens: int, hidden: int, vocab: int):
    """GA, NPO and KL from hidden states in bfloat16: ours fused against materialised logits + ours,
    and for GA PyTorch's ``linear_cross_entropy`` (reference and chunked)."""
    h = torch.randn(SEQUENCES, tokens // SEQUENCES, hidden, dtype=torch.bfloat16, device=device)
    w = torch.randn(vocab, hidden, dtype=torch.bfloat16, device=device) * hidden**-0.5
    h.requires_grad_(True)
    w.requires_grad_(True)
    y = torch.randint(0, vocab, h.shape[:2], device=device)
    ref_h = torch.randn_like(h)
    r = -torch.rand(h.shape[:2], device=device) * 10
    flat_h, flat_y = h.view(-1, hidden), y.view(-1)
    candidates = {
        ("ga", "ours fused"): lambda: ul.linear_ga_loss(h, w, y, shift=False),
        ("ga", "materialised + ours"): lambda: ul.ga_loss(F.linear(h, w), y, shift=False),
        ("ga", "F.linear_cross_entropy"): lambda: -F.linear_cross_entropy(flat_h, w, flat_y),
        ("ga", "F.linear_cross_entropy chunked"): lambda: (
            -F.linear_cross_entropy(flat_h, w, flat_y, options=torch.nn.LinearCrossEntropyOptions())
        ),
        ("npo", "ours fused"): lambda: ul.linear_npo_loss(h, w, y, ref_logprobs=r, shift=False),
        ("npo", "materialised + ours"): lambda: ul.npo_loss(
            F.linear(h, w), y, ref_logprobs=r, shift=False
        ),
        ("kl", "ours fused"): lambda: ul.linear_kl_divergence(h, w, ref_h, labels=y, shift=False),
        ("kl", "materialised + ours"): lambda: ul.kl_divergence(
            F.linear(h, w), F.linear(ref_h, w).detach(), y, shift=False
        ),
    }
    rows = []
    for (loss_name, name), loss in candidates.items():
        if name.startswith("F.") and not hasattr(F, "linear_cross_entropy"):
            continue  # older PyTorch releases have neither
        if name.endswith("chunked") and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            continue
        samples = [
            timer(lambda loss=loss: torch.autograd.grad(loss(), (h, w))) for _ in range(repeats + 3)
        ]
        ms = statistics.median(samples[3:])
        peak = float("nan")
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch.autograd.grad(loss(), (h, w))
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        rows.append([loss_name, name, tokens, hidden, vocab, f"{ms:.2f}", f"{peak:.0f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return rows


def make_inputs(tokens: int, vocab: int, dtype, device, copies: int):
    length = tokens // SEQUENCES
    inputs = []
    for _ in range(copies):
        x = torch.randn(SEQUENCES, length, vocab, dtype=dtype, device=device).requires_grad_(True)
        q = torch.randn(SEQUENCES, length, vocab, dtype=dtype, device=device)
        y = torch.randint(0, vocab, (SEQUENCES, length), device=device)
        r = -torch.rand(SEQUENCES, length, device=device) * 10
        inputs.append((x, y, r, q))
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256, 256000])
    parser.add_argument("--compile-vocabs", type=int, nargs="*", default=[128256])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--linear",
        type=int,
        nargs=2,
        default=[4096, 128256],
        metavar=("H", "V"),
        help="hidden size and vocabulary of the fused-linear run",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import triton

    header_line = (
        f"{name}; torch {torch.__version__}, triton {triton.__version__}; "
        f"N={args.tokens} tokens in {SEQUENCES} sequences; median of {args.repeats}"
    )
    bandwidth = copy_bandwidth(device, timer, 1024 if device.type == "cuda" else 16)
    print(f"{header_line}\ncopy bandwidth: {bandwidth:.0f} GB/s", flush=True)

    checks, rows = [], []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for vocab in args.vocabs:
            logits_bytes = args.tokens * vocab * dtype.itemsize
            copies = max(1, min(3, (2 << 30) // (2 * logits_bytes)))
            inputs = make_inputs(args.tokens, vocab, dtype, device, copies)
            x, y, _, q = inputs[0]
            sample = torch.randperm(args.tokens, device=device)[:64]
            errors = check_rows(x, q, y, sample)
            checks.append([dtype_name, vocab, *(f"{e:.1e}" for e in errors.values())])
            print(f"check {dtype_name} V={vocab}: {errors}", flush=True)

            # The in-place providers overwrite their inputs, so they run last.
            providers = {
                "ours": ours(False),
                "eager": {"ga": eager_ga, "npo": eager_npo, "kl": eager_kl, "undial": eager_undial},
            }
            if vocab in args.compile_vocabs:
                providers["torch.compile"] = {
                    loss: torch.compile(fn, dynamic=False)
                    for loss, fn in providers["eager"].items()
                }
            providers["ours inplace"] = ours(True)
            liger = liger_ga()
            if liger is not None:
                providers["liger"] = {"ga": liger}
            for provider, losses in providers.items():
                for loss, fn in losses.items():
                    times = time_modes(fn, inputs, timer, args.repeats)
                    peak = peak_extra_bytes(fn, inputs, device)
                    kind = "kl" if loss in TWO_INPUT_LOSSES else "logprobs"
                    moved = TRAFFIC[kind]["fwd+bwd"] * logits_bytes
                    gbps = moved / times["fwd+bwd"] / 1e6
                    rows.append(
                        [
                            loss,
                            provider,
                            dtype_name,
                            vocab,
                            f"{times['fwd']:.2f}",
                            f"{times['bwd']:.2f}",
                            f"{times['fwd+bwd']:.2f}",
                            f"{gbps:.0f}",
                            f"{gbps / bandwidth:.0%}",
                            f"{peak / logits_bytes:.2f}",
                        ]
                    )
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()

    linear_rows = fused_linear_rows(device, timer, args.repeats, args.tokens, *args.linear)
    linear_header = ["loss", "provider", "N", "H", "V", "fwd+bwd ms", "extra peak MiB"]
    check_header = [
        "dtype",
        "V",
        "log-prob rel err",
        "log-prob grad rel err",
        "KL rel err",
        "KL grad rel err",
        "UNDIAL rel err",
        "UNDIAL grad rel err",
    ]
    header = [
        "loss",
        "provider",
        "dtype",
        "V",
        "fwd ms",
        "bwd ms",
        "fwd+bwd ms",
        "fwd+bwd GB/s",
        "of copy bandwidth",
        "extra peak / logits",
    ]
    report = (
        f"{header_line}; copy bandwidth {bandwidth:.0f} GB/s.\n\n"
        f"Against float64 on 64 sampled rows:\n\n{markdown_table(check_header, checks)}\n\n"
        f"{markdown_table(header, rows)}\n\n"
        f"From hidden states, bfloat16:\n\n{markdown_table(linear_header, linear_rows)}\n"
    )
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(report)
    with open(args.out / "gpu_check.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


if __name__ == "__main__":
    main()
