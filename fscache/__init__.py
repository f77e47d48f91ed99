"""Kernel front ends of the on-demand daemon; the only package that knows their wire formats and syscalls.

- :mod:`fscache.cachefiles`: ``/dev/cachefiles`` on-demand mode (OPEN / READ / CLOSE, ``copen``,
  ``CACHEFILES_IOC_READ_COMPLETE``).
- :mod:`fscache.fanotify`: fanotify pre-content events (``FAN_PRE_ACCESS`` with a byte range, Linux >= 6.14)
  on sparse blob cache files used as ``device=`` of a file-backed EROFS mount.
- :mod:`fscache.mount`: mount(2) of file-backed EROFS, umount2(2), the mount table, a mount's readahead window.
- :mod:`fscache.inotify`: inotify, to learn when a mounted image's superblock is released.
- :mod:`fscache.errors`: the exceptions the cachefiles and fanotify bindings raise.

Either way the rest of the daemon only fills a range of a blob, then says done or failed.
"""
