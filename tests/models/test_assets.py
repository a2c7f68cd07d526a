import shutil

import pytest
import torch

from migm.models.assets import (
    ASSET_DIR,
    CheckpointError,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    sha256,
)
from migm.models.tiny import load_tokenizer


def test_every_shipped_asset_matches_its_manifest_hash():
    manifest = read_manifest()
    assert {"tokenizer.pt", "base.pt", "classifier.pt"} <= set(manifest)
    for name, entry in manifest.items():
        assert sha256(ASSET_DIR / name) == entry["sha256"], name
        assert (ASSET_DIR / name).stat().st_size < 16 * 2**20, f"{name} should stay a few MiB"


def test_corrupt_asset_is_refused_naming_the_file(tmp_path):
    shutil.copy(ASSET_DIR / "tokenizer.pt", tmp_path / "tokenizer.pt")
    save_checkpoint(tmp_path / "tok2.pt", "tokenizer", {}, {"w": torch.ones(2)}, command="test")
    manifest_dir = tmp_path
    (manifest_dir / "tok2.pt").write_bytes((manifest_dir / "tok2.pt").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match=r"tok2.pt: sha256 .* does not match"):
        load_checkpoint("tok2.pt", "tokenizer", manifest_dir)


def test_missing_asset_and_wrong_kind_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*make base"):
        load_checkpoint(tmp_path / "nothing.pt", "base")
    save_checkpoint(tmp_path / "x.pt", "classifier", {}, {"w": torch.ones(2)}, command="test")
    with pytest.raises(CheckpointError, match="field 'kind' is 'classifier', expected 'base'"):
        load_checkpoint("x.pt", "base", tmp_path)


def test_save_is_atomic_and_records_hash(tmp_path):
    digest = save_checkpoint(tmp_path / "a.pt", "base", {"width": 4}, {"w": torch.randn(3)}, command="cmd")
    assert read_manifest(tmp_path)["a.pt"]["sha256"] == digest
    assert not list(tmp_path.glob(".*tmp"))
    blob = load_checkpoint("a.pt", "base", tmp_path)
    assert blob["config"] == {"width": 4} and blob["state_dict"]["w"].dtype == torch.float16


def test_shipped_tokenizer_loads():
    tok = load_tokenizer()
    assert tok.num_tokens == 49 and tok.config.codebook_size == 256
