"""The lab's items and suites, listed explicitly: each item file exports one ITEM (its run and its
report section); a suite is an ordered tuple of item keys. Adding an item = one file + one line here."""

from __future__ import annotations

from cifarlab.lab.context import Experiment
from cifarlab.lab.items import (
    c1_training,
    c2_breakdown,
    c3_workers,
    c4_profile,
    c5_cpu_gpu,
    c6_optimizers,
    c7_batchnorm,
    c8_compile,
    e_export,
    q_facts,
)
from cifarlab.lab.scaling import (
    s1_batch,
    s2_speedup,
    s3_compute_comm,
    s4_allreduce,
    s5_large_batch,
    s6_answers,
)

LAB_ITEMS: tuple[Experiment, ...] = (
    c1_training.ITEM, e_export.ITEM, c2_breakdown.ITEM, c3_workers.ITEM, c4_profile.ITEM, c5_cpu_gpu.ITEM,
    c6_optimizers.ITEM, c7_batchnorm.ITEM, c8_compile.ITEM, q_facts.ITEM,
)
SCALING_ITEMS: tuple[Experiment, ...] = (
    s1_batch.ITEM, s2_speedup.ITEM, s3_compute_comm.ITEM, s4_allreduce.ITEM, s5_large_batch.ITEM, s6_answers.ITEM,
)

EXPERIMENTS: dict[str, Experiment] = {item.key: item for item in LAB_ITEMS + SCALING_ITEMS}
SUITES: dict[str, tuple[str, ...]] = {
    "lab": tuple(item.key for item in LAB_ITEMS),
    "scaling": tuple(item.key for item in SCALING_ITEMS),
}
