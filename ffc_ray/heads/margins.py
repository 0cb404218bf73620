"""Margin transforms on cosine logits (registry ``MARGINS``; names = ``HeadConfig.margin_type``).

Every margin maps the cosine matrix ``cos[B, C]`` between L2-normalised embeddings and class
centres, plus the target column of each row, to SCALED logits that go straight into
``F.cross_entropy(logits, target)``. Only the target column is changed (CurricularFace also
re-weights hard negatives); every other column is ``s * cos``. The computation is done in fp32
whatever the input dtype (the margin formulas lose too much in fp16/bf16 near theta = 0).

Names and formulas (theta_y = angle to the target centre, s = ``head.scale``):

============== ==========================================================================
arcface        cos(theta_y + m), with the InsightFace fallback ``cos - mm`` where theta_y + m > pi
               (ArcFace, Deng et al. CVPR 2019, eq. 3); ``easy_margin``: margin only where cos > 0
cosface, am    cos(theta_y) - m (CosFace, Wang et al. CVPR 2018, eq. 4; AM-Softmax, same form)
sphereface     (lambda cos + psi(theta_y)) / (1 + lambda), psi = (-1)^k cos(m theta) - 2k
               (A-Softmax, Liu et al. CVPR 2017, eq. 7), lambda annealed by :meth:`Margin.step`
combined       cos(m1 theta_y + m2) - m3 (InsightFace combined margin)
curricularface cos(theta_y + m) (+ fallback); hard negatives cos_j -> cos_j (t + cos_j)
               (CurricularFace, Huang et al. CVPR 2020, eqs. 7-9), t an EMA of the mean target cos
magface        ArcFace with m(a) linear in the clamped feature norm a, regulariser
               g(a) = 1/a + a/u_a^2
               (MagFace, Meng et al. CVPR 2021, eqs. 3-5)
lsoftmax       L-Softmax (Liu et al. ICML 2016, eq. 6): multiplicative psi on the *unnormalised*
               logit ||W_y|| ||x|| cos(theta_y), beta annealed like SphereFace. FC head only.
adaptiveface   cos(theta_y) - m_y with a learnable margin per class and the regulariser
               -lambda_m * mean(m) (AdaptiveFace, Liu et al. CVPR 2019, eqs. 5-6). FC head only.
softmax        s * cos (normalised softmax, no margin)
============== ==========================================================================

``head.margin_kwargs`` overrides the type-specific extras listed in each class' ``EXTRAS``; an
unknown key is a :class:`~ffc_ray.config.ConfigError` naming ``head.margin_kwargs.<key>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from ffc_ray.config import ConfigError, HeadConfig
from ffc_ray.heads.base import upcast
from ffc_ray.registry import MARGINS

log = logging.getLogger(__name__)

# sin^2(theta) is clamped from below before the square root: the value is exact for
# theta > ~1e-3 rad, and d sin / d cos stays bounded (<= 1e3) at theta -> 0 and theta -> pi, where
# the true derivative is infinite (and 0 * inf would put NaN into the gradient of torch.where).
_SIN2_EPS = 1e-6
# acos is evaluated on cos clamped to [-1 + eps, 1 - eps] for the same reason.
_ACOS_EPS = 1e-6

FC_ONLY = ("lsoftmax", "adaptiveface")


def _cfg_err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"config field '{key}': {msg}")


def _check_inputs(cos: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if cos.dim() != 2:
        raise ValueError(f"margin: cos must be [B, C], got shape {tuple(cos.shape)}")
    if target.dim() != 1 or target.shape[0] != cos.shape[0]:
        raise ValueError(
            f"margin: target must be [B] with B = {cos.shape[0]}, got shape {tuple(target.shape)}"
        )
    if target.dtype != torch.long:
        raise ValueError(f"margin: target must be int64 (long), got {target.dtype}")
    return upcast(cos).clamp(-1.0, 1.0), target


def _gather_target(cos: Tensor, target: Tensor) -> Tensor:
    return cos.gather(1, target[:, None]).squeeze(1)


def _put_target(cos: Tensor, target: Tensor, value: Tensor) -> Tensor:
    """``cos`` with column ``target[i]`` of row i replaced by ``value[i]`` (out of place, autograd
    flows into both ``cos`` (other columns) and ``value``)."""
    return cos.scatter(1, target[:, None], value[:, None])


def _sin_from_cos(c: Tensor) -> Tensor:
    return torch.sqrt((1.0 - c * c).clamp_min(_SIN2_EPS))


def _additive_angle(
    c: Tensor,
    m: float | Tensor,
    easy_margin: bool = False,
    fallback: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(phi, out)``: phi = cos(theta + m) = c cos m - sin(theta) sin m, and the target value used.

    ``out`` is phi where it is monotonic in theta; otherwise (InsightFace ArcMarginProduct) the
    linear continuation ``c - mm``, mm = sin(pi - m) * m, where c <= th = cos(pi - m), i.e.
    theta + m >= pi. With ``easy_margin`` the margin is only applied where c > 0.
    ``m`` may be a float or a per-row tensor (MagFace).
    """
    if isinstance(m, Tensor):
        cos_m, sin_m = torch.cos(m), torch.sin(m)
        th, mm = torch.cos(math.pi - m), torch.sin(math.pi - m) * m
    else:
        cos_m, sin_m = math.cos(m), math.sin(m)
        th, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    phi = c * cos_m - _sin_from_cos(c) * sin_m
    if easy_margin:
        return phi, torch.where(c > 0, phi, c)
    if not fallback:
        return phi, phi
    return phi, torch.where(c > th, phi, c - mm)


