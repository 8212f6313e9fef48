"""The bottleneck does what Eq. 10 says on a synthetic problem (task part + high-entropy nuisance).

See experiments/bottleneck.py for the setup. One seeded comparison, ~10 s on two CPU cores.
"""

from __future__ import annotations

import pytest

from experiments.bottleneck import BottleneckDemoConfig, compare


@pytest.fixture(scope="module")
def reports():
    cfg = BottleneckDemoConfig()
    assert cfg.infotok.mode == "cs"
    return compare(cfg)


def test_cs_removes_nuisance_from_the_shared_tokens(reports):
    off, cs = reports["off"], reports["cs"]
    assert cs.nuisance_r2_z < 0.6 * off.nuisance_r2_z, (off, cs)


def test_cs_keeps_the_task_information(reports):
    off, cs = reports["off"], reports["cs"]
    assert cs.answer_accuracy >= off.answer_accuracy - 0.02, (off, cs)
    assert cs.target_r2 > off.target_r2 + 0.3, (off, cs)
    assert cs.task_loss < 0.2, cs


def test_the_compactness_term_lowers_the_rate(reports):
    cs, weak = reports["cs"], reports["cs, KL/100"]
    assert cs.rate_u < 0.5 * weak.rate_u and cs.rate_g < 0.5 * weak.rate_g, (cs, weak)
    assert cs.nuisance_r2_z <= weak.nuisance_r2_z, (cs, weak)
