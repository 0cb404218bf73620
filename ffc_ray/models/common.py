"""Pieces shared by every backbone: argument checks, the input-shape guard, weight init.

Every backbone maps float images ``[B, 3, S, S]`` (S a positive multiple of 16, normalised by
:func:`ffc_ray.data.batch.normalize`) to a RAW embedding ``[B, D]``. The embedding is
deliberately not L2-normalised: margin heads normalise it themselves, MagFace needs its norm, and
evaluation normalises before scoring. The official FFC backbones end in ``F.normalize``; here that
step moved out of the model.
"""

from __future__ import annotations

import torch
from torch import nn

#: Total downsampling of every backbone: the final feature map is image_size / 16 on a side.
STRIDE = 16


def check_build_args(name: str, embedding_dim: int, image_size: int, dropout: float) -> int:
    """Validate the common factory arguments; return the final feature-map side ``S / 16``.

    Raises ``ValueError`` naming the argument (``image_size``, ``embedding_dim``, ``dropout``).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"{name}: image_size must be an int, got {image_size!r}")
    if image_size <= 0 or image_size % STRIDE != 0:
        raise ValueError(
            f"{name}: image_size={image_size} is not a positive multiple of {STRIDE} "
            f"(the backbone downsamples by {STRIDE}; use 112, 64, 48, 32 ...)"
        )
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim <= 0:
        raise ValueError(f"{name}: embedding_dim must be a positive int, got {embedding_dim!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{name}: dropout={dropout} must be in [0, 1)")
    return image_size // STRIDE


class Backbone(nn.Module):
    """Base class: remembers ``image_size`` / ``embedding_dim`` and checks the input shape.

    The spatial size is baked into the last layers (a flatten + Linear in IResNet, a global
    depthwise conv in MobileFaceNet / VarGFaceNet), so a wrong input size would otherwise fail
    deep inside with an opaque shape error or, worse, silently produce a non-1x1 map.
    """

    def __init__(self, name: str, embedding_dim: int, image_size: int, dropout: float) -> None:
        super().__init__()
        self.final_size = check_build_args(name, embedding_dim, image_size, dropout)
        self.backbone_name = name
        self.embedding_dim = embedding_dim
        self.image_size = image_size

    def check_input(self, x: torch.Tensor) -> None:
        if (
            x.dim() != 4
            or x.shape[1] != 3
            or x.shape[2] != self.image_size
            or (x.shape[3] != self.image_size)
        ):
            raise ValueError(
                f"{self.backbone_name}: expected input [B, 3, {self.image_size}, "
                f"{self.image_size}] (image_size={self.image_size}), got {list(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, embedding_dim={self.embedding_dim}"


def init_weights(model: nn.Module) -> None:
    """Standard init: Kaiming-normal (fan_out) convs, BN gamma 1 / beta 0, small-normal Linear.

    Frozen parameters (``requires_grad=False``) keep the value their module set.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.weight is not None and m.weight.requires_grad:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``), each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def conv_bn(
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act: bool = True,
) -> nn.Sequential:
    """conv (no bias, 'same' padding for odd kernels) -> BN -> PReLU (per channel) if ``act``."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)
