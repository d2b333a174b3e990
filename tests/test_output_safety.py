"""How cam-caffe writes files without harming anyone's: atomic writes, what it refuses
to replace, the record of what it wrote (OutputLedger), abandoned temporaries, the
cache folders, the output folder checks and the image formats. In-process calls on
real files, each result checked against what the OS itself reports (stat, listdir,
the file read back) or an independent decoder (Pillow)."""
from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cam_caffe import output
from cam_caffe.errors import OutputError
from cam_caffe.output import (
    IMAGE_FORMATS,
    NAME_MAX,
    STALE_AGE,
    OutputLedger,
    cache_home,
    check_writable,
    encode_image,
    image_format,
    publish,
    remove_stale,
    remove_temporaries,
    replaceable,
    temporary_beside,
    write_bytes,
)

NOBODY = 65534


# ----------------------------------------------------------------------------- helpers
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def temporary_name(target: str, pid: int, host: str = output._HOST, token: str = "abcd1234") -> str:
    """The name temporary_beside gives a temporary of ``target`` written by ``pid``."""
    return f".{target}.{token}.{host}-{pid}.tmp"


def other_host() -> str:
    return "0123abcd" if output._HOST != "0123abcd" else "fedc4321"


def names(folder: Path) -> set[str]:
    return set(os.listdir(folder))


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder any user may enter (tmp_path's ancestors are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="cam-caffe-safety-"))
    folder.chmod(0o755)
    yield folder
    for path in (folder, *folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder)


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    """("returned", repr of what ``call`` returned) or ("OutputError", its message)."""
    try:
        return "returned", repr(call())
    except OutputError as e:
        return "OutputError", str(e)


def forked(call: Callable[[], object], uid: int | None = None) -> tuple[str, str]:
    """:func:`outcome` of ``call`` in a forked child of this process (the same code,
    mutants included), as user ``uid`` when given: for what would change this process
    for good (a resource limit, dropped privileges). mutmut learns which tests reach a
    function in this process only: a test calls the function here too."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # pragma: no cover (the child)
        try:
            os.close(read)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            try:
                answer = outcome(call)
            except BaseException as e:
                answer = ("raised", repr(e))
            os.write(write, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        answer = json.loads(f.read() or b'["died", ""]')
    os.waitpid(pid, 0)
    return answer[0], answer[1]


def unprivileged(call: Callable[[], object]) -> tuple[str, str]:
    """:func:`outcome` of ``call`` as a user who cannot write into root's read-only
    folders: this process when it is not root, else a child as uid 65534 (root writes
    anywhere)."""
    return forked(call, NOBODY) if os.geteuid() == 0 else outcome(call)


# -------------------------------------------------------------------------- cache_home
def test_cache_home_is_under_the_passwd_home_without_home(monkeypatch):
    """HOME unset (a cron job, a service): the cache is ~/.cache of the passwd entry,
    the same home the OS's own ~ expansion finds, one folder per kind."""
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HOME")
    home = pwd.getpwuid(os.getuid()).pw_dir
    assert home == os.path.expanduser("~")
    assert cache_home("models") == Path(home) / ".cache" / "cam-caffe" / "models"
    assert cache_home("onnx") == Path(home) / ".cache" / "cam-caffe" / "onnx"


def test_a_uid_without_passwd_entry_has_no_cache(monkeypatch):
    """A container's uid with no passwd entry and no HOME: no cache (None) rather than a
    cache in the current folder."""
    taken = {entry.pw_uid for entry in pwd.getpwall()}
    monkeypatch.setattr(output.os, "getuid", lambda: next(u for u in range(70000, 80000)
                                                          if u not in taken))
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HOME")
    assert output._passwd_home() == ""
    assert cache_home("models") is None
    monkeypatch.setenv("HOME", "/h")
    assert cache_home("models") == Path("/h/.cache/cam-caffe/models")


# ------------------------------------------------------------------------- write_bytes
def test_write_bytes_creates_folders_and_replaces_a_file(tmp_path):
    """The folders of a new output are made; a second write replaces the first; the
    folder holds the file alone, no temporary."""
    target = tmp_path / "a" / "b" / "x.json"
    write_bytes(target, b"first")
    write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert names(target.parent) == {"x.json"}


def test_write_bytes_through_a_symlink_writes_its_target(tmp_path):
    """A symlink at an output's name (a user's link into a shared folder) stays a link;
    its target gets the new content."""
    real = tmp_path / "real" / "x.png"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "x.png"
    link.symlink_to(real)
    write_bytes(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert names(real.parent) == {"x.png"} and names(tmp_path) == {"real", "x.png"}


def test_a_write_interrupted_before_the_rename_leaves_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C between writing and renaming: the old file is intact, the temporary is
    gone, and the interrupt goes on (it is not turned into an OutputError)."""
    target = tmp_path / "x.npy"
    write_bytes(target, b"good")

    def interrupted(temporary, path):
        assert Path(temporary).read_bytes() == b"partial"
        raise KeyboardInterrupt
    monkeypatch.setattr(output, "publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes(target, b"partial")
    assert target.read_bytes() == b"good" and names(tmp_path) == {"x.npy"}

    def removed_then_interrupted(temporary, path):      # by a Dask client's clean-up
        os.unlink(temporary)
        raise KeyboardInterrupt
    monkeypatch.setattr(output, "publish", removed_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes(target, b"partial")
    assert target.read_bytes() == b"good" and names(tmp_path) == {"x.npy"}


def test_a_failed_write_is_one_error_naming_the_file(open_folder):
    """A read-only output folder: OutputError naming the file and the reason; nothing
    is left in the folder."""
    locked = open_folder / "locked"
    locked.mkdir()
    write_bytes(locked / "ok.json", b"{}")            # writable for its owner
    locked.chmod(0o555)
    target = locked / "x.json"
    assert unprivileged(lambda: write_bytes(target, b"{}")) == (
        "OutputError", f"{target}: cannot write: Permission denied")
    assert names(locked) == {"ok.json"}


def test_a_full_disk_while_writing_is_one_error_and_no_temporary(tmp_path):
    """Writing past the file size limit (EFBIG, as on a full disk) after the temporary
    is open: OutputError naming the file, and its temporary removed."""
    target = tmp_path / "x.npy"
    write_bytes(target, b"good")

    def too_large() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        write_bytes(target, bytes(10000))
    assert forked(too_large) == ("OutputError", f"{target}: cannot write: File too large")
    assert target.read_bytes() == b"good" and names(tmp_path) == {"x.npy"}


# ------------------------------------------------------------------------- replaceable
def test_replaceable_is_the_file_or_the_symlinks_target(tmp_path, monkeypatch):
    """What a write replaces: the absolute path, or where a symlink points (also when
    that does not exist yet)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.png").write_bytes(b"x")
    assert replaceable(Path("mine.png")) == tmp_path / "mine.png"
    assert replaceable(Path("new.png")) == tmp_path / "new.png"
    (tmp_path / "link.png").symlink_to(tmp_path / "elsewhere.png")
    assert replaceable(Path("link.png")) == tmp_path / "elsewhere.png"


def test_replaceable_refuses_what_is_not_a_regular_file(tmp_path, monkeypatch):
    """A folder, a device, a FIFO or a socket at an output's name is never replaced:
    one error saying what it is (and the symlink's target when it was reached through
    one); the thing stays."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind("socket.png")
    (tmp_path / "null.png").symlink_to("/dev/null")
    cases = {"folder.png": "is a folder", "fifo.png": "is a FIFO", "socket.png": "is a socket",
             "null.png": "is a device (through a symlink to /dev/null)"}
    try:
        for name, what in cases.items():
            with pytest.raises(OutputError) as error:
                replaceable(Path(name))
            assert str(error.value) == f"{name}: {what}, not a regular file: not replacing it"
            with pytest.raises(OutputError):
                write_bytes(tmp_path / name, b"x")
    finally:
        server.close()
    assert stat.S_ISSOCK(os.stat(tmp_path / "socket.png").st_mode)
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo.png").st_mode)
    blocks = [p for p in Path("/dev").iterdir() if stat.S_ISBLK(os.stat(p).st_mode)]
    for device in blocks[:1]:                             # where the machine has one
        with pytest.raises(OutputError, match=f"^{device}: is a device, not a regular"):
            replaceable(device)


def test_replaceable_reports_what_stat_cannot_answer(tmp_path):
    """A symlink loop or a file where a folder should be: 'cannot write' with the OS's
    reason, not a traceback."""
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(OutputError) as error:
        replaceable(loop)
    assert str(error.value) == f"{loop}: cannot write: {os.strerror(errno.ELOOP)}"
    (tmp_path / "file").write_bytes(b"")
    inside = tmp_path / "file" / "x.png"
    with pytest.raises(OutputError) as error:
        replaceable(inside)
    assert str(error.value) == f"{inside}: cannot write: {os.strerror(errno.ENOTDIR)}"


# -------------------------------------------------------------------- temporary_beside
def test_temporary_is_named_for_its_target_and_process(tmp_path):
    """'.<name>.<random>.<host>-<pid>.tmp' in the target's folder (made if missing),
    open for writing, closed in children (close-on-exec): what remove_stale and
    remove_temporaries rely on."""
    target = tmp_path / "new" / "sub" / "x.cam.png"
    fd, name = temporary_beside(target)
    try:
        assert os.path.dirname(name) == str(target.parent)
        match = output._TEMPORARY.match(os.path.basename(name))
        assert match and match["name"] == "x.cam.png"
        assert (match["host"], int(match["pid"])) == (output._HOST, os.getpid())
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(fd, b"data")
        assert Path(name).read_bytes() == b"data"
        assert names(target.parent) == {os.path.basename(name)}
    finally:
        os.close(fd)


def test_temporary_of_the_longest_name_fits(tmp_path):
    """A target name of NAME_MAX bytes (multi-byte characters too): its temporary is
    created, at most NAME_MAX bytes, and remove_temporaries finds it."""
    for stem in ("n" * (NAME_MAX - 4), "é" * ((NAME_MAX - 5) // 2)):
        target = tmp_path / (stem + ".png")
        assert len(os.fsencode(target.name)) in (NAME_MAX, NAME_MAX - 1)
        fd, name = temporary_beside(target)
        os.close(fd)
        assert len(os.fsencode(os.path.basename(name))) <= NAME_MAX
        remove_temporaries([target])
        assert not os.path.exists(name)


def test_temporary_takes_another_name_when_one_is_taken(tmp_path, monkeypatch):
    """Names are tried until one is free, a hundred times; then FileExistsError naming
    the folder. An existing file is never opened, a symlink never followed."""
    target = tmp_path / "x.png"
    remove_stale(tmp_path)          # looked at before these live temporaries appear
    taken = temporary_name("x.png", os.getpid(), token="aaaaaaaa")
    (tmp_path / taken).write_bytes(b"someone's")
    trap = temporary_name("x.png", os.getpid(), token="cccccccc")
    (tmp_path / trap).symlink_to(tmp_path / "victim")
    tokens = iter(["aaaaaaaa", "cccccccc", "bbbbbbbb"])
    monkeypatch.setattr(output.secrets, "token_hex", lambda n: next(tokens))
    fd, name = temporary_beside(target)
    os.close(fd)
    assert os.path.basename(name) == temporary_name("x.png", os.getpid(), token="bbbbbbbb")
    assert (tmp_path / taken).read_bytes() == b"someone's"
    assert not (tmp_path / "victim").exists()
    calls = []
    monkeypatch.setattr(output.secrets, "token_hex", lambda n: calls.append(n) or "aaaaaaaa")
    with pytest.raises(FileExistsError) as error:
        temporary_beside(target)
    assert (error.value.errno, error.value.filename) == (errno.EEXIST, str(tmp_path))
    assert calls == [4] * 100
    before = names(tmp_path)
    with pytest.raises(OutputError) as written:
        write_bytes(target, b"x")
    assert str(written.value) == f"{target}: cannot write: no free temporary file name"
    assert names(tmp_path) == before


# ------------------------------------------------------------- remove_stale and _alive
@pytest.fixture
def live_pid() -> Iterator[int]:
    """A live process of this host that a stray signal would end (SIGHUP and SIGINT at
    their defaults): looking at it must leave it running. (This process's own pid would
    do, but a signal sent to it ends the test run itself, which mutmut does not count
    as a failed test.)"""
    child = subprocess.Popen(["sleep", "60"],
                             preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL)
                                                 for s in (signal.SIGHUP, signal.SIGINT)])
    yield child.pid
    child.kill()
    child.wait()


def test_alive(live_pid):
    """A live process is alive, and left running (signal 0 only asks); a reaped child
    and a pid past any pid_max are not alive."""
    assert output._alive(live_pid) is True
    assert output._alive(dead_pid()) is False
    assert output._alive(2 ** 80) is False
    time.sleep(0.05)
    assert os.waitpid(live_pid, os.WNOHANG) == (0, 0)                   # still running


def test_a_process_of_another_user_is_alive(live_pid):
    """kill(pid, 0) on another user's process is refused (EPERM): it exists."""
    assert output._alive(live_pid)                         # as its owner sees it
    if os.geteuid() == 0:                                  # root's process, seen by nobody
        assert unprivileged(lambda: output._alive(live_pid)) == ("returned", "True")
    else:                                                  # init is root's
        assert output._alive(1)


def test_remove_stale_removes_abandoned_temporaries_only(tmp_path, live_pid):
    """Gone: a dead process's temporary of this host, and any host's older than
    STALE_AGE (a live pid of this host too: pids are reused). Kept: a live process's,
    another host's recent one, files not named like ours, and what is not a file."""
    host, other, dead = output._HOST, other_host(), dead_pid()
    stale = {temporary_name("a.png", dead), temporary_name("b\nnewline.png", dead),
             temporary_name("c.png", 12345678, other), temporary_name("d.png", live_pid)}
    kept = {temporary_name("e.png", live_pid), temporary_name("f.png", dead, other),
            ".notes.tmp", f"g.png.abcd1234.{host}-{dead}.tmp",
            temporary_name("h.png", dead) + ".bak", f".i.png.abcd1234.{host}-{dead}.TMP"}
    for name in stale | kept:
        (tmp_path / name).write_bytes(b"partial")
    old = time.time() - STALE_AGE - 60
    for name in (temporary_name("c.png", 12345678, other), temporary_name("d.png", live_pid)):
        os.utime(tmp_path / name, (old, old))
    (tmp_path / temporary_name("j.png", dead)).mkdir()              # not a file
    (tmp_path / temporary_name("k.png", dead)).symlink_to(tmp_path / "notes")
    (tmp_path / "notes").write_bytes(b"a user's file")
    kept.add("notes")
    kept |= {temporary_name("j.png", dead), temporary_name("k.png", dead)}
    assert remove_stale(tmp_path) == len(stale)
    assert names(tmp_path) == kept
    assert (tmp_path / "notes").read_bytes() == b"a user's file"


def test_remove_stale_age_limit_is_exclusive(tmp_path, monkeypatch):
    """Another host's temporary exactly STALE_AGE old is kept, a second older goes."""
    other = other_host()
    young, old = temporary_name("a.png", 1, other), temporary_name("b.png", 1, other)
    now = 2_000_000_000
    for name, age in ((young, STALE_AGE), (old, STALE_AGE + 1)):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (now - age, now - age))
    monkeypatch.setattr(output.time, "time", lambda: float(now))
    assert remove_stale(tmp_path) == 1
    assert names(tmp_path) == {young}


def test_remove_stale_looks_at_a_folder_once(tmp_path, monkeypatch):
    """Once per process and folder (however it is spelled): a second look finds nothing
    to do, even when a stale temporary appeared since."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / temporary_name("a.png", dead_pid())).write_bytes(b"")
    assert remove_stale(Path("out")) == 1
    later = temporary_name("b.png", dead_pid())
    (tmp_path / "out" / later).write_bytes(b"")
    assert remove_stale(tmp_path / "out") == 0
    assert names(tmp_path / "out") == {later}
    assert remove_stale(tmp_path / "missing") == 0


def test_remove_stale_goes_on_past_a_temporary_removed_meanwhile(tmp_path, monkeypatch):
    """A temporary that vanishes while the folder is looked at (its writer finished) is
    skipped; the others are still looked at."""
    other = other_host()
    first = [temporary_name(f"{i}.png", 1, other) for i in range(3)]
    for name in first:
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (0, 0))
    found = output._temporaries

    def one_vanishes(folder):
        entries = sorted(found(folder), key=lambda pair: pair[0].name)
        os.unlink(entries[0][0].path)
        return entries
    monkeypatch.setattr(output, "_temporaries", one_vanishes)
    assert remove_stale(tmp_path) == 2
    assert names(tmp_path) == set()


# ------------------------------------------------------------------- remove_temporaries
def test_remove_temporaries_of_the_targets_only(tmp_path):
    """Every temporary of the given targets goes, in each target's folder, whatever its
    host or pid (its writer is known to be gone); others' temporaries and files stay."""
    a, b = tmp_path / "one" / "a.png", tmp_path / "two" / "b.json"
    for folder in (a.parent, b.parent):
        folder.mkdir()
    mine = {a.parent / temporary_name("a.png", os.getpid()),
            a.parent / temporary_name("a.png", 7, other_host()),
            b.parent / temporary_name("b.json", dead_pid())}
    others = {a.parent / temporary_name("b.json", 7), b.parent / temporary_name("a.png", 7),
              a.parent / "a.png", b.parent / temporary_name("c.json", 7)}
    for path in mine | others:
        path.write_bytes(b"")
    remove_temporaries([a, b, tmp_path / "missing" / "a.png"])
    assert {p for p in tmp_path.rglob("*") if p.is_file()} == others


# ------------------------------------------------------------------------------ publish
def test_publish_renames_and_names_the_target_when_it_cannot(tmp_path):
    """The rename is the write: content moves, the temporary is gone; a failure is one
    error naming the output file (not the temporary)."""
    temporary, target = tmp_path / ".x.tmp", tmp_path / "x.png"
    temporary.write_bytes(b"png")
    publish(temporary, target)
    assert target.read_bytes() == b"png" and names(tmp_path) == {"x.png"}
    with pytest.raises(OutputError) as error:
        publish(temporary, target)
    assert str(error.value) == f"{target}: cannot write: {os.strerror(errno.ENOENT)}"


# ------------------------------------------------------------------ image_format, encode
def test_image_format_follows_the_extension_in_any_case():
    assert [image_format(f"a/x{s.upper()}") for s in sorted(IMAGE_FORMATS)] == sorted(
        IMAGE_FORMATS)
    assert image_format(Path("x.Png")) == ".png"


@pytest.mark.parametrize(("name", "what"), [("x.gif", "unknown image format '.gif'"),
                                            ("dir.png/x", "no extension")])
def test_image_format_names_the_formats_it_knows(name, what):
    with pytest.raises(OutputError) as error:
        image_format(name)
    assert str(error.value) == (f"{name}: {what}; use one of "
                                ".bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp")


@pytest.mark.parametrize("suffix", sorted(IMAGE_FORMATS))
def test_each_image_format_decodes_back(suffix):
    """Every output format is that format (Pillow names it) and holds the picture:
    lossless ones exactly, JPEG within its quantisation."""
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 256, (3, 4, 3), np.uint8), 16, 0), 16, 1)
    decoded = Image.open(io.BytesIO(encode_image(f"x{suffix.upper()}", image)))
    kinds = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF",
             ".tiff": "TIFF", ".webp": "WEBP"}
    assert decoded.format == kinds[suffix]
    rgb = np.asarray(decoded.convert("RGB"))[:, :, ::-1]
    if kinds[suffix] == "JPEG":
        assert np.abs(rgb.astype(int) - image).mean() < 12
    else:
        assert np.array_equal(rgb, image)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a PNG file, each CRC checked (the PNG spec's layout)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == zlib.crc32(
            kind + body)
        chunks.append((kind, body))
        at += 12 + length
    return chunks


