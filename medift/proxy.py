"""The proxy instruction: K learnable embeddings that stand where an instruction would be.

It works on any transformers model whose text embeddings come from
`get_input_embeddings()` (LLaVA, Mllama, ...): a forward hook on that module overwrites
the embeddings of the K placeholder tokens with the proxy's rows, right after the
lookup, as method.md describes. The proxy is not a parameter of the model, so the
model's optimizer (DeepSpeed's, possibly partitioned) never holds it and the saved
checkpoint is a plain model; at evaluation the hook is simply not attached.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The placeholder token the K proxy rows stand on: a checkpoint without it gets it added
# (`medift.model.loading.ensure_proxy_token`); the embedded models' tokenizer has it built in.
PROXY_TOKEN = "<proxy>"

# The reference parameterises the proxy as the first column of a bias-free
# Linear(768, K*hidden) applied to a one-hot vector; PyTorch's default init of that
# Linear is uniform(-1/sqrt(768), 1/sqrt(768)), which we reproduce directly.
REFERENCE_FAN_IN = 768


class ProxyInstruction(nn.Module):
    def __init__(
        self, num_tokens: int, hidden_size: int, placeholder_id: int, generator: torch.Generator | None = None
    ):
        super().__init__()
        bound = 1.0 / math.sqrt(REFERENCE_FAN_IN)
        init = (torch.rand(num_tokens, hidden_size, generator=generator) * 2 - 1) * bound
        self.weight = nn.Parameter(init)
        # P_bar: the slow momentum copy that the live proxy is reset to before every step.
        self.register_buffer("momentum_copy", init.clone())
        self.placeholder_id = placeholder_id
        self._handle = None

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    # ------------------------------------------------------------ hook

    def attach(self, model) -> "ProxyInstruction":
        if self._handle is not None:
            raise RuntimeError("proxy already attached")
        self._handle = model.get_input_embeddings().register_forward_hook(self._replace_placeholders)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _replace_placeholders(self, module, inputs, output):
        input_ids = inputs[0]
        mask = input_ids == self.placeholder_id
        if not mask.any():
            return output
        per_row = mask.sum(dim=1)
        rows = per_row > 0
        if not torch.all(per_row[rows] == self.num_tokens):
            raise ValueError(
                f"each prompt must hold exactly {self.num_tokens} proxy placeholders, got {per_row.tolist()}"
            )
        source = self.weight.to(output.dtype).unsqueeze(0).expand(int(rows.sum()), -1, -1)
        return output.masked_scatter(mask.unsqueeze(-1), source)

    # ------------------------------------------------------------ momentum

    @torch.no_grad()
    def load_momentum_copy(self) -> None:
        """Step 1 of every main-stage step: P <- P_bar."""
        self.weight.copy_(self.momentum_copy)

    @torch.no_grad()
    def update_momentum_copy(self, momentum: float) -> None:
        """Step 4: P_bar <- m * P_bar + (1 - m) * P."""
        self.momentum_copy.mul_(momentum).add_(self.weight, alpha=1.0 - momentum)

    @torch.no_grad()
    def reset_momentum_copy(self) -> None:
        """After warm-up the warmed proxy initialises the main stage (both P and P_bar)."""
        self.momentum_copy.copy_(self.weight)
