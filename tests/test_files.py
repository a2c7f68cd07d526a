"""Output directories: checked writable before work starts, and locked by the run writing them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from migm.files import DirectoryLock, check_writable


def test_check_writable_creates_the_directory_and_leaves_nothing_in_it(tmp_path):
    out = check_writable(tmp_path / "a" / "b", "evaluation.out_dir")
    assert out.is_dir() and list(out.iterdir()) == []


def test_an_unwritable_directory_is_one_line_naming_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError) as err:
        check_writable(blocker / "eval", "evaluation.out_dir")
    assert str(err.value) == (f"evaluation.out_dir: {blocker / 'eval'} is not writable (Not a "
                              "directory); choose another directory")


def test_a_second_lock_refuses_naming_the_holders_pid_and_is_free_once_released(tmp_path):
    first = DirectoryLock(tmp_path, "migm test").acquire()
    with pytest.raises(ValueError, match=rf"in use by another migm test \(PID {os.getpid()}\)"):
        DirectoryLock(tmp_path, "migm test").acquire()
    first.release()
    DirectoryLock(tmp_path, "migm test").acquire().release()


def test_a_lock_held_by_another_process_names_it_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from migm.files import DirectoryLock; "
         f"lock = DirectoryLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"\(PID {holder.pid}\)"):
            DirectoryLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    DirectoryLock(tmp_path).acquire().release()      # a killed holder leaves nothing to clean up
