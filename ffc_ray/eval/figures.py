"""ROC and score-histogram figures as uint8 HWC images (PIL only, no matplotlib).

Why: TensorBoard's ``add_image(tag, img, step, dataformats="HWC")`` shows how the verification
scores evolve during training; drawing with PIL keeps the dependency list short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_BLUE = (31, 119, 180)
_GREEN = (44, 160, 44)
_RED = (214, 39, 40)
_GREY = (150, 150, 150)
_BLACK = (0, 0, 0)


class _Axes:
    """A plot area inside a white canvas with data -> pixel mapping, ticks and labels."""

    def __init__(
        self,
        size: tuple[int, int],
        xlim: tuple[float, float],
        ylim: tuple[float, float],
        log_x: bool = False,
    ) -> None:
        self.w, self.h = size
        self.img = Image.new("RGB", size, (255, 255, 255))
        self.draw = ImageDraw.Draw(self.img, "RGBA")
        self.font = ImageFont.load_default()
        self.left, self.right, self.top, self.bottom = 56, self.w - 16, 30, self.h - 44
        self.log_x = log_x
        self.xlim = (np.log10(xlim[0]), np.log10(xlim[1])) if log_x else xlim
        self.ylim = ylim

    def px(self, x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        x = np.asarray(x, np.float64)
        if self.log_x:
            x = np.log10(np.maximum(x, 10 ** self.xlim[0]))
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (np.asarray(y, np.float64) - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        px = self.left + np.clip(fx, 0, 1) * (self.right - self.left)
        py = self.bottom - np.clip(fy, 0, 1) * (self.bottom - self.top)
        return list(zip(px.tolist(), py.tolist()))

    def frame(
        self, title: str, xlabel: str, ylabel: str, xticks: Sequence[float], yticks: Sequence[float]
    ) -> None:
        d = self.draw
        d.rectangle([self.left, self.top, self.right, self.bottom], outline=_BLACK)
        for t in xticks:
            ((x, _),) = self.px([t], [self.ylim[0]])
            d.line([(x, self.bottom), (x, self.bottom + 4)], fill=_BLACK)
            label = f"{t:g}"
            d.text((x - 3 * len(label), self.bottom + 6), label, fill=_BLACK, font=self.font)
        for t in yticks:
            ((_, y),) = self.px([self.xlim[0] if not self.log_x else 10 ** self.xlim[0]], [t])
            d.line([(self.left - 4, y), (self.left, y)], fill=_BLACK)
            label = f"{t:g}"
            d.text((self.left - 8 - 6 * len(label), y - 5), label, fill=_BLACK, font=self.font)
        d.text(
            ((self.left + self.right) / 2 - 3 * len(xlabel), self.bottom + 22),
            xlabel,
            fill=_BLACK,
            font=self.font,
        )
        d.text((6, self.top - 18), ylabel, fill=_BLACK, font=self.font)
        d.text(
            ((self.left + self.right) / 2 - 3 * len(title), 6), title, fill=_BLACK, font=self.font
        )

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int]]], corner: str) -> None:
        width = 12 + 6 * max(len(t) for t, _ in entries)
        x = self.right - width - 8 if corner.endswith("right") else self.left + 8
        y = self.bottom - 14 * len(entries) - 8 if corner.startswith("lower") else self.top + 6
        self.draw.rectangle(
            [x - 4, y - 3, x + width, y + 14 * len(entries)],
            fill=(255, 255, 255, 220),
            outline=_GREY,
        )
        for i, (text, colour) in enumerate(entries):
            self.draw.rectangle([x, y + 14 * i + 3, x + 8, y + 14 * i + 9], fill=colour)
            self.draw.text((x + 12, y + 14 * i), text, fill=_BLACK, font=self.font)

    def array(self) -> np.ndarray:
        return np.asarray(self.img, dtype=np.uint8).copy()


def roc_image(
    metrics: Mapping[str, Any], size: tuple[int, int] = (480, 360), log_fpr: bool = False
) -> np.ndarray:
    """ROC curve (TPR vs FPR) of :func:`verification_metrics` output -> uint8 [H, W, 3].

    ``log_fpr`` draws FPR on a log axis (down to 1e-4 or one false accept), as used for TAR@FAR.
    """
    roc = metrics["roc"]
    fpr, tpr = np.asarray(roc["fpr"], np.float64), np.asarray(roc["tpr"], np.float64)
    if log_fpr:
        lo = max(
            1e-4,
            10 ** np.floor(np.log10(max(fpr[fpr > 0].min(), 1e-6))) if (fpr > 0).any() else 1e-4,
        )
        ax = _Axes(size, (lo, 1.0), (0.0, 1.0), log_x=True)
        xticks = [10.0**e for e in range(int(np.log10(lo)), 1)]
        keep = fpr >= lo
        fpr, tpr = (
            np.concatenate([[lo], fpr[keep]]),
            np.concatenate([[tpr[~keep].max() if (~keep).any() else 0.0], tpr[keep]]),
        )
    else:
        ax = _Axes(size, (0.0, 1.0), (0.0, 1.0))
        xticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
        ax.draw.line(ax.px([0, 1], [0, 1]), fill=_GREY, width=1)  # chance
    ax.frame("ROC", "false accept rate", "true accept rate", xticks, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.draw.line(ax.px(fpr, tpr), fill=_BLUE, width=2)
    entries = [(f"AUC {metrics.get('auc', float('nan')):.4f}", _BLUE)]
    if "accuracy" in metrics:
        entries.append((f"acc {metrics['accuracy']:.4f}", _BLUE))
    for key in sorted(k for k in metrics if str(k).startswith("tar@far=")):
        if metrics[key] is not None:  # None: not measurable on this set
            entries.append((f"{key} {metrics[key]:.3f}", _BLUE))
    ax.legend(entries, "lower right")
    return ax.array()


def histogram_image(
    metrics: Mapping[str, Any], size: tuple[int, int] = (480, 360), bins: int = 50
) -> np.ndarray:
    """Score histograms of same and different pairs with the threshold -> uint8 [H, W, 3]."""
    same = np.asarray(metrics["hist"]["same"], np.float64)
    diff = np.asarray(metrics["hist"]["diff"], np.float64)
    both = np.concatenate([same, diff])
    lo, hi = (float(both.min()), float(both.max())) if len(both) else (-1.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    h_same = np.histogram(same, edges)[0] / max(len(same), 1)
    h_diff = np.histogram(diff, edges)[0] / max(len(diff), 1)
    top = float(max(h_same.max(initial=0), h_diff.max(initial=0), 1e-9)) * 1.1
    ax = _Axes(size, (lo, hi), (0.0, top))
    xticks = np.round(np.linspace(lo, hi, 5), 2).tolist()
    ax.frame(
        "score histogram (fraction of pairs)",
        "cosine similarity",
        "fraction",
        xticks,
        np.round(np.linspace(0, top / 1.1, 4), 3).tolist(),
    )
    for h, colour in ((h_diff, _RED), (h_same, _GREEN)):
        for i, v in enumerate(h):
            if v <= 0:
                continue
            (x0, y0), (x1, y1) = ax.px([edges[i], edges[i + 1]], [v, 0.0])
            ax.draw.rectangle([x0, y0, x1, y1], fill=(*colour, 110), outline=(*colour, 255))
    entries = [(f"same ({len(same)})", _GREEN), (f"different ({len(diff)})", _RED)]
    if "threshold" in metrics:
        t = float(metrics["threshold"])
        ((x, _),) = ax.px([t], [0.0])
        for y in range(ax.top, ax.bottom, 8):
            ax.draw.line([(x, y), (x, min(y + 4, ax.bottom))], fill=_BLACK, width=1)
        entries.append((f"threshold {t:.3f}", _BLACK))
    ax.legend(entries, "upper left")
    return ax.array()
