"""A stopped `migm test` keeps every grid point it finished, and a rerun does only the rest.

Real signals to a real `migm test` process: the rows kept, the exit status and its one line,
then the rerun, whose rows must equal those of a run never stopped (the same seeds give the
same samples, so FID and class accuracy agree to the last digit). Two runs into one out_dir:
the second refuses at once, naming the first's PID.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from migm.cli import REPO_ROOT
from tests.training.test_preemption import CLEAN_ENV, start

QUALITY = ("fid_classifier", "class_accuracy", "base_calls", "shortcut_calls", "num_samples")


def eval_config(tmp_path: Path, name: str, test_samples: int = 40) -> str:
    """configs/tiny.yaml's test on the shipped shortcut: 4 points, seconds each, CSV only."""
    cfg = yaml.safe_load((REPO_ROOT / "configs/tiny.yaml").read_text())
    cfg["run"] = {"name": name, "root": str(tmp_path / name)}
    t = cfg["trainer"]
    t["logger"] = [lg for lg in t["logger"] if "Wandb" not in lg["class_path"]]
    t["callbacks"] = [cb for cb in t["callbacks"] if "EvaluationCallback" not in cb["class_path"]]
    t["enable_progress_bar"] = False
    cfg["evaluation"].update(
        methods=[{"class_path": "migm.accel.method.Vanilla", "init_args": {"steps": [2, 4, 8]}},
                 {"class_path": "migm.accel.shortcut.Shortcut", "init_args": {"steps": [8], "budgets": [2]}}],
        reference_steps=8, latency_batch=8, latency_repeats=1, keep_images=10)
    cfg["metrics"]["reference_samples"] = 200
    cfg["data"]["init_args"].update(test_samples=test_samples, test_batch_size=20)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def wait_for_rows(results: Path, proc: subprocess.Popen, count: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if results.exists() and len(results.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{results} never held {count} rows")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migm", *args], cwd=REPO_ROOT, env=CLEAN_ENV,
                          capture_output=True, text=True, timeout=300)


def test_a_stopped_test_keeps_its_finished_points_and_the_rerun_does_the_rest(tmp_path):
    straight = run("test", "--config", eval_config(tmp_path, "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = rows(tmp_path / "straight" / "eval")
    assert [r["label"] for r in expected] == ["N2", "N4", "N8", "N8/B2"]

    config = eval_config(tmp_path, "stopped")
    out = tmp_path / "stopped" / "eval"
    proc = start("test", "--config", config)
    wait_for_rows(out / "results.jsonl", proc, 2)         # two points finished, the third running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    kept = rows(out)
    assert 2 <= len(kept) < 4 and all("latency_ms_per_image" not in r for r in kept)  # not yet timed
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: stopped by SIGTERM: {len(kept)} finished points are kept in "
                     f"{out / 'results.jsonl'}; run the same command again to resume from them"], err[-2000:]

    written = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    assert len(written) == len(kept)

    again = run("test", "--config", config)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(kept)} of 4 points already finished" in again.stdout + again.stderr
    # the kept points were not generated again: their samples are the files the first run wrote
    assert {p: (out / "points" / p).stat().st_mtime_ns for p in written} == written
    resumed = rows(out)
    assert [r["label"] for r in resumed] == [r["label"] for r in expected]
    for got, want in zip(resumed, expected):
        assert {k: got[k] for k in QUALITY} == {k: want[k] for k in QUALITY}, got["label"]
        assert got["latency_ms_per_image"] > 0 and got["speedup"] > 0        # timed at the end
    assert len({r["config_hash"] for r in resumed}) == 1
    assert (out / "samples.png").is_file()   # kept points' samples came back from points/


def test_a_rerun_with_another_config_refuses_naming_what_differs_and_resume_false_redoes(tmp_path):
    config = eval_config(tmp_path, "study", test_samples=20)
    assert run("test", "--config", config).returncode == 0
    out = tmp_path / "study" / "eval"
    before = (out / "results.jsonl").read_text()
    other = run("test", "--config", config, "--data.init_args.test_samples", "40",
                "--evaluation.reference_steps", "4")
    assert other.returncode == 1
    lines = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in other.stderr, other.stderr[-2000:]
    assert "holds rows of another config" in lines[0]
    assert "data.test_samples: 20 there, 40 now" in lines[0]
    assert "evaluation.reference_steps: 8 there, 4 now" in lines[0]
    assert (out / "results.jsonl").read_text() == before           # nothing appended or lost
    redo = run("test", "--config", config, "--data.init_args.test_samples", "40",
               "--evaluation.resume", "false")
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert {r["num_samples"] for r in rows(out)} == {40}


def test_two_tests_into_one_out_dir_the_second_refuses_naming_the_first(tmp_path):
    config = eval_config(tmp_path, "shared", test_samples=2000)      # the first runs a while
    first = start("test", "--config", config)
    lock = tmp_path / "shared" / "eval" / ".lock"
    end = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()):
        assert first.poll() is None and time.time() < end, first.communicate()
        time.sleep(0.1)
    try:
        second = run("test", "--config", config)
        assert second.returncode == 1
        lines = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert lines == [f"error: {lock.parent} is in use by another migm test (PID {first.pid}); "
                         "wait for it to finish or choose another directory"], second.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
