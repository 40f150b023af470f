"""The main job answers a newcomer's question: is caching worth it against fewer steps?"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("digits_job", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("steps,depth,cached,interval,want", [
    (20, 8, 8, 2, 10),  # every layer, refresh every 2 steps: half the layer evaluations
    (20, 8, 4, 3, 13),  # 160 - 13 * 4 = 108 evaluations: 13 full steps fit (104)
    (2, 8, 8, 2, 1),
    (5, 8, 8, 1, 5),    # nothing skipped: as many steps
])
def test_fewer_steps_fit_the_same_compute(job, steps, depth, cached, interval, want):
    assert job._same_compute_steps(steps, depth, cached, interval) == want
    evaluations = job._evaluations(steps, depth, cached, interval)
    assert want * depth <= evaluations < (want + 1) * depth or want == 1


def test_the_headline_compares_the_recommended_setting_with_fewer_steps(job, tmp_path, capsys):
    out = tmp_path / "out"
    assert job.main(["--arch", "dit", "--per-class", "1", "--steps", "6", "--repeats", "2",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    payload = json.loads((out / "results.json").read_text())
    recommended = payload["recommended"]["dit"]
    fewer = {r["num_steps"]: r for r in payload["fewer_steps"]["dit"]}
    # Every layer, the forecast, interval 2: 3 refreshes of 8 layers in 6 steps = 3 full steps.
    assert (recommended["family"], recommended["cached_layers"], recommended["knob"],
            recommended["mode"]) == ("interval", 8, 2, "taylor1")
    assert recommended["layer_evaluations"] == 3 * 8
    baseline = fewer[3]
    assert baseline["family"] == "fewer steps" and baseline["layer_evaluations"] == 3 * 8
    # Half the steps: half the work, less the condition path, which runs once either way.
    assert 1.99 < baseline["ideal_speedup"] < 2.0
    # The summary line states both and says which won; the legend explains the columns.
    summary = next(line for line in text.splitlines() if line.startswith("dit: every layer"))
    assert f"{recommended['psnr']:.1f} dB against {baseline['psnr']:.1f} dB" in summary
    assert ("caching is better" in summary) == (recommended["psnr"] > baseline["psnr"])
    assert "higher: closer" in text and "lower: more like real digits" in text
    # Measured speedups carry their spread.
    for row in [recommended, baseline, *payload["results"]["dit"][1:]]:
        assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"]
    # The main settings keep their place (full compute, then each cached setting).
    assert [r["cached_layers"] for r in payload["results"]["dit"]] == [0, 4, 4]
