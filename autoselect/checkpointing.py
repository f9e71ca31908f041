"""Gradient (activation) checkpointing through the frozen LLM, with the VLM left in eval mode.

The LLM of a 7B VLM holds most of a training step's activations: the scorer's gradient has to
pass back through every decoder layer. Checkpointing keeps only each layer's input and recomputes
the layer in the backward pass (about one more LLM forward per step, see docs/pipelines.md).

transformers' own switch (``activation_checkpointing_enable``) is not used: its
``GradientCheckpointingLayer`` checkpoints only while the layer is in train mode
(``self.gradient_checkpointing and self.training``), and AutoSelect keeps the frozen VLM in eval
mode; train mode would switch on whatever dropout the LLM has. Instead, `checkpoint_layers` sets
a checkpointed ``forward`` on each decoder layer *instance* (no class is patched), always with
``use_reentrant=False``: the LLM's parameters are frozen, so every gradient through it comes from
inputs the scorer made (the visual embeddings, and with ``training.gate_attention`` the attention
mask), and the layers take the mask and positions as keyword arguments, which the reentrant form
refuses (checked: "Unexpected keyword arguments"); it differentiates positional tensors only.
(Checked too: with transformers' switch on and the VLM in eval mode no layer is recomputed.)
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

# A recompute would write the KV cache a second time: dropped, as transformers does when it checkpoints.
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _needs_backward(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a backward pass can reach this call: grad mode on, and an input or parameter needs it."""
    if not torch.is_grad_enabled():
        return False
    values = (*args, *kwargs.values())
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values) or any(
        p.requires_grad for p in layer.parameters()
    )


def _checkpointed_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = functools.partial(type(layer).forward, layer)
    if not _needs_backward(layer, args, kwargs):  # eval, generate (no_grad): the plain forward, cache and all
        return forward(*args, **kwargs)
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        kwargs = {k: None if k in CACHE_KWARGS else v for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def is_checkpointed(layer: nn.Module) -> bool:
    wrapped = layer.__dict__.get("forward")
    return isinstance(wrapped, functools.partial) and wrapped.func is _checkpointed_forward


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The outermost transformers decoder layers (``GradientCheckpointingLayer``) in ``module``."""
    found: dict[str, nn.Module] = {}
    for name, child in module.named_modules():
        if isinstance(child, GradientCheckpointingLayer) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = child
    return list(found.values())


def checkpoint_layers(module: nn.Module, enable: bool = True) -> int:
    """Checkpoint (or, ``enable=False``, stop checkpointing) every decoder layer of ``module`` on this
    instance only, whatever its train/eval mode; returns the number of layers. A layer is
    recomputed only when a backward pass can reach it, so no-grad inference keeps its KV cache.

    The wrapper is a ``functools.partial`` on the layer, so ``copy.deepcopy`` rebinds it to the copy."""
    layers = decoder_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no transformers decoder layers (GradientCheckpointingLayer) "
                         "to checkpoint")
    for layer in layers:
        if enable and not is_checkpointed(layer):
            layer.forward = functools.partial(_checkpointed_forward, layer)
        elif not enable and is_checkpointed(layer):
            del layer.forward
    return len(layers)
