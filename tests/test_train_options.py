"""The trainer's command line: every option's help and allowed values, warnings for options that do nothing,
and ``--model <checkpoint>``'s recorded options (issue 16)."""
import dataclasses
import json
import logging

import pytest

from lens_fast import train
from lens_fast.model import build_tiny_lens
from lens_fast.training import config as train_config
from lens_fast.training.config import TrainConfig, checkpoint_options, parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def test_every_option_has_a_help_line_with_its_allowed_values_and_default():
    actions = {a.dest: a for a in train_config.build_parser()._actions if a.dest in FIELDS}
    assert set(actions) == set(FIELDS)
    for name, f in FIELDS.items():
        action, allowed, bounds = actions[name], f.metadata.get("choices"), f.metadata.get("range")
        assert f.metadata.get("help"), f"{name} has no help text"
        assert action.help.startswith(f.metadata["help"].replace("%", "%%")) and "default: " in action.help, name
        if allowed:
            assert all(value in action.help for value in allowed), name
        if bounds:
            assert str(bounds) in action.help, name
    # choices come from the tuples the code checks against, not from comments
    assert actions["mode"].choices == train_config.MODES and actions["sharding"].choices == train_config.SHARDINGS
    assert actions["loss_type"].choices == ("grpo", "dapo", "dr_grpo")
    assert FIELDS["stage1_train"].metadata["choices"] == train_config.PARTS
    assert "(float in (0, 1]; default: 0.9)" in actions["top_p"].help
    assert "(float >= 0 or null; default: null)" in actions["epsilon_high"].help
    assert "(true or false; default: true)" in actions["mask_truncated_completions"].help


def test_yaml_values_are_checked_against_the_same_metadata(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("loss_type: ppo\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert "loss_type must be one of ('grpo', 'dapo', 'dr_grpo'), got 'ppo'" in capsys.readouterr().err
    path.write_text("top_p: 1.5\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert "top_p must be in (0, 1], got 1.5" in capsys.readouterr().err
    path.write_text("lr: fast\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert f"{path}: lr: cannot read 'fast' as float" in capsys.readouterr().err
    # a YAML value reset to null from the command line
    path.write_text("epsilon_high: 0.28\nnum_iterations: 2\n")
    assert parse_args(["--config", str(path), "--epsilon-high", "null"])[0].epsilon_high is None


INERT = "inert at num_iterations 1"
GSPO = "GSPO clips sequence ratios at epsilon 3e-4, epsilon_high 4e-4"


@pytest.mark.parametrize("argv, warned", [
    (["--epsilon", "0.3"], "epsilon 0.3: " + INERT),
    (["--epsilon-high", "0.28"], "epsilon_high 0.28: " + INERT),
    (["--importance-sampling-level", "sequence"], "importance_sampling_level 'sequence': " + INERT),
    (["--epsilon", "0.3", "--num-iterations", "2"], None),
    (["--importance-sampling-level", "sequence", "--num-iterations", "2"],
     "importance_sampling_level 'sequence' with epsilon 0.2 / epsilon_high 0.2: a token-level clip range"),
    (["--importance-sampling-level", "sequence", "--num-iterations", "2", "--epsilon", "3e-4", "--epsilon-high", "4e-4"],
     None),
    ([], None),
])
def test_options_that_do_nothing_warn_once(argv, warned, caplog):
    with caplog.at_level(logging.WARNING, logger="lens_fast.training"):
        parse_args(argv)
    messages = [r.getMessage() for r in caplog.records if r.name == "lens_fast.training"]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0], messages
        assert (GSPO in messages[0]) == ("token-level clip range" in warned)


def test_shipped_configs_warn_of_nothing(caplog):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    with caplog.at_level(logging.WARNING, logger="lens_fast.training"):
        for name in ("tiny.yaml", "synthetic_full.yaml", "lens_qwen2.5vl_3b.yaml"):
            parse_args(["--config", str(root / name)])
    assert [r.getMessage() for r in caplog.records if r.name == "lens_fast.training"] == []


RECORDED = dict(mode="prompts", prompt_style="cot", num_queries=8, max_new_tokens=12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny lens_fast checkpoint whose four recorded options all differ from the trainer's defaults."""
    directory = tmp_path_factory.mktemp("ckpt")
    build_tiny_lens(seed=0, **RECORDED).save_pretrained(directory)
    assert all(getattr(TrainConfig(), name) != value for name, value in RECORDED.items())
    return directory


def test_model_checkpoint_options_left_out_are_the_checkpoints(checkpoint):
    """Generation length and the reward (prompt_style cot adds the format term) follow the checkpoint's model."""
    config, _ = parse_args(["--model", str(checkpoint)])
    assert {name: getattr(config, name) for name in RECORDED} == RECORDED
    config, _ = parse_args(["--model", str(checkpoint), "--prompt-style", "cot", "--max-new-tokens", "12"])
    assert {name: getattr(config, name) for name in RECORDED} == RECORDED


def test_a_run_from_a_checkpoint_generates_and_scores_as_the_checkpoint(checkpoint, tmp_path):
    """Two GRPO steps from the cot checkpoint: the format reward is scored and completions stop at its 12 tokens."""
    code = train.main(["--model", str(checkpoint), "--output-dir", str(tmp_path), "--stage1-steps", "0", "--stage2-steps", "2",
                       "--val-size", "2", "--val-batch-size", "2", "--batch-size", "1", "--num-generations", "2",
                       "--beta", "0", "--progress", "false"])
    assert code == 0
    written = json.loads((tmp_path / "config.json").read_text())
    assert {name: written[name] for name in RECORDED} == RECORDED
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r.get("stage") == "grpo"]
    assert len(steps) == 2 and all("reward/format/mean" in r and r["completion_length"] <= 12 for r in steps)


@pytest.mark.parametrize("argv, message", [
    (["--prompt-style", "grounding"], "a checkpoint with prompt_style 'cot', but prompt_style 'grounding' is set (command line)"),
    (["--num-queries", "16", "--mode", "queries"],
     "a checkpoint with mode 'prompts', num_queries 8, but mode 'queries' is set (command line), num_queries 16 is set "
     "(command line)"),
])
def test_model_checkpoint_conflicts_are_refused_with_both_values(checkpoint, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model", str(checkpoint), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"model {checkpoint} is {message}" in err and "leave them out, or set them to its values" in err


def test_model_checkpoint_conflict_in_yaml_names_the_file(checkpoint, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("max_new_tokens: 40\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path), "--model", str(checkpoint)])
    assert f"max_new_tokens 12, but max_new_tokens 40 is set ({path})" in capsys.readouterr().err


def test_model_directory_without_a_checkpoint_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path)])
    assert f"{tmp_path} is not a lens_fast checkpoint: no lens_config.json" in capsys.readouterr().err


def test_checkpoint_options_in_code_must_agree(checkpoint):
    """A config built in code counts every option as set: it must agree with the checkpoint."""
    with pytest.raises(ValueError, match="but mode 'queries' is set \\(the config\\), prompt_style 'grounding' is set"):
        checkpoint_options(TrainConfig(model=str(checkpoint)))
    agreeing = TrainConfig(model=str(checkpoint), **RECORDED)
    assert checkpoint_options(agreeing) == agreeing
    assert checkpoint_options(TrainConfig()) == TrainConfig()
