"""``nydus-erofs`` subcommands provided by the daemon package (registered as entry points in pyproject.toml)."""
