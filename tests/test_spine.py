"""One training step for everything: the trainer and the benchmarks run the same
``sdiff.training.step.train_step``.

1. k steps through ``Trainer.run`` and k steps through the benchmark path
   (``sdiff.bench.throughput.make_train_step``), from the same config and seed, fed the same
   batches, end in bit-identical weights, EMA, optimizer state and generators (CPU,
   deterministic).
2. The benchmark modules that time or measure training have no training code of their own:
   an AST scan finds no optimizer, no gradient clipping, no EMA update, no diffusion loss and
   no backward pass in them, and each imports ``train_step`` from ``sdiff.training.step``. The
   scan is shown to flag each of these on a small source that has them.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import torch

from sdiff.bench.throughput import make_train_step
from sdiff.training.config import apply_overrides, get_run_preset
from sdiff.training.trainer import Trainer, index_batches

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3

# the demo's run preset, small enough for a test: batch 16, flips and model dropout on so that
# every random draw of a step (flips, label dropout, t, noise, dropout masks) is exercised;
# learning-rate and EMA warm-up are on as in the preset
CONFIG = apply_overrides(
    get_run_preset("digits"),
    ["train.batch_size=16", "train.deterministic=true", "train.sample_every_images=0",
     "data.random_flip=true", "model.dropout=0.1", "model.dropout_resolutions=[16,8]"],
)  # fmt: skip


def _batches(dataset, config, steps: int):
    """The (images, labels) the trainer reads for steps 1..steps (its data order)."""
    t = config.train
    order = index_batches(len(dataset), t.batch_size, t.seed, start_step=0)
    out = []
    for _, idx in zip(range(steps), order, strict=False):
        out.append(torch.utils.data.default_collate([dataset[i] for i in idx]))
    return out


def _assert_modules_equal(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{what}.{name} differs"


def test_trainer_and_benchmark_take_bit_identical_steps(tmp_path):
    trainer = Trainer(CONFIG, tmp_path, device="cpu", progress=False)
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run(max_steps=STEPS)
    assert result.step == STEPS and result.stopped_early
    cpu_rng_after_trainer = torch.get_rng_state()

    state, step = make_train_step(CONFIG, "cpu")  # what `sdiff bench` times
    for x, y in _batches(trainer.dataset, CONFIG, STEPS):
        step(x, y)
    assert state.step == trainer.step == STEPS

    _assert_modules_equal(trainer.model, state.model, "model")
    _assert_modules_equal(trainer.ema, state.ema, "ema")
    opt_a, opt_b = trainer.opt.state_dict(), state.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]  # lr of the last (warm-up) step too
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for i, tensors in opt_a["state"].items():
        for key, value in tensors.items():
            assert torch.equal(value, opt_b["state"][i][key]), f"optimizer {i}.{key} differs"
    # the same draws were made: flips, labels, t, noise (the step's generator), dropout (global)
    assert torch.equal(trainer.gen.get_state(), state.generator.get_state())
    assert torch.equal(cpu_rng_after_trainer, torch.get_rng_state())
    # and the comparison is not vacuous: the weights moved, the EMA lags behind them
    assert any(not torch.equal(init[k], v) for k, v in state.model.state_dict().items())
    assert any(
        not torch.equal(state.model.state_dict()[k], v) for k, v in state.ema.state_dict().items()
    )


# -- 2. no training code of their own --------------------------------------------------------------

# the files that time or measure a training step
BENCHMARKS = [
    "bench/throughput.py",
    "bench/memory.py",
    "bench/asv/benchmarks/train_step.py",
    "bench/asv/benchmarks/inputs.py",
    "bench/perf/test_perf.py",
]
# those of them that run the step themselves (inputs.py only builds the state)
STEP_CALLERS = [p for p in BENCHMARKS if not p.endswith("inputs.py")]
# (file, function) -> what it may do: the memory estimate frees the gradients and runs a backward
# pass on meta tensors to count what autograd keeps (no optimizer, no update: it trains nothing)
ALLOWED = {("bench/memory.py", "simulate_step"): {"zero_grad", "backward"}}

EMA_CALLS = {"lerp", "lerp_", "_foreach_lerp_", "update_ema", "_update_ema", "AveragedModel"}
CLIP_CALLS = {"clip_grad_norm_", "clip_grad_value_", "clip_grad_norm", "_grad_norm"}


def _dotted(node: ast.AST) -> str:
    """torch.optim.Adam -> "torch.optim.Adam"; a call or subscript inside -> "?"."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def training_code(source: str, path: str = "<source>") -> list[tuple[str, int, str]]:
    """(kind, line, code) for every piece of training-step code in ``source``: an optimizer
    (``torch.optim`` imported or called), gradient clipping, an EMA update (``lerp``), the
    diffusion loss, a backward pass, ``zero_grad`` or an optimizer's ``step()``."""
    tree = ast.parse(source)
    found = []
    optim_names = set()  # names bound by `from torch.optim import Adam`

    def visit(node: ast.AST, function: str | None) -> None:
        allowed = ALLOWED.get((path, function), set())
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.ImportFrom) and node.module:
            names = {a.name for a in node.names}
            if node.module.startswith("torch.optim") or (
                node.module == "torch" and "optim" in names
            ):
                found.append(("optimizer", node.lineno, f"from {node.module} import ..."))
                optim_names.update(a.asname or a.name for a in node.names)
            if "diffusion_loss" in names:
                found.append(("loss", node.lineno, f"from {node.module} import diffusion_loss"))
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torch.optim"):
                    found.append(("optimizer", node.lineno, f"import {a.name}"))
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            code = f"{name}(...)"
            if ".optim." in f".{name}" or name.split(".")[0] in optim_names:
                found.append(("optimizer", node.lineno, code))
            elif last in CLIP_CALLS:
                found.append(("clipping", node.lineno, code))
            elif last in EMA_CALLS:
                found.append(("ema", node.lineno, code))
            elif last == "diffusion_loss":
                found.append(("loss", node.lineno, code))
            elif last in ("backward", "zero_grad") and last not in allowed:
                found.append((last, node.lineno, code))
            elif last == "step" and "opt" in name.rpartition(".")[0].rsplit(".", 1)[-1].lower():
                found.append(("optimizer", node.lineno, code))  # opt.step(), optimizer.step()
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def imports_train_step(source: str) -> bool:
    """Whether ``source`` imports ``train_step`` from ``sdiff.training.step`` (anywhere)."""
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "sdiff.training.step"
        and any(a.name == "train_step" for a in node.names)
        for node in ast.walk(ast.parse(source))
    )


