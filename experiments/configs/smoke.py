"""A smoke run: four steps of a tiny VGG on the digits that scikit-learn ships
(offline, seconds on a CPU), in the shape of the default config.

  python -m experiments.main --config=smoke --workdir=/tmp/smoke
"""

from __future__ import annotations

from typing import Any

from experiments.configs import default


def get_config() -> dict[str, Any]:
    return default.over(
        {
            "dataset": "digits",
            "widths": [4, 8],
            "convs_per_stage": 1,
            "batch_size": 16,
            "steps": 4,
            "log_every": 2,
            "eval_every": 4,
            "checkpoint_every": 4,
            "progress": False,
        }
    )
