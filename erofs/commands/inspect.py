"""``nydus-erofs inspect BOOT [--json] [--ls [PATH]] [--stat PATH]``: what is inside a bootstrap."""

from __future__ import annotations

import json
import os
import stat
import time
from typing import Any

import click

from erofs.errors import ImageError, UsageError
from erofs.format import erofs_fs as fs
from erofs.format import rafs_v6 as rv
from erofs.reader.bootstrap import Bootstrap
from erofs.reader.prefetch import prefetch_entries
from erofs.reader.records import Inode
from erofs.units import count

_COMPAT = {
    fs.EROFS_FEATURE_COMPAT_SB_CHKSUM: "sb_csum",
    fs.EROFS_FEATURE_COMPAT_MTIME: "mtime",
    fs.EROFS_FEATURE_COMPAT_XATTR_FILTER: "xattr_filter",
    rv.EROFS_FEATURE_COMPAT_RAFS_V6: "rafs_v6",
}
_INCOMPAT = {
    fs.EROFS_FEATURE_INCOMPAT_ZERO_PADDING: "zero_padding",
    fs.EROFS_FEATURE_INCOMPAT_COMPR_CFGS: "compr_cfgs",
    fs.EROFS_FEATURE_INCOMPAT_CHUNKED_FILE: "chunked_file",
    fs.EROFS_FEATURE_INCOMPAT_DEVICE_TABLE: "device_table",
    fs.EROFS_FEATURE_INCOMPAT_ZTAILPACKING: "ztailpacking",
    fs.EROFS_FEATURE_INCOMPAT_FRAGMENTS: "fragments",
    fs.EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES: "xattr_prefixes",
}
_RAFS_FLAGS = {
    rv.RAFS_SUPER_FLAG_COMPRESSION_NONE: "compress_none",
    rv.RAFS_SUPER_FLAG_COMPRESSION_LZ4: "compress_lz4_block",
    rv.RAFS_SUPER_FLAG_HASH_BLAKE3: "hash_blake3",
    rv.RAFS_SUPER_FLAG_HASH_SHA256: "hash_sha256",
    rv.RAFS_SUPER_FLAG_EXPLICIT_UID_GID: "explicit_uid_gid",
    rv.RAFS_SUPER_FLAG_HAS_XATTR: "has_xattr",
    rv.RAFS_SUPER_FLAG_COMPRESSION_GZIP: "compress_gzip",
    rv.RAFS_SUPER_FLAG_COMPRESSION_ZSTD: "compress_zstd",
    rv.RAFS_SUPER_FLAG_INLINED_CHUNK_DIGEST: "inlined_chunk_digest",
    rv.RAFS_SUPER_FLAG_TARTFS_MODE: "tarfs",
}
_BLOB_FEATURES = {
    rv.BLOB_FEATURE_ALIGNED: "aligned",
    rv.BLOB_FEATURE_INLINED_FS_META: "inlined_fs_meta",
    rv.BLOB_FEATURE_CHUNK_INFO_V2: "chunk_info_v2",
    rv.BLOB_FEATURE_ZRAN: "zran",
    rv.BLOB_FEATURE_SEPARATE: "separate",
    rv.BLOB_FEATURE_INLINED_CHUNK_DIGEST: "inlined_chunk_digest",
    rv.BLOB_FEATURE_TARFS: "tarfs",
    rv.BLOB_FEATURE_BATCH: "batch",
    rv.BLOB_FEATURE_ENCRYPTED: "encrypted",
    rv.BLOB_FEATURE_HAS_TAR_HEADER: "has_tar_header",
    rv.BLOB_FEATURE_HAS_TOC: "has_toc",
    rv.BLOB_FEATURE_CAP_TAR_TOC: "cap_tar_toc",
}


def _names(value: int, table: dict[int, str]) -> list[str]:
    out = [name for bit, name in table.items() if value & bit]
    rest = value & ~sum(table)
    if rest:
        out.append(f"{rest:#x}")
    return out


