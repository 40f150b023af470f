"""The command-line jobs end to end: the benchmark CLI and the digits main job."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from jaxcache.evaluation import bench

ROOT = Path(__file__).resolve().parents[1]


def _digits_main():
    spec = importlib.util.spec_from_file_location("digits_job", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ------------------------------------------------------------------------------- bench
def test_bench_json_has_the_promised_fields(capsys):
    assert bench.main(["--size", "tiny", "--steps", "6", "--batch", "2", "--repeats", "2",
                       "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("device", "uncached_s", "cached_s", "speedup", "ideal_speedup", "efficiency",
                "compile_s", "max_abs_diff"):
        assert key in result
    assert result["uncached_s"] > 0 and result["cached_s"] > 0
    # 6 steps, interval 3: steps 0 and 3 refresh; 2 of 4 layers cached.
    assert result["layer_evaluations"] == 6 * 4 - 4 * 2
    assert math.isclose(result["efficiency"], result["speedup"] / result["ideal_speedup"])


def test_bench_interval_one_is_exact(capsys):
    assert bench.main(["--model", "mmdit", "--size", "tiny", "--steps", "4", "--interval", "1",
                       "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] == 0.0
    assert result["ideal_speedup"] == 1.0


def test_bench_table(capsys):
    assert bench.main(["--size", "tiny", "--steps", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "efficiency" in out and "uncached" in out


@pytest.mark.parametrize("flag", ["--steps", "--interval", "--batch"])
def test_bench_rejects_non_positive_counts(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be positive" in capsys.readouterr().err


def test_bench_rejects_too_many_cached_layers(capsys):
    assert bench.main(["--size", "tiny", "--cached-layers", "9"]) == 2
    assert "--cached-layers must be in [1, 4]" in capsys.readouterr().err


# ------------------------------------------------------------------------------- digits job
def test_digits_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = _digits_main()(["--arch", "both", "--per-class", "2", "--repeats", "1",
                           "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "class acc" in text and "full" in text
    assert {p.name for p in out.iterdir()} == {"digits_dit.png", "digits_mmdit.png",
                                                "results.json"}
    results = json.loads((out / "results.json").read_text())["results"]
    for arch in ("dit", "mmdit"):
        full, cached = results[arch]
        assert full["cached_layers"] == 0 and cached["cached_layers"] == 4
        assert cached["layer_evaluations"] < full["layer_evaluations"]
        assert cached["ideal_speedup"] > 1.0
        assert 0.0 < cached["ssim"] <= 1.0
        assert full["accuracy"] >= 0.5  # trained models make recognisable digits


def test_digits_job_interval_one_is_identical(tmp_path, capsys):
    out = tmp_path / "o"
    assert _digits_main()(["--arch", "dit", "--interval", "1", "--per-class", "1",
                           "--repeats", "1", "--out", str(out)]) == 0
    full, cached = json.loads((out / "results.json").read_text())["results"]["dit"]
    assert cached["psnr"] is None  # infinite: bitwise identical to full compute
    assert cached["ssim"] == 1.0 and cached["relative_l1"] == 0.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--classes", "3,11"], "class must be in 0..9"),
        (["--classes", "-1"], "class must be in 0..9"),
        (["--interval", "0"], "--interval must be an int >= 1, got 0"),
        (["--per-class", "0"], "--per-class must be an int >= 1, got 0"),
        (["--cached-layers", "0"], "--cached-layers must be in [1, 8]"),
        (["--checkpoint", "does-not-exist.msgpack"], "does-not-exist"),
    ],
)
def test_digits_job_bad_input_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert _digits_main()([*argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_digits_job_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00not a checkpoint")
    before = bad.read_bytes()
    out = tmp_path / "out"
    assert _digits_main()(["--checkpoint", str(bad), "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err
    assert bad.read_bytes() == before and not out.exists()
