"""A containerd proxy snapshotter that runs Nydus images before they are downloaded, and the pull that feeds it."""
