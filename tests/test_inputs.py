"""inputs.collect in this process: lists, stdin, folders, globs and output stems.

The command-line tests run these paths in child processes, where mutation
testing cannot see them; here each rule is checked on its own.
"""
from __future__ import annotations

import io
import os
from pathlib import Path, PurePath

import cv2
import numpy as np
import pytest

from cam_caffe import inputs
from cam_caffe.errors import EXIT_INPUT, CamError
from cam_caffe.inputs import STDIN_NAME, Input, collect, identity, in_shard, parse_shard


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def names(items: list[Input]) -> list[str]:
    return [str(item.stem) for item in items]


def gathered(specs: list[str], **kwargs) -> tuple[list[Input], list[str]]:
    problems: list[CamError] = []
    items = collect(specs, problems=problems, **kwargs)
    return items, [str(p) for p in problems]


def test_a_list_skips_blanks_and_comments_and_strips_each_line(tmp_path):
    touch(tmp_path / "a.png", tmp_path / "b.png")
    listing = tmp_path / "list.txt"
    listing.write_bytes(f"  {tmp_path / 'a.png'}  \r\n\n# {tmp_path / 'b.png'}\n   \n"
                        f"{tmp_path / 'b.png'}".encode())
    items, problems = gathered([f"@{listing}"])
    assert [item.path for item in items] == [tmp_path / "a.png", tmp_path / "b.png"]
    assert problems == []


def test_list_problems_name_the_list_and_line_and_the_rest_goes_on(tmp_path):
    touch(tmp_path / "a.png")
    inner = tmp_path / "inner.txt"
    inner.write_text(f"@{inner}\n")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"# first\nbad\0name.png\n-\n" + f"@{inner}\n{tmp_path / 'a.png'}\n"
                        .encode())
    items, problems = gathered([f"@{listing}"])
    assert [item.path for item in items] == [tmp_path / "a.png"]
    assert problems == [
        f"{listing}:2: the line contains a NUL byte, which no file name can",
        f"{listing}: '-' (stdin) inside a list",
        f"{inner}: list file includes itself"]
    with pytest.raises(CamError, match="NUL byte"):
        collect([f"@{listing}"])                    # without problems= the first is raised


