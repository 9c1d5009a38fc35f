"""Experiments and models that use :mod:`riemax` (not part of the library), in
the shape of the Flax examples.

- :mod:`experiments.main` -- the command line: flags -> one resolved config ->
  ``train_and_evaluate(config, workdir)``; :mod:`experiments.cifar` is the same
  under the name of the papers' command lines, :mod:`experiments.digits` with
  ``--dataset=digits``; :mod:`experiments.flags` the flags,
  :mod:`experiments.tasks` the tasks other than one training run;
- :mod:`experiments.configs` -- configs as code (``get_config()`` per file): the
  default, a smoke run, the papers' published configurations;
- :mod:`experiments.keys` -- the one table of config keys;
  :mod:`experiments.config` -- the per-dataset defaults and the checks (no
  JAX: the command line checks its flags before loading it);
- :mod:`experiments.train` -- ``train_and_evaluate(config, workdir)``, the one
  training loop, one file per concern (loop, compiled steps, devices,
  checkpoints, metrics, ``--task=test``);
- :mod:`experiments.optimizers` -- the one optimizer table (also used by
  ``benchmarks/``), its factories, parameter groups and schedules;
- :mod:`experiments.models` -- the papers' models, one family per file;
- :mod:`experiments.data` -- datasets, batches, on-device augmentation;
- :mod:`experiments.monitor` -- the signs of a run going nowhere;
- :mod:`experiments.console` -- the one clock and the verbosity of the console;
- :mod:`experiments.compare`, :mod:`experiments.plots` -- ``--task=compare`` and
  ``--task=plot``.
"""
