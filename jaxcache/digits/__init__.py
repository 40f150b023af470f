"""The digits testbed: small trained models on which jaxcache's quality claims are measured.

Not part of the caching library (the core never imports it). It holds

* :mod:`~jaxcache.digits.data`: scikit-learn's handwritten digits at 16x16, split train / test;
* :mod:`~jaxcache.digits.classifier`: a digit classifier with shipped weights, used for scoring;
* :mod:`~jaxcache.digits.training`: training of the reference models (flow matching, noise
  prediction);
* :mod:`~jaxcache.digits.pretrained`: the shipped trained digit models, their sampling recipes
  and checkpoints;
* :mod:`~jaxcache.digits.harness`: cache settings scored against full compute (one setting in,
  one row out);
* :mod:`~jaxcache.digits.quality`: the digit scores of a set of samples;
* :mod:`~jaxcache.digits.tradeoff`: the study of quality at equal compute.

Import the modules you need (``from jaxcache.digits import pretrained``); this package imports
none of them eagerly, so importing it costs nothing.
"""
