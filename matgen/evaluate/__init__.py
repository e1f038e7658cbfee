"""Evaluation of crystal generators (any generator: a folder of CIFs or a table with a ``cif`` column).

Metrics, each defined in its module's docstring with its source:

* :mod:`.validity` -- sanity bounds, structural validity, SMACT compositional validity (CDVAE);
* :mod:`.fingerprints`, :mod:`.coverage` -- CrystalNN/Magpie coverage vs the MP-20 test set and
  Wasserstein distances of density and number of elements (CDVAE);
* :mod:`.relax`, :mod:`.hull` -- batched CHGNet relaxation and energy above an (approximate) hull;
* :mod:`.sun` -- uniqueness and novelty (StructureMatcher), hence S.U.N. (MatterGen);
* :mod:`.pipeline` -- :func:`evaluate`, resumable through :mod:`.journal`; :mod:`.report` -- outputs.
"""

from matgen.evaluate.coverage import coverage_metrics, wasserstein_metrics
from matgen.evaluate.fingerprints import (
    ReferenceSet,
    composition_fingerprint,
    load_test_reference,
    scale_composition_fingerprints,
    structure_fingerprint,
)
from matgen.evaluate.hull import FormationEnergyHull, HullReference, PhaseDiagramHull, load_hull
from matgen.evaluate.inputs import parse_cif, read_inputs
from matgen.evaluate.pipeline import STABILITY_NOTE, evaluate
from matgen.evaluate.relax import CHGNetBatchPotential, RelaxResult, build_graph_arrays, relax_structures
from matgen.evaluate.sun import TrainingSet, novelty_flags, uniqueness_flags
from matgen.evaluate.validity import (
    SanityBounds,
    check_sanity,
    composition_validity,
    min_interatomic_distance,
    structure_validity,
)

__all__ = [
    "STABILITY_NOTE",
    "CHGNetBatchPotential",
    "FormationEnergyHull",
    "HullReference",
    "PhaseDiagramHull",
    "ReferenceSet",
    "RelaxResult",
    "SanityBounds",
    "TrainingSet",
    "build_graph_arrays",
    "check_sanity",
    "composition_fingerprint",
    "composition_validity",
    "coverage_metrics",
    "evaluate",
    "load_hull",
    "load_test_reference",
    "min_interatomic_distance",
    "novelty_flags",
    "parse_cif",
    "read_inputs",
    "relax_structures",
    "scale_composition_fingerprints",
    "structure_fingerprint",
    "structure_validity",
    "uniqueness_flags",
    "wasserstein_metrics",
]
