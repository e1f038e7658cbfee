"""Batched CHGNet relaxation: FIRE with a Frechet cell filter, in lock-step over many crystals.

What it computes
    For each crystal, a local minimum of the CHGNet 0.3.0 energy (Deng et al. 2023) with respect to atomic
    positions and the cell, and the CHGNet total energy there. CHGNet energies are trained on MPtrj labels
    that already carry the MP2020 corrections, so they are directly comparable with MP2020-corrected
    formation energies (see ``/work/shared/data/mp_hull/README.md``).

How (and why it agrees with ``chgnet.model.StructOptimizer``)
    ``StructOptimizer.relax`` runs ASE's ``FIRE`` on ``FrechetCellFilter(atoms)`` until the largest row norm
    of the filter's generalised forces is below ``fmax`` (default 0.1 eV/A) or 500 steps. This module runs
    the same algorithm, vectorised over a batch:

    * Degrees of freedom (ASE ``FrechetCellFilter``): reference positions ``r0 = r F^-T`` and the cell
      variable ``X = c log F`` with ``F`` the deformation gradient (``cell = cell0 F^T``) and ``c = n_atoms``
      (``exp_cell_factor``). Generalised forces are ``f F`` for atoms and ``D / c`` for the cell, with
      ``D = L_exp(log F^T, W F^-T)`` the adjoint Frechet derivative of the matrix exponential applied to
      the virial ``W = -V sigma``; ``L_exp(A, E)`` is read off ``expm([[A, E], [0, A]])`` (Higham 2008,
      eq. 10.15), which is the block formula behind scipy's ``expm_frechet`` that ASE calls.
    * FIRE (Bitzek et al. 2006, as in ``ase.optimize.FIRE``): ``dt=0.1, dtmax=1, Nmin=5, finc=1.1,
      fdec=0.5, astart=a=0.1, fa=0.99, maxstep=0.2`` with the step norm clipped per crystal over all its
      degrees of freedom, exactly as ASE does for one system.
    * The energy reported is the CHGNet energy at the final configuration (what ``StructOptimizer``'s
      trajectory ends with). ``benchmarks/relax_vs_chgnet.py`` measures the agreement.

GPU design
    * One CHGNet forward + one ``autograd.grad`` per step for the whole batch: the batched graph is
      assembled in numpy and moved to the device in one go (no per-crystal kernels), forces and stress come
      from a single backward pass (no ``create_graph``).
    * In-flight batching: crystals that converge, hit the step cap or fail leave the batch and queued ones
      join, so the batch stays near ``batch_atoms`` atoms.
    * Graph building (neighbour list, CHGNet's atom and bond graphs) is CPU work. It is vectorised in numpy
      (:func:`build_graph_arrays`, ~0.5 ms per MP-20 crystal against ~7 ms for ``CrystalGraphConverter``),
      can be spread over ``graph_workers`` processes, and on CUDA the batch is split in two halves so the
      CPU builds one half's graphs while the GPU evaluates the other.
    * CUDA out-of-memory halves the batch budget and retries; crystals keep their optimiser state.

Failures never raise: non-finite energies/forces, a volume change beyond ``max_volume_factor``, a graph
denser than ``max_neighbors`` per atom, or an exception inside CHGNet (the batch is then retried one crystal
at a time to find the culprit) end that crystal with a ``reason`` and leave the others running.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from dfm_core.runtime import resolve_device

__all__ = [
    "CHGNetBatchPotential",
    "GraphArrays",
    "RelaxResult",
    "build_graph_arrays",
    "relax_structures",
    "resolve_device",
    "shared_potential",
]

# ASE FIRE defaults (ase.optimize.FIRE) -- kept identical so that results match StructOptimizer.
FIRE_DT = 0.1
FIRE_DTMAX = 1.0
FIRE_NMIN = 5
FIRE_FINC = 1.1
FIRE_FDEC = 0.5
FIRE_ASTART = 0.1
FIRE_FA = 0.99
FIRE_MAXSTEP = 0.2


# ----------------------------------------------------------------------------------------------- graphs
class GraphArrays(NamedTuple):
    """CHGNet's crystal graph of one crystal as numpy arrays (same meaning as ``chgnet.graph.CrystalGraph``).

    Shapes: ``numbers (n,)``, ``frac (n, 3)``, ``lattice (3, 3)`` (rows are vectors), ``atom_graph (E, 2)``
    directed edges (center, neighbor), ``image (E, 3)`` periodic image of the neighbor, ``d2u (E,)``
    directed -> undirected edge, ``u2d (E/2,)`` undirected -> its first directed edge, ``bond_graph (A, 5)``
    angles as (center atom, undirected 1, directed 1, undirected 2, directed 2).
    """

    numbers: np.ndarray
    frac: np.ndarray
    lattice: np.ndarray
    atom_graph: np.ndarray
    image: np.ndarray
    d2u: np.ndarray
    u2d: np.ndarray
    bond_graph: np.ndarray


class GraphTooDenseError(ValueError):
    """More neighbours per atom than allowed: the crystal has collapsed (or was nonsense to begin with)."""


def build_graph_arrays(
    lattice: np.ndarray,
    frac: np.ndarray,
    numbers: np.ndarray,
    atom_cutoff: float = 6.0,
    bond_cutoff: float = 3.0,
    max_neighbors: int | None = 400,
) -> GraphArrays:
    """Build CHGNet's atom graph and bond (line) graph, vectorised.

    Reproduces ``CrystalGraphConverter(algorithm="fast")`` + ``Graph.adjacency_list`` +
    ``Graph.line_graph_adjacency_list``: directed edges are pymatgen's neighbour list within
    ``atom_cutoff`` in its order; the directed edge (i, j, image) and its reverse (j, i, -image) form one
    undirected edge, numbered by first appearance; an angle joins two distinct directed edges with the same
    center atom when the first is <= ``bond_cutoff`` and the second < ``bond_cutoff`` long. Edge and angle
    order may differ from CHGNet's, which does not change the model's output beyond float round-off.

    Args:
        lattice: ``(3, 3)`` lattice vectors as rows, in A.
        frac: ``(n, 3)`` fractional coordinates (wrapped into [0, 1) here).
        numbers: ``(n,)`` atomic numbers.
        atom_cutoff, bond_cutoff: CHGNet's graph radii in A.
        max_neighbors: raise :class:`GraphTooDenseError` above this mean number of neighbours per atom.

    Returns:
        :class:`GraphArrays`.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    lattice = np.ascontiguousarray(lattice, dtype=np.float64)
    frac = np.mod(np.asarray(frac, dtype=np.float64), 1.0)
    frac[frac >= 1.0] = 0.0  # np.mod(-1e-18, 1) == 1.0
    numbers = np.asarray(numbers, dtype=np.int64)
    n_atoms = len(numbers)
    cart = np.ascontiguousarray(frac @ lattice)
    center, neighbor, image, dist = find_points_in_spheres(
        cart, cart, r=float(atom_cutoff), pbc=np.ones(3, dtype=np.int64), lattice=lattice, tol=1e-8
    )
    keep = ~((center == neighbor) & (dist <= 1e-8))
    center, neighbor, dist = center[keep].astype(np.int64), neighbor[keep].astype(np.int64), dist[keep]
    image = np.rint(image[keep]).astype(np.int64)
    if max_neighbors is not None and len(center) > max_neighbors * max(n_atoms, 1):
        raise GraphTooDenseError(
            f"{len(center) / max(n_atoms, 1):.0f} neighbours per atom within {atom_cutoff} A "
            f"(limit {max_neighbors})"
        )

    # Pair every directed edge with its reverse through an integer key of (center, neighbor, image).
    for _ in range(2):  # a second pass only if unpaired edges (float ties at the cutoff) were dropped
        off = int(np.abs(image).max()) if len(image) else 0
        span = 2 * off + 1

        def key(
            a: np.ndarray, b: np.ndarray, img: np.ndarray, span: int = span, off: int = off
        ) -> np.ndarray:
            code = ((img[:, 0] + off) * span + (img[:, 1] + off)) * span + (img[:, 2] + off)
            return (a * n_atoms + b) * span**3 + code

        fwd, rev_key = key(center, neighbor, image), key(neighbor, center, -image)
        order = np.argsort(fwd, kind="stable")
        pos = np.clip(np.searchsorted(fwd[order], rev_key), 0, max(len(fwd) - 1, 0))
        found = fwd[order][pos] == rev_key if len(fwd) else np.zeros(0, bool)
        if found.all():
            break
        center, neighbor, image, dist = center[found], neighbor[found], image[found], dist[found]
    reverse = order[pos] if len(fwd) else np.zeros(0, np.int64)

    n_edges = len(center)
    idx = np.arange(n_edges)
    is_first = idx < reverse
    u2d = idx[is_first]
    und_of_first = np.cumsum(is_first) - 1
    d2u = und_of_first[np.minimum(idx, reverse)]

    # Angles: pairs (e1, e2), same center, e1 != e2, len(e1) <= bond_cutoff, len(e2) < bond_cutoff.
    e1 = idx[dist <= bond_cutoff]
    e2_all = idx[dist < bond_cutoff]
    e2_sorted = e2_all[np.argsort(center[e2_all], kind="stable")]
    counts = np.bincount(center[e2_all], minlength=n_atoms)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n_atoms else np.zeros(0, np.int64)
    reps = counts[center[e1]]
    left = np.repeat(e1, reps)
    within = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    right = e2_sorted[np.repeat(starts[center[e1]], reps) + within]
    distinct = left != right
    left, right = left[distinct], right[distinct]
    bond_graph = np.stack([center[left], d2u[left], left, d2u[right], right], axis=1)

    return GraphArrays(
        numbers=numbers,
        frac=frac,
        lattice=lattice,
        atom_graph=np.stack([center, neighbor], axis=1),
        image=image.astype(np.float64),
        d2u=d2u,
        u2d=u2d,
        bond_graph=bond_graph.reshape(-1, 5),
    )


