"""The memory plan: exact parameter counts of the real shapes on the meta device, hand-checked items,
the option search, and the ``--plan`` CLI."""
import dataclasses
from pathlib import Path

import pytest
import torch

from lens_fast import train
from lens_fast.training import plan as memory
from lens_fast.training.config import TrainConfig, parse_args

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "configs" / "lens_qwen2.5vl_3b.yaml"
VOCAB, HIDDEN = 151936, 2048


@pytest.fixture(scope="module")
def real():
    config, _ = parse_args(["--config", str(REAL)])
    facts = memory.model_facts(config)
    return config, facts, memory.shapes(facts, config)


def item(estimate, prefix):
    (found,) = [i for i in estimate.items if i.name.startswith(prefix)]
    return found.bytes


def test_real_parameter_counts_from_the_meta_device(real):
    _, facts, _ = real
    # Qwen2.5-VL-3B-Instruct as released: 3,754,622,976 parameters (tied embeddings counted once)
    assert facts.policy == 3_754_622_976
    assert facts.params["vision"] == 668_684_288
    assert facts.params["llm"] == 3_085_938_688
    # SAM ViT-L (segment_anything): image encoder 308.3 M, prompt encoder + mask decoder 4.06 M
    assert facts.params["sam_encoder"] == 308_278_272
    assert facts.params["sam_decoder"] == 6_220 + 4_058_340
    # LENS's connector (4 blocks at 2048 + a Conv1d of kernel 64) and 64 queries
    assert facts.params["queries"] == 64 * HIDDEN
    assert facts.conv_params == HIDDEN * HIDDEN * 64 + HIDDEN
    assert facts.largest_tensor == VOCAB * HIDDEN  # the tied embedding / LM head
    assert facts.text["vocab_size"] == VOCAB and facts.text["num_hidden_layers"] == 36


def test_real_config_keeps_the_shapes_and_takes_the_tokenizers_ids():
    from lens_fast.model import build_tiny_tokenizer, real_config
    from lens_fast.model.tokenizer import special_token_ids

    tokenizer = build_tiny_tokenizer()
    config = real_config(tokenizer, "vit_b")
    ids = special_token_ids(tokenizer)
    assert config.qwen["image_token_id"] == ids["<|image_pad|>"]
    assert config.qwen["text_config"]["eos_token_id"] == ids["<|im_end|>"]
    assert config.qwen["text_config"]["vocab_size"] == VOCAB
    assert config.sam["encoder_embed_dim"] == 768


def test_sequence_of_a_refcoco_image(real):
    config, _, shape = real
    assert shape.resized == (476, 644)  # 480 x 640 through smart resize (factor 28)
    assert shape.patches == 34 * 46 and shape.image_tokens == 391
    assert shape.completion == config.max_new_tokens == 768 and shape.queries == 64
    assert shape.row == shape.prompt + 768 + 64
    typical = dataclasses.replace(config, plan_completion_tokens=40)
    assert memory.shapes(memory.model_facts(typical), typical).completion == 40


