"""The command line against killed runs and full disks (issue 23, cases 12-13).

12: the temporaries a killed `embed` or `convert` left next to its target are removed by the next
    write of that target (their writer, named in the temporary, no longer runs), which says so in
    one line; temporaries of live writers, of another machine or container, of another user or of
    another naming are left alone.
13: a full disk is reported naming the file, for real: a tiny tmpfs (needs root to mount; the
    tests skip, saying why, where it cannot be mounted).
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from convert import load
from jina_jax import files

EMBED = [sys.executable, "-m", "jina_jax.cli", "embed"]
CONVERT = [sys.executable, "-m", "convert"]


def temporaries(folder, name):
    return sorted(p for p in os.listdir(folder) if p.startswith(f".{name}.tmp-"))


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def kill_hard(child):
    child.kill()
    child.wait(timeout=60)


@pytest.fixture
def lines(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"text number {i}\n" for i in range(200)))
    return str(path)


# --- case 12: stale temporaries --------------------------------------------------------------

def test_killed_embed_leaves_a_temporary_the_next_run_removes(tiny_release, tmp_path, lines):
    out = tmp_path / "out.npy"
    # stdin stays open: the killed run is inside its write, its temporary in place, for sure.
    child = subprocess.Popen(EMBED + ["--model", tiny_release, "--task", "none", "--input", "-",
                                      "--output", str(out)],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        child.stdin.write(b"one line\n")
        child.stdin.flush()
        deadline = time.monotonic() + 240
        while not temporaries(tmp_path, "out.npy") and time.monotonic() < deadline:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        left = temporaries(tmp_path, "out.npy")
        assert left, "embed never opened its temporary"
    finally:
        kill_hard(child)  # SIGKILL: nothing of ours runs after it
    assert temporaries(tmp_path, "out.npy") == left and not out.exists()

    done = run(EMBED + ["--model", tiny_release, "--task", "none", "--input", lines,
                        "--output", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    notes = [line for line in done.stderr.splitlines() if line.startswith("removed ")]
    assert notes == [f"removed 1 stale temporary of {out} left by killed runs: {left[0]}"], \
        done.stderr
    assert temporaries(tmp_path, "out.npy") == []
    assert np.load(out).shape == (200, 32)


KILLED_FOLDER_WRITER = """
import os, signal, sys
from jina_jax.files import atomic_folder
with atomic_folder(sys.argv[1]) as tmp:
    open(os.path.join(tmp, "half.bin"), "wb").write(b"x" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_folder_write_is_removed_by_the_next_convert(tiny_release, tmp_path):
    dst = tmp_path / "dst"
    killed = run([sys.executable, "-c", KILLED_FOLDER_WRITER, str(dst)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = temporaries(tmp_path, "dst")
    assert len(left) == 1 and os.listdir(tmp_path / left[0]) == ["half.bin"]

    done = run(CONVERT + [tiny_release, str(dst)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"removed 1 stale temporary of {dst} left by killed runs: {left[0]}" in done.stderr
    assert temporaries(tmp_path, "dst") == []
    assert load(str(dst)).config.num_hidden_layers == 2


LIVE_WRITER = """
import sys, time
from jina_jax.files import temporary_sibling
print(temporary_sibling(sys.argv[1]), flush=True)
time.sleep(120)
"""


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    target = str(tmp_path / "out.npy")
    mine = files.temporary_sibling(target)  # .out.npy.tmp-TAG-PID-START-XXXXXXXX
    tag, pid, start, _ = os.path.basename(mine)[len(".out.npy.tmp-"):].split("-")
    assert pid == str(os.getpid()), "this test needs Linux /proc"
    os.unlink(mine)

    def touch(name, folder=False):
        path = tmp_path / name
        path.mkdir() if folder else path.write_bytes(b"")
        return path

    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, target], stdout=subprocess.PIPE,
                            text=True)
    try:
        live_tmp = live.stdout.readline().strip()
        assert os.path.exists(live_tmp)
        kept = [
            touch(".out.npy.tmp-abcd1234"),                            # another naming
            touch(f".out.npy.tmp-00000000-1-1-abcdefgh"),              # another machine/boot
            touch(f".other.npy.tmp-{tag}-999999999-1-abcdefgh"),       # another target
            touch(f".out.npy.tmp-{tag}-{pid}-{start}-abcdefgh"),       # this very process
        ]
        foreign = touch(f".out.npy.tmp-{tag}-999999998-1-abcdefgh")    # another user's
        os.chown(foreign, 65534, 65534)
        kept.append(foreign)
        stale = [
            touch(f".out.npy.tmp-{tag}-999999999-1-abcdefgh"),         # no such process
            touch(f".out.npy.tmp-{tag}-{pid}-{int(start) - 1}-abcdefgh"),  # pid reused
            touch(f".out.npy.tmp-{tag}-999999999-2-abcdefgh", folder=True),
        ]
        (stale[-1] / "inside").write_bytes(b"x")
        removed = files.remove_stale_temporaries(target)
        assert sorted(removed) == sorted(str(p) for p in stale)
        assert all(p.exists() for p in kept) and os.path.exists(live_tmp)
    finally:
        kill_hard(live)
    assert files.remove_stale_temporaries(target) == [live_tmp]  # now its writer is gone
    assert all(p.exists() for p in kept)


# --- case 13: a full disk names the file ---------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 32 KiB tmpfs: writes beyond it fail with ENOSPC, for real."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_full_disk_names_the_output_file(tiny_release, small_disk, lines):
    out = small_disk / "out.jsonl"  # 200 rows of 32 floats as JSON: far more than 32 KiB
    done = run(EMBED + ["--model", tiny_release, "--task", "none", "--input", lines,
                        "--output", str(out)])
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == \
        f"error: {out}: No space left on device", done.stderr
    assert "Traceback" not in done.stderr
    assert os.listdir(small_disk) == []  # neither the target nor a temporary


def test_full_disk_names_the_file_inside_the_output_folder(tiny_release, small_disk):
    dst = small_disk / "dst"
    done = run(CONVERT + [tiny_release, str(dst)])
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"error: {dst / 'params.safetensors'}: No space left on device"], done.stderr
    assert os.listdir(small_disk) == []
