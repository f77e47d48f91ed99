"""Flattening layer trees, bottom to top, into the one tree the bootstrap holds (``builder/src/core/overlay.rs``).

Whiteout specs (``--whiteout-spec``):

``oci`` (default)
    ``.wh.NAME`` removes NAME of the lower layers, ``.wh..wh..opq`` hides every lower entry of its
    directory; neither is stored.  Whiteouts apply to lower layers only: an entry of the same layer
    with the whited-out name stays.
``overlayfs``
    For an image used as one overlay lower: whiteouts are applied *and kept* the way overlayfs expects,
    a ``.wh.NAME`` (or a char 0:0 device of the source) becomes a char 0:0 device NAME and an opaque
    directory gets ``trusted.overlay.opaque=y``.  A directory holding whiteouts also gets an empty
    ``trusted.overlay.origin``, as ``mkfs.erofs --tar --aufs`` does, so overlayfs does not list it as a
    plain directory and show the whiteouts.
``none``
    Nothing is special: ``.wh.*`` entries are ordinary files.

A directory takes its metadata from the topmost layer that names it (implicitly created parents do not
count); any other entry of an upper layer replaces the lower one, a file replacing a directory and vice
versa.  A hard link to a lower layer's file shares that file's inode.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence

from erofs.build.tree import LayerTree, Node, is_placeholder
from erofs.errors import SourceError, UsageError

WHITEOUT_SPECS = ("oci", "overlayfs", "none")
WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
OVL_OPAQUE = b"trusted.overlay.opaque"
OVL_ORIGIN = b"trusted.overlay.origin"


def _is_ovl_whiteout(node: Node) -> bool:
    return stat.S_ISCHR(node.mode) and node.rdev == 0


def _copy_meta(dst: Node, src: Node) -> None:
    dst.mode, dst.uid, dst.gid = src.mode, src.uid, src.gid
    dst.mtime, dst.mtime_nsec, dst.xattrs = src.mtime, src.mtime_nsec, dict(src.xattrs)


def _lookup(root: Node, parts: list[bytes]) -> Node | None:
    node: Node | None = root
    for comp in parts:
        if node is None or node.children is None:
            return None
        node = node.children.get(comp)
    return node


def _resolve_links(merged: Node, layer: LayerTree) -> None:
    """Point each placeholder hard link of ``layer`` at the lower layers' file it names."""
    for key, (target_parts, member) in layer.links.items():
        target = _lookup(merged, target_parts)
        shown = b"/".join(target_parts).decode(errors="replace")
        if target is None:
            raise SourceError(f"hard link {member!r}: target {shown!r} is in neither this nor a lower layer")
        if target.children is not None:
            raise SourceError(f"hard link {member!r}: target {shown!r} is a directory")
        for parent, name in layer.link_sites.get(key, []):
            if parent.children is not None and parent.children.get(name) is not None:
                if id(parent.children[name]) == key:
                    parent.children[name] = target


def merge_layers(layers: Sequence[LayerTree], spec: str = "oci") -> Node:
    """The flattened tree of ``layers`` (bottom first) under whiteout ``spec``."""
    if spec not in WHITEOUT_SPECS:
        raise UsageError(f"unknown whiteout spec {spec!r} ({', '.join(WHITEOUT_SPECS)})")
    if len(layers) == 1 and spec != "overlayfs" and not layers[0].implicit and not layers[0].links:
        return _only_layer(layers[0].root, spec)
    merged = Node.directory(0o755)
    for layer in layers:
        _resolve_links(merged, layer)
        _apply(merged, layer, spec)
    return merged


def _only_layer(root: Node, spec: str) -> Node:
    """What merging one layer without implicit directories or hard links onto nothing gives, without copying
    its directories: its own tree, less the whiteout entries (``oci``; they hide nothing below it)."""
    if spec == "oci":
        stack = [root]
        while stack:
            children = stack.pop().children
            assert children is not None
            for name in [name for name in children if name.startswith(WH_PREFIX)]:
                del children[name]
            stack.extend(child for child in children.values() if child.children is not None)
    return root


def _apply(merged: Node, layer: LayerTree, spec: str) -> None:
    if id(layer.root) not in layer.implicit:
        _copy_meta(merged, layer.root)
    stack: list[tuple[Node, Node]] = [(merged, layer.root)]
    while stack:
        base, upper = stack.pop()
        assert base.children is not None and upper.children is not None
        entries = upper.children
        whiteouts = False
        if spec != "none":
            opaque = WH_OPAQUE in entries or (spec == "overlayfs" and upper.xattrs.get(OVL_OPAQUE) == b"y")
            if opaque:
                base.children.clear()
                if spec == "overlayfs":
                    base.xattrs[OVL_OPAQUE] = b"y"
            for name, node in entries.items():
                if name.startswith(WH_PREFIX):
                    if name.startswith(WH_PREFIX + WH_PREFIX):
                        continue  # the opaque marker, or aufs metadata (.wh..wh.plnk...): never stored
                    hidden = name[len(WH_PREFIX) :]
                    base.children.pop(hidden, None)
                    if spec == "overlayfs" and hidden not in entries:
                        wh = Node(mode=stat.S_IFCHR | (node.mode & 0o7777), uid=node.uid, gid=node.gid,
                                   mtime=node.mtime, mtime_nsec=node.mtime_nsec)  # fmt: skip
                        base.children[hidden] = wh
                        whiteouts = True
                elif spec == "overlayfs" and _is_ovl_whiteout(node):
                    base.children.pop(name, None)
                    whiteouts = True
        for name, node in entries.items():
            if spec != "none" and name.startswith(WH_PREFIX):
                continue
            if is_placeholder(node):
                raise AssertionError("unresolved hard link placeholder")  # _resolve_links ran first
            if node.children is None:
                base.children[name] = node
                continue
            old = base.children.get(name)
            if old is None or old.children is None:
                over_whiteout = spec == "overlayfs" and old is not None and _is_ovl_whiteout(old)
                old = Node.directory(0o755)
                if over_whiteout:  # still hide what lies below the image, as overlayfs does on a copy-up
                    old.xattrs[OVL_OPAQUE] = b"y"
                base.children[name] = old
            if id(node) not in layer.implicit:  # implicit parents keep the lower (or default) metadata
                keep = {k: v for k, v in old.xattrs.items() if k in (OVL_OPAQUE, OVL_ORIGIN)}
                _copy_meta(old, node)
                if spec == "overlayfs":  # opacity and origin from lower layers still hold
                    old.xattrs = {**keep, **old.xattrs}
            stack.append((old, node))
        if whiteouts and spec == "overlayfs":
            base.xattrs[OVL_ORIGIN] = b""
