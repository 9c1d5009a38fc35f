"""Benchmarks of riemax against its optax counterparts, reported as same-run ratios.

Each module is a script with a ``main(argv)`` that prints markdown tables and
returns them (see :mod:`benchmarks._common`)::

  python -m benchmarks.headline         # the one table: train step, compile, optimizer
  python -m benchmarks.optimizer_step   # optimizer-only step, WRN-28-10 / ResNet-20
  python -m benchmarks.train_step       # forward + backward + update, batch 128
  python -m benchmarks.compile_memory   # compile time and optimizer-state bytes
  python -m benchmarks.scaling          # optimizer-step time vs parameter count

Every script takes ``--smoke`` (tiny sizes, one repetition: checks that everything
runs and that the ratios are finite, nothing about speed).
"""
