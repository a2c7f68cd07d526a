import shutil

import pytest
import torch

from migm.files import CheckpointError, sha256

from migm.models.assets import ASSET_DIR, load_checkpoint, read_manifest, save_checkpoint
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


# --- issue 16.2: a path that exists is that file; an asset name is a bare manifest name ----------
def test_an_existing_relative_path_is_that_file_never_the_shipped_asset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "base.pt").write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"mine/base.pt: cannot be read as a torch checkpoint") as err:
        load_checkpoint("mine/base.pt", "base")
    assert "weights_only" not in str(err.value)                 # never advise an unsafe load
    with pytest.raises(CheckpointError, match=r"mine/other.pt .*not found"):
        load_checkpoint("mine/other.pt", "base")          # a directory part: never an asset name
    assert load_checkpoint("base.pt", "base")["kind"] == "base"    # a bare manifest name: the asset


def test_an_absolute_path_is_hash_checked_against_the_manifest_beside_it(tmp_path):
    save_checkpoint(tmp_path / "w.pt", "base", {}, {"w": torch.ones(4)}, command="test")
    raw = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(raw[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match=r"w.pt: sha256 .* does not match"):
        load_checkpoint(tmp_path / "w.pt", "base")
    with pytest.raises(CheckpointError, match=r"w.pt: sha256 .* does not match"):
        load_checkpoint(str(tmp_path / "w.pt"), "base", asset_dir=tmp_path / "elsewhere")


def test_checkpoint_digest_is_the_real_file_hash_for_assets_and_user_files(tmp_path):
    from migm.models.assets import checkpoint_digest, resolve_checkpoint

    assert checkpoint_digest("base.pt") == read_manifest()["base.pt"]["sha256"]
    shutil.copy(ASSET_DIR / "base.pt", tmp_path / "copy.pt")
    assert resolve_checkpoint(str(tmp_path / "copy.pt")) == tmp_path / "copy.pt"
    assert checkpoint_digest(tmp_path / "copy.pt") == sha256(ASSET_DIR / "base.pt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    first = checkpoint_digest(tmp_path / "d")              # a checkpoint directory
    (tmp_path / "d" / "config.json").write_text('{"n_layers": 2}')
    assert checkpoint_digest(tmp_path / "d") != first


# --- issue 16.5: orphan temporaries of a killed writer ---------------------------------------------
def test_atomic_writes_remove_orphans_of_dead_writers_only(tmp_path, caplog):
    import socket
    import subprocess
    import sys

    from migm.files import atomic_write_bytes

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = socket.gethostname()
    orphan = tmp_path / f".out.txt.{host}.{dead}.abc123.tmp"
    legacy = tmp_path / ".out.txt.k2j3h4.tmp"                 # mkstemp's name before the pid was in it
    live = tmp_path / f".out.txt.{host}.{__import__('os').getpid()}.zzz.tmp"
    other = tmp_path / ".other.txt.somehost.1.q.tmp"
    for p in (orphan, legacy, live, other):
        p.write_text("half written")
    with caplog.at_level("WARNING"):
        atomic_write_bytes(tmp_path / "out.txt", lambda tmp: tmp.write_text("whole"))
    assert (tmp_path / "out.txt").read_text() == "whole"
    assert not orphan.exists() and not legacy.exists()
    assert live.exists() and other.exists()                  # a live writer's, another file's
    assert "orphan" in caplog.text and orphan.name in caplog.text


def test_non_finite_weights_are_never_saved(tmp_path):
    with pytest.raises(CheckpointError, match=r"bad.pt: not written: tensor 'b' has NaN"):
        save_checkpoint(tmp_path / "bad.pt", "base", {}, {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])},
                        command="test")
    assert not list(tmp_path.iterdir())


def test_a_corrupt_manifest_is_named_not_a_bare_json_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"base.pt": {"sha256": ')
    with pytest.raises(CheckpointError, match=r"manifest\.json: not valid JSON"):
        read_manifest(tmp_path)
