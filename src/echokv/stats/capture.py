"""Calibration capture: run the model over text and hand each layer's post-RoPE Q, K, V to a callback.

Nothing is kept unless the callback keeps it, so statistics can stream over calibration runs that
would not fit in memory as activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .. import attention
from ..geometry import attention_modules  # noqa: F401 - re-exported: read beside capture
from ..placement import input_device

# callback(layer_idx, module, q [B, Hq, T, d], k [B, H, T, d], v [B, H, T, d])
LayerCallback = Callable[[int, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def capture(
    model,
    blocks: torch.Tensor,
    on_layer: LayerCallback,
    layers: list[int] | None = None,
    batch_size: int = 1,
    desc: str = "capture",
    progress: bool = True,
    offsets: torch.Tensor | None = None,
) -> None:
    """Forward every row of ``blocks`` [N, T] (token ids) and call ``on_layer`` for each layer. ``offsets`` [N]: row i
    sits at positions ``offsets[i]`` to ``offsets[i] + T - 1`` (RoPE attention is the same at any shift, so what
    changes is only where the post-RoPE keys and queries are rotated to)."""
    wanted = None if layers is None else set(layers)

    def hook(module, q, k, v, mask, scaling):
        if wanted is None or module.layer_idx in wanted:
            on_layer(module.layer_idx, module, q.detach(), k.detach(), v.detach())
        # let the stock attention run

    device = input_device(model)
    with attention.echokv_attention(model), attention.hooked(hook):
        for i in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress, leave=False):
            ids = blocks[i : i + batch_size].to(device)
            extra = {}
            if offsets is not None:
                pos = torch.arange(ids.shape[1], device=device)
                extra["position_ids"] = offsets[i : i + batch_size].to(device)[:, None] + pos[None, :]
            model(input_ids=ids, use_cache=False, **extra)