@pytest.mark.parametrize("shape", [(5, 7, 3), (6, 4)])
def test_png_output_is_cam_caffes_own_encoding(shape):
    """A .png output (any case of the extension) is encoded by cam-caffe's encoder, the
    one the README measures at a third of OpenCV's time: a plain 8-bit PNG, every row
    filtered with Sub, one IDAT, an empty IEND; unfiltered by hand it is the picture."""
    image = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
    chunks = png_chunks(encode_image("x.PNG", image))
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"] and chunks[2][1] == b""
    height, width = shape[:2]
    channels = 3 if len(shape) == 3 else 1
    assert chunks[0][1] == struct.pack(">IIBBBBB", width, height, 8, 2 if channels == 3 else 0,
                                       0, 0, 0)
    rows = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(height, -1)
    assert (rows[:, 0] == 1).all()                                 # filter type 1, Sub
    pixels = np.cumsum(rows[:, 1:].reshape(height, width, channels), axis=1, dtype=np.uint8)
    expected = image[:, :, ::-1] if channels == 3 else image[:, :, None]
    assert np.array_equal(pixels, expected)


def test_an_image_the_encoder_refuses_is_one_error():
    """JPEG holds at most 65,500 pixels a side: OutputError naming the file."""
    with pytest.raises(OutputError) as error:
        encode_image("tall.jpg", np.zeros((70000, 1, 3), np.uint8))
    assert str(error.value) == "tall.jpg: could not encode the image"


