"""Softmax regression, an MLP and a small CNN, as ``nn.Sequential`` with named layers.

Every model is a flat ``nn.Sequential`` whose parametrized children are named, from input to
output, ``conv1, conv2, ..., fc1, fc2, ..., head``. ``layer_names(model)`` lists them; "the
head" is the layer called ``head`` and "the backbone" is every other parametrized layer, so
per-layer multipliers (``{"head": 10}``) and transfer learning address layers by name.

Weights are initialized from an explicit ``torch.Generator`` (PyTorch's default scheme), not
from the global RNG, so runs on concurrent threads stay reproducible. Dropout draws its masks
from a per-model generator for the same reason.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from lrpipe.engine.config import ModelConfig, is_plugin
from lrpipe.engine.plugins import plugin_model

HEAD = "head"


class SeededDropout(nn.Module):
    """Inverted dropout whose masks come from the module's own generator (thread-safe seeding)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None or self.generator.device != x.device:
            raise RuntimeError("SeededDropout: call seed_dropout(model, seed) after .to(device)")
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int
) -> nn.Module:
    """The network named by ``cfg.name`` for inputs of ``input_shape`` (C, H, W); a plug-in
    factory (``package.module:build``) builds its own, seeded 0 (``make_model`` seeds it)."""
    if is_plugin(cfg.name):
        return plugin_model(cfg.name, 0)
    channels, height, width = input_shape
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    if cfg.name == "softmax":
        layers.append((HEAD, nn.Linear(channels * height * width, num_classes)))
    elif cfg.name == "mlp":
        width_in = channels * height * width
        for i, width_out in enumerate(cfg.hidden, start=1):
            layers += [(f"fc{i}", nn.Linear(width_in, width_out)), (f"relu{i}", nn.ReLU())]
            if cfg.dropout > 0:
                layers.append((f"drop{i}", SeededDropout(cfg.dropout)))
            width_in = width_out
        layers.append((HEAD, nn.Linear(width_in, num_classes)))
    else:  # cnn: two 3x3 conv blocks with 2x2 pooling, one hidden dense layer
        layers = [
            ("conv1", nn.Conv2d(channels, 16, 3, padding=1)), ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(32 * (height // 4) * (width // 4), 128)), ("relu3", nn.ReLU()),
        ]
        if cfg.dropout > 0:
            layers.append(("drop3", SeededDropout(cfg.dropout)))
        layers.append((HEAD, nn.Linear(128, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def layer_names(model: nn.Module) -> list[str]:
    """Names of the top-level layers that hold parameters, from input to head."""
    return [name for name, child in model.named_children()
            if any(True for _ in child.parameters(recurse=True))]


def backbone_names(model: nn.Module) -> list[str]:
    """Every parametrized layer except the head, from input to output."""
    return [name for name in layer_names(model) if name != HEAD]


def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv init (Kaiming-uniform, a=sqrt(5)), drawn from ``generator``.

    The generator must live on the CPU; values are copied to the parameters' device, so a seed
    gives the same initial weights on every device.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                weight = module.weight
                fan_in = weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5) gives this too
                w = torch.empty(weight.shape).uniform_(-bound, bound, generator=generator)
                weight.copy_(w)
                if module.bias is not None:
                    b = torch.empty(module.bias.shape).uniform_(-bound, bound, generator=generator)
                    module.bias.copy_(b)


def seed_dropout(model: nn.Module, seed: int, device: torch.device | str) -> None:
    """Give every SeededDropout in ``model`` its own generator on ``device``."""
    for i, module in enumerate(m for m in model.modules() if isinstance(m, SeededDropout)):
        module.generator = torch.Generator(device=device).manual_seed(seed * 1000 + i + 1)


def make_model(
    cfg: ModelConfig,
    input_shape: tuple[int, int, int],
    num_classes: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build, seed-initialize and place a model: the same seed gives the same weights anywhere.
    A plug-in factory is called with ``seed`` and initializes the model itself."""
    if is_plugin(cfg.name):
        return plugin_model(cfg.name, seed).to(device)
    model = build_model(cfg, input_shape, num_classes)
    init_weights(model, torch.Generator().manual_seed(seed))
    model.to(device)
    seed_dropout(model, seed, device)
    return model
