"""AnswerSegmenter (a frozen SAM prompted with each completion's parsed answer) and the reward adapters'
``segmenter``: each completion of a group gets its own mask, shown in TRL's real GRPOTrainer.train()."""
import numpy as np
import pytest
import torch
from PIL import Image

from lens_fast.model import build_tiny_lens
from lens_fast.model.answer_segmenter import AnswerSegmenter
from lens_fast.rewards import parse_answer
from lens_fast.rewards.adapters import TRLReward, compute_score, compute_score_batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lens():
    return build_tiny_lens(seed=0, mode="prompts")


def scene(shift=0, size=(64, 80)):
    image = np.full((*size, 3), 128, np.uint8)
    image[10 + shift : 40, 10:50] = (200, 30, 30)
    gt = np.zeros(size, bool)
    gt[10 + shift : 40, 10:50] = True
    return image, gt


def test_masks_follow_the_answer_and_encode_once(lens):
    segmenter = AnswerSegmenter(lens.segmenter)  # answers in the image's own pixels
    image, _ = scene()
    a = segmenter(image, parse_answer("[4, 4, 30, 20]"))
    b = segmenter(image.copy(), '{"bbox": [30, 20, 70, 60], "points_1": [50, 40]}')  # same pixels, new array
    none = segmenter(image, "no box")
    assert a.shape == b.shape == none.shape == (64, 80) and a.dtype == bool
    assert not np.array_equal(a, b) and not none.any()
    assert segmenter.encodes == 1  # one SAM image embedding for the three answers
    segmenter(Image.fromarray(image[:, ::-1].copy()), "[1, 2, 3, 4]")
    assert segmenter.encodes == 2


def test_policy_frame_maps_the_answer_to_image_pixels(lens):
    """An answer in Qwen's resized frame (64 x 80 -> 56 x 84 here) equals the same box in image pixels."""
    image, _ = scene()
    in_frame = AnswerSegmenter.from_model(lens)
    in_pixels = AnswerSegmenter(lens.segmenter)
    h, w = 56, 84
    from lens_fast.model.image_processing import smart_resize

    assert smart_resize(64, 80, 28, lens.config.min_pixels, lens.config.max_pixels) == (h, w)
    box = (8.0, 10.0, 60.0, 40.0)
    pixels = (box[0] * 80 / w, box[1] * 64 / h, box[2] * 80 / w, box[3] * 64 / h)
    assert np.array_equal(in_frame(image, str(list(box))), in_pixels(image, str(list(pixels))))


def test_adapters_with_a_segmenter(lens, tmp_path):
    segmenter = AnswerSegmenter(lens.segmenter)
    image, gt = scene()
    Image.fromarray(image).save(tmp_path / "a.png")
    texts = ["[10, 10, 50, 40]", "[40, 30, 79, 63]", "nothing"]
    reward = TRLReward("lens", segmenter=segmenter, image_key="image")
    logged = {}
    out = reward(prompts=["p"] * 3, completions=texts, solution=["[10, 10, 50, 40]"] * 3,
                 image=[str(tmp_path / "a.png")] * 3, gt_mask=[gt] * 3,
                 log_extra=lambda name, values: logged.__setitem__(name, values))
    masks = [segmenter(str(tmp_path / "a.png"), t) for t in texts]
    inter = [np.logical_and(m, gt).sum() for m in masks]
    union = [np.logical_or(m, gt).sum() for m in masks]
    want_mask = [(i / u) ** 2 for i, u in zip(inter, union)]
    assert logged["lens_reward/mask"] == pytest.approx(want_mask, abs=1e-6)
    assert out[2] == 0.0 and len(set(np.round(want_mask, 6))) > 1
    rows = compute_score_batch(["s"] * 3, texts, ["[10, 10, 50, 40]"] * 3,
                               [{"image": image, "gt_mask": gt} for _ in texts], segmenter=segmenter)
    assert [r["mask"] for r in rows] == pytest.approx(want_mask, abs=1e-6)
    assert compute_score("s", texts[1], "[10, 10, 50, 40]", {"image": image, "gt_mask": gt},
                         segmenter=segmenter)["mask"] == pytest.approx(want_mask[1], abs=1e-6)
    with pytest.raises(ValueError, match="a segmenter needs the images: no column 'image'"):
        reward(prompts=["p"], completions=texts[:1], solution=["[1, 2, 3, 4]"], gt_mask=[gt])
    with pytest.raises(ValueError, match=r"rows \[0\] have none"):
        compute_score_batch(["s"], texts[:1], ["[1, 2, 3, 4]"], [{"gt_mask": gt}], segmenter=segmenter)
    with pytest.raises(TypeError, match="segmenter must be callable"):
        TRLReward("lens", segmenter="sam")


def test_mask_reward_in_trl_grpo_trainer_train(lens, tmp_path):
    """TRL's real GRPOTrainer.train() on a tiny text policy whose tokens are whole box answers: the
    mask reward (AnswerSegmenter on each completion's box) differs between completions of one prompt."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    boxes = [f"[{x},{y},{x + w},{y + h}]" for x in (4, 20, 40) for y in (4, 24) for w in (16, 30) for h in (12, 28)]
    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "find": 2, "the": 3, "object": 4}
    vocab.update({box: 5 + i for i, box in enumerate(boxes)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, eos_token_id=1, pad_token_id=0, bos_token_id=0,
    ))
    paths, gts = [], []
    for i in range(2):
        image, gt = scene(shift=5 * i)
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
        gts.append(gt.tolist())
    dataset = Dataset.from_dict({"prompt": ["find the object"] * 2, "solution": ["[10,10,50,40]", "[10,15,50,40]"],
                                 "image_path": paths, "gt_mask": gts})
    segmenter = AnswerSegmenter(lens.segmenter)
    reward = TRLReward("lens", segmenter=segmenter, image_key="image_path")
    seen = []

    def lens_reward(**kwargs):
        log_extra = kwargs["log_extra"]

        def record(name, values):
            if name == "lens_reward/mask":
                seen.append((list(kwargs["image_path"]), list(values)))
            log_extra(name, values)

        return reward(**{**kwargs, "log_extra": record})

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=2,
        max_steps=2, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", learning_rate=1e-3,
        bf16=False, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[lens_reward], args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    assert len(seen) == 2
    for images, mask_rewards in seen:
        assert len(set(images)) == 1 and len(mask_rewards) == 4  # one prompt, G = 4 completions
        assert len({round(v, 6) for v in mask_rewards}) > 1, mask_rewards
    assert segmenter.encodes == 2  # one SAM embedding per image, shared by its 4 completions
    assert "lens_reward/mask" in trainer.state.log_history[0]
