"""Copy an MMF checkout to a place it can be installed from (``install.sh mmf-main PATH`` when PATH is read-only),
restoring the git symlinks an export wrote as plain files.

MMF's repository links shared configs (``projects/hateful_memes/configs/concat_bert/defaults.yaml`` ->
``../../../others/concat_bert/hateful_memes/defaults.yaml``, ``mmf/projects`` -> ``../projects``). A checkout or
archive made without symlink support (git's ``core.symlinks=false``) holds each as a one-line file with the
target's path, which MMF would then read as a config. Such a file is a link when its whole content is a relative
path, without a line end, to something that exists.

    python -m deqfusion_adapters.mmf.checkout SRC DST      # prints the links it restored
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

__all__ = ["copy_checkout", "flattened_links"]


def flattened_links(root: str | os.PathLike) -> dict[Path, str]:
    """Files under ``root`` that are git symlinks written as files: {file: its target}."""
    out = {}
    for path in Path(root).rglob("*"):
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 400:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if text and "\n" not in text and " " not in text and not text.startswith("/") \
                and (path.parent / text).exists():
            out[path] = text
    return out


def copy_checkout(src: str | os.PathLike, dst: str | os.PathLike) -> dict[Path, str]:
    """Copy ``src`` to ``dst`` (replacing it), writable, without ``.git``, with its flattened links restored.
    Returns the restored links."""
    src, dst = Path(src).resolve(), Path(dst)
    if not (src / "mmf" / "version.py").is_file():
        raise FileNotFoundError(f"{src} has no mmf/version.py: not an MMF checkout")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info"),
                    copy_function=shutil.copy)
    for path in [dst, *dst.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)
    links = flattened_links(dst)
    for path, target in links.items():
        path.unlink()
        path.symlink_to(target)
    return links


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m deqfusion_adapters.mmf.checkout SRC DST")
    for path, target in copy_checkout(sys.argv[1], sys.argv[2]).items():
        print(f"{path} -> {target}")
