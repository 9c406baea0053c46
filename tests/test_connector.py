"""The connector is LENS's (hustvl/LENS ``SAMR1ForConditionalGeneration_qwen2p5``): a learned position
embedding over the queries, pre-LN blocks (LayerNorm eps 1e-6, fused qkv, QuickGELU MLP, no final norm),
a Conv1d collapsing the queries, Linear-GELU-Linear; initialised N(0, std) with zero biases. Checked
against a from-the-description reference written here with plain tensor maths."""
import math

import pytest
import torch
import torch.nn.functional as F

from lens_fast.model import build_tiny_lens
from lens_fast.model.connector import Connector

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * weight + bias


def lens_reference(connector: Connector, states: torch.Tensor) -> torch.Tensor:
    """LENS's connector forward from its description, reading ``connector``'s parameters by name."""
    p = dict(connector.named_parameters())
    batch, length, hidden = states.shape
    x = states + p["position"]
    for i, block in enumerate(connector.blocks):
        w = lambda name: p[f"blocks.{i}.{name}"]  # noqa: E731
        h = layer_norm(x, w("norm1.weight"), w("norm1.bias"))
        qkv = h @ w("qkv.weight").T + w("qkv.bias")
        heads = block.heads
        q, k, v = (qkv[..., j * hidden : (j + 1) * hidden].reshape(batch, length, heads, -1).transpose(1, 2) for j in range(3))
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hidden // heads), dim=-1)  # no mask
        out = (attention @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = x + out @ w("proj.weight").T + w("proj.bias")
        h = layer_norm(x, w("norm2.weight"), w("norm2.bias")) @ w("fc1.weight").T + w("fc1.bias")
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ w("fc2.weight").T + w("fc2.bias")
    # Conv1d(hidden, hidden, kernel N) over the N states: one output token
    token = torch.einsum("bnc,ocn->bo", x, p["collapse.weight"]) + p["collapse.bias"]
    token = F.gelu(token @ p["project.0.weight"].T + p["project.0.bias"])
    return (token @ p["project.2.weight"].T + p["project.2.bias"])[:, None]


def test_forward_is_lens_layout():
    torch.manual_seed(0)
    connector = Connector(num_queries=6, hidden_size=32, prompt_dim=16, depth=2, heads=4)
    with torch.no_grad():  # every parameter non-trivial, so that each one's place in the layout is checked
        for name, param in connector.named_parameters():
            is_norm_weight = name.endswith(("norm1.weight", "norm2.weight"))
            param.copy_(torch.randn_like(param) * 0.3 + (1.0 if is_norm_weight else 0.0))
    states = torch.randn(3, 6, 32)
    out = connector(states)
    assert out.shape == (3, 1, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, lens_reference(connector, states), rtol=1e-4, atol=1e-5)
    assert {name for name, _ in connector.named_parameters()} >= {"position", "collapse.weight", "project.2.bias"}
    assert not any("norm" in name and not name.startswith("blocks.") for name, _ in connector.named_parameters())


def test_position_embedding_is_learned_and_per_query():
    torch.manual_seed(0)
    connector = Connector(num_queries=5, hidden_size=16, prompt_dim=8, depth=1, heads=2, linear_init_std=0.2)
    assert connector.position.shape == (1, 5, 16) and connector.position.requires_grad
    assert torch.equal(connector.position, torch.zeros(1, 5, 16))
    states = torch.randn(2, 5, 16)
    connector(states).square().sum().backward()
    grad = connector.position.grad
    assert grad is not None and grad.abs().sum() > 0
    assert not torch.allclose(grad[0, 0], grad[0, 1])  # one embedding per query position
    with torch.no_grad():  # the position embedding is added to the states before the first block
        position = torch.randn(1, 5, 16)
        connector.position.copy_(position)
        with_position = connector(states)
        connector.position.zero_()
        torch.testing.assert_close(with_position, connector(states + position))


def test_lens_initialisation():
    """Linear weights N(0, linear_init_std), Conv1d N(0, conv_init_std), all biases 0, LayerNorms 1 / 0,
    position 0 (LENS's ``_init_custom_params`` + Qwen's ``_init_weights`` under ``post_init``)."""
    torch.manual_seed(0)
    connector = Connector(num_queries=64, hidden_size=256, prompt_dim=256, depth=2, heads=16, linear_init_std=0.05)
    linears = [m for m in connector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 2
    for module in linears:
        assert torch.equal(module.bias, torch.zeros_like(module.bias))
        assert module.weight.std().item() == pytest.approx(0.05, rel=0.05)
        assert abs(module.weight.mean().item()) < 0.005
    conv = connector.collapse
    assert conv.weight.shape == (256, 256, 64) and torch.equal(conv.bias, torch.zeros(256))
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.01)
    for module in connector.modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-6
            assert torch.equal(module.weight, torch.ones(256)) and torch.equal(module.bias, torch.zeros(256))
    assert torch.equal(connector.position, torch.zeros(1, 64, 256))


def test_lens_model_connector_uses_the_policys_initializer_range():
    """LENS initialises the connector's Linears with the policy's ``initializer_range`` (the tiny policy:
    0.2) and its Conv1d with 0.02."""
    model = build_tiny_lens(seed=0)
    assert model.policy.model.config.get_text_config().initializer_range == 0.2
    connector = model.connector
    assert connector.position.shape == (1, model.config.num_queries, model.policy.hidden_size)
    assert connector in model.parts()["connector"]
    weights = torch.cat([m.weight.flatten() for m in connector.modules() if isinstance(m, torch.nn.Linear)])
    assert weights.std().item() == pytest.approx(0.2, rel=0.05)
    assert connector.collapse.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="heads 3 must divide hidden_size 16"):
        Connector(num_queries=4, hidden_size=16, prompt_dim=8, depth=1, heads=3)
    connector = Connector(num_queries=4, hidden_size=16, prompt_dim=8, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"states must be \[B, 4, hidden\]"):
        connector(torch.zeros(2, 5, 16))
    with pytest.raises(ValueError, match=r"states must be \[B, 4, hidden\]"):
        connector(torch.zeros(4, 16))
