"""The verifier's frozen parts a DFlash drafter borrows: embedding, final norm and LM head.

The drafter has no embedding and (with the full vocab) no LM head of its own (docs/architecture.md):
block tokens are embedded with the verifier's `embed_tokens`, draft logits come from the
verifier's `lm_head`, and the training targets are `lm_head(norm(h_N))` where h_N is verifier
layer N BEFORE the final norm (docs/architecture.md). Feeding an already-normed h_N here would norm twice;
training still runs, but the targets are not what the verifier predicts.
"""

from __future__ import annotations

import torch
from torch import nn

from dflash_core.model.attention import RMSNorm


class VerifierHeads(nn.Module):
    """embed_tokens [V, Hv], norm [Hv] (Qwen3/Llama RMSNorm) and lm_head [V, Hv]; never trained."""

    def __init__(self, *, vocab_size: int, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.norm = RMSNorm(hidden_size, eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.requires_grad_(False)

    @classmethod
    def from_tensors(
        cls, *, embed: torch.Tensor, lm_head: torch.Tensor, norm: torch.Tensor, eps: float
    ) -> VerifierHeads:
        """Wrap existing tensors without copying them (tied embeddings stay shared)."""
        if embed.shape[1] != lm_head.shape[1] or norm.shape != (embed.shape[1],):
            raise ValueError(
                f"verifier tensors disagree: embed {tuple(embed.shape)}, lm_head {tuple(lm_head.shape)}, "
                f"norm {tuple(norm.shape)}"
            )
        heads = cls.__new__(cls)
        nn.Module.__init__(heads)
        heads.embed_tokens = nn.Embedding.from_pretrained(embed.detach(), freeze=True)
        heads.norm = RMSNorm(norm.shape[0], eps)
        heads.norm.weight = nn.Parameter(norm.detach(), requires_grad=False)
        heads.lm_head = nn.Linear(lm_head.shape[1], lm_head.shape[0], bias=False, device="meta")
        heads.lm_head.weight = nn.Parameter(lm_head.detach(), requires_grad=False)
        return heads

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.lm_head.weight.shape[1]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[...] token ids -> [..., Hv]."""
        return self.embed_tokens(input_ids)

    def target_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Verifier logits [..., V] from layer-N hidden states [..., Hv] taken BEFORE the final norm."""
        return self.lm_head(self.norm(last_hidden))
