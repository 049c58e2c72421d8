"""The one deterministic function that applies a namespace record to the replica.

`apply(view, record)` checks the record against the replica first and raises `NamespaceError`
with the errno ext4 would give before it writes anything, so a refused record changes nothing.
Everything it needs comes from the record and the replica — no clock, no node-local state — so
every member that applies the same records in the same order holds the same namespace.

Link counts follow ext4: a directory has 2 + its subdirectories, a file one per name. An inode
whose count drops to 0 becomes an orphan; it is deleted by a later `Purge` record once no open
handle needs it (decided by the node layer, which knows about handles).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clusterfs import records as r
from clusterfs.store import Dentry, Inode, View

ROOT_INO = 1
FIRST_INO = 2
NAME_MAX_BYTES = 255
XATTR_NAME_MAX_BYTES = 255
XATTR_VALUE_MAX_BYTES = 65536
DISK_STATE_MAX_BYTES = 1 << 20
DIR_SIZE_BYTES = 4096
_MAX_DEPTH = 1 << 16  # a parent chain longer than this is a corrupt replica, not a tree

XATTR_CREATE = getattr(os, "XATTR_CREATE", 1)
XATTR_REPLACE = getattr(os, "XATTR_REPLACE", 2)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class NamespaceError(Exception):
    """A change or a lookup refused with an errno."""

    def __init__(self, errno_: int, detail: str = "") -> None:
        super().__init__(errno_, detail or os.strerror(errno_))
        self.errno = errno_


@dataclass
class Applied:
    """What a record did, for the node layer: new inode, orphans, deleted inodes, caches."""

    ino: int = 0
    orphaned: list[int] = field(default_factory=list)
    purged: list[Inode] = field(default_factory=list)
    changed_inodes: list[int] = field(default_factory=list)
    changed_entries: list[tuple[int, bytes]] = field(default_factory=list)


def initialise(view: View, uid: int, gid: int, now_ns: int) -> None:
    """Create the root directory of a new replica (once, when a cluster is founded)."""
    if view.get_inode(ROOT_INO) is None:
        root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, uid, gid, 2, 0, DIR_SIZE_BYTES, ROOT_INO,
                     now_ns, now_ns, now_ns)
        view.put_inode(root)
        view.set_counter(b"next_ino", FIRST_INO)


def apply(view: View, record: r.Record) -> Applied:
    return _HANDLERS[type(record)](view, record)


# -- checks shared by the handlers ----------------------------------------------------------

def _inode(view: View, ino: int) -> Inode:
    inode = view.get_inode(ino)
    if inode is None:
        raise NamespaceError(errno.ENOENT)
    return inode


def _directory(view: View, ino: int) -> Inode:
    inode = _inode(view, ino)
    if not stat.S_ISDIR(inode.mode):
        raise NamespaceError(errno.ENOTDIR)
    if inode.nlink == 0:
        raise NamespaceError(errno.ENOENT, "directory was removed")
    return inode


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX_BYTES:
        raise NamespaceError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise NamespaceError(errno.EINVAL, "invalid file name")


def _entry(view: View, parent: int, name: bytes) -> Dentry:
    entry = view.lookup(parent, name)
    if entry is None:
        raise NamespaceError(errno.ENOENT)
    return entry


def _free_name(view: View, parent: int, name: bytes) -> None:
    check_name(name)
    if view.lookup(parent, name) is not None:
        raise NamespaceError(errno.EEXIST)


def _touch(inode: Inode, now_ns: int) -> None:
    inode.mtime_ns = inode.ctime_ns = now_ns


def _is_within(view: View, ino: int, ancestor: int) -> bool:
    """True if directory `ino` is `ancestor` or lies below it."""
    for _ in range(_MAX_DEPTH):
        if ino == ancestor:
            return True
        if ino == ROOT_INO:
            return False
        ino = _inode(view, ino).parent
    raise NamespaceError(errno.EIO, "directory parent chain does not reach the root")


def _unlink_inode(view: View, inode: Inode, now_ns: int, done: Applied) -> None:
    """Drop one name of `inode` (all of them for a directory) and orphan it at nlink 0."""
    inode.nlink = 0 if stat.S_ISDIR(inode.mode) else inode.nlink - 1
    inode.ctime_ns = now_ns
    if inode.nlink == 0:
        view.add_orphan(inode.ino)
        done.orphaned.append(inode.ino)
    done.changed_inodes.append(inode.ino)


# -- creating -------------------------------------------------------------------------------

def _add_child(view: View, parent: Inode, name: bytes, child: Inode) -> Applied:
    view.put_inode(child)
    view.put_dentry(parent.ino, name, child.ino)
    _touch(parent, child.ctime_ns)
    view.put_inode(parent)
    return Applied(ino=child.ino, changed_inodes=[parent.ino],
                   changed_entries=[(parent.ino, name)])


def _new_ino(view: View) -> int:
    return view.next_counter(b"next_ino", FIRST_INO)


def _make_node(view: View, rec: r.MakeNode) -> Applied:
    parent = _directory(view, rec.parent)
    _free_name(view, rec.parent, rec.name)
    if stat.S_ISDIR(rec.mode) or stat.S_ISLNK(rec.mode):
        raise NamespaceError(errno.EINVAL, "use MakeDir or MakeSymlink")
    now = rec.now_ns
    child = Inode(_new_ino(view), rec.mode, rec.uid, rec.gid, 1, rec.rdev, 0, 0, now, now, now)
    return _add_child(view, parent, rec.name, child)


def _make_dir(view: View, rec: r.MakeDir) -> Applied:
    parent = _directory(view, rec.parent)
    _free_name(view, rec.parent, rec.name)
    now = rec.now_ns
    mode = stat.S_IFDIR | stat.S_IMODE(rec.mode)
    child = Inode(_new_ino(view), mode, rec.uid, rec.gid, 2, 0, DIR_SIZE_BYTES, parent.ino,
                  now, now, now)
    parent.nlink += 1
    return _add_child(view, parent, rec.name, child)


def _make_symlink(view: View, rec: r.MakeSymlink) -> Applied:
    parent = _directory(view, rec.parent)
    _free_name(view, rec.parent, rec.name)
    if not rec.target or len(rec.target) > 4095 or b"\0" in rec.target:
        raise NamespaceError(errno.ENAMETOOLONG if rec.target else errno.ENOENT)
    now = rec.now_ns
    child = Inode(_new_ino(view), stat.S_IFLNK | 0o777, rec.uid, rec.gid, 1, 0,
                  len(rec.target), 0, now, now, now)
    view.put_symlink(child.ino, rec.target)
    return _add_child(view, parent, rec.name, child)


def _link(view: View, rec: r.Link) -> Applied:
    parent = _directory(view, rec.parent)
    _free_name(view, rec.parent, rec.name)  # first, as the kernel checks the new name first
    inode = _inode(view, rec.ino)
    if stat.S_ISDIR(inode.mode):
        raise NamespaceError(errno.EPERM)
    if inode.nlink == 0:
        raise NamespaceError(errno.ENOENT, "file was removed")
    inode.nlink += 1
    inode.ctime_ns = rec.now_ns
    done = _add_child(view, parent, rec.name, inode)
    done.changed_inodes.append(inode.ino)
    return done


# -- removing -------------------------------------------------------------------------------

def _remove_entry(view: View, parent: Inode, entry: Dentry, child: Inode, now_ns: int) -> Applied:
    done = Applied(ino=child.ino, changed_inodes=[parent.ino],
                   changed_entries=[(parent.ino, entry.name)])
    view.delete_dentry(parent.ino, entry)
    if stat.S_ISDIR(child.mode):
        parent.nlink -= 1
    _unlink_inode(view, child, now_ns, done)
    view.put_inode(child)
    _touch(parent, now_ns)
    view.put_inode(parent)
    return done


def _unlink(view: View, rec: r.Unlink) -> Applied:
    parent = _directory(view, rec.parent)
    entry = _entry(view, rec.parent, rec.name)
    child = _inode(view, entry.ino)
    if stat.S_ISDIR(child.mode):
        raise NamespaceError(errno.EISDIR)
    return _remove_entry(view, parent, entry, child, rec.now_ns)


def _remove_dir(view: View, rec: r.RemoveDir) -> Applied:
    parent = _directory(view, rec.parent)
    entry = _entry(view, rec.parent, rec.name)
    child = _inode(view, entry.ino)
    if not stat.S_ISDIR(child.mode):
        raise NamespaceError(errno.ENOTDIR)
    if not view.dir_is_empty(child.ino):
        raise NamespaceError(errno.ENOTEMPTY)
    return _remove_entry(view, parent, entry, child, rec.now_ns)


def _purge(view: View, rec: r.Purge) -> Applied:
    inode = view.get_inode(rec.ino)
    if inode is None or inode.nlink != 0:
        return Applied(ino=rec.ino)  # already gone, or linked again: nothing to do
    view.delete_inode(rec.ino)
    return Applied(ino=rec.ino, purged=[inode], changed_inodes=[rec.ino])


# -- metadata -------------------------------------------------------------------------------

def _set_attr(view: View, rec: r.SetAttr) -> Applied:
    inode = _inode(view, rec.ino)
    if rec.mode is not None:
        inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(rec.mode)
    if rec.uid is not None:
        inode.uid = rec.uid
    if rec.gid is not None:
        inode.gid = rec.gid
    if rec.size_bytes is not None:
        if stat.S_ISDIR(inode.mode):
            raise NamespaceError(errno.EISDIR)
        inode.size_bytes = rec.size_bytes
    if rec.atime_ns is not None:
        inode.atime_ns = rec.atime_ns
    if rec.mtime_ns is not None:
        inode.mtime_ns = rec.mtime_ns
    inode.ctime_ns = rec.now_ns
    view.put_inode(inode)
    return Applied(ino=inode.ino, changed_inodes=[inode.ino])


def _set_xattr(view: View, rec: r.SetXattr) -> Applied:
    inode = _inode(view, rec.ino)
    if not rec.name or len(rec.name) > XATTR_NAME_MAX_BYTES:
        raise NamespaceError(errno.ERANGE)
    if len(rec.value) > XATTR_VALUE_MAX_BYTES:
        raise NamespaceError(errno.E2BIG)
    exists = view.get_xattr(rec.ino, rec.name) is not None
    if exists and rec.flags & XATTR_CREATE:
        raise NamespaceError(errno.EEXIST)
    if not exists and rec.flags & XATTR_REPLACE:
        raise NamespaceError(errno.ENODATA)
    view.set_xattr(rec.ino, rec.name, rec.value)
    inode.ctime_ns = rec.now_ns
    view.put_inode(inode)
    return Applied(ino=inode.ino, changed_inodes=[inode.ino])


def _remove_xattr(view: View, rec: r.RemoveXattr) -> Applied:
    inode = _inode(view, rec.ino)
    if view.get_xattr(rec.ino, rec.name) is None:
        raise NamespaceError(errno.ENODATA)
    view.delete_xattr(rec.ino, rec.name)
    inode.ctime_ns = rec.now_ns
    view.put_inode(inode)
    return Applied(ino=inode.ino, changed_inodes=[inode.ino])


def _set_disk_state(view: View, rec: r.SetDiskState) -> Applied:
    inode = _inode(view, rec.ino)
    if not stat.S_ISREG(inode.mode):
        raise NamespaceError(errno.EINVAL, "only a regular file can be a shared disk")
    if len(rec.state) > DISK_STATE_MAX_BYTES:
        raise NamespaceError(errno.E2BIG)
    if view.get_disk_state(rec.ino) != rec.expected:
        raise NamespaceError(errno.EAGAIN, "the disk's state changed meanwhile")
    view.put_disk_state(rec.ino, rec.state)
    return Applied(ino=inode.ino)


# -- rename ---------------------------------------------------------------------------------

def _rename(view: View, rec: r.Rename) -> Applied:
    old_parent = _directory(view, rec.parent_old)
    new_parent = old_parent if rec.parent_new == rec.parent_old else _directory(
        view, rec.parent_new)
    check_name(rec.name_new)
    src = _entry(view, rec.parent_old, rec.name_old)
    dst = view.lookup(rec.parent_new, rec.name_new)
    if rec.flags & RENAME_EXCHANGE:
        if dst is None:
            raise NamespaceError(errno.ENOENT)
        return _exchange(view, rec, old_parent, new_parent, src, dst)
    if dst is not None and rec.flags & RENAME_NOREPLACE:
        raise NamespaceError(errno.EEXIST)
    # The checks in the order the kernel makes them, so the errno is the same as on ext4.
    moved = _inode(view, src.ino)
    if stat.S_ISDIR(moved.mode) and _is_within(view, new_parent.ino, moved.ino):
        raise NamespaceError(errno.EINVAL, "cannot move a directory into itself")
    target = None if dst is None else _inode(view, dst.ino)
    if target is not None and stat.S_ISDIR(target.mode) and \
            _is_within(view, old_parent.ino, target.ino):
        raise NamespaceError(errno.ENOTEMPTY, "target contains the source")
    if dst is not None and dst.ino == src.ino:
        return Applied(ino=src.ino)  # two names of one inode: POSIX says do nothing
    _check_replace(view, moved, target)
    done = Applied(ino=moved.ino, changed_inodes=[moved.ino, old_parent.ino, new_parent.ino],
                   changed_entries=[(old_parent.ino, rec.name_old), (new_parent.ino, rec.name_new)])
    if dst is not None and target is not None:
        view.delete_dentry(new_parent.ino, dst)
        if stat.S_ISDIR(target.mode):
            new_parent.nlink -= 1
        _unlink_inode(view, target, rec.now_ns, done)
        view.put_inode(target)
    view.delete_dentry(old_parent.ino, src)
    view.put_dentry(new_parent.ino, rec.name_new, moved.ino)
    if stat.S_ISDIR(moved.mode) and old_parent is not new_parent:
        old_parent.nlink -= 1
        new_parent.nlink += 1
        moved.parent = new_parent.ino
    moved.ctime_ns = rec.now_ns
    view.put_inode(moved)
    _touch_parents(view, old_parent, new_parent, rec.now_ns)
    return done


def _check_replace(view: View, moved: Inode, target: Inode | None) -> None:
    if target is None:
        return
    if stat.S_ISDIR(moved.mode):
        if not stat.S_ISDIR(target.mode):
            raise NamespaceError(errno.ENOTDIR)
        if not view.dir_is_empty(target.ino):
            raise NamespaceError(errno.ENOTEMPTY)
    elif stat.S_ISDIR(target.mode):
        raise NamespaceError(errno.EISDIR)


def _exchange(view: View, rec: r.Rename, old_parent: Inode, new_parent: Inode, src: Dentry,
              dst: Dentry) -> Applied:
    if src.ino == dst.ino:
        return Applied(ino=src.ino)
    first, second = _inode(view, src.ino), _inode(view, dst.ino)
    if stat.S_ISDIR(first.mode) and _is_within(view, new_parent.ino, first.ino):
        raise NamespaceError(errno.EINVAL, "cannot move a directory into itself")
    if stat.S_ISDIR(second.mode) and _is_within(view, old_parent.ino, second.ino):
        raise NamespaceError(errno.EINVAL, "cannot move a directory into itself")
    view.delete_dentry(old_parent.ino, src)
    view.delete_dentry(new_parent.ino, dst)
    view.put_dentry(old_parent.ino, rec.name_old, second.ino)
    view.put_dentry(new_parent.ino, rec.name_new, first.ino)
    if old_parent is not new_parent:
        _move_dir_link(first, old_parent, new_parent)
        _move_dir_link(second, new_parent, old_parent)
    for inode in (first, second):
        inode.ctime_ns = rec.now_ns
        view.put_inode(inode)
    _touch_parents(view, old_parent, new_parent, rec.now_ns)
    return Applied(ino=first.ino, changed_inodes=[first.ino, second.ino, old_parent.ino,
                                                  new_parent.ino],
                   changed_entries=[(old_parent.ino, rec.name_old),
                                    (new_parent.ino, rec.name_new)])


def _move_dir_link(inode: Inode, source: Inode, destination: Inode) -> None:
    if stat.S_ISDIR(inode.mode):
        source.nlink -= 1
        destination.nlink += 1
        inode.parent = destination.ino


def _touch_parents(view: View, old_parent: Inode, new_parent: Inode, now_ns: int) -> None:
    for parent in {id(old_parent): old_parent, id(new_parent): new_parent}.values():
        _touch(parent, now_ns)
        view.put_inode(parent)


_HANDLERS: dict[type[Any], Callable[[View, Any], Applied]] = {
    r.MakeNode: _make_node,
    r.MakeDir: _make_dir,
    r.MakeSymlink: _make_symlink,
    r.Link: _link,
    r.Unlink: _unlink,
    r.RemoveDir: _remove_dir,
    r.Rename: _rename,
    r.SetAttr: _set_attr,
    r.SetXattr: _set_xattr,
    r.RemoveXattr: _remove_xattr,
    r.Purge: _purge,
    r.SetDiskState: _set_disk_state,
}
