"""Lazy mounts of Nydus images on file-backed EROFS (``nydus-erofs mount``/``umount``), in one module per role.

Imports run one way: :mod:`.service` (mode choice, start/stop of the daemon) → :mod:`.worker` (the process that
serves a mount) → :mod:`.server` (the fanotify event loop), :mod:`.cachefile` (the blobs' sparse cache files),
:mod:`.watch` (when the image is released) → :mod:`fscache` (the syscalls).  :mod:`.supervisor` is the process
holding the fanotify group (built on :mod:`cachefilesd_py.supervisor`); :mod:`.spec` (what a mount is),
:mod:`.ready` (the readiness line) and :mod:`.record` (the runtime record) are shared by all of them.

Nothing is imported here: the supervisor process must stay free of the image machinery.
"""