@pytest.mark.parametrize("path", BENCHMARKS)
def test_benchmarks_have_no_training_code_of_their_own(path):
    source = (ROOT / path).read_text()
    assert training_code(source, path) == [], f"{path} has its own training-step code"


@pytest.mark.parametrize("path", STEP_CALLERS)
def test_benchmarks_import_the_shared_step(path):
    assert imports_train_step((ROOT / path).read_text()), f"{path} does not use train_step"


COPY_OF_A_STEP = textwrap.dedent(
    """
    import torch
    from sdiff.diffusion.process import diffusion_loss

    def step(model, ema, x, cond, diffusion, schedule):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss = diffusion_loss(model, x, diffusion, cond, schedule=schedule).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1e-4)
    """
)


def test_the_scan_flags_a_copied_step():
    kinds = [kind for kind, _, _ in training_code(COPY_OF_A_STEP)]
    for kind in ("optimizer", "loss", "zero_grad", "backward", "clipping", "ema"):
        assert kind in kinds, f"the scan misses {kind}"
    assert kinds.count("optimizer") == 2  # the constructor and opt.step()
    assert kinds.count("loss") == 2  # the import and the call
    # other spellings of the same things
    other = textwrap.dedent(
        """
        from torch.optim import AdamW
        import torch.optim
        from torch.nn.utils import clip_grad_norm_

        def step(model, ema, loss, decay):
            optimizer = AdamW(model.parameters())
            torch.autograd.backward(loss)
            clip_grad_norm_(model.parameters(), 1.0)
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
            optimizer.step()
        """
    )
    kinds = [kind for kind, _, _ in training_code(other)]
    assert kinds.count("optimizer") == 4  # two imports, the constructor, optimizer.step()
    assert {"backward", "clipping", "ema"} <= set(kinds)
    # what the benchmarks do is not flagged: the shared step, a forward without gradients
    shared = textwrap.dedent(
        """
        from sdiff.training.step import build_state, prepare_batch, train_step

        def step(state, x, y, config):
            state.step_model(x, y, None)
            return train_step(state, prepare_batch(state, x, y, config), config)
        """
    )
    assert training_code(shared) == [] and imports_train_step(shared)
    assert not imports_train_step(COPY_OF_A_STEP)
    assert not imports_train_step("from sdiff.training.step import build_state\n")


def test_the_allowance_is_narrow():
    """The meta estimate's backward is allowed in its own function of its own file only."""
    source = textwrap.dedent(
        """
        def simulate_step(model, loss):
            model.zero_grad(set_to_none=True)
            loss.backward()
            torch.optim.SGD(model.parameters())

        def other(loss):
            loss.backward()
        """
    )
    found = training_code(source, "bench/memory.py")
    assert [(kind, line) for kind, line, _ in found] == [("optimizer", 5), ("backward", 8)]
    assert len(training_code(source, "bench/throughput.py")) == 4
