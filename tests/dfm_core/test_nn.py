"""Properties of the DiT backbone: shapes, padding invariance, causality, conditioning, gradients, bf16."""

import pytest
import torch

from dfm_core.nn import DiT, RotaryEmbedding, apply_rotary, make_attention_mask

V, L = 23, 12


def randomize(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere: adaLN-Zero makes a fresh DiT output zeros, hiding every property."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def make(positional="learned", causal=False, cond_dim=None, **kw):
    return DiT(
        V,
        hidden=32,
        depth=2,
        heads=4,
        max_len=32,
        positional=positional,
        causal=causal,
        cond_dim=cond_dim,
        **kw,
    )


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rotary"])
@pytest.mark.parametrize("causal", [False, True])
def test_output_shape_and_zero_init(positional, causal):
    model = make(positional, causal, cond_dim=5)
    tokens = torch.randint(0, V, (3, L))
    out = model(tokens, torch.rand(3), torch.ones(3, L, dtype=torch.bool), torch.randn(3, 5))
    assert out.shape == (3, L, V)
    assert torch.all(out == 0)  # adaLN-Zero: the final layer starts at zero


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rotary"])
@pytest.mark.parametrize("causal", [False, True])
def test_valid_positions_ignore_padding(positional, causal):
    model = randomize(make(positional, causal))
    n_valid = 7
    tokens = torch.randint(0, V, (2, L))
    valid = torch.zeros(2, L, dtype=torch.bool)
    valid[:, :n_valid] = True
    t = torch.tensor([0.3, 0.8])
    other = tokens.clone()
    other[:, n_valid:] = torch.randint(0, V, (2, L - n_valid))
    out = model(tokens, t, valid)
    out_other = model(other, t, valid)
    out_short = model(tokens[:, :n_valid], t)  # the same sequences without any padding
    assert torch.allclose(out[:, :n_valid], out_other[:, :n_valid], atol=1e-5)
    assert torch.allclose(out[:, :n_valid], out_short, atol=1e-5)
    assert not torch.allclose(
        out[:, n_valid:], out_other[:, n_valid:], atol=1e-3
    )  # padding does get computed


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rotary"])
def test_causal_position_ignores_future(positional):
    model = randomize(make(positional, causal=True))
    tokens = torch.randint(0, V, (2, L))
    t = torch.rand(2)
    out = model(tokens, t)
    for i in (0, 4, L - 2):
        changed = tokens.clone()
        changed[:, i + 1 :] = (changed[:, i + 1 :] + 1) % V
        out_changed = model(changed, t)
        assert torch.allclose(out[:, : i + 1], out_changed[:, : i + 1], atol=1e-5)
        assert not torch.allclose(out[:, i + 1 :], out_changed[:, i + 1 :], atol=1e-3)


def test_noncausal_position_sees_future():
    model = randomize(make(causal=False))
    tokens = torch.randint(0, V, (1, L))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    t = torch.rand(1)
    assert not torch.allclose(model(tokens, t)[:, 0], model(changed, t)[:, 0], atol=1e-4)


def test_causal_with_padding_mask_is_finite_and_causal():
    model = randomize(make("sinusoidal", causal=True))
    tokens = torch.randint(0, V, (2, L))
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[0, :3] = False  # left padding: query 0 has no valid key but itself
    valid[1] = False  # a sequence with nothing valid at all
    out = model(tokens, torch.rand(2), valid)
    assert torch.isfinite(out).all()


def test_time_and_cond_change_the_output():
    model = randomize(make(cond_dim=4))
    tokens = torch.randint(0, V, (2, L))
    cond = torch.randn(2, 4)
    base = model(tokens, torch.tensor([0.2, 0.2]), None, cond)
    assert not torch.allclose(base, model(tokens, torch.tensor([0.7, 0.7]), None, cond), atol=1e-4)
    assert not torch.allclose(base, model(tokens, torch.tensor([0.2, 0.2]), None, cond + 1), atol=1e-4)
    # scalar t broadcasts
    assert torch.allclose(base, model(tokens, torch.tensor(0.2), None, cond), atol=1e-6)


def test_time_free_model_and_cond_errors():
    model = DiT(V, hidden=16, depth=1, heads=2, max_len=L, time_conditioning=False)
    assert model.time_embed is None
    assert model(torch.randint(0, V, (2, L)), None).shape == (2, L, V)
    with pytest.raises(ValueError, match="cond_dim=None"):
        model(torch.randint(0, V, (2, L)), None, cond=torch.randn(2, 3))
    with pytest.raises(ValueError, match="pass t"):
        make()(torch.randint(0, V, (2, L)), None)
    with pytest.raises(ValueError, match="positional"):
        make("alibi")


def test_gradients_reach_every_parameter():
    model = randomize(make("learned", cond_dim=3)).train()
    tokens = torch.randint(0, V, (2, L))
    out = model(tokens, torch.rand(2), torch.ones(2, L, dtype=torch.bool), torch.randn(2, 3))
    torch.nn.functional.cross_entropy(out.reshape(-1, V), tokens.reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fresh_model_trains_from_zero_init():
    # at adaLN-Zero init only the final layer has gradient; one step makes the rest trainable
    model = make()
    tokens = torch.randint(0, V, (2, L))
    loss = torch.nn.functional.cross_entropy(model(tokens, torch.rand(2)).reshape(-1, V), tokens.reshape(-1))
    loss.backward()
    assert model.final.linear.weight.grad.abs().sum() > 0


def test_bf16_autocast_close_to_fp32():
    model = randomize(make("rotary", cond_dim=3), std=0.05)
    tokens = torch.randint(0, V, (2, L))
    args = (tokens, torch.rand(2), torch.ones(2, L, dtype=torch.bool), torch.randn(2, 3))
    ref = model(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*args)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item() + 1e-3)


def test_make_attention_mask_shapes():
    valid = torch.tensor([[True, True, False], [False, False, False]])
    assert make_attention_mask(None, True, 3) == (None, True)
    mask, causal = make_attention_mask(valid, False, 3)
    assert mask.shape == (2, 1, 1, 3) and not causal
    assert mask[1].all()  # an all-padding sequence attends everywhere rather than to nothing
    mask, _ = make_attention_mask(valid, True, 3)
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_rotary_scores_depend_on_relative_position_only():
    rot = RotaryEmbedding(8, 16)
    cos, sin = rot(16)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        qi = apply_rotary(q.expand(1, 1, 16, 8), cos, sin)[0, 0, i]
        kj = apply_rotary(k.expand(1, 1, 16, 8), cos, sin)[0, 0, j]
        return (qi * kj).sum()

    assert torch.allclose(score(5, 2), score(9, 6), atol=1e-5)


def test_forward_has_no_graph_breaks():
    explain = torch._dynamo.explain(make("rotary", causal=True))
    result = explain(torch.randint(0, V, (2, L)), torch.rand(2), torch.ones(2, L, dtype=torch.bool))
    assert result.graph_break_count == 0
