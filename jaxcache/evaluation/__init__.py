"""Evaluation tools: image metrics, matrix-FLOP counting, program-text checks, the bench CLI.

* :mod:`~jaxcache.evaluation.metrics`: PSNR, SSIM, relative L1, Frechet distance;
* :mod:`~jaxcache.evaluation.flops`: matrix FLOPs of a function from its jaxpr, ideal speedup;
* :mod:`~jaxcache.evaluation.named`: policies by name, each with the plan its published
  rule runs on;
* :mod:`~jaxcache.evaluation.bench`: ``python -m jaxcache.evaluation.bench``, cached against
  uncached sampling (and a hand-written loop) on the reference models.

Not imported by the core; import the module you need.
"""
