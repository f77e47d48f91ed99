"""Collection rules for the whole suite.

``tests/vm`` holds tests that need the fscache-capable test kernel: on the host they are not collected at
all; ``tests/test_vm_suite.py`` boots the VM (kernel-test/run-vm, which sets NYDUS_EROFS_IN_VM=1) and runs that
folder there, so the one ``pytest`` command covers them without a skip on the host.
"""

from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("NYDUS_EROFS_IN_VM") == "1" else ["vm"]
