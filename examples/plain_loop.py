"""NPO + retain NLL in a plain PyTorch loop (no Trainer): the whole recipe in one screen.

python examples/plain_loop.py
"""

import copy

import torch

from unlearning_losses import combine_with_retain, nll_loss, npo_loss, token_logprobs
from unlearning_losses.demo.data import make_corpus
from unlearning_losses.demo.model import TinyCausalLM

torch.manual_seed(0)
corpus = make_corpus(people=20, forget_people=2, seed=0)
model = TinyCausalLM(corpus.vocab_size)
forget, retain = corpus.forget, corpus.retain

# 1. Learn every fact (stands in for the pretrained model you start from).
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
all_ids = torch.cat([retain.input_ids, forget.input_ids])
all_labels = torch.cat([retain.labels, forget.labels])
for _ in range(300):
    optimizer.zero_grad()
    nll_loss(model(all_ids), all_labels).backward()
    optimizer.step()

# 2. The reference is frozen: cache its per-token log-probs of the forget set once (B x T floats).
reference = copy.deepcopy(model).eval()
with torch.no_grad():
    ref_logprobs = token_logprobs(reference(forget.input_ids), forget.labels)


def forget_nll() -> float:
    with torch.no_grad():
        return nll_loss(model(forget.input_ids), forget.labels).item()


# 3. Unlearn: NPO on the forget set, NLL on a retain batch.
print(f"forget-set NLL before: {forget_nll():.3f}")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(100):
    rows = torch.randint(len(retain.input_ids), (32,))
    forget_term = npo_loss(model(forget.input_ids), forget.labels, ref_logprobs=ref_logprobs)
    retain_term = nll_loss(model(retain.input_ids[rows]), retain.labels[rows])
    loss = combine_with_retain(forget_term, retain_term, retain_weight=1.0)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
print(f"forget-set NLL after:  {forget_nll():.3f}")
