"""A small causal transformer in plain PyTorch: enough to memorise a few hundred facts on a CPU."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyCausalLM(nn.Module):
    """Token and position embeddings, pre-norm causal self-attention blocks, a tied output head."""

    def __init__(
        self,
        vocab_size: int,
        max_length: int = 16,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(max_length, width)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``(B, T, V)``; position ``t`` sees tokens ``<= t`` only."""
        length = input_ids.shape[1]
        hidden = self.embed(input_ids) + self.position(
            torch.arange(length, device=input_ids.device)
        )
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
        return self.head(self.norm(self.blocks(hidden, mask=mask, is_causal=True)))
