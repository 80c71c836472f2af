"""asv benchmarks of sdiff (see ../README.md). Each module times one concept; ``inputs`` builds
the objects they time. They import the installed ``sdiff``, whatever tree that is.

One CPU thread unless SDIFF_BENCH_THREADS says otherwise: on a shared machine, OpenMP threads
spin-waiting for a core that another process holds made a 20 ms forward take 1.1 s (2 threads on
2 busy cores), while one thread slows down gracefully. Set here, in the process that forks every
benchmark (asv.conf.json's forkserver), so all of them inherit it.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("SDIFF_BENCH_THREADS", "1")))
