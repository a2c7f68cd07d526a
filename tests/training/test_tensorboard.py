"""Switching the logger by config: a fit with TensorBoardLogger (the `tensorboard` extra, which
`make setup` installs) logs into the run's directory, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from migm.cli import main


def test_a_fit_logs_to_tensorboard_when_the_config_says_so(recorded, tmp_path, make_config):
    pytest.importorskip("tensorboard", reason="pip install migm[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    path = Path(make_config(tmp_path, recorded, max_epochs=1))
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["logger"] = [{"class_path": "migm.run.TensorBoardLogger", "init_args": {"name": "tb"}}]
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    (events,) = (tmp_path / "run" / "tb").rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events.parent)).Reload().Tags()["scalars"]
    assert "train/loss" in scalars and any(t.startswith("val/") for t in scalars), scalars
