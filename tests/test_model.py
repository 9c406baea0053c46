"""The LENS model (lens_fast.model) on the tiny configuration, CPU: shapes, the invariants a trainer relies
on (queries leave text log-probs alone, batching/padding changes nothing), generation, agreement with
transformers' own M-RoPE and image processor, masks at each image's size, weights in and out, bad input."""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lens_fast.model import (
    Completions,
    LensConfig,
    LensModel,
    SamConfig,
    architecture,
    build_lens,
    build_tiny_lens,
    build_tiny_tokenizer,
    from_components,
    tiny_config,
)
from lens_fast.model import build as build_module
from lens_fast.model import policy as policy_module
from lens_fast.model.image_processing import QwenPatchConfig, load_image, qwen_patches
from lens_fast.model.segmenter import NO_MASK_LOGIT, build_sam

EXPRESSIONS = ["the red circle", "the blue square on the left of the green triangle"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return build_tiny_lens(seed=0).eval()


@pytest.fixture(scope="module")
def prompts_model():
    return build_tiny_lens(seed=0, mode="prompts").eval()


def pictures(seed=0, sizes=((100, 150), (77, 33))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def prepared(model, images, expressions):
    batch = model.prepare_images(images)
    return batch, model.tokenize_prompts(batch, expressions), model.encode(batch)


# ---- shapes and the trainer's invariants -------------------------------------------------------------
def test_forward_shapes(model):
    images = pictures()
    batch, prompts, cache = prepared(model, images, EXPRESSIONS)
    assert batch.original_sizes.tolist() == [[100, 150], [77, 33]]
    assert batch.policy_sizes.tolist() == [[112, 140], [112, 56]]  # Qwen's smart resize, multiples of 28
    assert batch.grid_thw.tolist() == [[1, 8, 10], [1, 8, 4]]
    assert batch.pixel_values.shape == (80 + 32, 3 * 2 * 14 * 14)
    assert prompts.input_ids.shape == prompts.attention_mask.shape and prompts.positions.shape == (3, *prompts.input_ids.shape)
    assert [v.shape for v in cache.vision] == [(20, 64), (8, 64)]
    assert cache.sam.shape == (2, 32, 16, 16)
    completions = model.generate(prompts, cache, num_generations=3, max_new_tokens=6, temperature=1.0,
                                 generator=torch.Generator().manual_seed(0))
    assert completions.ids.shape[0] == 6 and completions.ids.shape[1] <= 6
    assert completions.mask.dtype == torch.bool and completions.truncated.shape == (6,)
    hidden, states = model.forward_completions(prompts, cache, completions)
    assert hidden.shape == (6, completions.ids.shape[1], 64) and states.shape == (6, 16, 64)
    logprobs = model.policy.token_logprobs(hidden, completions.ids)
    assert logprobs.shape == completions.ids.shape and logprobs.dtype == torch.float32 and (logprobs <= 0).all()
    low_res, iou = model.masks_from_queries(states, cache.sam.repeat_interleave(3, 0))
    assert low_res.shape == (6, 64, 64) and iou.shape == (6,)
    low_res.sum().backward()  # the mask's gradient reaches the queries through the policy
    assert model.queries.embeddings.grad is not None and model.queries.embeddings.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_queries_do_not_change_text_logprobs(model):
    images = pictures(1)
    _, prompts, cache = prepared(model, images, EXPRESSIONS)
    completions = model.generate(prompts, cache, num_generations=2, max_new_tokens=8, temperature=1.0,
                                 generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, none = model.policy.forward_completions(prompts, cache.vision, completions.ids, completions.mask, None)
        assert none is None
        base = model.policy.token_logprobs(plain, completions.ids)
        queries = model.queries(4)
        states = []
        for q in (queries, 5 * torch.randn_like(queries)):
            hidden, s = model.policy.forward_completions(prompts, cache.vision, completions.ids, completions.mask, q)
            torch.testing.assert_close(model.policy.token_logprobs(hidden, completions.ids)[completions.mask],
                                       base[completions.mask], rtol=0, atol=1e-5)
            states.append(s)
    assert (states[0] - states[1]).abs().max() > 1e-3  # the queries do reach their own states


def test_logprobs_batched_with_left_padding_equal_each_row_alone(model):
    images = pictures(2)
    _, prompts, cache = prepared(model, images, EXPRESSIONS)
    assert (prompts.attention_mask == 0).any()  # the shorter prompt is left-padded
    completions = model.generate(prompts, cache, num_generations=3, max_new_tokens=10, temperature=1.0,
                                 generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden, states = model.forward_completions(prompts, cache, completions)
        logprobs = model.policy.token_logprobs(hidden, completions.ids)
        for b in range(2):
            rows = slice(3 * b, 3 * b + 3)
            _, p, c = prepared(model, images[b : b + 1], EXPRESSIONS[b : b + 1])
            alone = completions.select(rows)
            h, s = model.forward_completions(p, c, alone)
            torch.testing.assert_close(model.policy.token_logprobs(h, alone.ids)[alone.mask], logprobs[rows][alone.mask],
                                       rtol=0, atol=1e-5)
            torch.testing.assert_close(s, states[rows], rtol=0, atol=1e-5)


def test_training_pass_over_selected_prompts_and_a_shared_encoding(model):
    """A micro-batch (ImageBatch / PromptBatch / ImageCache / Completions ``select``) gives the full pass's
    rows, and a given encoding (its SAM part computed there when empty) gives the pass that encodes itself."""
    images = pictures(4, sizes=((100, 150), (77, 33), (64, 91)))
    expressions = [*EXPRESSIONS, "the thing at the bottom"]
    batch, prompts, cache = prepared(model, images, expressions)
    completions = model.generate(prompts, cache, num_generations=2, max_new_tokens=8, temperature=1.0,
                                 generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logp, low_res = model(batch, prompts, completions)
        for picked, rows in (([2], slice(4, 6)), ([0, 2], None), ([1], slice(2, 3))):
            part = completions.select(rows) if rows is not None else Completions(
                *(t[[0, 1, 4, 5]] for t in (completions.ids, completions.mask, completions.truncated)))
            expected = [0, 1, 4, 5] if rows is None else list(range(rows.start, rows.stop))
            for given in (None, cache.select(picked), model.encode(batch, sam=False).select(picked)):
                p_logp, p_low_res = model(batch.select(picked), prompts.select(picked), part, cache=given)
                mask = part.mask
                torch.testing.assert_close(p_logp[mask], logp[expected][mask], rtol=0, atol=1e-5)
                torch.testing.assert_close(p_low_res, low_res[expected], rtol=0, atol=1e-4)
    assert batch.select([0, 1, 2]) is batch and prompts.select(range(3)) is prompts and cache.select([0, 1, 2]) is cache
    assert batch.select([2]).pixel_values.shape[0] == int(batch.grid_thw[2].prod())


def test_mask_logits_change_with_the_expression(model):
    image = pictures(3, ((96, 128),))[0]
    with torch.no_grad():
        lows = []
        for expression in ("the red circle", "the smallest blue triangle"):
            batch, prompts, cache = prepared(model, [image], [expression])
            ids, mask = model.answer_ids([expression], torch.tensor([[10.0, 20.0, 60.0, 70.0]]), batch.policy_sizes,
                                         batch.original_sizes)
            _, states = model.forward_completions(prompts, cache, Completions(ids, mask, torch.zeros(1, dtype=torch.bool)))
            lows.append(model.masks_from_queries(states, cache.sam)[0])
    # the random tiny SAM's logits are small (std ~0.03); the expression moves them by ~8 % of that
    assert (lows[0] - lows[1]).abs().max() > 0.02 * lows[0].std()


# ---- generation ----------------------------------------------------------------------------------------
def test_generate_greedy_sampling_top_k(model):
    _, prompts, cache = prepared(model, pictures(4), EXPRESSIONS)
    greedy = model.generate(prompts, cache, max_new_tokens=8, temperature=0.0)
    again = model.generate(prompts, cache, max_new_tokens=8, temperature=0.0)
    assert torch.equal(greedy.ids, again.ids) and torch.equal(greedy.mask, again.mask)

    def sample(seed, **kw):
        return model.generate(prompts, cache, num_generations=4, max_new_tokens=8, temperature=1.0,
                              generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = sample(7), sample(7), sample(8)
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)
    assert len({tuple(r) for r in a.ids.tolist()}) > 1  # the completions of a group differ
    top1 = model.generate(prompts, cache, num_generations=2, max_new_tokens=8, temperature=0.7, top_k=1,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1.ids, greedy.ids.repeat_interleave(2, 0))
    tiny_p = model.generate(prompts, cache, max_new_tokens=8, temperature=1.0, top_p=1e-6,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_p.ids, greedy.ids)


def test_greedy_generation_agrees_with_the_teacher_forced_pass(model):
    """Generation (KV cache, left-padded prompts, positions continued by hand) and forward_completions
    (one pass) see the same sequence: each greedy token is the argmax of the teacher-forced logits."""
    _, prompts, cache = prepared(model, pictures(13, ((50, 200), (90, 40))), EXPRESSIONS)
    greedy = model.generate(prompts, cache, max_new_tokens=12, temperature=0.0)
    with torch.no_grad():
        hidden, _ = model.forward_completions(prompts, cache, greedy)
        predicted = model.policy.lm_head(hidden).argmax(-1)
    assert torch.equal(predicted[greedy.mask], greedy.ids[greedy.mask])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_kv_cache_generates_what_the_dynamic_one_does(model, temperature):
    """The preallocated cache (the prompts' prefill repeated for the group, the full-length attention mask
    filled as tokens come) gives the same completions, greedy and sampled, call after call (the kept
    cache is reset) and at another shape."""
    _, prompts, cache = prepared(model, pictures(15, ((50, 200), (90, 40))), EXPRESSIONS)

    def run(kv_cache, group, tokens):
        generators = [torch.Generator().manual_seed(5 + i) for i in range(2)]
        return model.generate(prompts, cache, num_generations=group, max_new_tokens=tokens, temperature=temperature,
                              top_p=0.95, generator=generators, kv_cache=kv_cache)

    for group, tokens in ((4, 12), (4, 12), (3, 7)):
        dynamic, static = run("dynamic", group, tokens), run("static", group, tokens)
        assert torch.equal(static.ids, dynamic.ids) and torch.equal(static.mask, dynamic.mask)
        assert torch.equal(static.truncated, dynamic.truncated) and static.ids.shape[0] == 2 * group


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_kv_cache_compiled_with_cuda_graphs(dtype):
    """On a GPU the static cache's decode step runs compiled (CUDA graphs): greedy completions equal the
    dynamic cache's, for two calls of one shape (the graph replayed) and a call of another."""
    gpu = build_tiny_lens(seed=0).to(device="cuda", dtype=dtype).eval()
    _, prompts, cache = prepared(gpu, pictures(16, ((64, 64), (90, 40))), EXPRESSIONS)
    for group, tokens in ((4, 16), (4, 16), (2, 9)):
        runs = [gpu.generate(prompts, cache, num_generations=group, max_new_tokens=tokens, temperature=0.0, kv_cache=kind)
                for kind in ("dynamic", "static")]
        agree = (runs[0].ids == runs[1].ids).float().mean().item()
        assert agree == 1.0 if dtype == torch.float32 else agree > 0.9  # bf16: masked-key sums may flip a near tie
    assert gpu.policy._compiled_decode is not None


def test_generate_rejects_bad_sampling_arguments(model):
    _, prompts, cache = prepared(model, pictures(14, ((30, 30),)), EXPRESSIONS[:1])
    for kwargs, name in (({"num_generations": 0}, "num_generations"), ({"max_new_tokens": 0}, "max_new_tokens"),
                         ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
                         ({"kv_cache": "paged"}, "kv_cache")):
        with pytest.raises(ValueError, match=name):
            model.generate(prompts, cache, **kwargs)


def test_generate_end_of_turn_truncation_and_mask(model, monkeypatch):
    """Row r of 3 writes its end-of-turn token at step r + 1; row 2 never ends within 4 tokens."""
    _, prompts, cache = prepared(model, pictures(5, ((60, 60),)), EXPRESSIONS[:1])
    end, pad = model.policy.end_ids[0], model.policy.pad_id
    step = {"n": 0}

    def scripted(logits, temperature, top_k, top_p, generator=None, group=1):
        n = step["n"]
        step["n"] += 1
        token = torch.full((logits.shape[0],), 7)
        for row, at in ((0, 1), (1, 3)):
            if n == at:
                token[row] = end
        return token

    monkeypatch.setattr(policy_module, "sample_next", scripted)
    out = model.generate(prompts, cache, num_generations=3, max_new_tokens=4)
    assert out.ids.shape == (3, 4)
    assert out.truncated.tolist() == [False, False, True]
    assert out.lengths.tolist() == [2, 4, 4]
    assert out.ids.tolist() == [[7, end, pad, pad], [7, 7, 7, end], [7, 7, 7, 7]]
    # all rows ended: generation stops early
    step["n"] = 0
    out = model.generate(prompts, cache, num_generations=2, max_new_tokens=9)
    assert out.ids.shape == (2, 4) and out.truncated.tolist() == [False, False] and out.lengths.tolist() == [2, 4]


# ---- agreement with transformers -------------------------------------------------------------------------
def test_mrope_positions_equal_transformers_get_rope_index(model):
    images = pictures(6, ((100, 150), (40, 260), (168, 30)))
    batch = model.prepare_images(images)
    prompts = model.tokenize_prompts(batch, ["a", EXPRESSIONS[1], "the object"])
    mm_token_type_ids = (prompts.input_ids == model.policy.image_token_id).int()  # text 0, image 1
    reference, delta = model.policy.model.model.get_rope_index(
        prompts.input_ids, mm_token_type_ids, image_grid_thw=batch.grid_thw, attention_mask=prompts.attention_mask
    )
    valid = prompts.attention_mask.bool()
    assert torch.equal(reference[:, valid], prompts.positions[:, valid])
    assert torch.equal(delta.view(-1) + valid.sum(1), prompts.next_position)


@pytest.mark.parametrize("size", [(100, 150), (33, 77), (500, 20), (10, 10), (401, 403)])
def test_qwen_patches_equal_transformers_image_processor(size):
    from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil

    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    config = QwenPatchConfig(min_pixels=56 * 56, max_pixels=168 * 168)
    mine, grid, (height, width) = qwen_patches(image, config)
    options = dict(min_pixels=config.min_pixels, max_pixels=config.max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2)
    pil = Qwen2VLImageProcessorPil(**options)(images=[Image.fromarray(image)], return_tensors="pt")
    assert pil["image_grid_thw"].tolist() == [list(grid)] and (height // 14, width // 14) == grid[1:]
    torch.testing.assert_close(mine, pil["pixel_values"], rtol=0, atol=1e-6)  # same PIL bicubic resize
    fast = Qwen2VLImageProcessor(**options)(images=[Image.fromarray(image)], return_tensors="pt")
    assert fast["image_grid_thw"].tolist() == [list(grid)]
    assert (mine - fast["pixel_values"]).abs().max() < 0.1  # torchvision's bicubic differs by < 1 level


# ---- inference ---------------------------------------------------------------------------------------------
def test_masks_at_each_images_own_size(model):
    sizes = [(17, 251), (333, 45), (5, 7), (64, 64), (1, 3)]
    images = pictures(7, sizes)
    results = model.segment(images, ["the red circle"] * len(images), batch_size=2, max_new_tokens=6)
    assert [r.mask.shape for r in results] == sizes
    assert all(r.mask.dtype == bool and isinstance(r.text, str) and isinstance(r.score, float) for r in results)
    alone = model.segment(images[2:3], ["the red circle"], max_new_tokens=6)[0]
    assert np.array_equal(alone.mask, results[2].mask) and alone.text == results[2].text


def test_image_kinds(model, tmp_path):
    rgb = pictures(8, ((30, 41),))[0]
    grey = Image.fromarray(rgb[..., 0], "L")
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA")
    palette = Image.fromarray(rgb).convert("P")
    grey.save(tmp_path / "grey.png")
    palette.save(tmp_path / "palette.png")
    expected = {
        "grey": np.repeat(rgb[..., :1], 3, 2), "rgba": rgb, "palette": np.asarray(palette.convert("RGB")),
    }
    assert np.array_equal(load_image(grey), expected["grey"])
    assert np.array_equal(load_image(rgb[..., 0]), expected["grey"])
    assert np.array_equal(load_image(rgba), rgb)
    assert np.array_equal(load_image(np.asarray(rgba)), rgb)
    assert np.array_equal(load_image(palette), expected["palette"])
    assert np.array_equal(load_image(tmp_path / "palette.png"), expected["palette"])
    assert np.array_equal(load_image(str(tmp_path / "grey.png")), expected["grey"])
    results = model.segment([grey, rgba, palette, str(tmp_path / "grey.png"), tmp_path / "palette.png"],
                            ["the red circle"] * 5, max_new_tokens=4)
    assert all(r.mask.shape == (30, 41) for r in results)
    assert np.array_equal(results[0].mask, results[3].mask) and np.array_equal(results[2].mask, results[4].mask)


def test_prompts_mode_feeds_the_parsed_box_to_sam(prompts_model, monkeypatch):
    model = prompts_model
    assert not hasattr(model, "queries")
    image = pictures(9, ((90, 120),))[0]
    batch = model.prepare_images([image])
    cache = model.encode(batch)
    h, w = batch.policy_sizes[0].tolist()  # policy frame (112, 112) -> original (90, 120)
    seen = []
    decode = model.segmenter.decode

    def spy(embeddings, **prompts):
        seen.append(prompts)
        return decode(embeddings, **prompts)

    monkeypatch.setattr(model.segmenter, "decode", spy)
    texts = ["<|box_start|>(10,20),(60,80)<|box_end|>", '{"bbox_2d": [50, 5, 110, 100], "points_1": [70, 40]}', "no box here"]
    with torch.no_grad():
        low_res, score, boxes = model.masks_from_answers(
            texts, cache.sam.expand(3, -1, -1, -1), batch.policy_sizes.repeat(3, 1), batch.original_sizes.repeat(3, 1)
        )
    sx, sy = 120 / w, 90 / h
    assert boxes[0] == pytest.approx((10 * sx, 20 * sy, 60 * sx, 80 * sy))
    assert boxes[2] is None
    h_in, w_in = 192, 256  # SAM v1's frame: the longest side (120) to image_size 256, aspect kept, padded
    assert model.segmenter.image_size == 256 and model.segmenter.input_size((90, 120)) == (h_in, w_in)
    fed = torch.cat([p["boxes"] for p in seen])
    want = torch.tensor([[10 * sx * w_in / 120, 20 * sy * h_in / 90, 60 * sx * w_in / 120, 80 * sy * h_in / 90],
                         [50 * sx * w_in / 120, 5 * sy * h_in / 90, 110 * sx * w_in / 120, 100 * sy * h_in / 90]])
    torch.testing.assert_close(fed.sort(0).values, want.sort(0).values)  # both boxes, in SAM's input frame
    assert any(p["points"] is not None for p in seen)
    assert (low_res[0] - low_res[1]).abs().max() > 1e-3  # the mask follows the box
    assert (low_res[2] == NO_MASK_LOGIT).all() and score[2] == 0
    # through segment(): empty mask and no box when the answer has none
    monkeypatch.setattr(model.segmenter, "decode", decode)
    result = model.segment([image], ["the red circle"], max_new_tokens=5)[0]
    if result.box is None:
        assert not result.mask.any()


# ---- weights ---------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"lens_config.json", "model.safetensors", "tokenizer.json"}
    loaded = LensModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    images = pictures(10, ((50, 70), (31, 90)))
    want = model.segment(images, EXPRESSIONS, max_new_tokens=8)
    got = loaded.segment(images, EXPRESSIONS, max_new_tokens=8)
    for w, g in zip(want, got):
        assert w.text == g.text and w.box == g.box and w.score == g.score and np.array_equal(w.mask, g.mask)


def test_from_pretrained_builds_in_host_memory_and_moves_the_cast_weights(model, tmp_path, monkeypatch):
    """The fp32 build and load happen on the CPU; the target device receives only the weights in ``dtype``
    (an fp32 build on the GPU is 18 GB for the real recipe: stage 2's reference would not fit beside the
    trained model on a 24 GB card). The meta device stands in for the accelerator here."""
    model.save_pretrained(tmp_path / "ckpt")
    built_on = []
    real_build = build_module.build_lens
    monkeypatch.setattr(build_module, "build_lens", lambda *a, **k: built_on.append(str(k["device"])) or real_build(*a, **k))
    loaded = LensModel.from_pretrained(tmp_path / "ckpt", device="meta", dtype=torch.bfloat16)
    assert built_on == ["cpu"]
    want = copy.deepcopy(model).to(torch.bfloat16).state_dict()  # (SAM's prompt encoder stays fp32)
    assert {name: (t.device.type, t.dtype) for name, t in loaded.state_dict().items()} == \
        {name: ("meta", t.dtype) for name, t in want.items()}
    on_cpu = LensModel.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).state_dict()
    assert on_cpu.keys() == want.keys() and all(torch.equal(want[name], on_cpu[name]) for name in want)


@pytest.mark.cuda
def test_from_pretrained_to_cuda_peaks_at_the_final_weights(model, tmp_path):
    """Loading onto the GPU in bf16 allocates little more than the bf16 weights (not an fp32 copy)."""
    model.save_pretrained(tmp_path / "ckpt")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = LensModel.from_pretrained(tmp_path / "ckpt", device="cuda", dtype=torch.bfloat16)
    final = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    assert torch.cuda.max_memory_allocated() - before <= 1.1 * final + 2**20


TINY_SAM = SamConfig(
    image_size=128, patch_size=16, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
    encoder_global_attn_indexes=(0,), window_size=4, prompt_embed_dim=32, mask_in_chans=4,
    decoder_depth=1, decoder_mlp_dim=32, decoder_num_heads=2, iou_head_hidden_dim=16,
)


def write_released_formats(tmp_path, model):
    """A tiny Qwen2.5-VL as transformers saves it (+ the tokenizer beside it) and a tiny SAM state dict."""
    qwen_dir = tmp_path / "qwen"
    model.policy.model.save_pretrained(qwen_dir)
    model.tokenizer.save_pretrained(qwen_dir)
    torch.manual_seed(3)
    sam = build_sam(TINY_SAM)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    return qwen_dir, tmp_path / "sam.pth", sam.state_dict()


def test_from_components_on_released_formats(model, tmp_path):
    qwen_dir, sam_path, sam_state = write_released_formats(tmp_path, model)
    for sam_type in (TINY_SAM, dataclasses.asdict(TINY_SAM)):
        loaded = from_components(qwen_dir, sam_path, sam_type, num_queries=4, connector_depth=1, connector_heads=4)
        assert loaded.config.sam_config == TINY_SAM and loaded.config.num_queries == 4
        for name, value in model.policy.model.state_dict().items():
            assert torch.equal(loaded.policy.model.state_dict()[name], value), name
        assert torch.equal(loaded.segmenter.image_encoder.patch_embed.proj.weight, sam_state["image_encoder.patch_embed.proj.weight"])
        assert torch.equal(loaded.segmenter.mask_decoder.iou_prediction_head.layers[0].weight,
                           sam_state["mask_decoder.iou_prediction_head.layers.0.weight"])
    result = LensModel.from_components(qwen_dir, sam_path, TINY_SAM, mode="prompts").eval().segment(
        pictures(11, ((40, 50),)), ["the red circle"], max_new_tokens=4)[0]
    assert result.mask.shape == (40, 50)


def test_released_sam_names_and_architectures():
    from lens_fast.model.build import sam_architecture

    for name, width in (("vit_b", 768), ("vit_l", 1024), ("vit_h", 1280)):
        assert sam_architecture(name)["encoder_embed_dim"] == width
        SamConfig(**sam_architecture(name))
    with pytest.raises(ValueError, match="sam_type must be one of"):
        sam_architecture("vit_x")
    with pytest.raises(ValueError, match="unknown sam config keys"):
        sam_architecture({"depth": 3})


def qwen_id_tokenizer(qwen: dict):
    """A tokenizer holding only Qwen's special tokens at their released ids (enough to build the model)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    ids = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": qwen["vision_start_token_id"],
           "<|vision_end|>": qwen["vision_end_token_id"], "<|image_pad|>": qwen["image_token_id"], "<|video_pad|>": qwen["video_token_id"]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(ids, unk_token="<|endoftext|>")),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_real_sizes_on_the_meta_device():
    qwen = architecture("qwen2.5-vl-3b-instruct")
    config = LensConfig(qwen=qwen, sam=architecture("sam_vit_l"))
    lens = build_lens(config, qwen_id_tokenizer(qwen), device="meta")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    policy, sam = count(lens.policy), count(lens.segmenter)
    print(f"policy {policy / 1e9:.3f} B, SAM ViT-L {sam / 1e6:.1f} M, queries + connector {(count(lens) - policy - sam) / 1e6:.1f} M")
    assert 3.70e9 < policy < 3.80e9  # Qwen2.5-VL-3B-Instruct: 3.75 B (tied embeddings)
    assert 300e6 < sam < 320e6  # SAM ViT-L: 308 M
    assert next(lens.parameters()).device.type == "meta"


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_expressions_and_images(model):
    image = pictures(12, ((20, 20),))[0]
    with pytest.raises(ValueError, match=r"expressions\[0\] is empty"):
        model.segment([image], ["  "])
    with pytest.raises(TypeError, match=r"expressions\[0\] must be a string"):
        model.segment([image], [3])
    with pytest.raises(TypeError, match="expressions must be a list"):
        model.segment([image], "the red circle")
    with pytest.raises(ValueError, match=r"expressions\[0\] contains the special token"):
        model.segment([image], ["the <|image_pad|> circle"])
    with pytest.raises(ValueError, match="got 2 images but 1 expressions"):
        model.segment([image, image], ["the red circle"])
    with pytest.raises(ValueError, match=r"images\[0\] has zero size"):
        model.segment([np.zeros((0, 5, 3), np.uint8)], ["x"])
    with pytest.raises(ValueError, match=r"images\[0\] has zero size"):
        model.segment([Image.new("RGB", (0, 4))], ["x"])
    with pytest.raises(TypeError, match="images must be a list"):
        model.segment(image, ["x"])
    with pytest.raises(ValueError, match="cannot read an image"):
        model.segment(["/nonexistent.png"], ["x"])
    with pytest.raises(TypeError, match="uint8"):
        model.segment([image.astype(np.float32)], ["x"])


def test_bad_checkpoints(model, tmp_path):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="missing weight file"):
        LensModel.from_pretrained(ckpt)
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LensModel.from_pretrained(ckpt)
    weights.write_bytes(good)
    config = json.loads((ckpt / "lens_config.json").read_text())
    config["num_queries"] = 8
    (ckpt / "lens_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the model built from its config"):
        LensModel.from_pretrained(ckpt)
    with pytest.raises(FileNotFoundError, match="not a lens_fast checkpoint"):
        LensModel.from_pretrained(tmp_path / "nothing")


def test_bad_components(model, tmp_path):
    qwen_dir, sam_path, _ = write_released_formats(tmp_path, model)
    with pytest.raises(ValueError, match="sam_type must be one of"):
        from_components(qwen_dir, sam_path, "vit_q")
    with pytest.raises(FileNotFoundError, match="missing SAM checkpoint"):
        from_components(qwen_dir, tmp_path / "none.pth", TINY_SAM)
    with pytest.raises(ValueError, match="is not a SAM vit_b"):
        from_components(qwen_dir, sam_path, "vit_b")  # a tiny SAM's weights for ViT-B's shapes
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read SAM checkpoint"):
        from_components(qwen_dir, tmp_path / "corrupt.pth", TINY_SAM)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_components(tmp_path, sam_path, TINY_SAM)


def test_tiny_builder_is_fast_and_deterministic():
    import time

    build_tiny_tokenizer()  # the BPE is trained once per process
    start = time.perf_counter()
    a = build_tiny_lens(seed=5)
    elapsed = time.perf_counter() - start
    b = build_tiny_lens(seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert tiny_config(a.tokenizer) == a.config
    assert elapsed < 5.0, f"build_tiny_lens took {elapsed:.2f} s"
