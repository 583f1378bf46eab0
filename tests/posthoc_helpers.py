"""Small phantoms with a known posterior for the post-hoc tests: smooth logits ``z``, labels sampled from
``softmax(z)`` (exclusive) or ``sigmoid(z)`` (multilabel), so ``z`` itself is perfectly calibrated."""

from __future__ import annotations

import torch


def smooth_logits(n: int, c: int, shape: tuple[int, ...], seed: int, amplitude: float = 3.0) -> torch.Tensor:
    """``(n, c, *shape)`` smooth random logits: random low-frequency cosines plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij")
    z = torch.zeros(n, c, *shape)
    for _ in range(3):
        freq = torch.rand(n, c, len(shape), generator=g) * 4
        phase = torch.rand(n, c, 1, generator=g) * 6.28
        arg = sum(freq[..., d, None] * axes[d].reshape(1, 1, -1) for d in range(len(shape))) * 3.14 + phase
        z += torch.cos(arg).reshape(n, c, *shape)
    z = amplitude * z / 1.7 + 0.3 * torch.randn(n, c, *shape, generator=g)
    return z


def phantom(
    n: int = 6, c: int = 3, shape: tuple[int, ...] = (40, 40), seed: int = 0, mode: str = "exclusive"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated logits and sampled labels (exclusive: ``(n, *shape)`` int64; multilabel: ``(n, c,
    *shape)``)."""
    z = smooth_logits(n, c, shape, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    if mode == "exclusive":
        p = torch.softmax(z, 1).movedim(1, -1).reshape(-1, c)
        y = torch.multinomial(p, 1, generator=g).reshape(n, *shape)
    else:
        y = (torch.rand(z.shape, generator=g) < torch.sigmoid(z)).float()
    return z, y
