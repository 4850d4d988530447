"""Files inside a folder the studio does not own: a run folder under --runs, or a data
root. Other people may write there (a shared filesystem, a run folder copied from
someone), so reads are checked to stay inside the folder after every link is followed,
writes never follow a link, and `links_leading_out` finds what a trainer would follow.

Checks compare real paths (`os.path.realpath`) and, on Linux, also the path of the file
actually opened (`/proc/self/fd/N`), so a link swapped in after the check is caught too.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

CHECK_LIMIT = 200_000  # most entries `links_leading_out` looks at before giving up
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class OutsideRoot(OSError):
  """A path that leads out of its folder (through a link), or is not a plain file."""

  def __init__(self, message: str):
    super().__init__(errno.EACCES, message)

  def __str__(self) -> str:
    return self.strerror


class TooManyFiles(ValueError):
  """A folder too large to check entry by entry."""


def inside(path: str, root: str) -> bool:
  """Whether real path `path` is `root` or lies below it (both real paths)."""
  try:
    return os.path.commonpath([path, root]) == root
  except ValueError:  # one relative, one absolute: never inside
    return False


def resolve(root: str, rel: str) -> str | None:
  """The real path of `rel` under folder `root`, or None when it leads out of `root`."""
  real_root = os.path.realpath(root)
  path = os.path.realpath(os.path.join(real_root, rel))
  return path if inside(path, real_root) else None


def _opened_path(fd: int) -> str | None:
  """Where descriptor `fd` really points (None without /proc: the realpath check
  stands alone)."""
  try:
    return os.readlink(f"/proc/self/fd/{fd}")
  except OSError:
    return None


def _check_opened(fd: int, real_root: str, rel: str, *, directory: bool = False) -> None:
  st = os.fstat(fd)
  if not (stat.S_ISDIR if directory else stat.S_ISREG)(st.st_mode):
    # a FIFO or device would block or stream forever
    raise OutsideRoot(f"{rel}: not a plain {'folder' if directory else 'file'}")
  opened = _opened_path(fd)
  if opened is not None and not inside(opened, real_root):
    raise OutsideRoot(f"{rel} leads outside its folder")


def open_read(root: str, rel: str):
  """`rel` under `root`, opened for binary reading; OutsideRoot (an OSError) when it
  leads out of `root` or is not a plain file, FileNotFoundError when it is missing."""
  real_root = os.path.realpath(root)
  path = resolve(real_root, rel)
  if path is None:
    raise OutsideRoot(f"{rel} leads outside its folder")
  # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just after)
  fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK)
  try:
    _check_opened(fd, real_root, rel)
  except BaseException:
    os.close(fd)
    raise
  return os.fdopen(fd, "rb")


def read_bytes(root: str, rel: str, offset: int = 0, limit: int | None = None) -> bytes:
  """The bytes of `rel` under `root` from byte `offset`, at most `limit` of them (None:
  to the end); OSError as open_read."""
  with open_read(root, rel) as f:
    f.seek(offset)
    return f.read(-1 if limit is None else limit)


def identity(root: str, rel: str) -> tuple[int, int, int] | None:
  """(device, inode, size) of `rel` under `root`, or None when it cannot be opened: a
  reader that follows a file by offset sees it replaced (a new inode) or cut."""
  try:
    with open_read(root, rel) as f:
      st = os.fstat(f.fileno())
  except OSError:
    return None
  return st.st_dev, st.st_ino, st.st_size


def tail_bytes(root: str, rel: str, n: int) -> bytes:
  """The last `n` bytes of `rel` under `root` (OSError as open_read)."""
  with open_read(root, rel) as f:
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - n))
    return f.read(n)


def entries(root: str, rel: str) -> list[tuple[str, bool]]:
  """(name, is a folder) of each entry of folder `rel` under `root`, links not followed
  (a link is never a folder here); [] when it is missing or leads out of `root`."""
  real_root = os.path.realpath(root)
  path = resolve(real_root, rel)
  if path is None:
    return []
  try:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC)
  except OSError:
    return []
  try:
    _check_opened(fd, real_root, rel, directory=True)
    out = []
    for name in os.listdir(fd):
      try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
      except OSError:
        continue
      out.append((name, stat.S_ISDIR(st.st_mode)))
    return out
  except OSError:
    return []
  finally:
    os.close(fd)


def _open_folder(root: str) -> int:
  """Real folder `root` as a descriptor, checked to be that folder (not a link swapped
  in since its path was resolved)."""
  real_root = os.path.realpath(root)
  fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC)
  opened = _opened_path(fd)
  if opened is not None and opened != real_root:
    os.close(fd)
    raise OutsideRoot(f"{root} was replaced while it was opened")
  return fd


def write_file(root: str, name: str, data: bytes) -> None:
  """Replace file `name` directly in folder `root` with `data`: written to a fresh file
  (O_EXCL: never an existing file or link) and renamed over `name`, which replaces a
  link itself, not what it points to."""
  if os.sep in name or name in ("", ".", ".."):
    raise ValueError(f"{name!r} is not a file name")
  dfd = _open_folder(root)
  tmp = f".{name}.{secrets.token_hex(6)}.tmp"
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644,
                 dir_fd=dfd)
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
      with contextlib.suppress(OSError):  # the rename may have taken it
        os.unlink(tmp, dir_fd=dfd)
      raise
  finally:
    os.close(dfd)


def open_append(root: str, name: str) -> int:
  """A descriptor appending to file `name` directly in folder `root` (created when
  missing); OutsideRoot when `name` is a link or not a plain file."""
  if os.sep in name or name in ("", ".", ".."):
    raise ValueError(f"{name!r} is not a file name")
  dfd = _open_folder(root)
  try:
    try:
      fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC
                   | os.O_NONBLOCK, 0o644, dir_fd=dfd)
    except OSError as e:
      if e.errno == errno.ELOOP:  # O_NOFOLLOW's answer for a link
        raise OutsideRoot(f"{name} is a link") from None
      raise
    try:
      _check_opened(fd, os.path.realpath(root), name)
      os.set_blocking(fd, True)
    except BaseException:
      os.close(fd)
      raise
    return fd
  finally:
    os.close(dfd)


def links_leading_out(top: str, roots: list[str], *, skip_hidden: bool = False,
                      limit: int = CHECK_LIMIT) -> str | None:
  """The first entry below folder `top` (a path relative to it) that is a link resolving
  outside every folder of `roots` (real paths), or None. Folders are walked without
  following links, as the trainer's data reader and its checkpoints do. `skip_hidden`:
  leave out names starting with '.' (the data reader skips them). TooManyFiles past
  `limit` entries."""
  seen = 0
  for dirpath, dirnames, filenames in os.walk(top):
    if skip_hidden:
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      filenames = [f for f in filenames if not f.startswith(".")]
    for name in (*dirnames, *filenames):
      seen += 1
      if seen > limit:
        raise TooManyFiles(f"{top} holds over {limit} files and folders")
      path = os.path.join(dirpath, name)
      if os.path.islink(path):
        real = os.path.realpath(path)
        if not any(inside(real, r) for r in roots):
          return os.path.relpath(path, top)
  return None