def test_hand_computed_items(real):
    config, facts, shape = real
    trainable = sum(n for part, n in facts.params.items() if part in config.stage2_train)
    frozen = facts.params["sam_encoder"]
    assert trainable + frozen == facts.total
    base = memory.estimate(facts, shape, config, memory.Options(checkpointing=True))
    assert item(base, "weights, bf16") == 2 * facts.total  # bf16: 2 B/param
    assert item(base, "fp32 master") == 4 * trainable
    assert item(base, "AdamW states, fp32") == 8 * trainable  # fp32 AdamW: 8 B/param
    assert item(base, "gradients, bf16") == 2 * trainable
    assert item(base, "reference model") == 2 * facts.policy
    rows = config.batch_size * config.num_generations
    assert item(base, "KV cache") == rows * (shape.prompt + 768) * 36 * 2 * 2 * 128 * 2
    assert item(base, "log-probs: naive") == rows * 768 * VOCAB * 12
    assert item(base, "log-probs: chunked") == (2**25 // VOCAB) * VOCAB * 12
    tokens = rows * shape.row
    assert item(base, "activations: policy LLM, checkpointing") < item(base, "activations: policy LLM, no checkpointing") / 10
    layer = memory._text_layer_bytes(facts.text, "sdpa", shape.row)
    assert item(base, "activations: policy LLM, checkpointing") == tokens * (2 * HIDDEN * 36 + layer + 10 * HIDDEN)
    # flash-attn keeps K/V at 2 heads and no transposed copy: 20.5 h + 8 i bytes per token and layer
    assert memory._text_layer_bytes(facts.text, "flash", 1) == 20.5 * HIDDEN + 8 * 11008
    assert memory.korthikanti_bytes(HIDDEN, 16, 1000, flash=True) == 34 * HIDDEN
    assert memory.korthikanti_bytes(HIDDEN, 16, 1000, flash=False) == 34 * HIDDEN + 5 * 16 * 1000

    eight_bit = memory.estimate(facts, shape, config, memory.Options(states="8bit", weights="sr"))
    assert item(eight_bit, "AdamW states, 8bit") == pytest.approx(2 * trainable, rel=0.02)
    assert item(eight_bit, "master weights") == 0

    fsdp = memory.estimate(facts, shape, config, memory.Options(gpus=4))
    assert item(fsdp, "weights, bf16") == pytest.approx(2 * (trainable / 4 + frozen))
    assert item(fsdp, "AdamW states, fp32") == pytest.approx(8 * trainable / 4)
    assert item(fsdp, "gradients, bf16") == pytest.approx(2 * trainable / 4)
    assert item(fsdp, "KV cache") == item(base, "KV cache") / 4  # 2 of the 8 prompts per GPU

    no_ref = memory.estimate(facts, shape, config, memory.Options(beta0=True))
    assert item(no_ref, "reference model") == 0 and "reference" not in no_ref.phases
    assert "reference pass" not in no_ref.time
    assert base.phases["train"] - no_ref.phases["train"] == pytest.approx(2 * facts.policy)

    sixteen = dataclasses.replace(config, threads=16)  # 16 host threads per process: 1e9 params/s of AdamW
    offload = memory.estimate(facts, shape, sixteen, memory.Options(offload=True))
    assert item(offload, "AdamW states") == 0 and item(offload, "fp32 master") == 0
    assert offload.host_bytes == (4 + 4 + 8) * trainable  # the trainer's host masters, gradient buffer, fp32 states
    assert offload.time["optimizer (CPU offload)"] == pytest.approx(4 * trainable / 20e9 + trainable / 1e9)

    # FSDP2 + offload, as the trainer keeps it: on each GPU its shard of the bf16 weights and gradients, no
    # master or state; on the host each process's shard of masters, gradient buffer and (8-bit) states
    sharded_offload = memory.estimate(facts, shape, sixteen, memory.Options(gpus=4, offload=True, states="8bit"))
    assert item(sharded_offload, "weights, bf16") == pytest.approx(2 * (trainable / 4 + frozen))
    assert item(sharded_offload, "gradients, bf16") == pytest.approx(2 * trainable / 4)
    assert item(sharded_offload, "AdamW states") == 0 and item(sharded_offload, "fp32 master") == 0
    assert sharded_offload.host_bytes == pytest.approx((4 + 4 + 2 + 8 / 256) * trainable)
    # each process a quarter of the parameters, the 4 sharing the host's 50 GB/s at 28 B per update
    assert sharded_offload.time["optimizer (CPU offload)"] == pytest.approx(4 * trainable / 4 / 20e9
                                                                            + trainable / 4 / (50e9 / 28 / 4))
    assert memory.Options(gpus=4, offload=True, states="8bit").trainer_flags(16) == [
        "--gradient-checkpointing true", "--precision bf16", "--optimizer-offload true", "--optimizer-states 8bit",
        "--sharding fsdp"]

    streamed = memory.estimate(facts, shape, config, memory.Options(step_in_backward=True))
    assert item(streamed, "gradients (step in backward)") == 2 * (VOCAB * HIDDEN + facts.text_layer_params)

    micro = memory.estimate(facts, shape, config, memory.Options(micro_rows=8))
    assert micro.passes == 8
    assert item(micro, "activations: policy LLM, checkpointing") == item(base, "activations: policy LLM, checkpointing") / 8
    assert micro.total < base.total


def test_real_recipe_does_not_fit_one_24_gb_gpu_as_configured_but_a_combination_does(real):
    config, _, _ = real
    result = memory.plan(config)
    assert result.chosen.total > 24e9
    assert result.pick is not None and result.pick.total <= 24e9
    assert all(e.total <= 24e9 for e in result.candidates)
    # 16 B/param of mixed-precision AdamW cannot sit on one GPU: the pick offloads
    assert result.pick.options.offload
    # over 2 or 4 GPUs fp32 AdamW on the GPUs (16 B/param / N) does not fit: FSDP2 with the offloaded AdamW does
    assert set(result.by_gpus) == {1, 2, 4, 8} and all(result.by_gpus.values())
    for gpus in (2, 4):
        options = result.by_gpus[gpus].options
        assert options.gpus == gpus and options.offload and options.states == "fp32" and not options.step_in_backward
        assert result.by_gpus[gpus].total <= 24e9
    assert not result.by_gpus[8].options.offload


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_the_picks_command_runs_what_was_planned(real, gpus, capsys):
    """The printed ``Run it`` options, read by the trainer's own parser, plan to the pick's estimate."""
    config, _, _ = real
    result = memory.plan(dataclasses.replace(config, plan_gpus=gpus))
    rows = -(-config.batch_size // gpus) * config.num_generations
    flags = " ".join(result.pick.options.trainer_flags(rows)).split()
    assert "plan only" not in " ".join(flags)
    argv = ["--config", str(REAL), *flags, "--plan-gpus", str(gpus), "--plan-attention", result.pick.options.attention,
            "--plan-lean-ops", "true"]
    again = memory.plan(parse_args(argv)[0])
    assert again.chosen.total == pytest.approx(result.pick.total, rel=1e-9)
    assert memory.print_plan(config, str(REAL)) == 0
    assert f"Run it: python -m lens_fast.train --config {REAL} --gradient-checkpointing true" in capsys.readouterr().out


def test_step_in_backward_with_micro_batches_needs_offload(real):
    config, _, _ = real
    bad = dataclasses.replace(config, step_in_backward=True, grad_clip=0.0, micro_batch=8)
    with pytest.raises(ValueError, match="gradient buffer"):
        memory.plan(bad)
    assert memory.print_plan(bad) == 2


@pytest.mark.parametrize("argv", [["--config", str(REAL), "--plan"], ["--plan"]], ids=["real", "tiny"])
def test_cli_prints_the_plan(argv, capsys):
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    for text in ("weights, bf16", "AdamW states", "KV cache", "activations: policy LLM, checkpointing",
                 "log-probs: naive", "SAM encoder", "mask loss", "estimated peak", "The plan picks"):
        assert text in out


@pytest.mark.parametrize("argv, message", [
    (["--optimizer-states", "4bit"], "argument --optimizer-states: invalid choice: '4bit'"),
    (["--micro-batch", "-1"], "argument --micro-batch: must be >= 0, got -1"),
    (["--plan-gpus", "0"], "argument --plan-gpus: must be >= 1, got 0"),
    (["--plan-gpu-memory-gb", "0"], "argument --plan-gpu-memory-gb: must be > 0, got 0.0"),
])
def test_plan_options_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_plan_reads_the_trainers_options(real):
    """The plan estimates what the trainer does: optimizer_states fp32 is bf16 under precision=bf16; the search
    tries only what the trainer runs: step in backward without offload (no global-norm clipping) only when
    grad_clip is 0, no Kahan / stochastic-rounding AdamW, over several GPUs (FSDP2) torch's fp32 AdamW or the
    offloaded one (fp32 or 8-bit host states), never step in backward."""
    config, facts, shape = real
    assert memory.options_of(config).states == "fp32"
    assert memory.options_of(dataclasses.replace(config, precision="bf16")).states == "bf16"
    lean = dataclasses.replace(config, optimizer_states="8bit", optimizer_offload=True, step_in_backward=True, micro_batch=8)
    assert memory.options_of(lean) == memory.Options(states="8bit", offload=True, step_in_backward=True, micro_rows=8,
                                                     checkpointing=True)
    clipped, tried_clipped = memory.search(facts, shape, config, 1, 80e9)
    unclipped, tried_unclipped = memory.search(facts, shape, dataclasses.replace(config, grad_clip=0.0), 1, 80e9)
    assert tried_unclipped - tried_clipped == 2 * 2  # (fp32 master weights x fp32 or 8-bit states) x beta kept or 0
    assert not any(e.options.step_in_backward and not e.options.offload for e in clipped)
    assert any(e.options.step_in_backward and not e.options.offload for e in unclipped)
    assert all(e.options.weights == "master" and e.options.states in ("fp32", "8bit") for e in unclipped)
    sharded, _ = memory.search(facts, shape, dataclasses.replace(config, grad_clip=0.0), 4, 80e9)
    assert all(not e.options.step_in_backward and (e.options.offload or e.options.states == "fp32") for e in sharded)
    assert {(e.options.offload, e.options.states) for e in sharded} == {(False, "fp32"), (True, "fp32"), (True, "8bit")}


def test_plan_fields_have_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--plan-gpus" in text and "--plan only" in text
    assert "--optimizer-states" in text and "--micro-batch" in text and "--plan-states" not in text
    assert TrainConfig().plan_gpu_memory_gb == 24.0


def test_the_plan_steps_the_offloaded_adamw_on_the_runs_threads(real, monkeypatch):
    """The offloaded AdamW steps on the host: its estimated time follows the run's thread count (threads 0, the
    3B recipe's: torch's own choice), up to the host memory bandwidth the processes of a node share."""
    config, facts, shape = real
    assert config.threads == 0 and TrainConfig().threads == 1
    trainable = sum(n for part, n in facts.params.items() if part in config.stage2_train)

    def host_step(threads: int, gpus: int = 1) -> float:
        run = dataclasses.replace(config, threads=threads, optimizer_offload=True, plan_gpus=gpus)
        return memory.estimate(facts, shape, run, memory.options_of(run)).time["optimizer (CPU offload)"]

    pcie = 2 * 2 * trainable / memory.PCIE_BANDWIDTH
    assert host_step(1) == pytest.approx(pcie + trainable / 6.25e7)
    assert host_step(4) == pytest.approx(pcie + trainable / 2.5e8)
    ceiling = memory.HOST_BANDWIDTH / memory.ADAM_HOST_BYTES  # 1.79 G params/s: 28 threads and more gain nothing
    assert host_step(64) == pytest.approx(pcie + trainable / ceiling)
    assert host_step(64, gpus=2) == pytest.approx(pcie / 2 + trainable / 2 / (ceiling / 2))  # two processes share it
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert host_step(0) == host_step(8)
    assert "8 threads per process (threads 0: torch's choice here" in memory.assumptions(config)
    assert "1 thread per process (threads;" in memory.assumptions(dataclasses.replace(config, threads=1))
