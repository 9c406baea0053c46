"""The tiny LENS model (``build_tiny_lens``), one thread on CPU.

- ``segment``: ``model.segment()`` of 8 synthetic images (96 x 128) in one batch, greedy, 40 new
  tokens at most (the tiny config's cap): images/s in ``extra_info``.
- ``group``: one GRPO group of G = 8 completions of one prompt: sample 8 completions, score them
  teacher-forced with the context queries, and decode 8 masks. ``shared``: one policy vision encoding,
  one prefill and one SAM image embedding for the group (``encode`` once, ``generate(num_generations=8)``);
  ``per-completion``: the prompt repeated 8 times, each copy encoded and prefilled on its own (what a
  trainer that treats each completion as its own sample does, e.g. TRL's repeated prompts).
- ``generate``: the rollout's sampling alone (4 prompts x G = 8, 40 new tokens, temperature 0.9) with
  transformers' ``DynamicCache`` (the reference) and the preallocated ``StaticCache``
  (``kv_cache="static"``), asserted equal. On CPU both run eagerly; ``[cuda, ...]``: the tiny model on
  the GPU, where the static cache's decode step is compiled with CUDA graphs (the first, compiling
  call is the warm-up round).
"""
import pytest
import torch

from bench_utils import synced

from lens_fast.model.policy import KV_CACHES

from lens_fast.data import SyntheticRefDataset
from lens_fast.model import build_tiny_lens

G = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_tiny_lens(seed=0).eval()


@pytest.fixture(scope="module")
def samples():
    dataset = SyntheticRefDataset("val", size=8, seed=0)
    return [dataset[i] for i in range(8)]


def test_segment(benchmark, model, samples, one_torch_thread):
    images = [s.image for s in samples]
    expressions = [s.expression for s in samples]
    benchmark.group = "model: segment() 8 images"
    result = benchmark.pedantic(model.segment, (images, expressions), {"batch_size": 8}, rounds=10, warmup_rounds=1)
    assert len(result) == 8
    if benchmark.stats is not None:  # None in a --benchmark-disable pass
        benchmark.extra_info["images_per_s"] = 8 / benchmark.stats.stats.min


def _group(model, images, expressions, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        batch = model.prepare_images(images)
        prompts = model.tokenize_prompts(batch, expressions)
        cache = model.encode(batch)
        group = G // len(images)
        completions = model.generate(prompts, cache, num_generations=group, temperature=1.0, top_p=0.9, top_k=50,
                                     generator=generator)
        hidden, states = model.forward_completions(prompts, cache, completions)
        logprobs = model.policy.token_logprobs(hidden, completions.ids)
        masks, _ = model.masks_from_queries(states, cache.sam.repeat_interleave(group, 0))
    return logprobs, masks


@pytest.mark.parametrize("way", ["shared", "per-completion"])
def test_group_of_8(benchmark, model, samples, way, one_torch_thread):
    sample = samples[0]
    images, expressions = ([sample.image], [sample.expression]) if way == "shared" else ([sample.image] * G, [sample.expression] * G)
    benchmark.group = "model: one group of G = 8 completions (encode + generate + forward + masks)"
    benchmark.extra_info["reference"] = way == "per-completion"
    logprobs, masks = benchmark.pedantic(_group, (model, images, expressions, 0), rounds=15, warmup_rounds=1)
    assert logprobs.shape[0] == G and masks.shape[0] == G


def test_encode_alone(benchmark, model, samples, one_torch_thread):
    """The part the sharing saves: one image's policy vision encoding + SAM embedding."""
    batch = model.prepare_images([samples[0].image])
    benchmark.group = "model: encode one image (vision + SAM)"
    with torch.no_grad():
        benchmark(model.encode, batch)


def _sample(model, prompts, cache, kv_cache):
    generators = [torch.Generator(device=model.device).manual_seed(i) for i in range(len(prompts))]
    return model.generate(prompts, cache, num_generations=G, max_new_tokens=40, temperature=0.9, top_p=0.9, top_k=50,
                          generator=generators, kv_cache=kv_cache)


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("kv_cache", KV_CACHES)
def test_generate(benchmark, model, samples, kv_cache, device, one_torch_thread):
    on_device = model if device == "cpu" else build_tiny_lens(seed=0).to(device).eval()
    with torch.no_grad():
        batch = on_device.prepare_images([s.image for s in samples[:4]])
        prompts = on_device.tokenize_prompts(batch, [s.expression for s in samples[:4]])
        cache = on_device.encode(batch, sam=False)
    benchmark.group = f"model: generate 4 prompts x G = {G}, 40 new tokens ({device})"
    benchmark.extra_info["reference"] = kv_cache == "dynamic"
    out = benchmark.pedantic(synced(lambda: _sample(on_device, prompts, cache, kv_cache), device), rounds=10, warmup_rounds=1)
    expected = _sample(on_device, prompts, cache, "dynamic")
    assert torch.equal(out.ids, expected.ids)
