"""Every on-disk structure has the size of its C sizeof, and the bit fields round-trip."""

from __future__ import annotations

import pytest

from erofs.format import erofs_fs, rafs_v6
from erofs.format.cstruct import parse


@pytest.mark.parametrize(
    ("module", "name"),
    [(erofs_fs, n) for n in erofs_fs.SIZES] + [(rafs_v6, n) for n in rafs_v6.SIZES],
)
def test_struct_size_matches_c_sizeof(module, name):
    assert getattr(module, name).size == module.SIZES[name]


def test_struct_roundtrip_and_unknown_field():
    raw = erofs_fs.erofs_dirent.pack(nid=0x1234567890, nameoff=24, file_type=erofs_fs.EROFS_FT_DIR)
    de = erofs_fs.erofs_dirent.unpack(raw)
    assert (de.nid, de.nameoff, de.file_type) == (0x1234567890, 24, 2)
    with pytest.raises(TypeError):
        erofs_fs.erofs_dirent.pack(bogus=1)
    with pytest.raises(ValueError):
        erofs_fs.erofs_dirent.unpack(raw[:11])


def test_cstruct_rejects_unparsable_declaration():
    with pytest.raises(ValueError):
        parse("struct x { __le32 a[N]; };")


@pytest.mark.parametrize("blob_index", [0, 1, 253])
@pytest.mark.parametrize("ci_index", [0, 1, 0xFFFF, 0x10000, 0xFFFFFF])
def test_chunk_index_fields_roundtrip(blob_index, ci_index):
    advise, device_id = rafs_v6.chunk_index_fields(blob_index, ci_index)
    assert device_id & 0xFF == blob_index + 1  # the kernel's device_id after masking
    assert rafs_v6.chunk_index_decode(advise, device_id) == (blob_index, ci_index)


@pytest.mark.parametrize(
    "info", [(0, 1, 0, 1), (4828, 2974, 20480, 13400), (2**40 - 1, 1234567, 2**43, 16 << 20)]
)
def test_chunk_info_v1_roundtrip(info):
    assert rafs_v6.chunk_info_v1_decode(*rafs_v6.chunk_info_v1_encode(*info)) == info


def test_rdev_encoding_matches_kernel():
    assert erofs_fs.erofs_new_encode_dev(8, 1) == 0x801
    for major, minor in [(0, 0), (1, 3), (259, 70000), (4095, 0xFFFFF)]:
        assert erofs_fs.erofs_new_decode_dev(erofs_fs.erofs_new_encode_dev(major, minor)) == (major, minor)
