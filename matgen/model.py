"""Crystal networks of KO-DFM Appendix E.2: the atom-pooling DiT (DFM, KO-DFM) and the AR baseline.

Token layout (fixed by :mod:`matgen.tokenizer`): 3 lattice lengths, 3 angles, then 4 tokens per atom
(element, frac x, y, z): length ``6 + 4a``. Batches are padded to the largest atom count ``A`` with
PAD and come with ``num_atoms: (B,)``.

* :class:`AtomPoolingDiT` is exactly permutation-equivariant in the atoms: each atom's 4 embeddings
  are pooled into one vector (``6 + 4a -> 6 + a``), every atom gets the same positional embedding,
  attention hides padded atoms, and 4 linear heads expand each atom back (``6 + a -> 6 + 4a``).
* :class:`CrystalARModel` is a causal DiT with sinusoidal positions conditioned through adaLN on an
  embedding of ``a - 1`` (no time); it predicts token ``i`` from BOS and tokens ``< i``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm_core.config import config_from_dict
from dfm_core.nn import DiT, DiTBlock, FinalLayer, TimestepEmbedder, init_dit_weights, make_attention_mask
from dfm_core.sampler import categorical

__all__ = [
    "LATTICE_TOKENS",
    "TOKENS_PER_ATOM",
    "AtomPoolingDiT",
    "CrystalARModel",
    "CrystalDiTConfig",
    "build_model",
    "token_valid_mask",
]

LATTICE_TOKENS = 6
TOKENS_PER_ATOM = 4


@dataclass
class CrystalDiTConfig:
    """Architecture of the crystal networks.

    The default (hidden 384, depth 9, 6 heads) has ~26.3M parameters as the atom-pooling DiT, the
    size the paper matches to FlowMM (~25M); the AR model with the same config has ~25.1M.

    Attributes:
        vocab_size: 878 = 500 lengths + 180 angles + 101 fractions + 94 elements + BOS, MASK, PAD.
        hidden, depth, heads, mlp_ratio, dropout: DiT width, blocks, attention heads, MLP ratio, dropout.
        max_atoms: largest atom count (20 for MP-20); sizes the AR count embedding and positions.
        bos_id, mask_id, pad_id: special token ids.
    """

    vocab_size: int = 878
    hidden: int = 384
    depth: int = 9
    heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_atoms: int = 20
    bos_id: int = 875
    mask_id: int = 876
    pad_id: int = 877

    @classmethod
    def tiny(cls, **overrides: Any) -> CrystalDiTConfig:
        """~115k parameters (AR: ~99k): for tests."""
        return cls(**{"hidden": 32, "depth": 2, "heads": 2, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> CrystalDiTConfig:
        """~3.5M parameters (AR: ~3.1M): trains on a CPU."""
        return cls(**{"hidden": 192, "depth": 4, "heads": 4, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CrystalDiTConfig:
        """A size preset by name: ``tiny``, ``small`` or ``default`` (the ~25M of the paper)."""
        presets = {"tiny": cls.tiny, "small": cls.small, "default": cls}
        if name not in presets:
            raise ValueError(f"unknown size {name!r}: choose one of {', '.join(presets)}")
        return presets[name](**overrides)

    @property
    def max_len(self) -> int:
        return LATTICE_TOKENS + TOKENS_PER_ATOM * self.max_atoms

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CrystalDiTConfig:
        return config_from_dict(cls, data)


def token_valid_mask(num_atoms: Tensor, length: int) -> Tensor:
    """``(B, length)`` bool: True at the ``6 + 4 * num_atoms`` real tokens of each sequence."""
    lengths = LATTICE_TOKENS + TOKENS_PER_ATOM * num_atoms
    return torch.arange(length, device=num_atoms.device)[None, :] < lengths[:, None]


def _num_atom_slots(length: int) -> int:
    if length < LATTICE_TOKENS or (length - LATTICE_TOKENS) % TOKENS_PER_ATOM:
        raise ValueError(f"crystal sequences have length 6 + 4A, got {length}")
    return (length - LATTICE_TOKENS) // TOKENS_PER_ATOM


class AtomPoolingDiT(nn.Module):
    """Permutation-equivariant DiT over crystal token sequences (KO-DFM App. E.2).

    .. math::
        e_a &= \\mathrm{SiLU}(W_p [E x_a^{el}; E x_a^{x}; E x_a^{y}; E x_a^{z}]) + p_{atom} \\\\
        h &= \\mathrm{Blocks}([E x^{lat} + p_{1..6};\\ e_1..e_A],\\ c = \\mathrm{TimeEmb}(t)) \\\\
        \\mathrm{logits} &= \\mathrm{Final}([h^{lat};\\ W_1 h_a, W_2 h_a, W_3 h_a, W_4 h_a]_a,\\ c)

    One shared ``p_atom`` for all atoms and attention restricted to the ``num_atoms`` real atoms make
    the output equivariant to atom permutations and independent of the padding.

    Args:
        config: :class:`CrystalDiTConfig`.
    """

    def __init__(self, config: CrystalDiTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CrystalDiTConfig()
        h = config.hidden
        self.embed = nn.Embedding(config.vocab_size, h)
        self.atom_pool = nn.Sequential(nn.Linear(TOKENS_PER_ATOM * h, h), nn.SiLU())
        self.lattice_pos = nn.Parameter(torch.randn(LATTICE_TOKENS, h) * 0.02)
        self.atom_pos = nn.Parameter(torch.randn(h) * 0.02)
        self.time_embed = TimestepEmbedder(h)
        self.blocks = nn.ModuleList(
            DiTBlock(h, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth)
        )
        # the 4 independent per-atom linear heads, fused into one (h -> 4h) map
        self.atom_unpool = nn.Linear(h, TOKENS_PER_ATOM * h)
        self.final = FinalLayer(h, config.vocab_size)
        init_dit_weights(self)

    def forward(self, tokens: Tensor, t: Tensor, num_atoms: Tensor) -> Tensor:
        """Posterior logits for every token.

        Args:
            tokens: ``(B, 6 + 4A)`` long, padded with PAD past ``6 + 4 * num_atoms``.
            t: ``(B,)`` times in ``[0, 1]`` (a scalar is broadcast).
            num_atoms: ``(B,)`` long, ``1 <= num_atoms <= A``.

        Returns:
            ``(B, 6 + 4A, V)`` logits; those at padded positions are meaningless.
        """
        B, L = tokens.shape
        A = _num_atom_slots(L)
        h = self.config.hidden
        x = self.embed(tokens)
        lattice = x[:, :LATTICE_TOKENS] + self.lattice_pos
        atoms = self.atom_pool(x[:, LATTICE_TOKENS:].reshape(B, A, TOKENS_PER_ATOM * h)) + self.atom_pos
        x = torch.cat([lattice, atoms], dim=1)

        atom_valid = torch.arange(A, device=tokens.device)[None, :] < num_atoms[:, None]
        lattice_valid = torch.ones(B, LATTICE_TOKENS, dtype=torch.bool, device=tokens.device)
        attn_mask, _ = make_attention_mask(torch.cat([lattice_valid, atom_valid], dim=1), False, x.shape[1])
        c = self.time_embed(torch.as_tensor(t, device=tokens.device).float().expand(B))
        for block in self.blocks:
            x = block(x, c, attn_mask)

        atoms = self.atom_unpool(x[:, LATTICE_TOKENS:]).reshape(B, TOKENS_PER_ATOM * A, h)
        return self.final(torch.cat([x[:, :LATTICE_TOKENS], atoms], dim=1), c)


class CrystalARModel(nn.Module):
    """Autoregressive baseline of KO-DFM App. E.2: a causal DiT with sinusoidal positions whose adaLN is
    conditioned on an embedding of the atom count ``a - 1 in {0, ..., max_atoms - 1}`` (no time).

    .. math:: p(x) = \\prod_i p_\\theta(x^i \\mid \\mathrm{BOS}, x^{<i}, a)

    Args:
        config: :class:`CrystalDiTConfig`.
    """

    def __init__(self, config: CrystalDiTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CrystalDiTConfig()
        self.count_embed = nn.Embedding(config.max_atoms, config.hidden)
        nn.init.normal_(self.count_embed.weight, std=0.02)
        self.dit = DiT(
            config.vocab_size,
            hidden=config.hidden,
            depth=config.depth,
            heads=config.heads,
            max_len=config.max_len,
            mlp_ratio=config.mlp_ratio,
            dropout=config.dropout,
            causal=True,
            positional="sinusoidal",
            cond_dim=config.hidden,
            time_conditioning=False,
        )

    def shift_right(self, tokens: Tensor) -> Tensor:
        """Model input ``[BOS, x^1, ..., x^{L-1}]`` for targets ``tokens: (B, L)``."""
        bos = torch.full_like(tokens[:, :1], self.config.bos_id)
        return torch.cat([bos, tokens[:, :-1]], dim=1)

    def forward(self, tokens_in: Tensor, num_atoms: Tensor) -> Tensor:
        """Next-token logits.

        Args:
            tokens_in: ``(B, L)`` long, ``BOS`` followed by the first ``L - 1`` tokens (:meth:`shift_right`).
            num_atoms: ``(B,)`` long in ``[1, max_atoms]``.

        Returns:
            ``(B, L, V)``: position ``i`` scores token ``i`` of the crystal. No padding mask is needed:
            with causal attention real positions (a prefix) never see the padding.
        """
        cond = self.count_embed(num_atoms - 1)
        return self.dit(tokens_in, None, None, cond)

    def loss(self, tokens: Tensor, num_atoms: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the real (non-padded) positions of ``tokens: (B, 6 + 4A)``."""
        logits = self(self.shift_right(tokens), num_atoms).float()
        valid = token_valid_mask(num_atoms, tokens.shape[1])
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        return (ce * valid).sum() / valid.sum().clamp_min(1)

    @torch.no_grad()
    def sample(
        self,
        num_atoms: Tensor,
        allowed_mask: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Ancestral sampling, one token at a time (the prefix is recomputed at each step; no KV cache).

        Args:
            num_atoms: ``(B,)`` atom counts in ``[1, max_atoms]``.
            allowed_mask: ``(B, >= 6 + 4 max(num_atoms), V)`` bool; position ``i`` draws only tokens
                allowed there (e.g. element tokens at element slots). BOS, MASK and PAD are never
                drawn at real positions.
            temperature: softmax temperature; 0 means greedy (argmax).
            generator: for the draws; on the model's device.

        Returns:
            ``(B, 6 + 4 max(num_atoms))`` long tokens, PAD past each crystal's length.
        """
        cfg = self.config
        device = next(self.parameters()).device
        num_atoms = num_atoms.to(device).long()
        if num_atoms.numel() == 0 or int(num_atoms.min()) < 1 or int(num_atoms.max()) > cfg.max_atoms:
            raise ValueError(f"num_atoms must lie in [1, {cfg.max_atoms}]")
        B = num_atoms.shape[0]
        lengths = LATTICE_TOKENS + TOKENS_PER_ATOM * num_atoms
        L = int(lengths.max())
        if allowed_mask is not None:
            if (
                allowed_mask.shape[0] != B
                or allowed_mask.shape[1] < L
                or allowed_mask.shape[2] != cfg.vocab_size
            ):
                raise ValueError(f"allowed_mask must have shape ({B}, >= {L}, {cfg.vocab_size})")
            allowed_mask = allowed_mask.to(device).bool()
        special = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
        special[[cfg.bos_id, cfg.mask_id, cfg.pad_id]] = True

        was_training = self.training
        self.eval()
        seq = torch.full((B, L + 1), cfg.pad_id, dtype=torch.long, device=device)
        seq[:, 0] = cfg.bos_id
        try:
            for i in range(L):
                logits = self(seq[:, : i + 1], num_atoms)[:, -1].float()
                allowed = ~special.expand(B, -1)
                if allowed_mask is not None:
                    allowed = allowed & allowed_mask[:, i]
                active = i < lengths
                if not bool(allowed.any(-1)[active].all()):
                    raise ValueError(f"allowed_mask allows no token at position {i} for some crystal")
                logits = logits.masked_fill(~allowed, float("-inf"))
                if temperature == 0:
                    nxt = logits.argmax(-1)
                else:
                    # float64 softmax and draw, as the DFM sampler's (low precision biases draws)
                    probs = torch.softmax(logits.double() / temperature, dim=-1).nan_to_num(0.0)
                    probs[~active, 0] = 1.0  # finished crystals: any draw, overwritten with PAD below
                    nxt = categorical(probs, generator)
                seq[:, i + 1] = torch.where(active, nxt, torch.full_like(nxt, cfg.pad_id))
        finally:
            self.train(was_training)
        return seq[:, 1:]


def build_model(kind: Literal["dfm", "ar"], config: CrystalDiTConfig | None = None) -> nn.Module:
    """``"dfm"`` -> :class:`AtomPoolingDiT` (DFM and KO-DFM), ``"ar"`` -> :class:`CrystalARModel`."""
    if kind == "dfm":
        return AtomPoolingDiT(config)
    if kind == "ar":
        return CrystalARModel(config)
    raise ValueError(f"kind must be 'dfm' or 'ar', got {kind!r}")