def image_info(bs: Bootstrap) -> dict[str, Any]:
    """Everything ``inspect --json`` prints (without listings)."""
    sb = bs.sb
    info: dict[str, Any] = {
        "bootstrap": bs.path,
        "size": bs.size,
        "format": "rafs-v6" if bs.is_rafs else "erofs",
        "superblock": {
            "block_size": bs.blksz,
            "feature_compat": sb.feature_compat,
            "feature_incompat": sb.feature_incompat,
            "features": _names(sb.feature_compat, _COMPAT) + _names(sb.feature_incompat, _INCOMPAT),
            "checksum": sb.checksum,
            "checksum_ok": bs.checksum_ok,
            "root_nid": sb.root_nid,
            "inos": sb.inos,
            "blocks": sb.blocks,
            "meta_blkaddr": sb.meta_blkaddr,
            "xattr_blkaddr": sb.xattr_blkaddr,
            "build_time": bs.build_time,
            "uuid": sb.uuid.hex(),
            "volume_name": sb.volume_name.split(b"\0", 1)[0].decode("utf-8", "replace"),
            "extra_devices": sb.extra_devices,
        },
        "chunk_size": bs.chunk_size,
        "compressor": bs.compressor,
        "digester": bs.digester,
    }
    if bs.ext is not None:
        ext = bs.ext
        info["rafs"] = {
            "flags": ext.s_flags,
            "flag_names": _names(ext.s_flags, _RAFS_FLAGS),
            "blob_table": [ext.s_blob_table_offset, ext.s_blob_table_size],
            "chunk_table": [ext.s_chunk_table_offset, ext.s_chunk_table_size],
            "prefetch_table": [ext.s_prefetch_table_offset, ext.s_prefetch_table_size],
        }
        try:
            info["prefetch"] = [{"nid": p.nid, "path": p.path, "kind": p.kind} for p in prefetch_entries(bs)]
        except ImageError as e:
            info["prefetch"] = None
            info["prefetch_error"] = str(e)
    if bs.blobs:
        info["blobs"] = [
            {
                "id": b.blob_id,
                "index": b.blob_index,
                "compressed_size": b.compressed_size,
                "uncompressed_size": b.uncompressed_size,
                "chunk_count": b.chunk_count,
                "chunk_size": b.chunk_size,
                "compressor": b.compressor,
                "digester": b.digester,
                "ci_compressor": b.ci_compressor,
                "features": _names(b.features, _BLOB_FEATURES),
                "blob_toc_size": b.blob_toc_size,
            }
            for b in bs.blobs
        ]
    else:
        info["blobs"] = [
            {
                "id": d.key,
                "index": d.index,
                "compressed_size": None,
                "uncompressed_size": d.blocks * bs.blksz,
                "chunk_count": None,
            }
            for d in bs.devices
        ]
    info["devices"] = [{"tag": d.tag, "blocks": d.blocks, "mapped_blkaddr": d.mapped_blkaddr} for d in bs.devices]

    # walk: inode counts and chunk statistics
    nids: set[int] = set()
    kinds = {"files": 0, "directories": 0, "symlinks": 0, "others": 0}
    referenced = holes = 0
    unique: set[tuple[int, int]] = set()
    file_bytes = 0
    entries = 0
    for _, _, ino in bs.walk():
        entries += 1
        if ino.nid in nids:
            continue
        nids.add(ino.nid)
        if ino.is_reg:
            kinds["files"] += 1
            file_bytes += ino.size
            for c in bs.file_chunks(ino):
                if c.blob_offset is None:
                    holes += 1
                elif c.blob_index >= 0:
                    referenced += 1
                    unique.add((c.blob_index, c.ci_index if c.ci_index is not None else c.blob_offset))
        elif ino.is_dir:
            kinds["directories"] += 1
        elif ino.is_symlink:
            kinds["symlinks"] += 1
        else:
            kinds["others"] += 1
    info["inodes"] = len(nids)
    info["entries"] = entries
    info.update(kinds)
    info["file_bytes"] = file_bytes
    comp = uncomp = 0
    for c in bs.chunk_table:
        comp += c.compressed_size
        uncomp += c.uncompressed_size
    info["chunks"] = {
        "referenced": referenced,
        "unique": len(unique),
        "holes": holes,
        "dedup_ratio": round(referenced / len(unique), 4) if unique else None,
        "chunk_table_entries": len(bs.chunk_table),
        "compressed_bytes": comp if bs.chunk_table else None,
        "uncompressed_bytes": uncomp if bs.chunk_table else None,
        "compression_ratio": round(uncomp / comp, 4) if comp else None,
    }
    return info


def entry_info(bs: Bootstrap, path: str, ino: Inode, *, chunks: bool = False) -> dict[str, Any]:
    """One inode as ``--stat`` / ``--ls --json`` shows it."""
    out: dict[str, Any] = {
        "path": path,
        "nid": ino.nid,
        "mode": f"{stat.S_IMODE(ino.mode):04o}",
        "type": stat.filemode(ino.mode)[0].replace("-", "f"),
        "filemode": stat.filemode(ino.mode),
        "nlink": ino.nlink,
        "uid": ino.uid,
        "gid": ino.gid,
        "size": ino.size,
        "mtime": ino.mtime,
        "mtime_nsec": ino.mtime_nsec,
        "layout": ino.layout_name,
        "inode": "extended" if ino.extended else "compact",
        "xattrs": {os.fsdecode(k): v.decode("utf-8", "backslashreplace") for k, v in bs.xattrs(ino)},
    }
    if ino.is_symlink:
        out["target"] = os.fsdecode(bs.readlink(ino))
    if ino.is_device:
        out["rdev"] = list(ino.rdev)
    if chunks and ino.is_reg:
        out["chunks"] = [
            {
                "file_offset": c.file_offset,
                "length": c.length,
                "blob_index": c.blob_index,
                "ci_index": c.ci_index,
                "blob_offset": c.blob_offset,
            }
            for c in bs.file_chunks(ino)
        ]
    return out


