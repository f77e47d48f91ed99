"""Writing images: sources → tree → chunks and blobs → layout → bootstrap.

A source (:mod:`erofs.build.sources`) fills a :mod:`~erofs.build.tree` while its file data goes through the
:mod:`~erofs.build.chunker` into one data blob per layer (:mod:`~erofs.build.blob`); layer trees are merged
(:mod:`~erofs.build.overlay`) and laid out as a RAFS v6 bootstrap (:mod:`~erofs.build.bootstrap`).
:mod:`~erofs.build.builder` runs a build atomically into an output directory, :mod:`~erofs.build.convert`
turns an OCI image into a Nydus one.  Nothing here reads images back: that is :mod:`erofs.reader`.
"""
