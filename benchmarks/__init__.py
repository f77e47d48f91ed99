"""Benchmarks: our tools next to their references (mkfs.erofs, a direct read), compared in the same run."""