def chebyshev_cos_multiple(c: Tensor, m: int) -> Tensor:
    """cos(m theta) as the Chebyshev polynomial T_m(cos theta): exact, and its gradient in cos is
    finite everywhere (no acos in the differentiated path)."""
    t_prev, t = torch.ones_like(c), c
    for _ in range(m - 1):
        t_prev, t = t, 2.0 * c * t - t_prev
    return t


def psi_multiplicative(c: Tensor, m: int) -> Tensor:
    """psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi / m, (k+1) pi / m] (A-Softmax eq. 7,
    L-Softmax eq. 6): a monotonically decreasing extension of cos(m theta) from 1 (theta = 0) to
    1 - 2m (theta = pi). k is piecewise constant, so it is computed without gradient."""
    with torch.no_grad():
        theta = torch.acos(c.clamp(-1.0, 1.0))
        k = torch.floor(m * theta / math.pi).clamp(0, m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * chebyshev_cos_multiple(c, m) - 2.0 * k


class Margin(nn.Module):
    """Base margin: ``forward(cos, target, norms=None) -> scaled logits [B, C]``.

    Subclasses implement :meth:`apply_margin` (unscaled). ``extra_loss(norms)`` is a term the head
    adds to the loss (MagFace / AdaptiveFace regularisers; zero otherwise); ``step(iteration)``
    sets the annealing state (SphereFace / L-Softmax; a no-op otherwise).
    """

    EXTRAS: ClassVar[dict[str, float]] = {}  # margin_kwargs keys and their defaults
    fc_only: ClassVar[bool] = False  # needs learned class weights (FC head only)
    shardable: ClassVar[bool] = False  # a class-sharded head may use it (heads/fc.py)
    needs_norms: ClassVar[bool] = False  # forward needs the raw embedding norms
    has_extra_loss: ClassVar[bool] = False

    def __init__(self, scale: float = 32.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"margin scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, cos: Tensor, target: Tensor, norms: Tensor | None = None) -> Tensor:
        cos, target = _check_inputs(cos, target)
        return self.apply_margin(cos, target, norms) * self.scale

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        """Unscaled logits from fp32 ``cos`` clamped to [-1, 1]."""
        raise NotImplementedError

    def extra_loss(self, norms: Tensor | None = None) -> Tensor:
        """Regulariser added to the loss; zero for margins without one."""
        device = norms.device if norms is not None else _module_device(self)
        return torch.zeros((), device=device)

    def step(self, iteration: int) -> None:  # noqa: B027 - optional hook
        """Set the annealing state for ``iteration``. Default: nothing."""

    @classmethod
    def from_config(
        cls, head_cfg: HeadConfig, num_classes: int | None, extras: dict[str, float]
    ) -> Margin:
        return cls(scale=head_cfg.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _check_additive_margin(m: float, key: str = "head.margin") -> None:
    if not 0.0 <= m < math.pi:
        raise _cfg_err(key, f"additive angular margin {m} must be in [0, pi)")


@MARGINS.register("softmax")
class NormSoftmax(Margin):
    """Normalised softmax: logits = s * cos, no margin (NormFace-style baseline)."""

    shardable = True

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        return cos


@MARGINS.register("arcface")
class ArcFace(Margin):
    """ArcFace (eq. 3): target -> cos(theta_y + m).

    As the official InsightFace ``ArcMarginProduct``: where theta_y + m > pi (cos <= cos(pi - m))
    the target becomes ``cos - sin(pi - m) * m`` so the logit stays monotonic in theta; with
    ``easy_margin`` the margin is applied only where cos > 0. Unlike arcface_torch's
    straight-through version, the gradient flows through the formula (as FFC's ``Arc`` loss).
    """

    shardable = True

    def __init__(self, scale: float = 32.0, margin: float = 0.5, easy_margin: bool = False) -> None:
        super().__init__(scale)
        _check_additive_margin(margin)
        self.m = float(margin)
        self.easy_margin = bool(easy_margin)

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        _, out = _additive_angle(_gather_target(cos, target), self.m, self.easy_margin)
        return _put_target(cos, target, out)

    @classmethod
    def from_config(cls, head_cfg, num_classes, extras):
        return cls(head_cfg.scale, head_cfg.margin, head_cfg.easy_margin)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m={self.m}, easy_margin={self.easy_margin}"


@MARGINS.register("cosface")
@MARGINS.register("am")
class CosFace(Margin):
    """CosFace / AM-Softmax: target -> cos(theta_y) - m (CosFace eq. 4)."""

    shardable = True

    def __init__(self, scale: float = 32.0, margin: float = 0.35) -> None:
        super().__init__(scale)
        if margin < 0:
            raise _cfg_err("head.margin", f"{margin} must be >= 0")
        self.m = float(margin)

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        return _put_target(cos, target, _gather_target(cos, target) - self.m)

    @classmethod
    def from_config(cls, head_cfg, num_classes, extras):
        return cls(head_cfg.scale, head_cfg.margin)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m={self.m}"


def _integer_margin(value: float, name: str) -> int:
    m = int(round(value))
    if m < 1:
        raise _cfg_err(
            "head.margin",
            f"{name} needs an integer multiplicative margin >= 1 (A-Softmax uses 4), got {value}",
        )
    if abs(m - value) > 1e-6:
        log.warning("head.margin=%s rounded to the integer %d for %s", value, m, name)
    return m


class _Annealed(Margin):
    """Shared by SphereFace and L-Softmax: target = (lambda cos + psi) / (1 + lambda) with
    lambda = max(lambda_min, base * (1 + gamma * it)^-power) (Caffe ``MarginInnerProduct``).
    ``it`` lives in a buffer, so the schedule survives checkpointing."""

    def __init__(
        self,
        scale: float,
        m: int,
        base: float,
        gamma: float,
        power: float,
        minimum: float,
    ) -> None:
        super().__init__(scale)
        if m < 1:
            raise ValueError(f"multiplicative margin must be an integer >= 1, got {m}")
        self.m = int(m)
        self.base, self.gamma, self.power, self.minimum = base, gamma, power, minimum
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def current_lambda(self) -> float:
        it = int(self.iteration)
        return max(self.minimum, self.base * (1.0 + self.gamma * it) ** (-self.power))

    def step(self, iteration: int) -> None:
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        self.iteration.fill_(int(iteration))

    def _target(self, c: Tensor) -> Tensor:
        lam = self.current_lambda()
        return (lam * c + psi_multiplicative(c, self.m)) / (1.0 + lam)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m={self.m}, lambda={self.current_lambda():.4g}"


def _check_anneal(extras: dict[str, float], prefix: str, min_key: str) -> None:
    key = "head.margin_kwargs."
    if extras[f"{prefix}_base"] < 0:
        raise _cfg_err(key + f"{prefix}_base", "must be >= 0")
    if extras[f"{prefix}_gamma"] < 0:
        raise _cfg_err(key + f"{prefix}_gamma", "must be >= 0")
    if extras[f"{prefix}_power"] < 0:
        raise _cfg_err(key + f"{prefix}_power", "must be >= 0")
    if extras[min_key] < 0:
        raise _cfg_err(key + min_key, "must be >= 0")


@MARGINS.register("sphereface")
class SphereFace(_Annealed):
    """A-Softmax (SphereFace eq. 7) in the normalised-cosine variant.

    The original scales by the feature norm ||x||; here, like the other margins, the logits are
    ``s * f(cos)`` with normalised features and weights. Target value
    ``(lambda cos + psi(theta)) / (1 + lambda)``; lambda starts at ``lambda_base`` (1000: plain
    softmax) and decays to ``lambda_min`` (5) as ``step(iteration)`` advances (the heads call it
    from ``extra_step``). ``head.margin`` is rounded to the integer m (typically 4).
    """

    shardable = True

    EXTRAS: ClassVar[dict[str, float]] = {
        "lambda_base": 1000.0,
        "lambda_gamma": 0.12,
        "lambda_power": 1.0,
        "lambda_min": 5.0,
    }

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        return _put_target(cos, target, self._target(_gather_target(cos, target)))

    @classmethod
    def from_config(cls, head_cfg, num_classes, extras):
        _check_anneal(extras, "lambda", "lambda_min")
        return cls(
            head_cfg.scale,
            _integer_margin(head_cfg.margin, "sphereface"),
            extras["lambda_base"],
            extras["lambda_gamma"],
            extras["lambda_power"],
            extras["lambda_min"],
        )


@MARGINS.register("lsoftmax")
class LSoftmax(_Annealed):
    """L-Softmax (Liu et al. ICML 2016, eq. 6): the target logit ||W_y|| ||x|| cos(theta_y) becomes
    ||W_y|| ||x|| (beta cos + psi(theta_y)) / (1 + beta), other logits stay W_j . x.

    L-Softmax works on unnormalised weights and features, so it needs the learned class weights'
    norms: FC head only (the FFC pool holds unit features; Partial FC is not wired for it).
    The FC head passes ``norms`` (||x||, [B]) and ``weight_norms`` (||W_j||, [C]); without
    ``weight_norms`` the magnitude is ``s`` (normalised variant; ``norms`` is then unused).
    beta anneals like SphereFace's lambda (``beta_base`` 1000 -> ``beta_min`` 0); ``head.margin``
    is rounded to the integer m.
    """

    EXTRAS: ClassVar[dict[str, float]] = {
        "beta_base": 1000.0,
        "beta_gamma": 0.12,
        "beta_power": 1.0,
        "beta_min": 0.0,
    }
    fc_only = True
    uses_weight_norms: ClassVar[bool] = True

    def forward(  # type: ignore[override]
        self,
        cos: Tensor,
        target: Tensor,
        norms: Tensor | None = None,
        weight_norms: Tensor | None = None,
    ) -> Tensor:
        cos, target = _check_inputs(cos, target)
        out = _put_target(cos, target, self._target(_gather_target(cos, target)))
        if weight_norms is None:  # normalised variant (the generic margin call)
            return out * self.scale
        if norms is None:
            raise ValueError("lsoftmax: weight_norms [C] given without the feature norms [B]")
        if norms.shape != (cos.shape[0],) or weight_norms.shape != (cos.shape[1],):
            raise ValueError(
                f"lsoftmax: norms must be [{cos.shape[0]}] and weight_norms [{cos.shape[1]}], got "
                f"{tuple(norms.shape)} and {tuple(weight_norms.shape)}"
            )
        return out * (upcast(norms)[:, None] * upcast(weight_norms)[None, :])

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        return _put_target(cos, target, self._target(_gather_target(cos, target)))

    @classmethod
    def from_config(cls, head_cfg, num_classes, extras):
        _check_anneal(extras, "beta", "beta_min")
        return cls(
            head_cfg.scale,
            _integer_margin(head_cfg.margin, "lsoftmax"),
            extras["beta_base"],
            extras["beta_gamma"],
            extras["beta_power"],
            extras["beta_min"],
        )


@MARGINS.register("combined")
class CombinedMargin(Margin):
    """InsightFace combined margin: target -> cos(m1 theta_y + m2) - m3.

    (1, m, 0) is ArcFace's main branch, (1, 0, m) CosFace, (m, 0, 0) SphereFace without its
    monotonic extension. As in the original combined-margin code there is no fallback: for
    m1 theta + m2 > pi the target logit is no longer monotonic in theta.
    """

    shardable = True

    def __init__(self, scale: float = 32.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0):
        super().__init__(scale)
        if m1 <= 0 or m2 < 0 or m3 < 0:
            raise _cfg_err("head.m1", f"need m1 > 0, m2 >= 0, m3 >= 0; got ({m1}, {m2}, {m3})")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        c = _gather_target(cos, target)
        theta = torch.acos(c.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
        return _put_target(cos, target, torch.cos(self.m1 * theta + self.m2) - self.m3)

    @classmethod
    def from_config(cls, head_cfg, num_classes, extras):
        return cls(head_cfg.scale, head_cfg.m1, head_cfg.m2, head_cfg.m3)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}"


@MARGINS.register("curricularface")
class CurricularFace(Margin):
    """CurricularFace (eqs. 7-9): target cos(theta_y + m) with the ArcFace fallback; every
    negative with cos_j > cos(theta_y + m) (a "hard" one) becomes cos_j (t + cos_j).

    t is an EMA of the batch-mean target cosine, ``t <- alpha * mean(cos_y) + (1 - alpha) * t``
    (alpha = ``t_alpha``, 0.01; t starts at 0), kept in a buffer and updated before it is used,
    in training mode only (as the official code, whose update runs every forward). The hard mask
    compares against cos(theta_y + m) itself, not the fallback value (official behaviour).
    """

    EXTRAS: ClassVar[dict[str, float]] = {"t_alpha": 0.01}

    def __init__(self, scale: float = 32.0, margin: float = 0.5, t_alpha: float = 0.01) -> None:
        super().__init__(scale)
        _check_additive_margin(margin)
        if not 0.0 <= t_alpha <= 1.0:
            raise _cfg_err("head.margin_kwargs.t_alpha", f"{t_alpha} must be in [0, 1]")
        self.m = float(margin)
        self.t_alpha = float(t_alpha)
        self.register_buffer("t", torch.zeros(()))

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        c = _gather_target(cos, target)
        phi, final = _additive_angle(c, self.m)
        if self.training:
            with torch.no_grad():
                self.t.mul_(1.0 - self.t_alpha).add_(self.t_alpha * c.detach().mean())
        t = self.t.detach().clone()
        hard = cos > phi.detach()[:, None]
        out = torch.where(hard, cos * (t + cos), cos)
        return _put_target(out, target, final)

    @classmethod
    def from_config(cls, head_cfg, num_classes, extras):
        return cls(head_cfg.scale, head_cfg.margin, extras["t_alpha"])

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m={self.m}, t_alpha={self.t_alpha}"


@MARGINS.register("magface")
class MagFace(Margin):
    """MagFace (eqs. 3-5): ArcFace whose margin grows with the feature magnitude.

    a = clamp(||x||, l_a, u_a); m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m; target
    cos(theta_y + m(a)) with the ArcFace fallback (or ``easy_margin``). Regulariser (the head adds
    it): ``lambda_g * mean(g(a))``, g(a) = 1/a + a/u_a^2, as the official ``MagLinear`` (gradient
    flows into the norm through both the margin and g). ``head.margin`` is not used: the margin
    range is [l_m, u_m]. Needs ``norms`` (raw embedding norms, [B]).
    """

    EXTRAS: ClassVar[dict[str, float]] = {
        "l_a": 10.0,
        "u_a": 110.0,
        "l_m": 0.45,
        "u_m": 0.8,
        "lambda_g": 35.0,
    }
    needs_norms = True
    has_extra_loss = True

    def __init__(
        self,
        scale: float = 32.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(scale)
        key = "head.margin_kwargs."
        if not 0 < l_a < u_a:
            raise _cfg_err(key + "u_a", f"need 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if not 0 <= l_m <= u_m < math.pi:
            raise _cfg_err(key + "u_m", f"need 0 <= l_m <= u_m < pi, got l_m={l_m}, u_m={u_m}")
        if lambda_g < 0:
            raise _cfg_err(key + "lambda_g", f"{lambda_g} must be >= 0")
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)
        self.easy_margin = bool(easy_margin)

    def _clamped(self, norms: Tensor | None, batch: int | None = None) -> Tensor:
        if norms is None:
            raise ValueError(
                "magface needs the raw embedding norms: call margin(cos, target, norms)"
            )
        if norms.dim() != 1 or (batch is not None and norms.shape[0] != batch):
            raise ValueError(f"magface: norms must be [B], got shape {tuple(norms.shape)}")
        return upcast(norms).clamp(self.l_a, self.u_a)

    def adaptive_margin(self, norms: Tensor) -> Tensor:
        a = self._clamped(norms)
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        self._clamped(norms, cos.shape[0])
        m = self.adaptive_margin(norms)  # type: ignore[arg-type]
        _, out = _additive_angle(_gather_target(cos, target), m, self.easy_margin)
        return _put_target(cos, target, out)

    def extra_loss(self, norms: Tensor | None = None) -> Tensor:
        a = self._clamped(norms)
        return self.lambda_g * (1.0 / a + a / (self.u_a**2)).mean()

    @classmethod
    def from_config(cls, head_cfg, num_classes, extras):
        return cls(head_cfg.scale, easy_margin=head_cfg.easy_margin, **extras)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, "
            f"u_m={self.u_m}, lambda_g={self.lambda_g}"
        )


@MARGINS.register("adaptiveface")
class AdaptiveFace(Margin):
    """AdaptiveFace's adaptive margin softmax (eqs. 5-6): target -> cos(theta_y) - m_y with a
    learnable margin per class (a Parameter [N], initialised to ``head.margin``, clamped at 0 in
    the forward); the CE term shrinks margins, the regulariser ``-lambda_m * mean_j(m_j)`` (over
    all N classes; returned by :meth:`extra_loss`) enlarges them. Only the margin part of
    AdaptiveFace (no hard-prototype mining or adaptive data sampling). The margins are indexed by
    class id, so this needs ``num_classes`` and the FC head (the FFC pool's columns are slots,
    Partial FC's are a sample). ``lambda_m`` default 1.0 is this project's choice.
    """

    EXTRAS: ClassVar[dict[str, float]] = {"lambda_m": 1.0}
    fc_only = True
    has_extra_loss = True

    def __init__(
        self, num_classes: int, scale: float = 32.0, margin: float = 0.35, lambda_m: float = 1.0
    ) -> None:
        super().__init__(scale)
        if num_classes < 1:
            raise ValueError(f"adaptiveface needs num_classes >= 1, got {num_classes}")
        if lambda_m < 0:
            raise _cfg_err("head.margin_kwargs.lambda_m", f"{lambda_m} must be >= 0")
        self.lambda_m = float(lambda_m)
        self.margins = nn.Parameter(torch.full((num_classes,), float(margin)))

    def apply_margin(self, cos: Tensor, target: Tensor, norms: Tensor | None) -> Tensor:
        if cos.shape[1] != self.margins.shape[0]:
            raise ValueError(
                f"adaptiveface: cos has {cos.shape[1]} columns but {self.margins.shape[0]} classes"
            )
        m = upcast(self.margins).clamp_min(0.0)[target]
        return _put_target(cos, target, _gather_target(cos, target) - m)

    def extra_loss(self, norms: Tensor | None = None) -> Tensor:
        return -self.lambda_m * upcast(self.margins).mean()

    @classmethod
    def from_config(cls, head_cfg, num_classes, extras):
        if num_classes is None:
            raise ValueError("adaptiveface needs num_classes (one learnable margin per class)")
        return cls(num_classes, head_cfg.scale, head_cfg.margin, extras["lambda_m"])

    def extra_repr(self) -> str:
        return f"scale={self.scale}, classes={self.margins.shape[0]}, lambda_m={self.lambda_m}"


def _resolve_extras(name: str, defaults: Mapping[str, float], given: Mapping) -> dict[str, float]:
    out = dict(defaults)
    for key, value in given.items():
        full = f"head.margin_kwargs.{key}"
        if key not in defaults:
            known = ", ".join(defaults) if defaults else "none"
            raise _cfg_err(full, f"unknown for margin_type {name!r} (known: {known})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _cfg_err(full, f"expected a number, got {value!r}")
        out[key] = float(value)
    return out


def build_margin(head_cfg: HeadConfig, num_classes: int | None = None) -> Margin:
    """The margin named by ``head_cfg.margin_type``, configured from ``head_cfg``.

    ``lsoftmax`` and ``adaptiveface`` need learned class weights / per-class parameters and are
    refused unless ``head_cfg.type == "fc"`` (:class:`ConfigError` naming ``head.margin_type``).
    """
    name = head_cfg.margin_type
    try:
        cls = MARGINS.get(name)
    except KeyError as exc:
        raise _cfg_err("head.margin_type", str(exc.args[0])) from None
    if cls.fc_only and head_cfg.type != "fc":
        raise _cfg_err(
            "head.margin_type",
            f"{name!r} works with the fc head only (learned class weights indexed by class id), "
            f"not head.type={head_cfg.type!r}",
        )
    extras = _resolve_extras(name, cls.EXTRAS, head_cfg.margin_kwargs or {})
    return cls.from_config(head_cfg, num_classes, extras)


__all__ = [
    "FC_ONLY",
    "AdaptiveFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "LSoftmax",
    "MagFace",
    "Margin",
    "NormSoftmax",
    "SphereFace",
    "build_margin",
    "chebyshev_cos_multiple",
    "psi_multiplicative",
]
