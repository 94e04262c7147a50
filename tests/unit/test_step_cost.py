"""benchmarks/step_cost.py: the four variants hold what they say (ResIST's sub-network, the lean and
the shared-only models), the layout ratio is the arithmetic of its step times, and the results
name the machine (the ratios depend on the CPU: docs/benchmarks.md, "Compute per step")."""
import json

import pytest

from helpers import benchmark_module

step_cost = benchmark_module("step_cost")


def test_variants_hold_the_blocks_they_say():
    models, P, mine = step_cost.variants(width=2, ranks=4)
    assert (P, mine) == (22, 6)  # ResNet-101's third stage: 23 blocks, the first one shared
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    per_block = (count["full"] - count["shared"]) / P
    assert count["lean"] == pytest.approx(count["shared"] + mine * per_block)
    assert count["resist"] == count["lean"]  # switched-off blocks released: no storage


def test_the_json_names_the_machine_and_its_ratios_follow_from_the_step_times(tmp_path, capsys):
    out = tmp_path / "step_cost.json"
    assert step_cost.main(["--widths", "2", "--reps", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["machine"]["cpu"] and res["machine"]["torch"] and isinstance(res["machine"]["avx512"], bool)
    assert res["machine"]["cpu"] in capsys.readouterr().out
    (row,) = res["rows"]
    t, P, mine = row["step_s"], row["blocks"], row["blocks_per_rank"]
    block = (t["full"] - t["shared"]) / P
    assert row["layout_ratio"] == pytest.approx((t["shared"] + mine * block) / t["full"])
    assert row["resist_over_lean"] == pytest.approx(t["resist"] / t["lean"])
    assert row["block_count_ratio"] == pytest.approx((33 - 22 + 6) / 33)
