"""One training step (forward, backward, clip, Adam, EMA) of the tiny presets: the trainer's
own ``Trainer.train_step`` on fixed random images, fp32 on the CPU. img/s = batch / time."""

from .inputs import TINY, images, trainer


class TrainStep:
    params = (TINY, (4, 16))
    param_names = ("preset", "batch")
    number = 1  # one step per sample: unet-tiny-32 at batch 16 takes ~0.25 s on 2 cores
    repeat = (3, 10, 2.0)  # at least 3 samples, at most 10 or 2 s
    warmup_time = 0.3
    timeout = 120

    def setup(self, preset: str, batch: int) -> None:
        self.trainer = trainer(preset, batch)
        self.x, self.y = images(preset, batch)

    def time_train_step(self, preset: str, batch: int) -> None:
        self.trainer.train_step(self.x, self.y)

    def peakmem_train_step(self, preset: str, batch: int) -> None:
        # the benchmark process's peak RSS, torch itself included (~0.3 GB)
        self.trainer.train_step(self.x, self.y)
