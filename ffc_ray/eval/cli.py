"""``ffc-ray eval CHECKPOINT --pairs SET [--pairs SET ...] [--out DIR] [--flip]``.

Evaluates the P-Net of a training checkpoint on verification pairs and writes ``metrics.json``
plus a ROC curve and a same / different similarity histogram (PNG) per set.

``CHECKPOINT`` is a checkpoint folder written by ``ffc-ray train`` (it holds ``state.pt``) or a
run folder (then its best-scoring checkpoint is used, the latest when none was evaluated).
``SET`` is ``synthetic`` (the held-out synthetic identities of the checkpoint's own config), a
verification set ``.npz`` from ``ffc-ray data pairs``, an InsightFace ``.bin`` or an LFW pairs
list. No Ray is needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (state.pt) or run folder")
    parser.add_argument(
        "--pairs",
        action="append",
        required=True,
        metavar="SET",
        help="'synthetic' or a verification set file (repeatable)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint>/eval)")
    parser.add_argument("--flip", action="store_true", help="add the mirrored image's embedding")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the best (else latest) checkpoint of a run folder."""
    from ffc_ray.engine.checkpoint import META_FILE, STATE_FILE

    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    cands = [d for d in p.iterdir() if (d / STATE_FILE).is_file() and (d / META_FILE).is_file()]
    if not cands:
        raise FileNotFoundError(f"{p}: no checkpoint folder (with {STATE_FILE}) inside")

    def rank(d: Path) -> tuple[float, int]:
        meta = json.loads((d / META_FILE).read_text())
        score = meta.get("metrics", {}).get("score")
        ok = isinstance(score, (int, float)) and not math.isnan(score) and score >= 0
        return (float(score) if ok else -math.inf, int(meta.get("step", 0)))

    return max(cands, key=rank)


def load_backbone(ckpt_dir: Path, device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """(P-Net in eval mode, Config, checkpoint meta) from a checkpoint folder."""
    import torch

    from ffc_ray.config import Config
    from ffc_ray.engine.checkpoint import META_FILE, load_checkpoint_state
    from ffc_ray.models import build_backbone

    state = load_checkpoint_state(ckpt_dir)
    cfg = Config.from_dict(state["config"])
    net = build_backbone(cfg.model, cfg.data.image_size)
    net.load_state_dict(state["trainer"]["pnet"])
    net.to(torch.device(device)).eval()
    meta = (
        json.loads((ckpt_dir / META_FILE).read_text())
        if (ckpt_dir / META_FILE).is_file()
        else {"step": state.get("step")}
    )
    return net, cfg, meta


def make_embed_fn(net: Any, device: str) -> Any:
    """uint8 [B, H, W, 3] -> raw embeddings (``evaluate`` normalises)."""
    import torch

    from ffc_ray.data.batch import chw_tensor, normalize

    @torch.no_grad()
    def embed(images_u8: np.ndarray) -> np.ndarray:
        return net(normalize(chw_tensor(images_u8), device)).float().cpu().numpy()

    return embed


def write_figures(out_dir: Path, name: str, res: dict[str, Any]) -> list[Path]:
    """ROC and histogram PNGs of one set."""
    from PIL import Image

    from ffc_ray.eval.figures import histogram_image, roc_image

    paths = []
    for kind, fn in (("roc", roc_image), ("hist", histogram_image)):
        p = out_dir / f"{kind}_{name}.png"
        Image.fromarray(np.asarray(fn(res))[..., :3]).save(p)
        paths.append(p)
    return paths


def evaluate_checkpoint(
    checkpoint: str | Path,
    pairs: list[str],
    out: str | Path | None = None,
    flip: bool = False,
    batch_size: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate, write ``metrics.json`` and figures; returns the metrics per set."""
    from ffc_ray.eval.sets import load_eval_sets
    from ffc_ray.eval.verification import evaluate

    ckpt = find_checkpoint(checkpoint)
    net, cfg, meta = load_backbone(ckpt, device)
    cfg = cfg.with_overrides({"eval.pairs": list(pairs)})
    vsets = load_eval_sets(cfg)
    out_dir = Path(out) if out else ckpt / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    embed = make_embed_fn(net, device)
    results: dict[str, Any] = {"checkpoint": str(ckpt), "step": meta.get("step"), "sets": {}}
    for spec, vset in zip(pairs, vsets):
        res = evaluate(
            embed,
            vset,
            flip=flip,
            batch_size=batch_size or cfg.eval.batch_size,
            far_targets=cfg.eval.far_targets,
        )
        figs = write_figures(out_dir, vset.name, res)
        results["sets"][vset.name] = {
            "source": spec,
            **{
                k: float(v)
                for k, v in res.items()
                if isinstance(v, (int, float, np.floating, np.integer))
            },
            **{k: None for k, v in res.items() if k.startswith("tar@") and v is None},
            **({"notes": res["notes"]} if "notes" in res else {}),
            "figures": [str(p) for p in figs],
        }
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def run(args: argparse.Namespace) -> int:
    res = evaluate_checkpoint(
        args.checkpoint, args.pairs, args.out, args.flip, args.batch_size, args.device
    )
    print(f"checkpoint {res['checkpoint']} (step {res['step']})")
    for name, m in res["sets"].items():
        print(
            f"{name}: accuracy {m['accuracy']:.4f} +- {m['accuracy_std']:.4f}  "
            f"auc {m['auc']:.4f}  threshold {m['threshold']:.3f}  "
            + "  ".join(
                f"{k} {'n/a' if v is None else f'{v:.4f}'}"
                for k, v in m.items()
                if k.startswith("tar@")
            )
        )
    out = Path(args.out) if args.out else Path(res["checkpoint"]) / "eval"
    print(f"wrote {out / 'metrics.json'}")
    print(
        json.dumps(
            {n: {k: v for k, v in m.items() if k != "figures"} for n, m in res["sets"].items()}
        )
    )
    return 0
