"""The run's record: the smoothing behind curves.png, the curves themselves, and the printed summary."""
import pytest

from lens_fast import train
from lens_fast.training.log import moving_average, plot_curves, reward_rise, smoothing_window


def test_moving_average_is_the_trailing_mean():
    values = [1.0, 3.0, 5.0, 7.0, 9.0]
    assert moving_average(values, 1) == values
    assert moving_average(values, 2) == [1.0, 2.0, 4.0, 6.0, 8.0]
    assert moving_average(values, 3) == [1.0, 2.0, 3.0, 5.0, 7.0]
    assert moving_average(values, 10) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert moving_average([], 4) == []
    with pytest.raises(ValueError, match="window"):
        moving_average(values, 0)
    assert smoothing_window(3) == 1 and smoothing_window(150) == 10


def _records():
    align = [{"step": s, "stage": "align", "loss": 2.0 - s / 10, "bce": 0.5, "dice": 0.4} for s in range(10)]
    grpo = [{"step": 10 + s, "stage": "grpo", "loss": 0.1, "kl": 0.01 * s, "zero_variance_groups": 0.5 - s / 40,
             "reward/total/mean": 0.2 + s / 20, "reward/box/mean": 0.1 + s / 50, "reward/mask/mean": 0.1}
            for s in range(20)]
    return align + [{"step": 10, "stage": "val", "val/mask_iou": 0.3}] + grpo


VAL = [{"after": a, "step": s, "mask_iou": g, "cIoU": c, "box_iou": b, "box_acc": b / 2}
       for a, s, g, c, b in (("start", 0, 0.05, 0.04, 0.01), ("stage1", 10, 0.5, 0.45, 0.10), ("stage2", 30, 0.55, 0.5, 0.35))]


def test_reward_rise_per_component_over_the_first_and_last_tenth():
    rises = reward_rise(_records())
    assert set(rises) == {"total", "box", "mask"}
    assert rises["box"]["first_tenth"] == pytest.approx((0.1 + 0.12) / 2)
    assert rises["box"]["last_tenth"] == pytest.approx((0.1 + 18 / 50 + 0.1 + 19 / 50) / 2)
    assert rises["box"]["rise"] == pytest.approx(0.36)
    assert rises["mask"]["rise"] == pytest.approx(0.0)
    assert reward_rise([r for r in _records() if r["stage"] != "grpo"]) == {}


def test_summary_prints_what_grpo_changed_side_by_side():
    summary = {"val": VAL, "wall_time_s": 12.0, "stage2_rewards": reward_rise(_records())}
    text = train.summary_table(summary)
    changed = text[text.index("what stage 2 (GRPO) changed"):].splitlines()
    box = next(line for line in changed if line.strip().startswith("box IoU"))
    assert box.split()[-3:] == ["0.100", "0.350", "+0.250"]
    giou = next(line for line in changed if line.strip().startswith("gIoU"))
    assert giou.split()[-3:] == ["0.500", "0.550", "+0.050"]
    rewards = text[text.index("stage-2 rewards"):].splitlines()
    assert next(line for line in rewards if line.strip().startswith("box")).split()[-1] == "+0.360"
    without_stage2 = train.summary_table({"val": VAL[:2], "wall_time_s": 1.0})
    assert "changed" not in without_stage2 and "after stage 1" not in without_stage2


def test_curves_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_curves(_records(), VAL, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000  # four panels, not an empty figure