# -------------------------------------------------------------------------------------------- potential
@dataclass
class _Pending:
    """Device tensors of one launched batch, read back by :meth:`CHGNetBatchPotential.collect`."""

    energy_per_atom: torch.Tensor
    forces: torch.Tensor
    stress: torch.Tensor
    n_atoms: list[int]


class CHGNetBatchPotential:
    """CHGNet energies, forces and stresses for a list of :class:`GraphArrays` in one batched call.

    Uses CHGNet's own layers (``model._compute``) on a batched graph assembled here in one piece: for B
    crystals with N atoms in total it returns energy per atom ``(B,)`` in eV/atom (including CHGNet's
    composition model), forces ``(N, 3)`` in eV/A and stress ``(B, 3, 3)`` in eV/A^3 (ASE sign: positive
    = tensile; ``virial = -V * stress``).

    Args:
        model: a ``chgnet.model.CHGNet``; ``None`` loads the pretrained 0.3.0 weights shipped with chgnet.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    """

    def __init__(self, model: Any = None, device: str | torch.device = "auto") -> None:
        self.device = resolve_device(device)
        if model is None:
            from chgnet.model import CHGNet

            with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its banner on construction
                model = CHGNet.load(use_device=str(self.device), verbose=False)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)  # only gradients w.r.t. positions and strain are needed
        self.atom_cutoff = float(model.graph_converter.atom_graph_cutoff)
        self.bond_cutoff = float(model.graph_converter.bond_graph_cutoff)
        self.dtype = next(model.parameters()).dtype
        self._comp_cache: dict[tuple[int, ...], float] = {}

    def composition_energy(self, numbers: np.ndarray) -> float:
        """CHGNet's composition (AtomRef) energy per atom: constant along a relaxation, so computed once."""
        cm = self.model.composition_model
        if cm is None:
            return 0.0
        counts = np.bincount(np.asarray(numbers) - 1, minlength=94)
        key = tuple(counts.tolist())
        if key not in self._comp_cache:
            feas = torch.tensor(counts, dtype=torch.float32)
            if getattr(cm, "is_intensive", True):
                feas = feas / max(len(numbers), 1)
            n_el = getattr(cm, "max_num_elements", 94)
            feas = feas[:n_el].to(self.device)[None]
            with torch.no_grad():
                self._comp_cache[key] = float(cm._get_energy(feas).item())
        return self._comp_cache[key]

    def launch(self, graphs: Sequence[GraphArrays]) -> _Pending:
        """Assemble, move to the device, run forward + backward; returns without waiting for the GPU."""
        from chgnet.model.model import BatchedGraph

        model, dev = self.model, self.device
        n_atoms = [len(g.numbers) for g in graphs]
        n_edges = [len(g.atom_graph) for g in graphs]
        n_und = [len(g.u2d) for g in graphs]
        atom_off = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(np.int64)
        edge_off = np.concatenate([[0], np.cumsum(n_edges)[:-1]]).astype(np.int64)
        und_off = np.concatenate([[0], np.cumsum(n_und)[:-1]]).astype(np.int64)
        B = len(graphs)

        numbers = np.concatenate([g.numbers for g in graphs])
        frac = np.concatenate([g.frac for g in graphs])
        lattice = np.stack([g.lattice for g in graphs])
        owner = np.repeat(np.arange(B), n_atoms)
        edge_owner = np.repeat(np.arange(B), n_edges)
        atom_graph = np.concatenate([g.atom_graph + o for g, o in zip(graphs, atom_off, strict=True)])
        image = np.concatenate([g.image for g in graphs])
        d2u = np.concatenate([g.d2u + o for g, o in zip(graphs, und_off, strict=True)])
        u2d = np.concatenate([g.u2d + o for g, o in zip(graphs, edge_off, strict=True)])
        bond = np.concatenate(
            [
                g.bond_graph + np.array([ao, uo, eo, uo, eo])
                for g, ao, uo, eo in zip(graphs, atom_off, und_off, edge_off, strict=True)
            ]
        )
        comp_e = np.array([self.composition_energy(g.numbers) for g in graphs])

        def to_dev(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
            if dev.type == "cuda":
                t = t.pin_memory()
            return t.to(dev, non_blocking=True)

        fdt = self.dtype
        t_numbers = to_dev(numbers, torch.int32)
        t_frac = to_dev(frac, fdt)
        t_lat = to_dev(lattice, fdt)
        t_owner = to_dev(owner, torch.long)
        t_edge_owner = to_dev(edge_owner, torch.long)
        t_ag = to_dev(atom_graph, torch.long)
        t_img = to_dev(image, fdt)
        t_d2u = to_dev(d2u, torch.int32)
        t_u2d = to_dev(u2d, torch.long)
        t_bond = to_dev(bond, torch.long)
        t_comp = to_dev(comp_e, fdt)

        with torch.enable_grad():
            strain = torch.zeros((B, 3, 3), dtype=fdt, device=dev, requires_grad=True)
            eye = torch.eye(3, dtype=fdt, device=dev)
            lat = t_lat @ (eye + strain)
            volumes = torch.linalg.det(lat).abs()
            pos = torch.einsum("ni,nij->nj", t_frac, lat[t_owner])
            # CHGNet's BondEncoder, batched: vectors point from the neighbour image to the center.
            nbr = pos[t_ag[:, 1]] + torch.einsum("ei,eij->ej", t_img, lat[t_edge_owner])
            vec = pos[t_ag[:, 0]] - nbr
            length = torch.norm(vec, dim=1)
            vec = vec / length[:, None]
            und_len = length[t_u2d]
            bbe = model.bond_basis_expansion
            bond_bases_ag = bbe.rbf_expansion_ag(und_len)
            bond_bases_bg = bbe.rbf_expansion_bg(und_len)
            if len(bond):
                angle_bases = model.angle_basis_expansion(vec[t_bond[:, 2]], vec[t_bond[:, 4]])
                batched_bond_graph = t_bond[:, [0, 1, 3]].to(torch.int32)
            else:
                angle_bases = torch.tensor([], device=dev)
                batched_bond_graph = torch.tensor([], device=dev)
            graph = BatchedGraph(
                atomic_numbers=t_numbers,
                bond_bases_ag=bond_bases_ag,
                bond_bases_bg=bond_bases_bg,
                angle_bases=angle_bases,
                batched_atom_graph=t_ag.to(torch.int32),
                batched_bond_graph=batched_bond_graph,
                atom_owners=t_owner.to(torch.int32),
                directed2undirected=t_d2u,
                atom_positions=[pos],
                strains=[strain],
                volumes=volumes,
            )
            pred = model._compute(graph, compute_force=False, compute_stress=False)
            e_model = pred["e"]  # per atom if the model is intensive (CHGNet 0.3.0 is)
            per_atom_count = pred["atoms_per_graph"].to(fdt)
            e_total = e_model * per_atom_count if model.is_intensive else e_model
            g_pos, g_strain = torch.autograd.grad(e_total.sum(), [pos, strain], allow_unused=True)
        # a batch of isolated atoms (no edge within the cutoff) leaves positions/strain unused
        g_pos = torch.zeros_like(pos) if g_pos is None else g_pos
        g_strain = torch.zeros_like(strain) if g_strain is None else g_strain
        e_per_atom = (e_total / per_atom_count).detach() + t_comp
        return _Pending(
            energy_per_atom=e_per_atom,
            forces=(-g_pos).detach(),
            stress=(g_strain / volumes[:, None, None]).detach(),
            n_atoms=n_atoms,
        )

    @staticmethod
    def collect(pending: _Pending) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wait for a launched batch: ``(energy_per_atom (B,), forces (N, 3), stress (B, 3, 3))`` float64."""
        e = pending.energy_per_atom.double().cpu().numpy()
        f = pending.forces.double().cpu().numpy()
        s = pending.stress.double().cpu().numpy()
        return e, f, s

    def __call__(self, graphs: Sequence[GraphArrays]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.collect(self.launch(graphs))

    def graph(self, lattice: np.ndarray, frac: np.ndarray, numbers: np.ndarray) -> GraphArrays:
        return build_graph_arrays(lattice, frac, numbers, self.atom_cutoff, self.bond_cutoff)

    def predict_structures(
        self, structures: Sequence[Structure]
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Single-point energy per atom, forces and stress (eV/A^3) for structures (one batch)."""
        graphs = [self.graph(s.lattice.matrix, s.frac_coords, np.array(s.atomic_numbers)) for s in structures]
        e, f, s = self(graphs)
        return e, np.split(f, np.cumsum([len(x) for x in structures])[:-1]), s


_POTENTIALS: dict[str, CHGNetBatchPotential] = {}


def shared_potential(device: str | torch.device = "auto") -> CHGNetBatchPotential:
    """The pretrained CHGNet potential on ``device``, loaded once per process."""
    key = str(resolve_device(device))
    if key not in _POTENTIALS:
        _POTENTIALS[key] = CHGNetBatchPotential(device=key)
    return _POTENTIALS[key]


# ------------------------------------------------------------------------------------------ relaxation
CHGNET_MAX_Z = 94  # CHGNet's atom embedding has one row per element H ... Pu


@dataclass
class RelaxResult:
    """Outcome of relaxing one crystal.

    Attributes:
        energy: CHGNet total energy (eV) of the final configuration; NaN on failure.
        energy_per_atom: ``energy / n_atoms``.
        structure: the relaxed structure (``None`` on failure).
        n_steps: FIRE steps taken.
        converged: largest generalised force < ``fmax`` at the end.
        fmax: the largest generalised force at the end (eV/A).
        error: ``None``, or why the relaxation was abandoned.
        initial_energy_per_atom: CHGNet energy per atom of the input configuration.
    """

    energy: float
    energy_per_atom: float
    structure: Structure | None
    n_steps: int
    converged: bool
    fmax: float
    error: str | None = None
    initial_energy_per_atom: float = float("nan")


@dataclass
class _Slot:
    """Optimiser state of one crystal (ASE FIRE on a FrechetCellFilter)."""

    index: int
    numbers: np.ndarray
    cell0: np.ndarray
    frac_of_r0: np.ndarray  # inv(cell0), maps reference positions to fractional coordinates
    r0: np.ndarray  # (n, 3) reference ("undeformed") positions
    X: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))  # c * log(F)
    v_atoms: np.ndarray | None = None
    v_cell: np.ndarray | None = None
    dt: float = FIRE_DT
    a: float = FIRE_ASTART
    n_pos: int = 0  # ASE's Nsteps: steps since the last uphill reset
    n_steps: int = 0
    e0: float = float("nan")
    solo: bool = False  # evaluated alone after its batch raised, to find the culprit

    @property
    def n(self) -> int:
        return len(self.numbers)

    def deformation(self) -> np.ndarray:
        from scipy.linalg import expm

        return expm(self.X / self.n)

    def lattice(self) -> np.ndarray:
        return self.cell0 @ self.deformation().T

    def frac(self) -> np.ndarray:
        return self.r0 @ self.frac_of_r0

    def structure(self) -> Structure:
        frac = np.mod(self.frac(), 1.0)
        frac[frac >= 1.0] = 0.0
        return Structure(Lattice(self.lattice()), self.numbers.tolist(), frac)


