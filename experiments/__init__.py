"""Experiments and models that use :mod:`riemax` (not part of the library).

- :mod:`experiments.cifar` -- the command line (``python -m experiments.cifar``);
  :mod:`experiments.digits` is the same with ``--dataset=digits``;
- :mod:`experiments.train` -- ``train_and_evaluate(config, workdir)``, the one
  training loop, one file per concern (loop, compiled steps, devices,
  checkpoints, metrics, ``--task=test``);
- :mod:`experiments.config` -- every config key, its default and its checks
  (no JAX: the command line checks its flags before loading it);
- :mod:`experiments.monitor` -- the signs of a run going nowhere;
- :mod:`experiments.console` -- the one clock and the verbosity of the console;
- :mod:`experiments.presets` -- the papers' published configurations;
- :mod:`experiments.data` -- datasets, batches, on-device augmentation;
- :mod:`experiments.optimizers` -- the one optimizer table (also used by
  ``benchmarks/``);
- :mod:`experiments.models` -- the papers' models, one family per file;
- :mod:`experiments.compare`, :mod:`experiments.plots` -- ``--task=compare`` and
  ``--task=plot``.
"""
