"""Reading a secret from where the config points: a file or an environment variable.

A secret file is read only if it is a small regular file: a FIFO would block the read
forever and ``/dev/zero`` would fill the memory, so the path is stat-ed before it is opened,
opened non-blocking (a FIFO swapped in after the stat cannot hang us either) and checked
again on the open descriptor. A secret is one line of text: one trailing newline (what
``echo`` and editors add) is dropped, anything else that is a line break or a control
character is refused, because it would end up inside an HTTP header. Errors name the config
key and the file or variable, never the value.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

from harvester.errors import ConfigError
from harvester.logs import get_logger

log = get_logger("harvester.secrets")

#: far more than any key, token or password; a bigger "secret" is the wrong file
MAX_SECRET_BYTES = 64 << 10
_warned: set[tuple[Path, int]] = set()


def secret_from_env(key: str, env: str) -> str:
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"{key}: environment variable {env} is not set")
    return _one_line(value.strip(), f"{key}: environment variable {env}")


def secret_from_file(key: str, path: Path) -> str:
    where = f"{key}: secret file {path}"
    try:
        _check_regular(path.stat().st_mode, where)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read secret file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        _check_regular(st.st_mode, where)  # replaced between the stat and the open
        if st.st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"{where} is {st.st_size} bytes; a secret may have 64 KiB at most")
        data = _read_at_most(fd, MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read secret file {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(f"{where} grew past 64 KiB while being read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # No cause: a UnicodeDecodeError holds the bytes it failed on (``.object``), here the
        # secret itself, for any traceback renderer that shows attributes.
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start})") from None
    value = _one_line(_drop_one_newline(text).strip(" "), where)
    _warn_if_shared(st, key, path)
    return value


def _check_regular(mode: int, where: str) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "not a file")
    raise ConfigError(f"{where} is not a regular file ({kind})")


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _drop_one_newline(text: str) -> str:
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            return text[: -len(ending)]
    return text


def _one_line(value: str, where: str) -> str:
    if not value:
        raise ConfigError(f"{where} is empty")
    for ch in value:
        category = unicodedata.category(ch)
        if ch in "\r\n" or category in ("Zl", "Zp"):
            raise ConfigError(
                f"{where} holds more than one line; a secret is one line"
                " (only a single trailing newline is dropped)"
            )
        if category == "Cc":
            raise ConfigError(f"{where} contains a control character (U+{ord(ch):04X})")
    return value


def _warn_if_shared(st: os.stat_result, key: str, path: Path) -> None:
    """Everyone may read it, or a group this process is not in. A file readable by our own
    group is not shared: that is how Kubernetes mounts a Secret for a non-root pod (owner
    root, group fsGroup = the pod's group, mode 0440)."""
    mode = st.st_mode
    own_group = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    shared = mode & stat.S_IROTH or (mode & stat.S_IRGRP and not own_group)
    if not shared or (path, mode) in _warned:
        return
    _warned.add((path, mode))
    log.warning(
        "secret file is readable by another group or by everyone; chmod 600 it",
        config_key=key,
        file=str(path),
        mode=f"{stat.S_IMODE(mode):04o}",
    )
