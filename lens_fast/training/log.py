"""The run's record: ``metrics.jsonl`` (one line per logged step), TensorBoard events when tensorboard
is installed, and PNG curves at the end."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines from ``resume_step`` on are dropped first so that
    the file continues exactly where the checkpoint left off."""

    def __init__(self, output_dir: Path, resume_step: Optional[int] = None) -> None:
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] < resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record.get('stage', 'run')}/{key}", value, record["step"])

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line] if self.path.exists() else []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(records: list[dict], val: list[dict], path: Path) -> Optional[Path]:
    """One PNG: stage-2 rewards, losses of both stages, validation metrics. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    grpo = [r for r in records if r.get("stage") == "grpo"]
    for key in sorted({k for r in grpo for k in r if k.startswith("reward/") and k.endswith("/mean")}):
        axes[0].plot([r["step"] for r in grpo if key in r], [r[key] for r in grpo if key in r], label=key[7:-5])
    axes[0].set_title("stage 2 rewards (mean)")
    for key in ("loss", "bce", "dice", "answer_nll", "policy_loss"):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            axes[1].plot(*zip(*points), label=key)
    axes[1].set_title("losses")
    names = [v["after"] for v in val]
    for key in ("mask_iou", "cIoU", "box_iou"):
        axes[2].plot(names, [v[key] for v in val], marker="o", label=key)
    axes[2].set_title("validation")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.set_xlabel("step" if ax is not axes[2] else "after")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
