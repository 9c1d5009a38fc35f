"""Learning-rate schedules.

Schedules (:func:`make_schedule`) reproduce the three papers: ``"piecewise"``
(Cho & Lee: ``lr * factor ** #{s in decay_steps: count > s}``, strict ``>`` on the
0-based update count), ``"multistep"`` (Roburin et al.: PyTorch ``MultiStepLR``
stepped once per epoch, ``lr * factor ** #{m in decay_epochs: epoch >= m}``),
``"linear"`` (Stock et al.: ``lr * (E - epoch) / E`` set at the start of each
epoch), ``"linear_steps"`` (Bernstein 2025: ``lr * (1 - t / T)`` at update ``t``
of ``T``, :func:`optax.linear_schedule` to 0 step by step) and ``"constant"``;
``"cosine"`` (:func:`optax.cosine_decay_schedule` to 0 at the end of the run) is
the recipe for data without a paper preset. A linear warm-up (``warmup_steps``)
multiplies any of them. Every learning rate of an optimizer follows the same
schedule: both halves of a hybrid, the manifold and the Euclidean one alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optax

SCHEDULES = ("constant", "piecewise", "multistep", "linear", "cosine", "linear_steps")
#: Schedules whose shape depends on the length of the run (``steps``).
LENGTH_DEPENDENT = ("cosine", "linear_steps")


def schedule_of(cfg: dict, base: float) -> optax.Schedule:
    """:func:`make_schedule` of a resolved config for the base rate ``base``: the
    schedule the training loop applies to each learning rate."""
    return make_schedule(
        base,
        cfg["schedule"],
        decay_steps=tuple(cfg["decay_steps"]),
        decay_epochs=tuple(cfg["decay_epochs"]),
        decay_factor=cfg["decay_factor"],
        steps_per_epoch=cfg["steps_per_epoch"],
        epochs=cfg["epochs"],
        total_steps=cfg.get("steps"),  # in the key of length-dependent ones
        warmup_steps=cfg["warmup_steps"],
    )


def decay_counts(cfg: dict) -> list[int]:
    """The update counts (0-based) of a resolved config at which its step
    schedule first applies each decay: ``s + 1`` for every decay step ``s`` of
    ``"piecewise"`` (strict ``>``), ``ceil(m) * steps_per_epoch`` for every
    milestone ``m`` of ``"multistep"``; none for the other schedules (the
    counts depend on compiled keys only, not on the run's length)."""
    import math

    if cfg["schedule"] == "piecewise":
        counts = [int(s) + 1 for s in cfg["decay_steps"]]
    elif cfg["schedule"] == "multistep":
        counts = [math.ceil(m) * cfg["steps_per_epoch"] for m in cfg["decay_epochs"]]
    else:
        counts = []
    return sorted({c for c in counts if c > 0})


def make_schedule(
    base: float,
    kind: str,
    *,
    decay_steps: tuple[int, ...] = (),
    decay_epochs: tuple[float, ...] = (),
    decay_factor: float = 0.1,
    steps_per_epoch: int = 1,
    epochs: int | None = None,
    total_steps: int | None = None,
    warmup_steps: int = 0,
) -> optax.Schedule:
    """The learning rate as a function of the 0-based update count.

    ``kind`` is one of :data:`SCHEDULES`: the papers' ``"piecewise"``,
    ``"multistep"``, ``"linear"`` and ``"linear_steps"`` (see the module
    docstring), ``"constant"``, or ``"cosine"``: :func:`optax.cosine_decay_schedule`
    from ``base`` down to 0 over the ``total_steps - warmup_steps`` updates after
    the warm-up (``"linear_steps"`` decays over the same updates).

    With ``warmup_steps = W > 1`` the schedule is multiplied by a linear ramp
    (:func:`optax.linear_schedule`) from ``1/W`` at update 0 to 1 at update
    ``W - 1``; the papers' decay points stay where they were.
    """
    import jax.numpy as jnp
    import optax

    if kind == "constant":

        def schedule(count):
            return jnp.asarray(base, jnp.float32) + 0 * count

    elif kind == "piecewise":
        bounds = jnp.asarray(decay_steps or [2**31 - 1], jnp.int32)

        def schedule(count):
            n = jnp.sum(jnp.asarray(count, jnp.int32) > bounds) if decay_steps else 0
            return base * jnp.asarray(decay_factor, jnp.float32) ** n

    elif kind == "multistep":
        milestones = jnp.asarray(decay_epochs or [2**31 - 1], jnp.float32)

        def schedule(count):
            epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
            n = jnp.sum(epoch >= milestones) if decay_epochs else 0
            return base * jnp.asarray(decay_factor, jnp.float32) ** n

    elif kind == "linear":
        if not epochs:
            raise ValueError("the linear schedule needs epochs")

        def schedule(count):
            epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
            frac = jnp.maximum(epochs - epoch, 0).astype(jnp.float32) / epochs
            return base * frac

    elif kind == "cosine":
        if not total_steps:
            raise ValueError("the cosine schedule needs total_steps")
        cosine = optax.cosine_decay_schedule(base, max(total_steps - warmup_steps, 1))

        def schedule(count):
            return cosine(jnp.maximum(jnp.asarray(count, jnp.int32) - warmup_steps, 0))

    elif kind == "linear_steps":
        if not total_steps:
            raise ValueError("the linear_steps schedule needs total_steps")
        line = optax.linear_schedule(base, 0.0, max(total_steps - warmup_steps, 1))

        def schedule(count):
            return line(jnp.maximum(jnp.asarray(count, jnp.int32) - warmup_steps, 0))

    else:
        raise ValueError(f"unknown schedule {kind!r}; valid schedules: {SCHEDULES}")
    if warmup_steps <= 1:
        return schedule
    ramp = optax.linear_schedule(1.0 / warmup_steps, 1.0, warmup_steps - 1)

    def warmed_up(count):
        return schedule(count) * ramp(count)

    return warmed_up