def test_a_list_line_keeps_bytes_that_are_not_utf8(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")              # Latin-1 bytes, not UTF-8
    (tmp_path / name).write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_bytes(os.fsencode(str(tmp_path)) + b"/caf\xe9.png\n")
    items, _ = gathered([f"@{listing}"])
    assert [item.path for item in items] == [tmp_path / name]
    assert os.fsencode(str(items[0].path)).endswith(b"caf\xe9.png")


def test_stdin_names_a_list_or_brings_one_image(tmp_path):
    touch(tmp_path / "a.png", tmp_path / "b.png")
    text = f"{tmp_path / 'a.png'}\n{tmp_path / 'b.png'}\n"
    for stream in (io.StringIO(text), io.BytesIO(text.encode())):
        items, _ = gathered(["-"], stdin=stream)
        assert [item.path for item in items] == [tmp_path / "a.png", tmp_path / "b.png"]
        assert all(item.data is None for item in items)
    png = cv2.imencode(".png", np.zeros((4, 5, 3), np.uint8))[1].tobytes()
    items, _ = gathered(["-"], stdin=io.BytesIO(png))
    assert items == [Input(STDIN_NAME, PurePath("stdin"), png)]
    assert items[0].data == png


class Failing(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        raise OSError(5, "Input/output error")


def test_stdin_that_cannot_be_read(tmp_path, monkeypatch):
    _, problems = gathered(["-"], stdin=Failing())
    assert problems == ["stdin: cannot read: Input/output error"]
    monkeypatch.setattr(inputs.sys, "stdin", None)
    _, problems = gathered(["-"])
    assert problems == ["stdin: closed, so '-' has no inputs to read"]
    monkeypatch.setattr(inputs, "LIST_LIMIT", 8)
    _, problems = gathered(["-"], stdin=io.BytesIO(b"123456789"))
    assert problems == ["stdin: larger than 0 MiB, the limit for a list of inputs"]
    items, problems = gathered(["-"], stdin=io.BytesIO(b"12345678"))
    assert problems == [] and names(items) == ["12345678"]     # at the limit: read


def test_stems_are_unique_ignoring_case_and_each_file_comes_once(tmp_path):
    touch(tmp_path / "a" / "x.png", tmp_path / "b" / "X.png", tmp_path / "c" / "x.jpg",
          tmp_path / "x-2.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "a" / "x.png")
    items, _ = gathered([str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "X.png"),
                         str(tmp_path / "x-2.png"), str(tmp_path / "c" / "x.jpg"),
                         str(tmp_path / "link.png"), str(tmp_path / "a" / "x.png")])
    assert names(items) == ["x", "X-2", "x-2-2", "x-3"]


def test_a_folder_gives_images_with_their_relative_stems_and_skips_the_outputs(tmp_path):
    touch(tmp_path / "in" / "b" / "y.JPG", tmp_path / "in" / "a.png", tmp_path / "in" / "n.txt",
          tmp_path / "in" / "a.cam.png", tmp_path / "in" / "out" / "z.png")
    (tmp_path / "in" / "dir.png").mkdir()
    items, _ = gathered([str(tmp_path / "in")])
    assert names(items) == ["a.cam", "a", "b/y", "out/z"]
    # a folder holding the output folder: what is in it, and anything named like an
    # output, is left out
    items, _ = gathered([str(tmp_path / "in")], output_dir=tmp_path / "in" / "out")
    assert names(items) == ["a", "b/y"]
    items, _ = gathered([str(tmp_path / "in")], output_dir=tmp_path / "in")
    assert names(items) == ["a", "b/y", "out/z"]


def test_a_glob_gives_stems_below_its_fixed_part_and_a_literal_name_wins(tmp_path):
    touch(tmp_path / "p" / "q" / "1.png", tmp_path / "p" / "r" / "2.gif", tmp_path / "p" / "3.txt",
          tmp_path / "p" / "a[1].png")
    (tmp_path / "p" / "d.png").mkdir()
    items, _ = gathered([str(tmp_path / "p" / "**" / "*.*")])
    assert names(items) == ["a[1]", "q/1", "r/2"]
    items, _ = gathered([str(tmp_path / "p" / "a[1].png")])
    assert [item.path for item in items] == [tmp_path / "p" / "a[1].png"]


def test_a_missing_path_is_kept_for_the_loader_to_report(tmp_path):
    items, problems = gathered([str(tmp_path / "gone.jpg")])
    assert names(items) == ["gone"] and problems == []


def test_identity_resolves_links_and_stands_in_for_paths_that_cannot_resolve(tmp_path):
    touch(tmp_path / "a.png")
    (tmp_path / "l.png").symlink_to(tmp_path / "a.png")
    assert identity(tmp_path / "l.png") == (tmp_path / "a.png").resolve()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert identity(tmp_path / "loop" / "x") == Path(os.path.abspath(tmp_path / "loop" / "x"))
    assert identity(Path("a\0b")) == Path(os.path.abspath("a\0b"))


def test_shards(tmp_path):
    assert parse_shard("0/1") == (0, 1) and parse_shard("2/3") == (2, 3)
    with pytest.raises(CamError, match=r"^--shard 'x': expected I/N, e\.g\. 0/4$"):
        parse_shard("x")
    with pytest.raises(CamError, match=r"^--shard '3/3': need 0 <= I < N$"):
        parse_shard("3/3")
    with pytest.raises(CamError, match=r"^--shard '0/0': need 0 <= I < N$"):
        parse_shard("0/0")
    item = Input(tmp_path / "a" / "x.png", PurePath("a/x"))
    moved = Input(Path("/elsewhere/a/x.png"), PurePath("a/x"))
    assert [in_shard(item, (k, 5)) for k in range(5)] == [in_shard(moved, (k, 5))
                                                          for k in range(5)]
    assert sum(in_shard(item, (k, 5)) for k in range(5)) == 1


def test_problems_are_input_errors_that_say_what_failed(tmp_path, monkeypatch):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"bad\0name.png\n-\n")
    problems: list[CamError] = []
    collect([f"@{listing}", f"@{tmp_path / 'none.txt'}", str(tmp_path / ("x" * 5000))],
            problems=problems)
    assert [p.exit_code for i, p in enumerate(problems) if i != 2] == [EXIT_INPUT] * 3
    assert str(problems[2]).startswith(f"{tmp_path / 'none.txt'}: list file")
    assert str(problems[3]).startswith(f"{tmp_path}/xxx")       # (the name shortened)
    assert str(problems[3]).endswith(": cannot list: File name too long")
    for stream in (Failing(), io.BytesIO(b"1" * 9)):
        monkeypatch.setattr(inputs, "LIST_LIMIT", 8)
        stdin_problems: list[CamError] = []
        collect(["-"], stdin=stream, problems=stdin_problems)
        assert [p.exit_code for p in stdin_problems] == [EXIT_INPUT]


def test_stdin_is_read_as_bytes_and_defaults_to_the_process_stdin(tmp_path, monkeypatch):
    png = cv2.imencode(".png", np.zeros((4, 5, 3), np.uint8))[1].tobytes()
    text = io.TextIOWrapper(io.BytesIO(png), encoding="utf-8")   # a terminal's sys.stdin
    assert collect(["-"], stdin=text) == [Input(STDIN_NAME, PurePath("stdin"), png)]
    touch(tmp_path / "a.png")
    monkeypatch.setattr(inputs.sys, "stdin", io.StringIO(f"{tmp_path / 'a.png'}\n"))
    assert [item.path for item in collect(["-"])] == [tmp_path / "a.png"]


def test_each_stem_counts_its_own_duplicates(tmp_path):
    touch(tmp_path / "1" / "a.png", tmp_path / "2" / "a.png", tmp_path / "1" / "b.png")
    items = collect([str(tmp_path / "1" / "a.png"), str(tmp_path / "2" / "a.png"),
                     str(tmp_path / "1" / "b.png")])
    assert names(items) == ["a", "a-2", "b"]


class Endless(io.RawIOBase):
    """A stdin that never ends (``yes |``), counting the bytes it gave."""

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.given > 1000:          # a reader that wants everything would never stop
            raise OSError(27, "File too large")
        buffer[:] = b"1" * len(buffer)
        self.given += len(buffer)
        return len(buffer)


def test_an_endless_stdin_is_read_one_byte_past_the_limit_only(monkeypatch):
    monkeypatch.setattr(inputs, "LIST_LIMIT", 8)
    stream = Endless()
    _, problems = gathered(["-"], stdin=stream)
    assert problems == ["stdin: larger than 0 MiB, the limit for a list of inputs"]
    assert stream.given == 9


def test_a_closed_stdin_and_a_spec_that_cannot_be_listed_are_input_problems(monkeypatch):
    monkeypatch.setattr(inputs.sys, "stdin", None)
    problems: list[CamError] = []
    # a NUL byte in a folder of a pattern (from the API: argv cannot hold one):
    # glob raises ValueError, which has no strerror
    collect(["-", "a\0b/*.png"], problems=problems)
    assert [(str(p), p.exit_code) for p in problems] == [
        ("stdin: closed, so '-' has no inputs to read", EXIT_INPUT),
        ("a\\x00b/*.png: cannot list: embedded null byte", EXIT_INPUT)]


def test_problems_of_a_list_on_stdin_name_stdin_and_the_line():
    _, problems = gathered(["-"], stdin=io.BytesIO(b"a.png\nbad\0name.png\n-\n"))
    assert problems == ["stdin:2: the line contains a NUL byte, which no file name can",
                        "stdin: '-' (stdin) inside a list"]


def test_an_image_on_stdin_is_not_a_file_named_dash(tmp_path, monkeypatch):
    png = cv2.imencode(".png", np.zeros((4, 5, 3), np.uint8))[1].tobytes()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").write_bytes(png)               # a file really named "-", given as ./-
    items = collect(["-", "./-"], stdin=io.BytesIO(png))
    assert items == [Input(STDIN_NAME, PurePath("stdin"), png),
                     Input(Path("-"), PurePath("-"), None)]


def test_stems_that_differ_only_in_upper_case_letters_keep_their_own_count(tmp_path):
    # "ß".upper() is "SS": the count of "ß" must not move "ss" on
    touch(tmp_path / "1" / "ß.png", tmp_path / "2" / "ß.png", tmp_path / "ss.png")
    items = collect([str(tmp_path / "1" / "ß.png"), str(tmp_path / "2" / "ß.png"),
                     str(tmp_path / "ss.png")])
    assert names(items) == ["ß", "ß-2", "ss"]
