"""Experiments and models that use :mod:`riemax` (not part of the library).

- :mod:`experiments.cifar` -- the command line (``python -m experiments.cifar``);
  :mod:`experiments.digits` is the same with ``--dataset=digits``;
- :mod:`experiments.train` -- ``train_and_evaluate(config, workdir)``, the one
  training loop;
- :mod:`experiments.config` -- every config key, its default and its checks;
- :mod:`experiments.presets` -- the papers' published configurations;
- :mod:`experiments.data` -- datasets, batches, on-device augmentation;
- :mod:`experiments.optimizers` -- the one optimizer table (also used by
  ``benchmarks/``);
- :mod:`experiments.models` -- the papers' models;
- :mod:`experiments.compare`, :mod:`experiments.plots` -- ``--task=compare`` and
  ``--task=plot``.
"""
