"""One training step of the tiny presets, fp32 on the CPU: ``prepare_batch`` then ``train_step``
of ``sdiff.training.step``, the step the trainer runs (label dropout, warm-up lr, loss,
backward, clip, the non-finite check, Adam, EMA), on fixed random images. img/s = batch /
time."""

from .inputs import TINY, images, train_state


class TrainStep:
    params = (TINY, (4, 16))
    param_names = ("preset", "batch")
    number = 1  # one step per sample: unet-tiny-32 at batch 16 takes ~0.25 s on 2 cores
    repeat = (3, 10, 2.0)  # at least 3 samples, at most 10 or 2 s
    warmup_time = 0.3
    timeout = 120

    def setup(self, preset: str, batch: int) -> None:
        from sdiff.training.step import prepare_batch, train_step

        self.config, self.state = train_state(preset, batch)
        self.x, self.y = images(preset, batch)
        self.prepare_batch, self.train_step = prepare_batch, train_step

    def step(self) -> None:
        batch = self.prepare_batch(self.state, self.x, self.y, self.config)
        self.train_step(self.state, batch, self.config)

    def time_train_step(self, preset: str, batch: int) -> None:
        self.step()

    def peakmem_train_step(self, preset: str, batch: int) -> None:
        # the benchmark process's peak RSS, torch itself included (~0.3 GB)
        self.step()
