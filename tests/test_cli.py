"""The command-line jobs end to end: the benchmark CLI and the digits main job."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from jaxcache.evaluation import bench

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str):
    """Imports ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digits_job():
    return _example("digits")


def _digits_main():
    return _digits_job().main


def _train_digits_parse():
    return _example("train_digits")._parse


# The smallest real run of the digits job: one shipped model, one digit per class, two steps.
_TINY_JOB = ["--per-class", "1", "--steps", "2", "--repeats", "1"]


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
    # The hand-written loop's column: its time, and the speedups stated against it.
    assert result["hand_loop_s"] > 0
    assert math.isclose(result["speedup_over_hand_loop"],
                        result["hand_loop_s"] / result["cached_s"])
    assert "hand loop" in bench._table(result)


def test_bench_interval_one_is_exact(capsys):
    assert bench.main(["--model", "mmdit", "--size", "tiny", "--steps", "4", "--interval", "1",
                       "--repeats", "1", "--no-hand-loop", "--json",
                       "--compiler-options", '{"xla_cpu_enable_fast_math": false}']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compiler_options"] == {"xla_cpu_enable_fast_math": False}
    assert result["max_abs_diff"] == 0.0
    assert result["ideal_speedup"] == 1.0


def test_bench_table(capsys):
    # The JSON test's model, steps and batch: its two compiled programs serve this run too.
    assert bench.main(["--size", "tiny", "--steps", "6", "--batch", "2", "--repeats", "1",
                       "--no-hand-loop"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "efficiency" in out and "uncached" in out
    assert "hand loop" not in out  # the JSON test covers the hand-written loop's column


@pytest.mark.parametrize("flag", ["--steps", "--interval", "--batch"])
def test_bench_rejects_non_positive_counts(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [("{nope", "not JSON"), ("[1]", "a JSON object")])
def test_bench_rejects_bad_compiler_options(text, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--compiler-options", text])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_rejects_too_many_cached_layers(capsys):
    assert bench.main(["--size", "tiny", "--cached-layers", "9"]) == 2
    assert "--cached-layers must be in [1, 4]" in capsys.readouterr().err


def _assert_refused(main, argv, message, tmp_path, capsys):
    """``main`` exits 2 with ``message`` on stderr, having written nothing to its ``--out``."""
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


# ------------------------------------------------------------------------------- digits job
def test_digits_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = _digits_main()(["--arch", "both", "--per-class", "1", "--repeats", "1",
                           "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "class acc" in text and "full" in text
    assert {p.name for p in out.iterdir()} == {"digits_dit.png", "digits_mmdit.png",
                                                "results.json"}
    results = json.loads((out / "results.json").read_text())["results"]
    for arch in ("dit", "mmdit"):
        full, reused, forecast = results[arch]  # by default plain reuse beside the forecast
        assert (reused["mode"], forecast["mode"]) == ("reuse", "taylor1")
        for cached in (reused, forecast):
            assert full["cached_layers"] == 0 and cached["cached_layers"] == 4
            assert cached["layer_evaluations"] < full["layer_evaluations"]
            assert cached["ideal_speedup"] > 1.0
            assert 0.0 < cached["ssim"] <= 1.0
        assert forecast["layer_evaluations"] == reused["layer_evaluations"]
        assert forecast["psnr"] > reused["psnr"]  # the forecast is closer to full compute
        assert full["accuracy"] >= 0.5  # trained models make recognisable digits


def test_digits_job_interval_one_is_identical(tmp_path, capsys):
    out = tmp_path / "o"
    # One per class, as in the end-to-end run: its compiled full-compute program serves here.
    assert _digits_main()(["--arch", "dit", "--interval", "1", "--per-class", "1",
                           "--reuse", "taylor1", "--repeats", "1", "--out", str(out)]) == 0
    full, *cached = json.loads((out / "results.json").read_text())["results"]["dit"]
    for row in cached:
        assert row["psnr"] is None  # infinite: bitwise identical to full compute
        assert row["ssim"] == 1.0 and row["relative_l1"] == 0.0


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
    _assert_refused(_digits_main(), argv, message, tmp_path, capsys)


def test_digits_job_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00not a checkpoint")
    before = bad.read_bytes()
    out = tmp_path / "out"
    assert _digits_main()(["--checkpoint", str(bad), "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err
    assert bad.read_bytes() == before and not out.exists()


@pytest.mark.parametrize("arch", ["dit", "both", "mmdit"])
def test_digits_job_refuses_arch_with_checkpoint(arch, tmp_path, capsys):
    out = tmp_path / "out"
    ckpt = ROOT / "jaxcache" / "digits" / "assets" / "digits_dit.msgpack"
    assert _digits_main()(["--arch", arch, "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--arch {arch} cannot go with --checkpoint" in err
    assert not out.exists()


def test_digits_job_help_says_checkpoint_decides(capsys):
    with pytest.raises(SystemExit):
        _digits_main()(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "not with --checkpoint, whose file decides the model" in help_text


def test_digits_job_checkpoint_alone(tmp_path, capsys):
    out = tmp_path / "out"
    ckpt = ROOT / "jaxcache" / "digits" / "assets" / "digits_dit.msgpack"
    # The classes of the next test: the same model and shapes, so the same compiled programs.
    assert _digits_main()([*_TINY_JOB, "--checkpoint", str(ckpt), "--classes", "1,7",
                           "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"digits_dit.png", "results.json"}


def test_digits_job_lists_what_it_wrote_and_says_what_accuracy_is_measured_on(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    (out / "digits_mmdit.png").write_bytes(b"old")
    assert _digits_main()([*_TINY_JOB, "--arch", "dit", "--classes", "1,7",
                           "--out", str(out)]) == 0
    text = capsys.readouterr().out
    wrote = next(line for line in text.splitlines() if line.startswith("wrote "))
    assert wrote == f"wrote {out}/: digits_dit.png, results.json"
    assert (out / "stale.txt").read_text() == "from an earlier run"  # left alone
    assert (out / "digits_mmdit.png").read_bytes() == b"old"
    assert ("class acc, Frechet: over the 2 samples of each setting (1 per class x 2 classes, "
            "noise seed 0), scored by the shipped digit classifier") in text
    assert "2 FlowMatchEuler steps, guidance 1.5" in text
    results = json.loads((out / "results.json").read_text())
    assert results["models"]["dit"]["solver"] == "FlowMatchEuler"


def test_digits_job_eps_model_uses_ddim(tmp_path, capsys):
    out = tmp_path / "out"
    assert _digits_main()([*_TINY_JOB, "--arch", "dit-eps", "--out", str(out)]) == 0
    assert "2 DDIM steps" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["models"]["dit-eps"] == {"objective": "eps", "solver": "DDIM",
                                            "num_steps": 2, "guidance_scale": 1.5}
    assert results["results"]["dit-eps"][0]["layer_evaluations"] == 2 * 8
    assert {p.name for p in out.iterdir()} == {"digits_dit-eps.png", "results.json"}


def _refuse_sampling(monkeypatch):
    """The job module, with sampling replaced by a failure (the --out check must come first)."""
    job = _digits_job()

    def sampled(*args, **kwargs):
        raise AssertionError("sampled before checking --out")

    monkeypatch.setattr(job, "Evaluator", sampled)
    return job


def test_digits_job_out_is_a_file(tmp_path, capsys, monkeypatch):
    job = _refuse_sampling(monkeypatch)
    out = tmp_path / "taken"
    out.write_text("a file")
    assert job.main([*_TINY_JOB, "--arch", "dit", "--out", str(out)]) == 2
    assert f"--out {out} exists and is not a folder" in capsys.readouterr().err
    assert out.read_text() == "a file"


def test_digits_job_out_under_a_file(tmp_path, capsys, monkeypatch):
    job = _refuse_sampling(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    out = blocker / "sub" / "out"
    assert job.main([*_TINY_JOB, "--arch", "dit", "--out", str(out)]) == 2
    assert f"--out {out} cannot be created: {blocker} is not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("exists", [True, False])
def test_digits_job_out_not_writable(exists, tmp_path, capsys, monkeypatch):
    job = _refuse_sampling(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked if exists else locked / "out"
    # Permission bits do not bind root, so the check's view of them is stubbed.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    assert job.main([*_TINY_JOB, "--arch", "dit", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot write in" in err and str(locked) in err
    assert list(locked.iterdir()) == []


def test_digits_job_out_name_taken_by_a_folder(tmp_path, capsys, monkeypatch):
    job = _refuse_sampling(monkeypatch)
    out = tmp_path / "out"
    (out / "results.json").mkdir(parents=True)
    assert job.main([*_TINY_JOB, "--arch", "dit", "--out", str(out)]) == 2
    assert "results.json exists and is not a file" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["results.json"]


# ------------------------------------------------------------------------------- train_digits
def test_train_digits_objective_settings():
    parse = _train_digits_parse()
    flow = parse(["--out", "x.msgpack"])
    assert flow.objective == "flow" and flow.min_snr_gamma is None
    eps = parse(["--objective", "eps", "--out", "x.msgpack"])
    assert eps.min_snr_gamma == 5.0 and eps.eval_steps is None  # the recipe's 50 DDIM steps
    assert parse(["--objective", "eps", "--min-snr-gamma", "0", "--out", "x"]).min_snr_gamma is None


@pytest.mark.parametrize("argv, message", [
    (["--min-snr-gamma", "5"], "--min-snr-gamma applies to --objective eps only"),
    (["--objective", "eps", "--min-snr-gamma", "-1"], "--min-snr-gamma must be >= 0"),
    (["--steps", "0"], "--steps must be an int >= 1, got 0"),
    (["--eval-steps", "0"], "--eval-steps must be an int >= 1, got 0"),
])
def test_train_digits_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _train_digits_parse()([*argv, "--out", "x.msgpack"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------- tradeoff
def _tradeoff_main():
    return _example("tradeoff").main


@pytest.mark.parametrize("argv, message", [
    (["--arch", "unet"], "--arch must name models"),
    (["--arch", ""], "--arch must name models"),
    (["--targets", "2,fast"], "--targets must be comma-separated numbers"),
    (["--per-class", "0"], "--per-class, --fit-per-class, --fit-iterations and --router-"),
    (["--fit-iterations", "0"], "--router-iterations must be positive"),
    (["--router-iterations", "0"], "--router-iterations must be positive"),
    (["--families", "learned,random"], "--families must name families of"),
    (["--modes", "taylor1,taylor9"], "--modes must name modes of"),
])
def test_tradeoff_rejects_bad_input_before_sampling(argv, message, tmp_path, capsys):
    _assert_refused(_tradeoff_main(), argv, message, tmp_path, capsys)