# ------------------------------------------------------------------------ check_writable
def test_check_writable_leaves_nothing_behind(tmp_path):
    """An existing folder, or a missing one below an existing ancestor: accepted, and
    nothing is created (no probe file, no folder)."""
    check_writable(tmp_path)
    check_writable(tmp_path / "a" / "b" / "c", tmp_path / "a" / "b" / "c" / "x.png")
    check_writable(Path("relative-that-does-not-exist") / "sub")
    assert names(tmp_path) == set()
    assert not Path("relative-that-does-not-exist").exists()


def test_check_writable_refuses_a_file_in_the_way(tmp_path):
    """A file where the folder (or one of its parents) should be: the error names the
    output and the file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(OutputError) as error:
        check_writable(blocker / "sub", blocker / "sub" / "o.png")
    assert str(error.value) == f"{blocker / 'sub' / 'o.png'}: cannot write: {blocker} is not a directory"
    with pytest.raises(OutputError) as error:
        check_writable(blocker)
    assert str(error.value) == f"{blocker}: cannot write: {blocker} is not a directory"


def test_check_writable_refuses_a_read_only_folder(open_folder):
    """A folder (or the existing ancestor of a missing one) the user cannot write in:
    the error names the output; nothing is left there."""
    locked = open_folder / "locked"
    locked.mkdir()
    check_writable(locked)
    locked.chmod(0o555)
    assert unprivileged(lambda: check_writable(locked / "new")) == (
        "OutputError", f"{locked / 'new'}: cannot write: Permission denied")
    target = locked / "o.png"
    assert unprivileged(lambda: check_writable(locked, target)) == (
        "OutputError", f"{target}: cannot write: Permission denied")
    assert names(locked) == set()


# ------------------------------------------------------------------------- OutputLedger
def make_files(folder: Path, *relative: str) -> list[Path]:
    paths = [folder / r for r in relative]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return paths


def lists(folder: Path) -> list[Path]:
    return sorted((folder / OutputLedger.DIRECTORY).glob("written-*.txt"))


def test_ledger_of_a_folder_is_one_per_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert OutputLedger.of(Path("out")) is OutputLedger.of(tmp_path / "out")
    assert OutputLedger.of(tmp_path / "out").folder == tmp_path / "out"
    assert OutputLedger.of(tmp_path / "other") is not OutputLedger.of(tmp_path / "out")


def test_ledger_lists_each_path_once_relative_to_its_folder(tmp_path):
    """What a ledger writes: one JSON string a line, each path relative to the folder,
    once however often it is recorded; nothing at all for nothing new."""
    ledger = OutputLedger(tmp_path)
    ledger.record([])
    assert not (tmp_path / OutputLedger.DIRECTORY).exists()
    ledger.record([tmp_path / "a.png", tmp_path / "sub" / "ü\n.json"])
    ledger.record([tmp_path / "a.png"])
    ledger.record([tmp_path / "sub" / "ü\n.json"])
    ledger.record([tmp_path / "b.png"])
    (listing,) = lists(tmp_path)
    assert listing.name.startswith("written-") and listing.name.endswith(".txt")
    lines = listing.read_bytes().decode().splitlines()
    assert [json.loads(line) for line in lines] == ["a.png", "sub/ü\n.json", "b.png"]


def test_ledger_of_a_folder_not_made_yet(tmp_path):
    """Outputs are recorded before they are written: the ledger makes the output folder
    (and its parents) for its list."""
    folder = tmp_path / "new" / "out"
    OutputLedger(folder).record([folder / "a.png"])
    (a,) = make_files(folder, "a.png")
    assert len(lists(folder)) == 1 and OutputLedger(folder).foreign([a]) == []


def test_ledger_knows_its_own_records_and_only_existing_files(tmp_path):
    """A ledger's own records count at once (without reading its list back); files
    that do not exist are never foreign; a dangling symlink at an output's name is."""
    ledger = OutputLedger(tmp_path)
    mine, theirs = make_files(tmp_path, "mine.png", "theirs.png")
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere")
    ledger.record([mine])
    shutil.rmtree(tmp_path / OutputLedger.DIRECTORY)
    assert ledger.foreign([mine, theirs, tmp_path / "missing.png", dangling]) == [theirs,
                                                                                dangling]
    assert ledger.foreign([tmp_path / "missing.png"]) == []


