"""Parameters and multiply-accumulates per forward pass of every preset (deterministic).

``sdiff.models.flops.model_stats`` builds the model on the meta device, so even the 2B U-ViT costs
about a second. MACs are per image (batch 1); sdiff/flops.py says what is counted. A change
here is a change of architecture, never noise.
"""

from sdiff.models.presets import PRESETS


class ModelStats:
    params = (tuple(PRESETS),)
    param_names = ("preset",)
    timeout = 120

    def setup_cache(self) -> dict[str, tuple[int, int]]:
        # one process counts every preset; each track_* call then only looks its row up
        from sdiff.models.flops import model_stats

        stats = {}
        for name, config in PRESETS.items():
            s = model_stats(config)
            stats[name] = (s.params, s.macs)
        return stats

    def track_params(self, stats: dict, preset: str) -> int:
        return stats[preset][0]

    track_params.unit = "params"

    def track_macs(self, stats: dict, preset: str) -> int:
        return stats[preset][1]

    track_macs.unit = "MACs"
