"""The on-demand daemon and the mount service: blob backends (:mod:`.backends`), the fetch → verify →
decompress → write pipeline (:mod:`.pipeline`), the fscache daemon (:mod:`.daemon` over :mod:`.image_store`) and
the fanotify-served file-backed mounts; ``cachefilesd-py`` and ``nydus-erofs mount``/``umount``."""
