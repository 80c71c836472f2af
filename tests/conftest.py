"""Test-session set-up.

Without a GPU, Triton kernels run in the Triton interpreter, which must be switched on before
triton is first imported; a GPU machine runs them natively (set TRITON_INTERPRET=1 yourself to
interpret there too).
"""

import os
from pathlib import Path

if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
