"""No leftovers: a writer killed with -9 leaves a temporary that names its PID and host; the next
write of the same target removes it (only when that writer is gone); `leftovers` lists them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bitft.files import _host, atomic_dir, leftovers, remove_stale, temp_path
from helpers import REPO, tiny_model


def kill_when(pattern: str, folder: Path, cmd: list, env=None) -> Path:
    """Run CMD; kill -9 it as soon as a temporary matching PATTERN appears in FOLDER; return that temporary."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        found = list(folder.glob(pattern))
        if found:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return found[0]
        time.sleep(0.001)
    proc.kill()
    raise AssertionError(f"no {pattern} appeared before the writer ended (exit {proc.poll()})")


def test_kill_9_during_convert_then_convert_again_leaves_only_the_target(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "model"
    cmd = [sys.executable, "-m", "bitft.cli", "convert", str(src), "--output", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    tmp = kill_when(".model.tmp-*", work, cmd, env)
    assert not out.exists()
    found = leftovers(work)
    assert [(t["path"], t["target"], t["host"], t["stale"]) for t in found] == [(tmp, "model", _host(), True)]
    assert tmp.name.startswith(".model.tmp-") and f"@{_host()}" in tmp.name
    assert subprocess.run(cmd, cwd=REPO, env=env, capture_output=True).returncode == 0
    assert sorted(p.name for p in work.iterdir()) == ["model"] and leftovers(work) == []


def test_a_killed_file_writer_is_removed_by_the_next_one(tmp_path):
    """The file form (gguf export: `.NAME.tmp-PID@HOST`, written then renamed over NAME)."""
    out = tmp_path / "model.gguf"
    writer = ("import sys, time; from bitft.files import temp_path; t = temp_path(sys.argv[1]); "
              "f = open(t, 'wb'); f.write(b'x' * 4096); f.flush(); time.sleep(60)")
    tmp = kill_when(".model.gguf.tmp-*", tmp_path, [sys.executable, "-c", writer, str(out)],
                    dict(os.environ, PYTHONPATH=str(REPO)))
    (info,) = leftovers(tmp_path)
    assert info["path"] == tmp and info["stale"] and info["bytes"] == 4096 and info["target"] == "model.gguf"
    mine = temp_path(out)  # what the next writer of OUT does first
    assert not tmp.exists() and mine.name == f".model.gguf.tmp-{os.getpid()}@{_host()}"


def test_live_writers_and_other_hosts_are_kept(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getpid()}@{_host()}-abcd"  # this process: alive
    other = tmp_path / ".out.tmp-1@some_other_node-abcd"  # another machine sharing the filesystem
    elsewhere = tmp_path / ".another.tmp-999999999@" f"{_host()}"  # another target
    old_style = tmp_path / ".out.tmp-999999999"  # gguf's name before the host was added: this host
    for p in (live, other, elsewhere):
        p.mkdir()
    old_style.write_bytes(b"12")
    assert remove_stale(out) == [old_style]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other, elsewhere))
    listed = {t["path"].name: t["stale"] for t in leftovers(tmp_path)}
    assert listed == {live.name: False, other.name: False, elsewhere.name: True}


def test_atomic_dir_replaces_and_cleans(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}@")
        (tmp / "a").write_text("1")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == ["b"]
    assert (out / "b").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_full_disk_during_convert_is_one_line_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE (EFBIG, the path ENOSPC takes too) smaller than the weights: one line, no temporary."""
    import resource

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    work = tmp_path / "work"
    work.mkdir()
    limit = (src / "model.safetensors").stat().st_size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    r = subprocess.run([sys.executable, "-m", "bitft.cli", "convert", str(src), "--output", str(work / "model")],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                       preexec_fn=small_files)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bitft: error: disk full while writing {work / 'model'}"), r.stderr
    assert f"file size limit of {limit:,} bytes" in lines[0] and "free space or choose another --output" in lines[0]
    assert list(work.iterdir()) == []


def test_info_lists_leftovers_and_the_gguf_export_clears_stale_ones(tmp_path, capsys):
    """`bitft info` on a folder names what interrupted writes left; the GGUF export's temporary (temp_path)
    removes the stale ones of its target first."""
    import socket

    from bitft.cli import main
    from bitft.files import temp_path

    stale = tmp_path / f".m.gguf.tmp-999999@{socket.gethostname()}"
    stale.write_bytes(b"x" * 1000)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ".m.gguf.tmp-999999" in out and "unfinished write of m.gguf" in out and "the next write of it removes this" in out
    tmp = temp_path(tmp_path / "m.gguf")
    assert not stale.exists() and tmp.name.startswith(f".m.gguf.tmp-{os.getpid()}@")
