"""The GPU check script runs end to end on toy shapes (its --smoke mode), on CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_shell_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


@pytest.fixture()
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_gpu_check_smoke_writes_every_part(gpu_check, tmp_path):
    reports = gpu_check.main(["all", "--smoke", "--device", "cpu", "--output", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"gpu-check-{p}-smoke.json" for p in sorted(gpu_check.PARTS)]
    inference = json.loads((tmp_path / "gpu-check-inference-smoke.json").read_text())["result"]
    for family in ("sd15-tiny", "sdxl-tiny"):
        assert set(inference[family]["ratio_vs_stock"]) == {"1", "3"}
        assert inference[family]["unload_bit_identical"] is True
    step = reports["train-step"]["result"]["sdxl-tiny"]
    assert step["ratio"] > 0 and step["perfusion_seconds_per_step"] > 0
    long_run = reports["long-run"]["result"]
    assert long_run["steps"] == 1 and long_run["concept_bytes"] > 0
