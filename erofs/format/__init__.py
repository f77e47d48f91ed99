"""Every on-disk structure of a Nydus RAFS v6 image, defined once: EROFS (``erofs_fs``) and Nydus (``rafs_v6``)."""
