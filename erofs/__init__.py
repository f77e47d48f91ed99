"""Nydus RAFS v6 images on the kernel's EROFS: the on-disk format (:mod:`erofs.format`), writing images
(:mod:`erofs.build`), reading and verifying them (:mod:`erofs.reader`), and the ``nydus-erofs`` CLI
(:mod:`erofs.cli`, :mod:`erofs.commands`).  Shared below them: errors, chunk codecs, paths, units."""
