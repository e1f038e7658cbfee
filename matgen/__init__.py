"""matgen: crystal generation with discrete flow matching (paper section 8.2, Appendix E.2)."""

import warnings

# pymatgen warns "No Pauling electronegativity for Ar. Setting to NaN" once per process for each noble gas
# it sorts (MP-20 holds Ar, Xe and He; generated crystals may hold any of Z = 1..94). The NaN only orders
# formulas; no metric here uses a Pauling value it lacks (SMACT has its own table). Silenced for every
# process that imports matgen, worker processes included.
warnings.filterwarnings("ignore", message="No Pauling electronegativity", category=UserWarning)