def _ls_line(bs: Bootstrap, name: str, ino: Inode) -> str:
    size = f"{ino.rdev[0]}, {ino.rdev[1]}" if ino.is_device else str(ino.size)
    try:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(ino.mtime))
    except (OverflowError, OSError, ValueError):  # beyond what the C library's calendar holds
        when = f"@{ino.mtime}"
    line = f"{stat.filemode(ino.mode)} {ino.nlink:>3} {ino.uid:>5} {ino.gid:>5} {size:>10} {when} {name}"
    if ino.is_symlink:
        line += " -> " + os.fsdecode(bs.readlink(ino))
    return line


def _lookup(bs: Bootstrap, path: str) -> Inode:
    try:
        return bs.lookup(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file or directory in the image") from None


@click.command()
@click.argument("bootstrap", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--ls",
    "ls_path",
    is_flag=False,
    flag_value="/",
    default=None,
    metavar="[PATH]",
    help="List a directory like ls -l (default /).",
)
@click.option("--stat", "stat_path", default=None, metavar="PATH", help="Show one entry in detail.")
def inspect(bootstrap: str, as_json: bool, ls_path: str | None, stat_path: str | None) -> None:  # fmt: skip
    """Show a bootstrap's superblock, Nydus features, blobs and chunk statistics, or list its files."""
    with Bootstrap(bootstrap, verify_checksum=False) as bs:
        if stat_path is not None:
            ino = _lookup(bs, stat_path)
            info = entry_info(bs, "/" + stat_path.strip("/"), ino, chunks=True)
            if as_json:
                click.echo(json.dumps(info, indent=2))
            else:
                for k, v in info.items():
                    if k == "chunks":
                        click.echo(f"chunks: {len(v)}")
                        for c in v:
                            where = "hole" if c["blob_offset"] is None else (
                                f"blob {c['blob_index']} chunk {c['ci_index']} @ {c['blob_offset']}"
                            )  # fmt: skip
                            click.echo(f"  {c['file_offset']:>12} +{c['length']:<10} {where}")
                    else:
                        click.echo(f"{k}: {v}")
            return
        if ls_path is not None:
            ino = _lookup(bs, ls_path)
            base = "/" + ls_path.strip("/")
            if ino.is_dir:
                items = [(os.fsdecode(d.name), bs.inode(d.nid)) for d in bs.listdir(ino)]
            else:
                items = [(base.rsplit("/", 1)[-1], ino)]
            if as_json:
                rows = [entry_info(bs, (base.rstrip("/") + "/" + n) if ino.is_dir else base, i) for n, i in items]
                click.echo(json.dumps(rows, indent=2))
            else:
                for n, i in items:
                    click.echo(_ls_line(bs, n, i))
            return
        info = image_info(bs)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        sbi = info["superblock"]
        click.echo(f"{info['bootstrap']}: {info['format']}, {info['size']} bytes, block size {sbi['block_size']}")
        csum = {True: "ok", False: "MISMATCH", None: "not set"}[sbi["checksum_ok"]]
        click.echo(f"features: {' '.join(sbi['features']) or '-'}  (superblock checksum {csum})")
        click.echo(f"root nid {sbi['root_nid']}, meta_blkaddr {sbi['meta_blkaddr']}, inos {sbi['inos']}")
        if "rafs" in info:
            click.echo(f"rafs flags: {' '.join(info['rafs']['flag_names'])}")
            click.echo(f"chunk size {info['chunk_size']}, compressor {info['compressor']}, digester {info['digester']}")
        click.echo(
            f"inodes: {info['inodes']} ({count(info['files'], 'file')}, "
            f"{count(info['directories'], 'directory', 'directories')}, {count(info['symlinks'], 'symlink')}, "
            f"{count(info['others'], 'other')}), {count(info['file_bytes'], 'byte')} of file data"
        )
        ch = info["chunks"]
        click.echo(
            f"chunks: {ch['referenced']} referenced, {ch['unique']} unique, {count(ch['holes'], 'hole')}, "
            f"dedup ratio {ch['dedup_ratio']}, compression ratio {ch['compression_ratio']}"
        )
        if info.get("prefetch") or info.get("prefetch_error"):
            click.echo(f"prefetch table: {info.get('prefetch_error') or str(len(info['prefetch'])) + ' entries'}")
            for p in info["prefetch"] or ():
                click.echo(f"  {p['path'] or '?'}  (nid {p['nid']}, {p['kind']})")
        click.echo(f"blobs: {len(info['blobs'])}")
        for b in info["blobs"]:
            if b["chunk_count"] is None:  # a plain EROFS device
                click.echo(f"  {b['index']}: {b['id']}  {b['uncompressed_size']} bytes (device)")
                continue
            click.echo(
                f"  {b['index']}: {b['id']}  {count(b['chunk_count'], 'chunk')}, "
                f"{count(b['compressed_size'], 'byte')} compressed, "
                f"{b['uncompressed_size']} uncompressed, {b['compressor']}/{b['digester']}, "
                f"chunk size {b['chunk_size']}"
            )