def test_ledger_reads_what_another_wrote_since_its_last_look(tmp_path):
    """Two ledgers of one folder (two shards): each sees the other's records as they
    are added, also after it looked once (a list read in part is read on from there)."""
    writer, reader = OutputLedger(tmp_path), OutputLedger(tmp_path)
    a, b, c = make_files(tmp_path, "a.png", "sub/b.png", "c.png")
    assert reader.foreign([a, b, c]) == [a, b, c]
    writer.record([a])
    assert reader.foreign([a, b, c]) == [b, c]
    writer.record([b])
    assert reader.foreign([a, b, c]) == [c]
    writer.record([c])
    assert reader.foreign([c, a]) == []


def test_ledger_reads_only_whole_lines(tmp_path):
    """A line being written (no newline yet) is not taken; once finished it is read
    whole. A damaged line is skipped, the lines after it are read."""
    a, b, c = make_files(tmp_path, "a.png", "b.png", "c.png")
    writer, reader = OutputLedger(tmp_path), OutputLedger(tmp_path)
    writer.record([a])
    (listing,) = lists(tmp_path)
    with open(listing, "ab") as f:
        f.write(b'"b.p')
    assert reader.foreign([a, b]) == [b]
    with open(listing, "ab") as f:
        f.write(b'ng"\nnot json\n\xff\xfe\n"c.png"\n')
    assert reader.foreign([a, b, c]) == []


