"""Names of files chosen from model folders, and walking those folders safely.

A model or LoRA *name* (what a ComfyUI list offers) is relative to one of the configured folders: an absolute path,
a ``..`` part, a NUL byte or a link inside the folder that points out of it could read any file on the machine, so
:func:`find_in_folders`, the one look-up every loader input goes through (in ``VALIDATE_INPUTS`` and again when the
node runs), refuses them. Link a whole model folder in (the configured folder itself may be a link), or add the
other place to ComfyUI's ``extra_model_paths.yaml``.
Folder walks follow symbolic links (model folders are often linked in) but remember the real folders they visited
and stop at a depth limit, so a link loop cannot make them run forever.
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


def _inside(path: Path, base: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(base)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def find_in_folders(name: str, bases: Iterable[str | Path], what: str = "name", folder: bool = False) -> Path | None:
    """The file (``folder``: the directory) called ``name`` in the first of ``bases`` that has it, or None.

    ``name`` must be relative without ``..`` or NUL (:func:`check_relative_name`), and what it names must really lie
    inside its base: a link that leads out of the folder is refused (:class:`UnsafeNameError`), not followed."""
    check_relative_name(name, what)
    for base in bases:
        path = Path(base) / name
        if not (path.is_dir() if folder else path.is_file()):
            continue
        if not _inside(path, Path(base)):
            raise UnsafeNameError(f"{what} {name!r} is a link that leads out of the model folder {base} (to "
                                  f"{os.path.realpath(path)}); put the file itself there or link the whole folder")
        return path
    return None


def walk_folders(base: str | Path, max_depth: int = MAX_DEPTH) -> Iterator[tuple[Path, list[str]]]:
    """(folder, file names) for ``base`` and its sub-folders, following links, each real folder once, at most
    ``max_depth`` levels down; unreadable folders are skipped. Links that lead out of ``base`` are left out, as
    :func:`find_in_folders` refuses them: a list never offers a name its loader will refuse."""
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
                if entry.is_symlink() and not _inside(Path(entry.path), Path(base)):
                    continue
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
