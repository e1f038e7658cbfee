"""dfm_core: discrete flow matching with general discrete paths (the kinetic-optimal perspective).

Modules, one idea each:

* :mod:`dfm_core.schedulers`  kappa_t families incl. the kinetic-optimal one (eq 33), beta_t (eq 108)
* :mod:`dfm_core.sources`     mask, uniform, data-statistics (eq 38) sources
* :mod:`dfm_core.paths`       mixture (eq 2) and metric-induced (eq 27) conditional paths
* :mod:`dfm_core.velocities`  kinetic-optimal velocities (eq 22-29, C.3), Campbell (eq 24), corrector (eq 35)
* :mod:`dfm_core.sampler`     posterior sampler with the always-valid step (section 3, Appendix A)
* :mod:`dfm_core.objectives`  cross-entropy (eq 11), ELBOs (eq 36, 37), fair evaluation (E.1)
* :mod:`dfm_core.nn`          a DiT backbone with adaLN time conditioning
* :mod:`dfm_core.training`    the training loop shared by the apps (EMA, LR schedule, resumable runs)
* :mod:`dfm_core.checkpoints` release checkpoints: safetensors weights with JSON metadata
* :mod:`dfm_core.config`      dataclass settings from TOML/JSON with clear errors
* :mod:`dfm_core.runtime`     device choice and seeding
* :mod:`dfm_core.atomic_io`   atomic file writes (checkpoints, caches, samples, tables), folder locks
"""

from dfm_core.objectives import (
    cross_entropy_loss,
    fair_elbo,
    general_elbo_integrand,
    mixture_elbo_integrand,
    mixture_elbo_loss,
    sample_training_time,
)
from dfm_core.paths import MetricPath, MixturePath, ProbabilityPath
from dfm_core.sampler import SampleResult, sample, uniform_grid
from dfm_core.schedulers import (
    BetaSchedule,
    CosineScheduler,
    KineticOptimalScheduler,
    LinearScheduler,
    PolynomialScheduler,
    Scheduler,
    make_scheduler,
)
from dfm_core.sources import data_statistics_source, mask_source, token_statistics, uniform_source
from dfm_core.velocities import (
    CampbellVelocity,
    CorrectedVelocity,
    KineticOptimalVelocity,
    PowerInfVelocity,
    PowerVelocity,
    make_velocity,
    mixture_marginal_velocity,
)

__all__ = [
    "BetaSchedule",
    "CampbellVelocity",
    "CorrectedVelocity",
    "CosineScheduler",
    "KineticOptimalScheduler",
    "KineticOptimalVelocity",
    "LinearScheduler",
    "MetricPath",
    "MixturePath",
    "PolynomialScheduler",
    "PowerInfVelocity",
    "PowerVelocity",
    "ProbabilityPath",
    "SampleResult",
    "Scheduler",
    "cross_entropy_loss",
    "data_statistics_source",
    "fair_elbo",
    "general_elbo_integrand",
    "make_scheduler",
    "make_velocity",
    "mask_source",
    "mixture_elbo_integrand",
    "mixture_elbo_loss",
    "mixture_marginal_velocity",
    "sample",
    "sample_training_time",
    "token_statistics",
    "uniform_grid",
    "uniform_source",
]
