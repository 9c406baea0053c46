"""The run's record: ``metrics.jsonl`` (one line per logged step), TensorBoard events when tensorboard
is installed, and PNG curves at the end."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence


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


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start): same length as ``values``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(count: int) -> int:
    """The moving average's window for ``count`` points: a fifteenth of them, at least 1."""
    return max(1, count // 15)


def _in_stage(records: list[dict], stage: str) -> list[dict]:
    return [r for r in records if r.get("stage") == stage]


def _points(records: list[dict], key: str) -> list[tuple[int, float]]:
    """The (step, value) points of the records that logged ``key``."""
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def reward_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each stage-2 reward component's logged (step, mean) points, by component name (``total``, ``box``...)."""
    grpo = _in_stage(records, "grpo")
    keys = sorted({k for r in grpo for k in r if k.startswith("reward/") and k.endswith("/mean")})
    return {key[len("reward/"):-len("/mean")]: _points(grpo, key) for key in keys}


def reward_rise(records: list[dict]) -> dict[str, dict]:
    """For each stage-2 reward component: its mean over the first and the last tenth of the logged
    stage-2 steps, and the rise between them."""
    rises = {}
    for name, points in reward_series(records).items():
        values = [v for _, v in points]
        tenth = max(1, len(values) // 10)
        first, last = sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth
        rises[name] = {"first_tenth": first, "last_tenth": last, "rise": last - first}
    return rises


def _plot_smoothed(ax, points: Sequence[tuple[int, float]], label: Optional[str], color: str) -> None:
    """The (step, value) points, faint, and their moving average, solid, in one colour."""
    steps, values = [s for s, _ in points], [v for _, v in points]
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, moving_average(values, smoothing_window(len(values))), color=color, linewidth=1.8, label=label)


def plot_curves(records: list[dict], val: list[dict], path: Path) -> Optional[Path]:
    """One PNG of the run, four panels: stage 2's reward components (raw points and their moving average),
    the fraction of zero-variance groups (GRPO learns nothing from a group whose rewards are all equal),
    the losses of both stages (smoothed), and the held-out validation before and after each stage.
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = [f"C{i}" for i in range(10)]
    fig, ((rewards, groups), (losses, validation)) = plt.subplots(2, 2, figsize=(13, 8))
    grpo = _in_stage(records, "grpo")
    for color, (name, points) in zip(colors, reward_series(records).items()):
        _plot_smoothed(rewards, points, name, color)
    rewards.set_title("stage 2 (GRPO): rewards of the sampled answers, per component")
    points = _points(grpo, "zero_variance_groups")
    if points:
        _plot_smoothed(groups, points, "zero-variance groups", colors[0])
        groups.set_ylim(-0.05, 1.05)
    groups.set_title("stage 2: fraction of groups whose rewards are all equal (no signal)")
    for color, key in zip(colors, ("loss", "bce", "dice", "answer_nll", "policy_loss", "kl")):
        label = key  # on the first stage that logs it: each stage is smoothed on its own
        for stage in ("align", "grpo"):
            points = _points(_in_stage(records, stage), key)
            if points:
                _plot_smoothed(losses, points, label, color)
                label = None
    boundary = min((r["step"] for r in grpo), default=None)
    for ax in (rewards, groups, losses):
        if boundary is not None:
            ax.axvline(boundary, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
    losses.set_title("losses (moving average; dotted: stage 2 begins)")
    names = [v["after"] for v in val]
    metrics = ("mask_iou", "cIoU", "box_iou")
    width = 0.8 / len(metrics)
    for i, (color, key) in enumerate(zip(colors, metrics)):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(names))]
        bars = validation.bar(xs, [v[key] for v in val], width, color=color, label={"mask_iou": "gIoU", "box_iou": "box IoU"}.get(key, key))
        validation.bar_label(bars, fmt="%.2f", fontsize=7)
    validation.set_xticks(range(len(names)), [n if n == "start" else f"after {n}" for n in names])
    validation.set_ylim(0, 1)
    validation.set_title("held-out validation, before and after each stage")
    for ax in (rewards, groups, losses, validation):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
