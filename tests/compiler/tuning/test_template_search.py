"""The template search on a tiny kernel: the default timed first, every trial and the finished kernel
logged, failed builds recorded as failures, a rerun measuring nothing twice, and the XGBoost ranking."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from tensorpress.compiler.formats import decode_stage
from tensorpress.compiler.targets import TargetSpec
from tensorpress.compiler.tuning import template_search
from tensorpress.compiler.tuning.measure import LocalMeasurer, TimingPlan
from tensorpress.compiler.tuning.records import RECORDS_FILE, kernel_key, key_text, read_records
from tensorpress.compiler.tuning.template_search import (
    TemplateKernel,
    cpu_weight_gemm_space,
    search_kernel,
)
from tensorpress.schedules.template_config import CPU_WEIGHT_GEMM, kernel_signature
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, make_weight_gemm

CPU = TargetSpec("cpu")


class CountingMeasurer(LocalMeasurer):
    """Times on this CPU (briefly) and remembers which libraries it timed."""

    def __init__(self):
        super().__init__(TimingPlan(repeat=2, min_repeat_ms=2))
        self.timed = 0

    def measure(self, candidates):
        self.timed += len(candidates)
        return super().measure(candidates)


def _kernel(m=32, k=32, n=8):
    func = make_weight_gemm(decode_stage("dense-fp32-panel"), m, k, "float32", "float32", with_bias=True)
    func = func.with_attr(N_HINT_ATTR, n)
    return TemplateKernel("gemm", func, kernel_key(kernel_signature(func), CPU_WEIGHT_GEMM, CPU), n)


def test_search_logs_every_trial_the_default_first_and_failed_builds_as_failures(tmp_path):
    kernel, space = _kernel(), cpu_weight_gemm_space()
    configs = space.configs(kernel.func, CPU.tvm_target())
    broken: list[dict] = []  # the first config after the default does not build

    def schedule(func, target, config):
        if config != configs[0] and (not broken or broken[0] == config):
            broken[:] = [config]
            raise RuntimeError("this config does not build")
        return space.schedule(func, target, config)

    measurer = CountingMeasurer()
    result = search_kernel(kernel, dataclasses.replace(space, schedule=schedule), CPU, tmp_path, 5, measurer=measurer)
    trials = [r for r in read_records([tmp_path]) if r.type == "trial"]
    (best,) = [r for r in read_records([tmp_path]) if r.type == "best"]
    assert len(trials) == 5 == result.trials and len({key_text(t.config) for t in trials}) == 5
    assert trials[0].config == configs[0]
    assert [t.seconds for t in trials if t.config == broken[0]] == [math.inf]
    # then the default and the 3 fastest trials are timed again, 5 rounds; the broken one never is
    finalists = [configs[0], *[t.config for t in sorted(trials[1:], key=lambda t: t.seconds)[:3]]]
    assert measurer.timed == 4 + 5 * 4
    assert best.config == result.best_config and best.config in finalists and best.seconds == result.best_seconds
    assert best.fields["default_seconds"] == result.default_seconds
    assert best.seconds <= result.default_seconds and best.fields["trials"] == 5
    elapsed = [t.fields["elapsed"] for t in trials]
    assert elapsed == sorted(elapsed)


def test_a_rerun_measures_only_new_trials_and_skips_finished_kernels(tmp_path):
    kernel, space = _kernel(), cpu_weight_gemm_space()
    search_kernel(kernel, space, CPU, tmp_path, 3, measurer=CountingMeasurer())
    log = tmp_path / RECORDS_FILE
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n")  # as if killed before the kernel finished
    measurer = CountingMeasurer()
    resumed = search_kernel(kernel, space, CPU, tmp_path, 6, measurer=measurer)
    assert measurer.timed == 3 + 5 * 4 and resumed.resumed == 3 and resumed.trials == 6  # 3 new, 4 confirmed
    trials = [r for r in read_records([tmp_path]) if r.type == "trial"]
    assert len(trials) == 6 and len({key_text(t.config) for t in trials}) == 6
    assert log.read_text().splitlines()[:3] == lines[:3]  # what was there is kept as it was
    again = CountingMeasurer()
    finished = search_kernel(kernel, space, CPU, tmp_path, 12, measurer=again)
    assert again.timed == 0 and finished.skipped and finished.best_config == resumed.best_config


@pytest.mark.parametrize("seed", range(4))
def test_the_model_picks_better_than_chance(seed):
    """Trials follow a law of the register tile's area (fastest at 80 outputs); from the default and 9
    random trials, the model's 4 first picks are faster on average than the configs left."""
    kernel = _kernel(m=64, k=64, n=128)
    configs = cpu_weight_gemm_space().configs(kernel.func, CPU.tvm_target())

    def law(c):
        return 1e-4 * (1 + abs(c["token_tile"] * c["weight_tile"] - 80) / 40)

    rng = random.Random(seed)
    measured = {key_text(c): law(c) for c in [configs[0], *rng.sample(configs[1:], 9)]}
    left = [c for c in configs if key_text(c) not in measured]
    ranked = template_search._ranked_by_model(configs, measured, left)
    assert sorted(map(key_text, ranked)) == sorted(map(key_text, left))
    assert sum(law(c) for c in ranked[:4]) / 4 < sum(law(c) for c in left) / len(left)


@pytest.mark.parametrize("explore", [0, 1])
def test_batches_start_with_the_default_and_never_repeat(explore, monkeypatch):
    monkeypatch.setattr(template_search, "EXPLORE", explore)
    configs = cpu_weight_gemm_space().configs(_kernel().func, CPU.tvm_target())
    measured: dict[str, float] = {}
    rng = random.Random(1)
    first = template_search._next_batch(configs, measured, 4, rng)
    assert first[0] == configs[0] and len({key_text(c) for c in first}) == 4
    while batch := template_search._next_batch(configs, measured, 4, rng):
        assert not any(key_text(c) in measured for c in batch)
        measured.update({key_text(c): 1e-4 * (1 + c["token_tile"]) for c in batch})
    assert len(measured) == len(configs)


def test_another_config_replaces_the_default_only_when_clearly_faster():
    default, other = "default", "other"
    assert template_search._chosen({default: 1.0, other: 0.99}, default) == default  # within the noise
    assert template_search._chosen({default: 1.0, other: 0.9}, default) == other
    assert template_search._chosen({default: math.inf, other: 2.0}, default) == other  # the default failed
    assert template_search._chosen({}, default) == default
