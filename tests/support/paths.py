"""Where the suite finds the repository and the shared fixtures beside it (read in place, never copied)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# ``shared/`` sits beside the checkout (or beside the folder of worktrees that holds it).
SHARED = next((p / "shared" for p in REPO.parents if (p / "shared" / "interop").is_dir()), REPO.parent / "shared")
NYDUS = SHARED / "interop" / "nydus"
