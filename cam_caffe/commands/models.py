"""``cam-caffe models``: list, download (checked) and locate the known CAM models.

    cam-caffe models list
    cam-caffe models download googlenet-cam [--base-url URL]
    cam-caffe models path googlenet-cam
"""
from __future__ import annotations

from pathlib import Path

from ..errors import EXIT_OK
from ..models import (
    BASE_URL_ENV,
    DEFAULT_MODEL,
    Model,
    cache_root,
    download,
    file_path,
    get,
    is_downloaded,
    list_models,
    model_path,
)
from .options import ArgumentParser


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="cam-caffe models",
                       description="List, download (checked) and locate known CAM models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("list", help="the known models, and whether they are downloaded")
    d = sub.add_parser("download", help="download a model's files and check them")
    d.add_argument("names", nargs="*", metavar="NAME",
                   help=f"models to download (default {DEFAULT_MODEL})")
    d.add_argument("--base-url", metavar="URL",
                   help=f"fetch the files from this folder by name (a mirror; default "
                        f"${BASE_URL_ENV} if set, else the official locations)")
    d.add_argument("--force", action="store_true", help="download files that are present again")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    path = sub.add_parser("path", help="print the prototxt, weights and labels paths")
    path.add_argument("name", metavar="NAME")
    return p


def _status(model: Model) -> str:
    present = is_downloaded(model.name)
    if model.local:
        return "local" if present else "missing"
    return "yes" if present else "no"


def checked(model: Model) -> str:
    """What a download of ``model`` checks: "verified" only against published checksums."""
    if model.local:
        return "structure checked (ships with cam-caffe)"
    unsummed = [kind for kind, file in model.files() if file.remote and file.sha256 is None]
    if unsummed:
        return f"structure checked (no published checksum for its {', '.join(unsummed)})"
    return "verified (published SHA-256) and structure checked"


def main(argv: list[str]) -> int:
    """``cam-caffe models COMMAND …``: the exit code."""
    parser = build_parser()
    if not argv:                                   # `cam-caffe models`: its own help
        parser.print_help()
        return EXIT_OK
    args = parser.parse_args(argv)
    if args.command == "list":
        entries = list_models()
        width = max(len(m.name) for m in entries) + 2
        print(f"{'NAME':<{width}}{'DOWNLOADED':<12}DESCRIPTION")
        for m in entries:
            name = m.name + ("*" if m.name == DEFAULT_MODEL else "")
            where = (cache_root() / m.name) if not m.local else file_path(m, m.weights).parent
            print(f"{name:<{width}}{_status(m):<12}{m.description}")
            print(f"{'':<{width + 12}}{where}")
        print("* default model; download one with: cam-caffe models download NAME")
        return EXIT_OK
    if args.command == "download":
        for name in args.names or [DEFAULT_MODEL]:
            prototxt, weights, labels = download(name, base_url=args.base_url,
                                                 progress=not args.quiet, force=args.force)
            print(f"{name}: {checked(get(name))}")
            _print_paths(prototxt, weights, labels)
        return EXIT_OK
    _print_paths(*model_path(args.name))
    return EXIT_OK


def _print_paths(prototxt: Path, weights: Path, labels: Path | None) -> None:
    print(f"prototxt: {prototxt}")
    print(f"weights:  {weights}")
    print(f"labels:   {labels if labels is not None else '(none)'}")
