"""erofs.build.sources.stream: a layer's bytes decoded on a reader thread."""

from __future__ import annotations

import subprocess
import sys

# Read an empty tar to its end and close, many times, with the GIL handed over as often as it can be: the
# window between the reader thread's last put and its exit is then hit within a few hundred rounds.
_READ_TO_END_AND_CLOSE = """
import io, sys, tarfile
from erofs.build.sources.stream import LayerStream
sys.setswitchinterval(1e-6)
data = io.BytesIO()
tarfile.open(fileobj=data, mode="w").close()
for _ in range(3000):
    stream = LayerStream(io.BytesIO(data.getvalue()), "layer.tar")
    stream.drain()
    stream.close()
print("closed")
"""


def test_close_after_reading_to_the_end_returns() -> None:
    # A `nydus-erofs build` of a layer hung for ever in close() when the reader thread had handed over its
    # end marker but not yet exited (CI: test_tar_bomb never finished).
    try:
        proc = subprocess.run([sys.executable, "-c", _READ_TO_END_AND_CLOSE], capture_output=True, text=True,
                              timeout=30)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise AssertionError("LayerStream.close() hung after the stream was read to its end") from None
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "closed"
