"""Tests for matgen.tokenizer: vocabulary layout, encode/decode, error handling and slot masks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from pymatgen.core import DummySpecies, Lattice, Structure
from scipy.optimize import linear_sum_assignment

from matgen.tokenizer import (
    ANGLE_OFFSET,
    BOS_ID,
    ELEMENT_OFFSET,
    FRAC_OFFSET,
    LENGTH_OFFSET,
    MASK_ID,
    PAD_ID,
    SLOT_ANGLE,
    SLOT_COORD,
    SLOT_ELEMENT,
    SLOT_LENGTH,
    VOCAB_SIZE,
    CrystalTokenizer,
    DecodeError,
    TokenizationError,
    element_token,
    ids_to_strings,
    slot_kinds,
    token_to_string,
)

TOK = CrystalTokenizer()


def toy_crystal() -> Structure:
    lattice = Lattice.from_parameters(4.2, 4.26, 5.04, 90, 90, 120)
    return Structure(lattice, ["Cl", "Na", "Na"], [[0.5, 0.5, 0.999], [0.0, 0.0, 0.0], [0.25, 0.126, -0.25]])


# ------------------------------------------------------------------ layout
def test_vocabulary_layout_matches_appendix_e2():
    assert VOCAB_SIZE == 878
    assert (LENGTH_OFFSET, ANGLE_OFFSET, FRAC_OFFSET, ELEMENT_OFFSET) == (0, 500, 680, 781)
    assert (BOS_ID, MASK_ID, PAD_ID) == (875, 876, 877)
    assert [token_to_string(i) for i in (0, 1, 499)] == ["0.0", "0.1", "49.9"]
    assert [token_to_string(i) for i in (500, 590, 679)] == ["0", "90", "179"]
    assert [token_to_string(i) for i in (680, 705, 780)] == ["0.00", "0.25", "1.00"]
    assert [token_to_string(i) for i in (781, 874)] == ["H", "Pu"]
    assert [token_to_string(i) for i in (875, 876, 877)] == ["<BOS>", "<MASK>", "<PAD>"]
    assert element_token("H") == 781 and element_token("Fe") == 781 + 25 and element_token("Pu") == 874
    # every id has a distinct string, and nothing outside the vocabulary has one
    assert len(set(ids_to_strings(range(VOCAB_SIZE)))) == VOCAB_SIZE
    with pytest.raises(ValueError):
        token_to_string(VOCAB_SIZE)
    with pytest.raises(ValueError):
        token_to_string(-1)
    for bad in ("Am", "X", "fe", ""):
        with pytest.raises(ValueError, match="unknown element"):
            element_token(bad)


def test_slot_kinds():
    kinds = slot_kinds(2)
    assert kinds.dtype == torch.long
    assert kinds.tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 2, 3, 3, 3]
    assert slot_kinds(0).tolist() == [0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------ encode
def test_encode_known_tokens_and_order():
    tokens = TOK.encode(toy_crystal())
    assert tokens.dtype == torch.long and tokens.shape == (6 + 4 * 3,)
    assert ids_to_strings(tokens) == [
        "4.2", "4.3", "5.0", "90", "90", "120",
        "Na", "0.00", "0.00", "0.00",
        "Na", "0.25", "0.13", "0.75",  # -0.25 wraps to 0.75; 0.126 rounds to 0.13
        "Cl", "0.50", "0.50", "0.00",  # 0.999 rounds to 1.00, folded onto 0.00
    ]  # fmt: skip
    # encode is deterministic and independent of the input site order
    shuffled = Structure.from_sites(list(reversed(toy_crystal().sites)))
    assert torch.equal(TOK.encode(shuffled), tokens)


def test_encode_rejects_unrepresentable_structures():
    lattice = Lattice.cubic(4.0)
    with pytest.raises(TokenizationError, match="disordered"):
        TOK.encode(Structure(lattice, [{"Fe": 0.5, "Co": 0.5}], [[0, 0, 0]]))
    with pytest.raises(TokenizationError, match="disordered"):
        TOK.encode(Structure(lattice, [{"Fe": 0.5}], [[0, 0, 0]]))
    with pytest.raises(TokenizationError, match="Z=95"):
        TOK.encode(Structure(lattice, ["Am"], [[0, 0, 0]]))
    with pytest.raises(TokenizationError, match="not an element"):
        TOK.encode(Structure(lattice, [DummySpecies("X")], [[0, 0, 0]]))
    with pytest.raises(TokenizationError, match="lengths"):
        TOK.encode(Structure(Lattice.tetragonal(4.0, 49.96), ["Fe"], [[0, 0, 0]]))
    with pytest.raises(TokenizationError, match="angles"):
        TOK.encode(Structure(Lattice.from_parameters(20, 20, 20, 90, 90, 179.6), ["Fe"], [[0, 0, 0]]))
    with pytest.raises(TokenizationError, match="zero atoms"):
        TOK.encode(Structure(lattice, [], []))
    # cells that round to a token which never decodes: every encoded sequence must decode
    for cell in ((0.04, 5, 5, 90, 90, 90), (5, 5, 5, 90, 90, 0.4), (5, 5, 5, 120.2, 120.2, 119.6)):
        with pytest.raises(TokenizationError, match="vocabulary's cells|degenerate"):
            TOK.encode(Structure(Lattice.from_parameters(*cell), ["Na"], [[0, 0, 0]]))
    # the edges of the vocabulary are fine, and oxidation states are dropped
    ok = Structure(Lattice.tetragonal(4.0, 49.94), ["Pu", "Fe2+"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert ids_to_strings(TOK.encode(ok))[:3] == ["4.0", "4.0", "49.9"]
    assert "Fe" in ids_to_strings(TOK.encode(ok))


# ------------------------------------------------------------------ decode
def test_decode_handles_padding_bos_and_containers():
    tokens = TOK.encode(toy_crystal())
    reference = TOK.decode(tokens)
    assert [str(s) for s in reference.species] == ["Na", "Na", "Cl"]
    np.testing.assert_allclose(reference.lattice.abc, [4.2, 4.3, 5.0], atol=1e-9)
    np.testing.assert_allclose(reference.lattice.angles, [90, 90, 120], atol=1e-9)
    padded = torch.cat([tokens, torch.full((8,), PAD_ID)])
    for variant in (padded, padded.tolist(), padded.numpy(), torch.cat([torch.tensor([BOS_ID]), padded])):
        decoded = TOK.decode(variant)
        np.testing.assert_allclose(decoded.frac_coords, reference.frac_coords)
    # the 1.00 coordinate token is accepted and lands on 0.0
    ones = tokens.clone()
    ones[7:10] = FRAC_OFFSET + 100
    assert np.allclose(TOK.decode(ones).frac_coords[0], 0.0)


@pytest.mark.parametrize(
    "tokens, reason",
    [
        ([], "0 tokens"),
        ([PAD_ID] * 10, "0 tokens"),
        ([42, 42, 42, 590, 590, 590], "6 tokens"),
        ([42, 42, 42, 590, 590, 590, 781, 680, 680], "need 6 \\+ 4a"),
        ([42, 42, 42, 590, 590, 590, 781, 680, 680, 680, 781], "need 6 \\+ 4a"),
        ([42, 42, 590, 590, 590, 590, 781, 680, 680, 680], "position 2 expects a length"),
        ([42, 42, 42, 590, 590, 42, 781, 680, 680, 680], "position 5 expects an angle"),
        ([42, 42, 42, 590, 590, 590, 680, 680, 680, 680], "position 6 expects an element"),
        ([42, 42, 42, 590, 590, 590, 781, 680, 781, 680], "position 8 expects a coordinate"),
        ([42, 42, 42, 590, 590, 590, 781, 680, MASK_ID, 680], "got <MASK>"),
        ([42, 42, 42, 590, 590, 590, 781, PAD_ID, 680, 680], "got <PAD>"),
        ([42, 42, 42, 590, 590, 590, BOS_ID, 680, 680, 680], "got <BOS>"),
        ([42, 42, 42, 590, 590, 590, 781, 680, 680, 9999], "out-of-vocabulary id 9999"),
        ([42, 42, 42, 590, 590, 590, 781, 680, 680, -3], "out-of-vocabulary id -3"),
        ([0, 42, 42, 590, 590, 590, 781, 680, 680, 680], "length of 0.0"),
        ([42, 42, 42, 500, 590, 590, 781, 680, 680, 680], "angle of 0"),
        ([42, 42, 42, 510, 510, 679, 781, 680, 680, 680], "degenerate lattice"),  # 10+10 < 179 deg
        ([1, 1, 1, 590, 590, 590, 781, 680, 680, 680], "degenerate lattice"),  # volume 0.001 A^3
        ([42, 42, 42, 620, 620, 620, 781, 680, 680, 680], "degenerate lattice"),  # 120*3 = 360 deg: flat
        ([[42, 42, 42, 590, 590, 590, 781, 680, 680, 680]], "1-D"),
        ([42.0, 42, 42, 590, 590, 590, 781, 680, 680, float("nan")], "non-finite"),
        ([42.5, 42, 42, 590, 590, 590, 781, 680, 680, 680], "non-integer"),
        (["42"] * 10, "integers"),
        (None, "1-D"),
        ([[1, 2], [3]], "1-D array"),
    ],
)
def test_decode_rejects_malformed_sequences(tokens, reason):
    with pytest.raises(DecodeError, match=reason):
        TOK.decode(tokens)
    structure, message = TOK.try_decode(tokens)
    assert structure is None and isinstance(message, str) and message


def test_random_sequences_never_raise_anything_but_decode_error():
    rng = np.random.default_rng(0)
    kinds_ok = 0
    for trial in range(2000):
        length = int(rng.integers(0, 90))
        if trial % 2 == 0:  # arbitrary ids, including out-of-vocabulary ones
            tokens = rng.integers(-10, VOCAB_SIZE + 10, size=length)
        else:  # every slot of the right kind, values anywhere in range: stresses the lattice checks
            atoms = int(rng.integers(1, 21))
            kinds = slot_kinds(atoms).numpy()
            starts = np.array([LENGTH_OFFSET, ANGLE_OFFSET, ELEMENT_OFFSET, FRAC_OFFSET])[kinds]
            counts = np.array([500, 180, 94, 101])[kinds]
            tokens = starts + (rng.random(len(kinds)) * counts).astype(np.int64)
        structure, reason = TOK.try_decode(torch.as_tensor(tokens))
        assert (structure is None) != (reason is None)
        if structure is not None:
            kinds_ok += 1
            assert structure.volume > 0.1
            # decoding is exact on the grid: re-encoding gives the same tokens (up to atom order, 1.00 -> 0.00)
            canonical = TOK.encode(structure)
            assert torch.equal(TOK.encode(TOK.decode(canonical)), canonical)
            assert torch.equal(canonical[:6], torch.as_tensor(tokens[:6]))
        try:
            TOK.decode(tokens)
        except DecodeError:
            pass
    assert kinds_ok > 100  # the well-kinded half mostly decodes


def test_batch_decode():
    tokens = TOK.encode(toy_crystal())
    batch = torch.stack([tokens, torch.full_like(tokens, MASK_ID)])
    results = TOK.batch_decode(batch)
    assert results[0][0] is not None and results[0][1] is None
    assert results[1][0] is None and "MASK" in results[1][1]


# ------------------------------------------------------------------ round trip on MP-20 (fixture: conftest)
def _periodic_cost(frac_a: np.ndarray, frac_b: np.ndarray, species_a: list, species_b: list) -> np.ndarray:
    diff = np.abs(frac_a[:, None, :] - frac_b[None, :, :]) % 1.0
    cost = np.minimum(diff, 1.0 - diff).max(axis=-1)
    same = np.asarray(species_a)[:, None] == np.asarray(species_b)[None, :]
    return np.where(same, cost, np.inf)


@pytest.mark.slow
def test_round_trip_all_mp20_test_structures(mp20_test_structures):
    ids, structures = mp20_test_structures
    assert len(structures) == 9046
    start = time.perf_counter()
    worst = {"length": 0.0, "angle": 0.0, "frac": 0.0}
    for material_id, original in zip(ids, structures, strict=True):
        tokens = TOK.encode(original)
        assert tokens.shape == (6 + 4 * len(original),)
        decoded = TOK.decode(tokens)
        worst["length"] = max(
            worst["length"], np.abs(np.subtract(decoded.lattice.abc, original.lattice.abc)).max()
        )
        worst["angle"] = max(
            worst["angle"], np.abs(np.subtract(decoded.lattice.angles, original.lattice.angles)).max()
        )
        species_a = [site.specie.symbol for site in original]
        species_b = [site.specie.symbol for site in decoded]
        assert sorted(species_a) == sorted(species_b), material_id
        cost = _periodic_cost(original.frac_coords, decoded.frac_coords, species_a, species_b)
        rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e6))
        worst["frac"] = max(worst["frac"], cost[rows, cols].max())
    elapsed = time.perf_counter() - start
    print(f"round trip of {len(structures)} structures: {elapsed:.1f} s, worst errors {worst}")
    assert worst["length"] <= 0.05 + 1e-9
    assert worst["angle"] <= 0.5 + 1e-9
    assert worst["frac"] <= 0.005 + 1e-9
    # rounding really happens (a broken identity decode would pass the bounds trivially)
    assert worst["length"] > 0.04 and worst["angle"] > 0.4 and worst["frac"] > 0.004


# ------------------------------------------------------------------ masks
def test_allowed_token_mask_slots_and_padding():
    num_atoms = torch.tensor([1, 3])
    mask = TOK.allowed_token_mask(num_atoms)
    assert mask.shape == (2, 6 + 4 * 3, VOCAB_SIZE) and mask.dtype == torch.bool
    kinds = slot_kinds(3)
    expected_counts = {SLOT_LENGTH: 499, SLOT_ANGLE: 180, SLOT_ELEMENT: 94, SLOT_COORD: 101}
    for position, kind in enumerate(kinds.tolist()):
        allowed = mask[1, position].nonzero().flatten()
        assert allowed.numel() == expected_counts[kind]
        strings = ids_to_strings(allowed)
        if kind == SLOT_LENGTH:
            assert allowed.min() == 1 and allowed.max() == 499
        elif kind == SLOT_ANGLE:
            assert allowed.min() == 500 and allowed.max() == 679
        elif kind == SLOT_ELEMENT:
            assert strings[0] == "H" and strings[-1] == "Pu"
        else:
            assert allowed.min() == 680 and allowed.max() == 780
    # crystal 0 has one atom: everything after slot 10 is PAD only
    assert torch.equal(mask[0, :10], mask[1, :10])
    for position in range(10, 18):
        assert mask[0, position].nonzero().flatten().tolist() == [PAD_ID]
    # BOS and MASK are never allowed
    assert not mask[..., BOS_ID].any() and not mask[..., MASK_ID].any()
    # a real sequence is allowed everywhere
    tokens = TOK.encode(toy_crystal())
    assert mask[1].gather(1, tokens[:, None]).all()


def test_allowed_token_mask_options():
    mask = TOK.allowed_token_mask(torch.tensor([2]), max_atoms=4, elements=["Fe", "O"])
    assert mask.shape == (1, 6 + 16, VOCAB_SIZE)
    for position in (6, 10):
        assert mask[0, position].nonzero().flatten().tolist() == sorted(
            [element_token("Fe"), element_token("O")]
        )
    assert mask[0, 14:].nonzero()[:, 1].unique().tolist() == [PAD_ID]
    with_zero = TOK.allowed_token_mask(torch.tensor([2]), exclude_zero_length=False)
    assert with_zero[0, 0, 0] and not mask[0, 0, 0]
    with pytest.raises(ValueError, match="unknown element"):
        TOK.allowed_token_mask(torch.tensor([2]), elements=["Fe", "Xx"])
    with pytest.raises(ValueError, match="max_atoms"):
        TOK.allowed_token_mask(torch.tensor([5]), max_atoms=4)