def _frechet_adjoint(log_f: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``D[mu, nu] = sum(L_exp(log_f, E_mu_nu) * grad)`` for a batch ``(B, 3, 3)``: ``L_exp(log_f^T, grad)``."""
    B = len(log_f)
    block = np.zeros((B, 6, 6))
    lt = np.transpose(log_f, (0, 2, 1))
    block[:, :3, :3] = lt
    block[:, 3:, 3:] = lt
    block[:, :3, 3:] = grad
    return torch.linalg.matrix_exp(torch.from_numpy(block)).numpy()[:, :3, 3:]


def _graph_task(args: tuple) -> GraphArrays | str:
    """:func:`build_graph_arrays` for a worker process: returns the error text instead of raising."""
    try:
        return build_graph_arrays(*args)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _segment_sum(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(owner, weights=values, minlength=n)


class _Group:
    """Crystals evaluated together in one batched call."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.slots: list[_Slot] = []

    @property
    def atoms(self) -> int:
        return sum(s.n for s in self.slots)


def relax_structures(
    structures: Sequence[Structure],
    *,
    potential: CHGNetBatchPotential | None = None,
    device: str = "auto",
    fmax: float = 0.1,
    steps: int = 500,
    batch_atoms: int | None = None,
    max_volume_factor: float = 8.0,
    max_neighbors: int = 400,
    overlap: bool | None = None,
    graph_workers: int = 0,
    on_results: Callable[[list[tuple[int, RelaxResult]]], None] | None = None,
    progress: bool = True,
) -> list[RelaxResult]:
    """Relax many crystals with CHGNet, batched FIRE + Frechet cell filter (see module docstring).

    Args:
        structures: crystals to relax (ordered; disordered sites are not supported).
        potential: a :class:`CHGNetBatchPotential`; built on ``device`` when ``None``.
        fmax: convergence threshold on the largest generalised force (eV/A), as in ASE.
        steps: FIRE step cap (``StructOptimizer``'s default is 500).
        batch_atoms: atoms per batched call; default 8192 on CUDA, 256 on CPU.
        max_volume_factor: abandon a crystal whose volume grows or shrinks by more than this factor.
        max_neighbors: abandon a crystal with more neighbours per atom within 6 A than this (collapse).
        overlap: build one half-batch's graphs while the device runs the other (default: on CUDA).
        graph_workers: processes that build graphs in parallel (0: in this process). Worth it on a GPU
            machine with spare cores, where graph building would otherwise be the bottleneck.
        on_results: called with ``[(index, result), ...]`` after every step in which crystals finished (for
            journaling; one durable write per step).
        progress: show a tqdm bar.

    Returns:
        One :class:`RelaxResult` per input, in input order.
    """
    from tqdm.auto import tqdm

    pot = potential or shared_potential(device)
    on_cuda = pot.device.type == "cuda"
    if batch_atoms is None:
        batch_atoms = 8192 if on_cuda else 256
    overlap = on_cuda if overlap is None else overlap
    groups = (
        [_Group(max(1, batch_atoms // 2)), _Group(max(1, batch_atoms // 2))]
        if overlap
        else [_Group(batch_atoms)]
    )
    results: list[RelaxResult | None] = [None] * len(structures)
    queue: deque[_Slot] = deque()
    bar = tqdm(
        total=len(structures), desc="relaxing (CHGNet, batched FIRE)", disable=not progress, leave=False
    )

    finished: list[tuple[int, RelaxResult]] = []

    def finish(slot: _Slot, res: RelaxResult) -> None:
        results[slot.index] = res
        finished.append((slot.index, res))

    def flush() -> None:
        if finished:
            bar.update(len(finished))
            if on_results is not None:
                on_results(list(finished))
            finished.clear()

    def fail(slot: _Slot, reason: str) -> None:
        nan = float("nan")
        finish(slot, RelaxResult(nan, nan, None, slot.n_steps, False, nan, reason, slot.e0))

    for i, s in enumerate(structures):
        try:
            numbers = np.array(s.atomic_numbers, dtype=np.int64)
            beyond = sorted({el.symbol for el in s.composition.elements if el.Z > CHGNET_MAX_Z})
            if beyond:
                raise ValueError(
                    f"CHGNet covers elements up to Pu (Z = {CHGNET_MAX_Z}); found {', '.join(beyond)}"
                )
            cell0 = np.array(s.lattice.matrix, dtype=np.float64)
            queue.append(
                _Slot(
                    index=i,
                    numbers=numbers,
                    cell0=cell0,
                    frac_of_r0=np.linalg.inv(cell0),
                    r0=np.array(s.cart_coords, dtype=np.float64),
                )
            )
        except Exception as exc:  # disordered sites, singular cells...
            nan = float("nan")
            results[i] = RelaxResult(
                nan, nan, None, 0, False, nan, f"cannot relax: {type(exc).__name__}: {exc}"
            )
            finished.append((i, results[i]))
    flush()

    def refill(group: _Group) -> None:
        if any(sl.solo for sl in group.slots):
            return
        used = group.atoms
        while queue and (not group.slots or (used + queue[0].n <= group.budget and not queue[0].solo)):
            slot = queue.popleft()
            group.slots.append(slot)
            used += slot.n
            if slot.solo:
                break

    def build(group: _Group) -> list[GraphArrays]:
        slots = group.slots
        X = np.stack([sl.X / sl.n for sl in slots])
        F = torch.linalg.matrix_exp(torch.from_numpy(X)).numpy()  # batched, not B scipy calls
        tasks = [
            (sl.cell0 @ F[b].T, sl.frac(), sl.numbers, pot.atom_cutoff, pot.bond_cutoff, max_neighbors)
            for b, sl in enumerate(slots)
        ]
        if pool is not None and len(tasks) > 1:
            chunk = max(1, math.ceil(len(tasks) / (4 * graph_workers)))
            outcomes = list(pool.map(_graph_task, tasks, chunksize=chunk))
        else:
            outcomes = [_graph_task(t) for t in tasks]
        graphs, kept = [], []
        for slot, out in zip(slots, outcomes, strict=True):
            if isinstance(out, str):
                fail(slot, f"graph construction failed: {out}")
            else:
                graphs.append(out)
                kept.append(slot)
        group.slots = kept
        return graphs

    def shrink_after_oom(group: _Group) -> None:
        for g in groups:
            g.budget = max(1, g.budget // 2)
        keep, used = [], 0
        for slot in group.slots:
            if not keep or used + slot.n <= group.budget:
                keep.append(slot)
                used += slot.n
            else:
                queue.appendleft(slot)
        group.slots = keep

    def update(group: _Group, e: np.ndarray, f: np.ndarray, s: np.ndarray) -> None:
        slots = group.slots
        B = len(slots)
        counts = np.array([sl.n for sl in slots])
        owner = np.repeat(np.arange(B), counts)
        X = np.stack([sl.X for sl in slots])
        log_f = X / counts[:, None, None]
        F = torch.linalg.matrix_exp(torch.from_numpy(log_f)).numpy()
        lat = np.stack([sl.cell0 for sl in slots]) @ np.transpose(F, (0, 2, 1))
        vol = np.abs(np.linalg.det(lat))
        s = 0.5 * (s + np.transpose(s, (0, 2, 1)))  # ASE keeps the symmetric (Voigt) part
        virial = -vol[:, None, None] * s
        # Generalised forces of the Frechet cell filter (ase.filters.FrechetCellFilter.get_forces).
        g_atoms = np.einsum("ni,nij->nj", f, F[owner])
        ucf_grad = virial @ np.linalg.inv(np.transpose(F, (0, 2, 1)))
        g_cell = _frechet_adjoint(log_f, ucf_grad) / counts[:, None, None]
        fmax_b = np.maximum(
            np.maximum.reduceat(
                np.linalg.norm(g_atoms, axis=1), np.concatenate([[0], np.cumsum(counts)[:-1]])
            )
            if len(g_atoms)
            else np.zeros(B),
            np.linalg.norm(g_cell, axis=2).max(axis=1),
        )
        finite = np.isfinite(e) & np.isfinite(fmax_b)
        vol0 = np.abs(np.linalg.det(np.stack([sl.cell0 for sl in slots])))
        ratio = vol / vol0

        # FIRE (ase.optimize.FIRE.step), vectorised over crystals; the "gradient" is the generalised force.
        first = np.array([sl.v_atoms is None for sl in slots])
        v_atoms = np.concatenate(
            [sl.v_atoms if sl.v_atoms is not None else np.zeros((sl.n, 3)) for sl in slots]
        )
        v_cell = np.stack([sl.v_cell if sl.v_cell is not None else np.zeros((3, 3)) for sl in slots])
        dt = np.array([sl.dt for sl in slots])
        a = np.array([sl.a for sl in slots])
        n_pos = np.array([sl.n_pos for sl in slots])
        vf = _segment_sum((g_atoms * v_atoms).sum(1), owner, B) + (g_cell * v_cell).sum((1, 2))
        gg = _segment_sum((g_atoms * g_atoms).sum(1), owner, B) + (g_cell * g_cell).sum((1, 2))
        vv = _segment_sum((v_atoms * v_atoms).sum(1), owner, B) + (v_cell * v_cell).sum((1, 2))
        downhill = (vf > 0.0) & ~first
        reset = (vf <= 0.0) & ~first
        with np.errstate(divide="ignore", invalid="ignore"):
            mix = np.where(downhill, a * np.sqrt(vv) / np.sqrt(gg), 0.0)
        keep_v = np.where(downhill, 1.0 - a, np.where(reset, 0.0, 1.0))
        v_atoms = keep_v[owner, None] * v_atoms + mix[owner, None] * g_atoms
        v_cell = keep_v[:, None, None] * v_cell + mix[:, None, None] * g_cell
        grow = downhill & (n_pos > FIRE_NMIN)
        dt = np.where(grow, np.minimum(dt * FIRE_FINC, FIRE_DTMAX), dt)
        a = np.where(grow, a * FIRE_FA, a)
        n_pos = np.where(downhill, n_pos + 1, n_pos)
        dt = np.where(reset, dt * FIRE_FDEC, dt)
        a = np.where(reset, FIRE_ASTART, a)
        n_pos = np.where(reset, 0, n_pos)
        v_atoms = v_atoms + dt[owner, None] * g_atoms
        v_cell = v_cell + dt[:, None, None] * g_cell
        dr_atoms = dt[owner, None] * v_atoms
        dr_cell = dt[:, None, None] * v_cell
        norm = np.sqrt(_segment_sum((dr_atoms**2).sum(1), owner, B) + (dr_cell**2).sum((1, 2)))
        scale = np.where(norm > FIRE_MAXSTEP, FIRE_MAXSTEP / np.maximum(norm, 1e-300), 1.0)
        dr_atoms = dr_atoms * scale[owner, None]
        dr_cell = dr_cell * scale[:, None, None]

        offsets = np.concatenate([[0], np.cumsum(counts)])
        staying = []
        for b, sl in enumerate(slots):
            if math.isnan(sl.e0):
                sl.e0 = float(e[b])
            if not finite[b]:
                fail(sl, "relaxation diverged: non-finite CHGNet energy or forces")
                continue
            if not (1.0 / max_volume_factor <= ratio[b] <= max_volume_factor):
                fail(sl, f"relaxation diverged: volume changed by a factor {ratio[b]:.3g}")
                continue
            converged = bool(fmax_b[b] < fmax)
            if converged or sl.n_steps >= steps:
                structure = sl.structure()
                finish(
                    sl,
                    RelaxResult(
                        energy=float(e[b]) * sl.n,
                        energy_per_atom=float(e[b]),
                        structure=structure,
                        n_steps=sl.n_steps,
                        converged=converged,
                        fmax=float(fmax_b[b]),
                        error=None,
                        initial_energy_per_atom=sl.e0,
                    ),
                )
                continue
            lo, hi = offsets[b], offsets[b + 1]
            sl.v_atoms, sl.v_cell = v_atoms[lo:hi].copy(), v_cell[b].copy()
            sl.dt, sl.a, sl.n_pos = float(dt[b]), float(a[b]), int(n_pos[b])
            sl.r0 = sl.r0 + dr_atoms[lo:hi]
            sl.X = sl.X + dr_cell[b]
            sl.n_steps += 1
            staying.append(sl)
        group.slots = staying

    pending: tuple[_Group, _Pending] | None = None
    pool = None
    if graph_workers and graph_workers > 0:
        from matgen.workers import process_pool

        pool = process_pool(graph_workers)

    def complete(p: tuple[_Group, _Pending]) -> None:
        group, handle = p
        e, f, s = pot.collect(handle)
        update(group, e, f, s)
        flush()

    try:
        while True:
            launched_any = False
            for group in groups:
                if pending is not None and pending[0] is group:
                    complete(pending)
                    pending = None
                refill(group)
                if not group.slots:
                    continue
                graphs = build(group)
                flush()
                if pending is not None:
                    complete(pending)
                    pending = None
                if not group.slots:
                    continue
                try:
                    pending = (group, pot.launch(graphs))
                    launched_any = True
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    if len(group.slots) == 1:
                        fail(group.slots[0], "CUDA out of memory for this crystal alone")
                        group.slots = []
                        flush()
                    else:
                        shrink_after_oom(group)
                except Exception as exc:  # one bad crystal must not stop the others
                    if len(group.slots) == 1:
                        fail(group.slots[0], f"CHGNet evaluation failed: {type(exc).__name__}: {exc}")
                        group.slots = []
                        flush()
                    else:  # retry each crystal of this batch on its own (state is unchanged)
                        for slot in reversed(group.slots):
                            slot.solo = True
                            queue.appendleft(slot)
                        group.slots = []
            if not launched_any and pending is None and not queue and not any(g.slots for g in groups):
                break
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results  # type: ignore[return-value]
