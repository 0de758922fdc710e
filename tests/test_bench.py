"""Smoke test of the benchmark at tiny sizes (no timing is asserted)."""

from __future__ import annotations

import json

from kdistill import bench


def test_quick_benchmark_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cases = "plain,kdistill,exp-two,linear-kdistill,linear-4-matmuls,epoch-teacher,epoch-cache"
    status = bench.main(
        ["--quick", "--no-memory", "--cache-examples", "256", "--cases", cases, "--json", str(out)]
    )
    assert status == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(cases.split(","))
    for result in report["results"].values():
        assert result["median_s"] > 0, result
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["kdistill speed-up over plain"]["value"] > 0
    assert targets["kdistill speed-up over plain+torch.compile"]["status"] == "not measured"
    printed = capsys.readouterr().out
    assert "linear-kdistill" in printed and "teacher-cache epoch speed-up" in printed


def test_memory_of_a_case_is_measured_in_a_subprocess():
    sizes = bench.Sizes.quick()
    sizes.tokens, sizes.vocab = 256, 4096  # a 4 MiB gradient: well above allocator noise
    result = bench.measure_memory("kdistill", sizes)
    assert "error" not in result, result
    gradient_bytes = sizes.tokens * sizes.vocab * 4
    assert 0.5 * gradient_bytes <= result["extra_peak_bytes"] <= 4 * gradient_bytes
