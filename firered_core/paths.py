"""Names of files chosen from model folders, and walking those folders safely.

A model or LoRA *name* (what a ComfyUI list offers, or what a submitted workflow claims) is relative to one of the
configured folders: an absolute path, a ``..`` part or a NUL byte could read any file on the machine, so
:func:`find_in_folders`, the one look-up every loader input goes through (in ``VALIDATE_INPUTS`` and again when the
node runs), refuses them. The check is on the *name*, the part a workflow's author controls. Links that the folder's
owner placed inside a model folder are followed, as ComfyUI's own ``folder_paths.get_full_path`` does (v0.3.64):
linking model files in from another disk is the usual set-up, and whoever can place a link there can already read
the file it points to.
Folder walks follow symbolic links but remember the real folders they visited and stop at a depth limit, so a link
loop cannot make them run forever.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Iterator

from .errors import FireRedError

MAX_DEPTH = 8  # folders below a model root; a model folder is rarely more than 2-3 levels down


class UnsafeNameError(FireRedError):
    """A file name that would leave the configured folders."""


def check_relative_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it stays inside the folder it is looked up in; refuse absolute paths and ``..``."""
    if not name or "\x00" in name:
        raise UnsafeNameError(f"{what} {name!r} is empty or holds a NUL character")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise UnsafeNameError(f"{what} {name!r} is an absolute path; give a name relative to the model folders")
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafeNameError(f"{what} {name!r} leaves the model folders ('..' is not allowed)")
    return name


def find_in_folders(name: str, bases: Iterable[str | Path], what: str = "name", folder: bool = False) -> Path | None:
    """The file (``folder``: the directory) called ``name`` in the first of ``bases`` that has it, or None.

    ``name`` must be relative without ``..`` or NUL (:func:`check_relative_name`), so the path found is always
    ``base / name`` lexically inside ``base``; links placed in the folder are followed (module docstring)."""
    check_relative_name(name, what)
    for base in bases:
        path = Path(base) / name
        if not (path.is_dir() if folder else path.is_file()):
            continue
        return path
    return None


def walk_folders(base: str | Path, max_depth: int = MAX_DEPTH) -> Iterator[tuple[Path, list[str]]]:
    """(folder, file names) for ``base`` and its sub-folders, following links, each real folder once, at most
    ``max_depth`` levels down; unreadable folders are skipped."""
    seen: set[str] = set()
    stack = [(Path(base), 0)]
    while stack:
        folder, depth = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        files, subs = [], []
        for entry in entries:
            try:
                (subs if entry.is_dir() else files).append(entry.name)
            except OSError:
                continue
        yield folder, sorted(files)
        if depth < max_depth:
            stack += [(folder / name, depth + 1) for name in sorted(subs, reverse=True)]


def read_json(path: str | Path, error: type[FireRedError] = FireRedError, expect: type = dict):
    """The JSON object in ``path``; ``error`` naming the file, the line and column when it is unreadable, not JSON,
    or not an ``expect`` (a mapping by default)."""
    import json

    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot be read ({exc})") from None
    if not isinstance(value, expect):
        raise error(f"{path}: holds a JSON {type(value).__name__}, expected a {expect.__name__}")
    return value
