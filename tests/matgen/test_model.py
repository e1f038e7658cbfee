"""Properties of the crystal networks (KO-DFM App. E.2): equivariance, padding, causality, sampling, size."""

import pytest
import torch

from dfm_core.nn import count_parameters
from matgen.model import (
    AtomPoolingDiT,
    CrystalARModel,
    CrystalDiTConfig,
    build_model,
    token_valid_mask,
)

CFG = CrystalDiTConfig.tiny()
PAD, BOS, MASK = CFG.pad_id, CFG.bos_id, CFG.mask_id


def randomize(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (adaLN-Zero would make a fresh model output zeros)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def random_crystals(num_atoms: torch.Tensor, slots: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 875, (len(num_atoms), 6 + 4 * slots), generator=g)
    return tokens.masked_fill(~token_valid_mask(num_atoms, tokens.shape[1]), PAD)


def atom_block_index(perm: torch.Tensor) -> torch.Tensor:
    """Sequence index that moves atom ``perm[j]`` to slot ``j`` (lattice tokens stay)."""
    atoms = (6 + 4 * perm[:, None] + torch.arange(4)[None]).reshape(-1)
    return torch.cat([torch.arange(6), atoms])


def test_atom_pooling_output_shape():
    model = AtomPoolingDiT(CFG)
    num_atoms = torch.tensor([1, 3, 5])
    out = model(random_crystals(num_atoms, 5), torch.rand(3), num_atoms)
    assert out.shape == (3, 6 + 4 * 5, 878)
    with pytest.raises(ValueError, match="6 \\+ 4A"):
        model(torch.zeros(1, 9, dtype=torch.long), torch.rand(1), torch.tensor([1]))


def test_atom_pooling_is_permutation_equivariant():
    model = randomize(AtomPoolingDiT(CFG))
    A = 6
    num_atoms = torch.tensor([6, 4])
    tokens = random_crystals(num_atoms, A)
    t = torch.tensor([0.25, 0.9])
    out = model(tokens, t, num_atoms)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        # permute the real atoms of each crystal; padding slots stay at the end
        idx = torch.stack(
            [
                atom_block_index(torch.cat([torch.randperm(n, generator=g), torch.arange(n, A)]))
                for n in num_atoms.tolist()
            ]
        )
        permuted = torch.gather(tokens, 1, idx)
        out_perm = model(permuted, t, num_atoms)
        expected = torch.gather(out, 1, idx[..., None].expand(-1, -1, out.shape[-1]))
        valid = token_valid_mask(num_atoms, tokens.shape[1])
        assert torch.allclose(out_perm[valid], expected[valid], atol=1e-5)
    # and it is not trivially invariant: different atom contents give different logits
    other = tokens.clone()
    other[:, 6] = (other[:, 6] + 1) % 875
    assert not torch.allclose(model(other, t, num_atoms)[:, 10:], out[:, 10:], atol=1e-3)


def test_atom_pooling_ignores_padding():
    model = randomize(AtomPoolingDiT(CFG))
    num_atoms = torch.tensor([2, 3])
    short = random_crystals(num_atoms, 3)
    long = torch.cat([short, torch.full((2, 4 * 5), PAD)], dim=1)  # same crystals padded to 8 atoms
    garbage = long.clone()
    garbage[:, 6 + 4 * 3 :] = torch.randint(0, 875, (2, 4 * 5))
    garbage[0, 6 + 4 * 2 : 6 + 4 * 3] = torch.randint(0, 875, (4,))  # crystal 0 also pads slot 2
    t = torch.rand(2)
    out_short, out_long, out_garbage = (model(x, t, num_atoms) for x in (short, long, garbage))
    valid = token_valid_mask(num_atoms, short.shape[1])
    assert torch.allclose(out_short[valid], out_long[:, : short.shape[1]][valid], atol=1e-5)
    assert torch.allclose(out_short[valid], out_garbage[:, : short.shape[1]][valid], atol=1e-5)


def test_atom_pooling_depends_on_time_and_lattice():
    model = randomize(AtomPoolingDiT(CFG))
    num_atoms = torch.tensor([3])
    tokens = random_crystals(num_atoms, 3)
    out = model(tokens, torch.tensor([0.1]), num_atoms)
    assert not torch.allclose(out, model(tokens, torch.tensor([0.6]), num_atoms), atol=1e-4)
    swapped = tokens.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # lattice positions are distinguishable
    assert not torch.allclose(out[:, 6:], model(swapped, torch.tensor([0.1]), num_atoms)[:, 6:], atol=1e-4)


def test_atom_pooling_bf16_autocast_cpu():
    model = randomize(AtomPoolingDiT(CFG), std=0.05)
    num_atoms = torch.tensor([2, 4])
    tokens = random_crystals(num_atoms, 4)
    ref = model(tokens, torch.rand(2), num_atoms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, torch.rand(2), num_atoms)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape and torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    model = randomize(AtomPoolingDiT(CFG)).train()
    num_atoms = torch.tensor([2, 3])
    tokens = random_crystals(num_atoms, 3)
    out = model(tokens, torch.rand(2), num_atoms)
    torch.nn.functional.cross_entropy(out.reshape(-1, 878), tokens.reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["dfm", "ar"])
def test_default_config_is_about_25M_parameters(kind):
    n = count_parameters(build_model(kind, CrystalDiTConfig()))
    assert 20e6 <= n <= 30e6


def test_small_and_tiny_sizes():
    assert 2e6 <= count_parameters(build_model("dfm", CrystalDiTConfig.small())) <= 4e6
    assert 50e3 <= count_parameters(build_model("dfm", CrystalDiTConfig.tiny())) <= 200e3


def test_config_round_trip_and_unknown_keys():
    cfg = CrystalDiTConfig.small(dropout=0.1)
    assert CrystalDiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown CrystalDiTConfig key"):
        CrystalDiTConfig.from_dict({"hiden": 3})
    with pytest.raises(ValueError, match="kind"):
        build_model("vae", cfg)


def test_ar_is_causal_and_conditioned_on_atom_count():
    model = randomize(CrystalARModel(CFG))
    num_atoms = torch.tensor([3, 3])
    tokens_in = model.shift_right(random_crystals(num_atoms, 3))
    out = model(tokens_in, num_atoms)
    assert out.shape == (2, 18, 878)
    i = 9
    changed = tokens_in.clone()
    changed[:, i + 1 :] = (changed[:, i + 1 :] + 1) % 875
    out_changed = model(changed, num_atoms)
    assert torch.allclose(out[:, : i + 1], out_changed[:, : i + 1], atol=1e-5)
    assert not torch.allclose(out[:, i + 1 :], out_changed[:, i + 1 :], atol=1e-3)
    assert not torch.allclose(out, model(tokens_in, torch.tensor([4, 4])), atol=1e-4)


def test_ar_loss_finite_ignores_padding_and_trains():
    model = CrystalARModel(CFG)
    num_atoms = torch.tensor([1, 3])
    tokens = random_crystals(num_atoms, 3)
    loss = model.loss(tokens, num_atoms)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, torch.log(torch.tensor(878.0)), atol=1e-4)  # zero-init: uniform logits
    other = tokens.clone()
    other[0, 10:] = 5  # crystal 0 has 1 atom: positions >= 10 are padding
    randomize(model)
    assert torch.allclose(model.loss(tokens, num_atoms), model.loss(other, num_atoms))
    model.train().loss(tokens, num_atoms).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ar_sample_respects_allowed_mask_and_lengths():
    model = randomize(CrystalARModel(CFG), std=0.05)
    num_atoms = torch.tensor([1, 4, 2])
    L = 6 + 4 * 4
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(3, L, 878, generator=g) < 0.01
    allowed[..., 7] = True  # at least one allowed token everywhere
    out = model.sample(num_atoms, allowed_mask=allowed, generator=torch.Generator().manual_seed(1))
    assert out.shape == (3, L)
    valid = token_valid_mask(num_atoms, L)
    assert torch.all(out[~valid] == PAD)
    assert torch.all(torch.gather(allowed, 2, out.clamp_max(877)[..., None])[..., 0][valid])
    again = model.sample(num_atoms, allowed_mask=allowed, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert not model.training


def test_ar_sample_never_draws_special_tokens_and_checks_input():
    model = randomize(CrystalARModel(CFG))
    with torch.no_grad():  # make the specials the most likely tokens
        model.dit.final.linear.bias[[PAD, BOS, MASK]] = 100.0
    out = model.sample(torch.tensor([2, 2]), temperature=0)
    assert not torch.isin(out, torch.tensor([PAD, BOS, MASK])).any()
    with pytest.raises(ValueError, match="num_atoms"):
        model.sample(torch.tensor([CFG.max_atoms + 1]))
    allowed = torch.ones(1, 10, 878, dtype=torch.bool)
    allowed[0, 3] = False
    with pytest.raises(ValueError, match="position 3"):
        model.sample(torch.tensor([1]), allowed_mask=allowed)
