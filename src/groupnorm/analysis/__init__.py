"""Analyses built on the harness's models, data and results databases (beyond the paper).

:mod:`.batchnoise`: how far n-image batch statistics stray from the population's, per BN layer,
beside each dataset's BN small-batch penalty (`groupnorm batch-noise`).
"""

from .batchnoise import (
    LayerMoments,
    Penalty,
    batch_noise,
    bn_penalty,
    layer_moments,
    measure_model,
    run_batch_noise,
)

__all__ = ["LayerMoments", "Penalty", "batch_noise", "bn_penalty", "layer_moments",
           "measure_model", "run_batch_noise"]
