"""The trainer: config errors, the direction of learning, kill + resume, signals, NaN handling."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lens_fast import train
from lens_fast.data import SyntheticRefDataset
from lens_fast.training import config as train_config
from lens_fast.training.batches import MicroBatch, micro_batches
from lens_fast.training.checkpoint import latest_checkpoint

FAST = ["--val-size", "8", "--val-batch-size", "8", "--log-every", "1", "--progress", "false",
        "--stage1-batch-size", "8", "--batch-size", "2", "--num-generations", "4", "--max-new-tokens", "24"]


def run_main(tmp_path: Path, *extra: str) -> int:
    return train.main(["--output-dir", str(tmp_path), *FAST, *extra])


def records(path: Path) -> list:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train_config.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in ("--num-generations", "--epsilon-high", "--loss-type", "--stage1-train", "--scale-rewards", "--beta"):
        assert name in text
    assert "default: 0.04" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no-such-key", "1"], "unrecognized arguments: --no-such-key"),
        (["--lr", "fast"], "argument --lr: cannot read 'fast' as float"),
        (["--loss-type", "ppo"], "argument --loss-type: invalid choice: 'ppo' (choose from 'grpo', 'dapo', 'dr_grpo')"),
        (["--resume", "maybe"], "argument --resume: cannot read 'maybe' as bool"),
        (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0.0"),
        (["--epsilon-high", "-0.1"], "argument --epsilon-high: must be >= 0, got -0.1"),
        (["--num-generations", "1"], "num_generations must be >= 2"),
        (["--stage1-train", "queries,brain"], "argument --stage1-train: 'queries,brain': want one or more distinct names, "
                                              "comma-separated, from vision, llm, queries, connector, sam_encoder, sam_decoder"),
        (["--stage2-train", "llm,llm"], "argument --stage2-train: 'llm,llm': want one or more distinct names"),
        (["--micro-batch", "3"], "micro_batch must be a multiple or a divisor of num_generations 8"),
        (["--sharding", "fsdp", "--step-in-backward", "true", "--optimizer-offload", "true"],
         "sharding 'fsdp' runs torch's AdamW (fp32 states) or the offloaded one"),
        (["--kv-cache", "paged"], "argument --kv-cache: invalid choice: 'paged' (choose from 'dynamic', 'static')"),
    ],
)
def test_bad_options_fail_with_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_config.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_micro_batches_cover_the_rows_in_order():
    halves = micro_batches(3, 4, 2)
    assert [(p.prompts, p.rows) for p in halves] == [([b], slice(2 * i, 2 * i + 2)) for i, b in enumerate([0, 0, 1, 1, 2, 2])]
    assert [p.last for p in halves] == [False] * 5 + [True] and not any(p.whole_groups for p in halves)
    pairs = micro_batches(3, 4, 8)
    assert [(p.prompts, p.rows, p.last, p.whole_groups) for p in pairs] == [([0, 1], slice(0, 8), False, True),
                                                                            ([2], slice(8, 12), True, True)]
    assert micro_batches(3, 4, 0) == micro_batches(3, 4, 12) == [MicroBatch([0, 1, 2], slice(0, 12), True, True)]
    with pytest.raises(ValueError, match="micro_batch 3 must be a multiple or a divisor of the group size 4"):
        micro_batches(3, 4, 3)


def test_yaml_config_unknown_key_and_overrides(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nbeta: 0.0\n")
    config, _ = train_config.parse_args(["--config", str(path), "--beta", "0.5"])
    assert config.lr == 0.001 and config.beta == 0.5
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        train_config.parse_args(["--config", str(path)])
    assert "unknown key(s) ['learning_rate']" in capsys.readouterr().err


def test_shipped_configs_parse_and_tiny_yaml_is_the_default():
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("tiny.yaml", "synthetic_full.yaml", "lens_qwen2.5vl_3b.yaml"):
        config, _ = train_config.parse_args(["--config", str(root / name)])
        assert isinstance(config, train_config.TrainConfig)
    tiny, _ = train_config.parse_args(["--config", str(root / "tiny.yaml")])
    assert tiny == train_config.TrainConfig()
    real, _ = train_config.parse_args(["--config", str(root / "lens_qwen2.5vl_3b.yaml")])
    assert (real.num_generations, real.beta, real.lr, real.temperature, real.top_p, real.top_k) == (8, 0.04, 3e-6, 0.9, 0.9, 50)


def test_missing_path_is_named_before_any_model_is_built(tmp_path, capsys):
    code = train.main(["--output-dir", str(tmp_path), "--model", str(tmp_path / "nowhere")])
    assert code == 2
    assert "model: path" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_short_run_learns_in_the_right_direction(tmp_path):
    code = run_main(tmp_path, "--stage1-steps", "60", "--stage2-steps", "8", "--stage1-lr", "2e-3")
    assert code == 0
    log = records(tmp_path)
    align = [r for r in log if r["stage"] == "align"]
    first, last = align[:10], align[-10:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.3
    assert mean(last, "dice") < mean(first, "dice")
    grpo = [r for r in log if r["stage"] == "grpo"]
    assert len(grpo) == 8 and all("reward/box/mean" in r and "kl" in r and "clip_fraction" in r for r in grpo)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [v["after"] for v in summary["val"]] == ["start", "stage1", "stage2"]
    assert summary["val"][1]["mask_iou"] > summary["val"][0]["mask_iou"] + 0.05
    assert [v["after"] for v in summary["val_full"]] == ["start", "stage1", "stage2"]
    assert (tmp_path / "checkpoints" / "final" / "model.safetensors").is_file()


def _wait_for_checkpoint(root: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = latest_checkpoint(root / "checkpoints")
        state = latest / "trainer_state.pt" if latest is not None else None
        if state is not None:
            try:
                if torch.load(state, weights_only=False)["step"] >= step:
                    return
            except Exception:
                pass
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.5)
    raise AssertionError("no checkpoint in time")


COMMON = ["--stage1-steps", "12", "--stage2-steps", "4", "--checkpoint-every", "4", "--beta", "0.04"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = [sys.executable, "-m", "lens_fast.train", *FAST, *COMMON]
    subprocess.run([*args, "--output-dir", str(whole)], check=True, env=env, capture_output=True)
    process = subprocess.Popen([*args, "--output-dir", str(broken)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(broken, 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([*args, "--output-dir", str(broken), "--resume", "true"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    a, b = records(whole), records(broken)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "bce", "dice", "reward/total/mean", "kl", "val/mask_iou"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_a_changed_config_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "lens_fast.train", *FAST, *COMMON, "--output-dir", str(tmp_path)]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(tmp_path, 4, process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    assert "stopped by a signal" in out and "--resume" in out
    refused = subprocess.run([*args, "--resume", "true", "--lr", "0.5"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "lr: checkpoint 0.0003, now 0.5" in refused.stderr


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    from lens_fast import ops
    from lens_fast.model.segmenter import Segmenter

    def poisoned(self, low_res, gt_masks):
        nan = low_res.sum() * float("nan")
        return ops.MaskLoss(nan, nan, nan)

    monkeypatch.setattr(Segmenter, "mask_loss", poisoned)
    code = run_main(tmp_path, "--stage1-steps", "10", "--stage2-steps", "0", "--max-bad-steps", "3", "--val-size", "2")
    assert code == 1
    assert "3 consecutive non-finite losses" in capsys.readouterr().err
    skipped = [r for r in records(tmp_path) if r.get("skipped")]
    assert len(skipped) == 3


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_reduced_precision_runs_both_stages(tmp_path, precision):
    """fp32 weights with bf16 autocast, or bf16 weights: the same loop runs (on CPU here; CUDA's default
    is bf16-mixed) and writes finite losses."""
    code = run_main(tmp_path, "--stage1-steps", "2", "--stage2-steps", "2", "--precision", precision, "--val-size", "2")
    assert code == 0
    log = [r for r in records(tmp_path) if r["stage"] in ("align", "grpo")]
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    dtype = torch.load(tmp_path / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)["config"]["precision"]
    assert dtype == precision


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch", ["2", "4"])
def test_micro_batches_match_one_pass(tmp_path, micro_batch):
    """Rows split into passes of 2 (a group of 4 over two passes: rewards come from a scoring pass first)
    or 4 (whole groups; batch-scaled advantages still need the scoring pass) give the one-pass run."""
    options = ["--stage1-steps", "4", "--stage2-steps", "3", "--warmup-steps", "1", "--loss-type", "dapo",
               "--scale-rewards", "batch", "--num-iterations", "2", "--beta", "0.04"]
    assert run_main(tmp_path / "one", *options) == 0
    assert run_main(tmp_path / "split", *options, "--micro-batch", micro_batch) == 0
    one, split = records(tmp_path / "one"), records(tmp_path / "split")
    assert [r["step"] for r in one] == [r["step"] for r in split]
    for a, b in zip(one, split):
        for key in ("loss", "bce", "dice", "answer_nll", "policy_loss", "kl", "grad_norm", "reward/total/mean", "val/mask_iou"):
            if key in a:  # (fp32 sums in another order; Adam magnifies the last bits of tiny gradients)
                assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-4), (a["step"], key)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_warms_up_from_zero_then_decays_to_a_tenth(schedule):
    """transformers' schedules: linear warm-up from 0 over warmup_steps, then cosine to 0.1 x lr at the last step
    (or constant)."""
    config = train_config.TrainConfig(warmup_steps=4, lr_schedule=schedule)
    optimizer, scheduler = train.build_optimizer([torch.nn.Parameter(torch.zeros(2))], 1.0, 24, config)
    lrs = []
    for _ in range(25):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    if schedule == "cosine":
        assert lrs[14] == pytest.approx(0.1 + 0.9 * 0.5)
        assert lrs[24] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    else:
        assert lrs[4:] == pytest.approx([1.0] * 21)


def test_coordinate_ramp_reaches_the_training_and_val_scenes_never_the_full_split():
    config, _ = train_config.parse_args(["--synthetic-coordinate-ramp", "60"])
    train_set, val_set, full = train.build_datasets(config)
    assert train_set.config.coordinate_ramp == 60.0 and val_set.config.coordinate_ramp == 60.0
    assert full is not None and full.config.coordinate_ramp == 0.0
    default, _ = train_config.parse_args([])
    assert train.build_datasets(default)[0].config.coordinate_ramp == 0.0


def test_the_kl_reference_keeps_the_policy_and_queries_and_gives_the_same_logprobs(tmp_path):
    """The reference drops SAM and the connector (1.6 GB in bf16 at the real sizes): its parameters are
    the starting model's policy and queries, and its log-probs of sampled completions are the whole model's."""
    config = train_config.TrainConfig(stage1_steps=0, beta=0.04)
    cpu = torch.device("cpu")
    reference = train.reference_model(SimpleNamespace(config=config, device=cpu, checkpoints=tmp_path))
    model = train.build_model(config, cpu).eval()
    assert not hasattr(reference, "segmenter") and not hasattr(reference, "connector")
    kept = dict(reference.named_parameters())
    assert kept.keys() == {n for n, _ in model.named_parameters() if n.startswith(("policy.", "queries."))}
    assert all(torch.equal(p, model.get_parameter(n)) and not p.requires_grad for n, p in kept.items())

    dataset = SyntheticRefDataset("val", size=2, seed=3)
    samples = [dataset[i] for i in range(2)]
    images = model.prepare_images([s.image for s in samples])
    prompts = model.tokenize_prompts(images, [s.expression for s in samples])
    with torch.no_grad():
        cache = model.encode(images, sam=False)
        completions = model.generate(prompts, cache, num_generations=3, max_new_tokens=8, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0))
        rows = micro_batches(2, 3, 0)[0]
        want = train.reference_logprobs(model, prompts, cache, completions, rows, 0.9)
        got = train.reference_logprobs(reference, prompts, cache, completions, rows, 0.9)
    assert want.shape == (6, completions.ids.shape[1]) and torch.equal(got, want)
