"""The device layout of a run: ``jax.pmap`` over the local devices, or ``jax.jit``
on a 1-D mesh; the multi-host start."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from experiments.config import ConfigError

AXIS = "batch"  # the pmap axis


class Devices:
    """The device layout of a run: ``pmap`` over the local devices or ``jit`` on a
    1-D mesh of all devices; in a multi-process run each process feeds its rows of
    every global batch."""

    def __init__(self, mode: str, num_devices: int | None):
        self.mode = mode
        local = jax.local_devices()
        if num_devices is not None:
            if num_devices > len(local):
                raise ConfigError(
                    f"num_devices {num_devices} > {len(local)} local devices"
                )
            if jax.process_count() > 1 and num_devices != len(local):
                raise ConfigError("num_devices must use every local device multihost")
            local = local[:num_devices]
        self.local = local
        self.n_local = len(local)
        self.n_proc = jax.process_count()
        self.proc = jax.process_index()
        self.n_global = self.n_local * self.n_proc
        if mode == "pmap":
            self.mesh = jax.sharding.Mesh(np.array(local), (AXIS,))
            self.batch_sharding = jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec(AXIS)
            )
        else:
            devices = jax.devices() if self.n_proc > 1 else local
            self.mesh = jax.sharding.Mesh(np.array(devices), ("data",))
            self.batch_sharding = jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec("data")
            )
            self.replicated = jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec()
            )

    def describe(self) -> str:
        kind = self.local[0].platform
        procs = f"{self.n_proc} processes x " if self.n_proc > 1 else ""
        return f"{self.mode} over {procs}{self.n_local} local {kind} device(s)"

    def check_divides(self, n: int, key: str) -> None:
        if n % self.n_global:
            raise ConfigError(
                f"{key} {n} does not divide over {self.n_global} devices "
                f"({self.n_proc} process(es) x {self.n_local} local); use a "
                f"multiple of {self.n_global}"
            )

    def rows(self, n: int) -> slice:
        """This process's rows of a global batch of ``n``."""
        per = n // self.n_proc
        return slice(self.proc * per, (self.proc + 1) * per)

    def put_batch(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """This process's rows onto its devices (pmap: a leading device axis)."""
        out = []
        for a in arrays:
            if self.mode == "pmap":
                a = a.reshape(self.n_local, -1, *a.shape[1:])
                out.append(jax.device_put(a, self.batch_sharding))
            else:
                out.append(
                    jax.make_array_from_process_local_data(self.batch_sharding, a)
                )
        return tuple(out)

    def put_state(self, host: Any) -> Any:
        if self.mode == "pmap":

            def rep(x):
                x = np.asarray(x)
                return jax.device_put(
                    np.broadcast_to(x, (self.n_local, *x.shape)), self.batch_sharding
                )

            return jax.tree.map(rep, host)

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(
                x.shape, self.replicated, lambda i: x[i]
            )

        return jax.tree.map(put, host)

    def get(self, tree: Any) -> Any:
        """Host numpy copy of replicated values (device 0's)."""

        def one(x):
            local = np.asarray(x.addressable_data(0))
            return local[0] if self.mode == "pmap" else local

        return jax.tree.map(one, tree)


# --------------------------------------------------------------------------------------


def init_multihost(**kwargs: Any) -> None:
    """``jax.distributed.initialize(**kwargs)`` once (CPU collectives through
    gloo); ``None`` values are left to its auto-detection (SLURM, ...)."""
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
