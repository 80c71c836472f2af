"""``sdiff.attention`` with the sdpa and math backends forced, forward and forward+backward.

Shapes: batch 2, 4 heads of dim 64, fp32 on the CPU; the sequence lengths are 256 (the U-ViT's
16x16 tokens) and 1024. FLOPs (non-causal): forward 4 B H N^2 D, backward 2.5x the forward;
TFLOP/s = FLOPs / time, as in bench/bench_attention.py, which covers the GPU kernels.
"""

import torch

B, H, D = 2, 4, 64


class Attention:
    params = (("sdpa", "math"), (256, 1024), ("fwd", "fwd+bwd"))
    param_names = ("backend", "seq_len", "mode")
    number = 1
    repeat = (3, 20, 1.0)
    warmup_time = 0.2
    timeout = 60

    def setup(self, backend: str, seq_len: int, mode: str) -> None:
        from sdiff import attention

        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, seq_len, D, generator=gen) for _ in range(3))
        if mode == "fwd":
            self.run = torch.no_grad()(lambda: attention(q, k, v, backend=backend))
            return
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        grad = torch.randn(B, H, seq_len, D, generator=gen)

        def step() -> None:
            for t in (q, k, v):
                t.grad = None
            attention(q, k, v, backend=backend).backward(grad)

        self.run = step

    def time_attention(self, backend: str, seq_len: int, mode: str) -> None:
        self.run()
