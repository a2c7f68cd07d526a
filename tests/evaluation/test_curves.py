import csv

import pytest

from migm.cli import main
from migm.evaluation.curves import read_step_curves


def _write_log(path, rows):
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_step_curves_are_read_per_epoch_and_plotted(tmp_path):
    # a resumed run: version_1 repeats epoch 1 (the later file wins) and adds epoch 2
    first = tmp_path / "v0.csv"
    _write_log(first, [{"epoch": 0, "step": 10, "train/loss": 0.5},
                       {"epoch": 0, "step": 20, "val/rel_err": 0.9, "val/rel_err/step_01": 0.95,
                        "val/rel_err/step_02": 0.85},
                       {"epoch": 1, "step": 40, "val/rel_err/step_01": 0.9, "val/rel_err/step_02": 0.8}])
    second = tmp_path / "v1.csv"
    _write_log(second, [{"epoch": 1, "step": 40, "val/rel_err/step_01": 0.88, "val/rel_err/step_02": 0.79},
                        {"epoch": 2, "step": 60, "val/rel_err/step_01": 0.86, "val/rel_err/step_02": 0.75}])
    curves = read_step_curves([first, second])
    assert curves == {0: {1: 0.95, 2: 0.85}, 1: {1: 0.88, 2: 0.79}, 2: {1: 0.86, 2: 0.75}}
    out = main(["curves", f"[{first}, {second}]", "--out", str(tmp_path / "c.png")])
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_logs_without_step_metrics_are_an_error(tmp_path):
    log = tmp_path / "m.csv"
    _write_log(log, [{"epoch": 0, "step": 1, "train/loss": 1.0}])
    with pytest.raises(ValueError, match="val/rel_err/step_XX"):
        read_step_curves([log])