def test_ledger_skips_a_list_it_cannot_read(tmp_path):
    """Something unreadable named like a list (a folder) does not stop the other lists
    from being read."""
    paths = make_files(tmp_path, *(f"{i}.png" for i in range(10)))
    for i, path in enumerate(paths):
        OutputLedger(tmp_path).record([path])
        (tmp_path / OutputLedger.DIRECTORY / f"written-{i}.txt").mkdir()
    assert OutputLedger(tmp_path).foreign(paths) == []


def test_ledger_starts_a_new_list_when_its_folder_was_removed(tmp_path):
    """`rm -rf out/.cam-caffe` during a run: the next records go to a new list that
    others can read; one list per writer otherwise."""
    a, b, c = make_files(tmp_path, "a.png", "b.png", "c.png")
    writer = OutputLedger(tmp_path)
    writer.record([a])
    writer.record([b])
    assert len(lists(tmp_path)) == 1
    shutil.rmtree(tmp_path / OutputLedger.DIRECTORY)
    writer.record([c])
    assert len(lists(tmp_path)) == 1
    assert OutputLedger(tmp_path).foreign([a, b, c]) == [a, b]


def test_ledger_that_cannot_write_its_list_is_one_error(tmp_path):
    """A file where the ledger's folder should be: OutputError naming that folder, and
    the path is not taken as recorded."""
    (tmp_path / OutputLedger.DIRECTORY).write_text("in the way")
    ledger = OutputLedger(tmp_path)
    (a,) = make_files(tmp_path, "a.png")
    with pytest.raises(OutputError) as error:
        ledger.record([a])
    assert str(error.value) == (f"{tmp_path / OutputLedger.DIRECTORY}: cannot write: "
                                f"{os.strerror(errno.EEXIST)}")
    assert ledger.foreign([a]) == [a]
