"""What :class:`~echokv.codecs.mix.MixCodec` needs of a model, without the model: an engine that loads the weights
its own way has only the Hugging Face config. The codec takes the RoPE of ``model.model.rotary_emb`` and its dtype
from the first parameter; :class:`RopeHost` is exactly that."""

from __future__ import annotations

import importlib

import torch
from torch import nn


def rotary_class(config):
    """transformers' rotary embedding class of the config's model type (e.g. ``LlamaRotaryEmbedding``)."""
    model_type = config.model_type
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    found = [getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding") and "Dynamic" not in n
             and "Scaling" not in n]
    if len(found) != 1:
        raise ValueError(f"no single rotary embedding class in transformers for model type {model_type!r}")
    return found[0]


class RopeHost(nn.Module):
    """``host.model.rotary_emb`` is the model's rotary embedding built from ``config``; ``host.config`` is the
    config; its one parameter has the dtype the codec rebuilds K/V in."""

    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.rotary_emb = rotary_class(config)(config=config)
        self.anchor = nn.Parameter(torch.zeros(0, dtype=dtype), requires_grad=False)
