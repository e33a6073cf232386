"""lmlab: transformer language models in JAX/Flax NNX, built to measure what the textbooks claim.

The package maps onto the repository's top-level folders: lmlab.models, lmlab.kernels,
lmlab.data, lmlab.training, lmlab.experiments, lmlab.benchmarks and lmlab.main (the `lmlab`
command). docs/DESIGN.md describes the layout and the contracts.
"""
__version__ = '0.2.0'
