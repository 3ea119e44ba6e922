"""The step runner (capture.py) and its place in the engine: eager steps unchanged, the captured
step's pieces (tensor lr, capturable optimizer flags, warm-up that restores state, eager partial batch,
fallback with a reason) checked on the CPU; the CUDA graph itself only where CUDA is present."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from cifarlab.config import CIFAR_MEAN, CIFAR_STD, TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.data.device import PAD, DeviceLoader
from cifarlab.model.optim import OPTIMIZERS, build_optimizer
from cifarlab.model.resnet import resnet18
from cifarlab.step import capture
from cifarlab.step.capture import CAPTURE_FLAGS, CapturedStep, StepRunner, StepSums, prepare_optimizer
from cifarlab.step.warmup import preserved_training_state
from cifarlab.train import engine, steps

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


class TinyNet(torch.nn.Module):
    """conv + BatchNorm + linear: every kind of state the step touches, in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.fixture
def cpu_capturable(monkeypatch):
    """Adam/Adadelta refuse capturable=True on a CPU; allow it so their capturable math runs here."""
    # (torch.optim.adam is the functional API; the module is reached by name)
    for module in map(importlib.import_module, ("torch.optim.adam", "torch.optim.adadelta")):
        original = module._get_capturable_supported_devices
        monkeypatch.setattr(module, "_get_capturable_supported_devices",
                            lambda *a, _o=original, **k: [*_o(*a, **k), "cpu"])


def _batches(n: int, batch: int, seed: int = 1, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        out.append((torch.randn(b, 3, size, size, generator=g), torch.randint(0, 10, (b,), generator=g)))
    return out


def _tiny(name: str) -> tuple[TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    return model, build_optimizer(name, model.parameters(), 0.1, 0.9, 5e-4)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def _plain_step(model, optimizer, x, y) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ------------------------------------------------------------------------------ learning rate


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tensor_lr_equals_float_lr_for_each_optimizer(name, cpu_capturable):
    """The captured step reads lr from a device tensor (so --warmup-epochs needs no recapture): with
    the same capturable flags, a tensor lr changed between steps gives the float lr's parameters."""
    lrs = [0.01, 0.04, 0.07, 0.1, 0.1]  # a warm-up ramp, then constant
    results = []
    for use_tensor in (True, False):
        model, opt = _tiny(name)
        lr_t = torch.tensor(lrs[0])
        prepare_optimizer(opt, lr_t)
        for (x, y), lr in zip(_batches(20, 4), lrs):
            if use_tensor:
                lr_t.fill_(lr)
            else:
                for group in opt.param_groups:
                    group["lr"] = lr
            _plain_step(model, opt, x, y)
        results.append(_params(model))
    for a, b in zip(*results):
        if name == "adadelta":  # its tensor-lr path multiplies by -lr, then adds: one more rounding
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_capture_flags_keep_the_optimizer_math(name, cpu_capturable):
    """Fused / capturable variants compute the same update as the eager foreach ones (up to rounding)."""
    results = []
    for flags in (True, False):
        model, opt = _tiny(name)
        if flags:
            prepare_optimizer(opt, torch.tensor(0.1))
        for x, y in _batches(16, 4):
            _plain_step(model, opt, x, y)
        results.append(_params(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert {k for g in opt.param_groups for k in CAPTURE_FLAGS[type(opt).__name__]} <= set(opt.param_groups[0])


def test_capturable_adagrad_is_torchs_adagrad_without_host_reads(monkeypatch):
    """The lab's Adagrad (optim.CapturableAdagrad) on its capturable path gives torch.optim.Adagrad's
    weights bit for bit (weight decay on, a warm-up lr ramp held in a tensor) while never reading a
    tensor back to the host (.item() is what a CUDA capture forbids and torch's foreach Adagrad does)."""
    lrs = [0.01, 0.05, 0.1, 0.1]
    torch.manual_seed(0)
    reference = TinyNet()
    ref_opt = torch.optim.Adagrad(reference.parameters(), lr=lrs[0], weight_decay=5e-4, foreach=True)
    model, opt = _tiny("adagrad")
    assert type(opt).__name__ == "CapturableAdagrad" and isinstance(opt, torch.optim.Adagrad)
    lr_t = torch.tensor(lrs[0])
    prepare_optimizer(opt, lr_t)
    assert all(g["capturable"] for g in opt.param_groups)
    for (x, y), lr in zip(_batches(16, 4), lrs):
        for group in ref_opt.param_groups:
            group["lr"] = lr
        _plain_step(reference, ref_opt, x, y)
        lr_t.fill_(lr)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", lambda self: pytest.fail("host read in the capturable Adagrad step"))
            _plain_step(model, opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(reference)))
    assert [float(s["step"]) for s in opt.state.values()] == [float(s["step"]) for s in ref_opt.state.values()]
    with pytest.raises(RuntimeError, match="no capturable configuration"):
        capture.capture_flags(ref_opt)  # torch's own Adagrad is not claimed capturable


# --------------------------------------------------------------------- warm-up changes nothing


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("prepared", [False, True])
def test_warm_up_inside_preserved_state_changes_nothing(name, prepared, cpu_capturable):
    """Warm-up steps, then restore: the following real steps give bit-for-bit the weights (BatchNorm
    statistics included) of a run without warm-up -- state the warm-up created is zeroed, which is
    exactly a fresh state for these optimizers (the captured graph keeps those tensors)."""
    batches = _batches(12, 4)
    results = []
    for warm in (True, False):
        model, opt = _tiny(name)
        if prepared:
            prepare_optimizer(opt, torch.tensor(0.1))
        if warm:
            with preserved_training_state(model, opt, keep_new_state=lambda: True):
                for x, y in _batches(8, 4, seed=9):
                    _plain_step(model, opt, x, y)
        losses = [_plain_step(model, opt, x, y) for x, y in batches]
        results.append((_params(model), losses))
    (pa, la), (pb, lb) = results
    assert all(torch.equal(a, b) for a, b in zip(pa, pb)), name
    assert all(torch.equal(a, b) for a, b in zip(la, lb))


def test_warm_up_without_keeping_state_leaves_the_optimizer_as_it_was():
    model, opt = _tiny("adam")
    with preserved_training_state(model, opt, keep_new_state=lambda: False):
        for x, y in _batches(8, 4):
            _plain_step(model, opt, x, y)
    assert len(opt.state) == 0  # fresh again: no step counters or moments left behind


# ------------------------------------------------------------------- eager runner vs history


def _historical_epoch(model, optimizer, loader, precision="fp32"):
    """The engine's loop before the step runner existed (commit 57b7b62), without the clock."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    first_bad = torch.full((), -1, dtype=torch.int64)
    for step, (inputs, targets) in enumerate(loader):
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with capture.autocast_context(precision, CPU):
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
        loss.backward()
        optimizer.step()
        loss_d = loss.detach()
        loss_sum += loss_d.double() * targets.shape[0]
        correct += (outputs.detach().argmax(dim=1) == targets).sum()
        bad = ~torch.isfinite(loss_d)
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
    return float(loss_sum), int(correct), int(first_bad)


def _device_loader(n: int = 10, batch: int = 4, seed: int = 0) -> DeviceLoader:
    g = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    return DeviceLoader(images, torch.arange(n) % 10, batch, CPU, augment=True, shuffle=True, seed=seed)


def test_eager_runner_through_the_engine_equals_the_historical_loop():
    """ResNet-18, batch 4 with a partial last batch of 2: same weights, loss and accuracy, bit for bit."""
    cfg = TrainConfig(batch_size=4)
    out = []
    for use_engine in (True, False):
        torch.manual_seed(0)
        model = resnet18().to(memory_format=torch.channels_last)
        opt = build_optimizer("sgd", model.parameters(), 0.1, 0.9, 5e-4)
        loader = _device_loader()
        engine.seed_epoch(cfg.seed, 1, loader)
        if use_engine:
            state = engine.TrainState(model=model, optimizer=opt, scaler=None, device=CPU, precision="fp32")
            record = engine.train_epoch(cfg, state, loader, epoch=1)
            assert record.step_mode == "eager" and record.steps == 3 and record.images == 10
            assert record.setup_s is not None and state.step_runner.note  # says why it is eager
            sums = (record.train_loss * 10, round(record.train_acc * 10), -1)
        else:
            loss_sum, correct, bad = _historical_epoch(model, opt, loader)
            sums = (loss_sum / 10 * 10, correct, bad)
        out.append((_params(model), sums))
    (pa, sa), (pb, sb) = out
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert sa == sb


# --------------------------------------------------- captured-step logic with a CPU stand-in graph


class BodyReplay:
    """CPU stand-in for a captured CUDA graph: replay() reruns the body the graph would have recorded
    (`_graph_body` on the static buffers). It checks the runner's routing -- static-buffer feeding,
    tensor lr, the eager partial batch, the on-device sums -- not CUDA graph capture itself."""

    def __init__(self, runner: CapturedStep) -> None:
        self.runner = runner

    def replay(self) -> None:
        self.runner._graph_body(self.runner.sums)


def _stand_in_captured(model, opt, batch: int) -> CapturedStep:
    runner = CapturedStep(model, opt, "fp32", CPU, batch_size=batch, sample_shape=(3, 8, 8), channels_last=False)
    runner.lr_tensor = torch.tensor(float(opt.param_groups[0]["lr"]))
    runner._lr_value = float(opt.param_groups[0]["lr"])
    prepare_optimizer(opt, runner.lr_tensor)
    runner.graph = BodyReplay(runner)
    return runner


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_captured_runner_logic_matches_eager_and_the_partial_batch_is_exact(name, cpu_capturable):
    batches = _batches(10, 4)  # 4, 4, 2
    lrs = [0.05, 0.075, 0.1]
    model_c, opt_c = _tiny(name)
    runner = _stand_in_captured(model_c, opt_c, batch=4)
    runner.begin_epoch()
    for (x, y), lr in zip(batches, lrs):
        runner.load(x, y)
        runner.step(lr)
    loss_sum, correct, bad = runner.read_sums()

    model_e, opt_e = _tiny(name)
    prepare_optimizer(opt_e, torch.tensor(0.1))
    for group in opt_e.param_groups:
        group["lr"] = 0.1
    eager = StepRunner(model_e, opt_e, "fp32", CPU)
    eager.begin_epoch()
    for (x, y), lr in zip(batches[:-1], lrs):
        eager.load(x, y)
        eager.step(lr)
    # The partial batch by hand: its loss is the plain mean over its 2 real images.
    x, y = batches[-1]
    for group in opt_e.param_groups:
        group["lr"] = lrs[-1]
    opt_e.zero_grad(set_to_none=True)
    last_loss = F.cross_entropy(model_e(x), y)  # mean over the 2 real images
    last_loss.backward()
    opt_e.step()
    eager_sum = eager.read_sums()[0] + float(last_loss.detach().double()) * 2

    assert all(torch.equal(a, b) for a, b in zip(_params(model_c), _params(model_e)))
    assert loss_sum == pytest.approx(eager_sum, rel=1e-12)
    assert bad == -1 and 0 <= correct <= 10
    assert float(runner.lr_tensor) == pytest.approx(lrs[-1])


class ShapeRecorder(torch.nn.Module):
    """Stands in for torch.compile(model): the same parameters, and it notes each batch size it runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(int(x.shape[0]))
        return self.model(x)


def test_a_compiled_graph_sees_only_the_full_batch_shape():
    """With --compile default inside the graph, the partial last batch runs on the plain model: a second
    input shape would make torch.compile build a second (dynamic-shape) graph during setup."""
    model, opt = _tiny("sgd")
    runner = _stand_in_captured(model, opt, batch=4)
    compiled = ShapeRecorder(model)
    runner.module = compiled
    runner.begin_epoch()
    for x, y in _batches(10, 4):  # 4, 4, 2
        runner.load(x, y)
        runner.step(0.1)
    assert compiled.batch_sizes == [4, 4]
    assert runner.read_sums()[2] == -1


def test_an_eager_compiled_run_sends_only_the_partial_batch_to_the_plain_model():
    """--compile reduce-overhead / max-autotune step eagerly around torch's own graphs: their full batches go
    through the compiled module, the partial last batch through the plain model (no second compiled shape,
    which with max-autotune means minutes more of autotuning); a wrapper that is not torch.compile's (DDP)
    gets every batch."""
    model, opt = _tiny("sgd")
    assert torch.compile(model)._orig_mod is model  # what module_for recognises (nothing compiles here)
    # torch.compile's wrapper: one warm-up call in setup (its compilation is setup_s, also on a CPU), then the
    # full batches; the partial one goes to the plain model.
    for wraps_model, expected in ((True, [4, 4, 4]), (False, [4, 4, 2])):
        compiled = ShapeRecorder(model)
        if wraps_model:
            compiled._orig_mod = model
        runner = StepRunner(compiled, opt, "fp32", CPU, model=model)
        runner.setup([4, 2], (3, 8, 8), channels_last=False)
        runner.begin_epoch()
        for x, y in _batches(10, 4):  # 4, 4, 2
            runner.load(x, y)
            runner.step(0.1)
        assert compiled.batch_sizes == expected


def test_a_compiled_module_warms_up_in_setup_on_a_cpu_and_changes_nothing():
    """Compilation is setup work: on a CPU too, a torch.compile'd module runs one untimed forward + backward in
    setup (compiling there, so epoch 1 is not the compile), and the weights, BatchNorm statistics and optimizer
    state are what they were. An uncompiled module on a CPU has nothing to warm up."""
    model, opt = _tiny("sgd")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = ShapeRecorder(model)
    compiled._orig_mod = model
    plain_calls: list[int] = []
    forward = model.forward
    model.forward = lambda x: (plain_calls.append(int(x.shape[0])), forward(x))[1]
    runner = StepRunner(compiled, opt, "fp32", CPU, model=model)
    runner.setup([4, 2], (3, 8, 8), channels_last=False)
    assert compiled.batch_sizes == [4]  # the full batch's shape only: the partial one runs on the plain model ...
    assert plain_calls == [4]  # ... which a CPU does not warm up (no autotuning): only the compiled call reached it
    del model.forward
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not opt.state
    assert all(p.grad is None for p in model.parameters())
    plain = ShapeRecorder(model)
    StepRunner(plain, opt, "fp32", CPU, model=model).setup([4, 2], (3, 8, 8), channels_last=False)
    assert plain.batch_sizes == []


def test_evaluation_runs_the_plain_model_not_the_compiled_one():
    """A compiled module would compile again for eval mode and the test batch (7.9 s on an H200 with
    --compile default): evaluation uses the plain model, whose weights are the same."""
    model, opt = _tiny("sgd")
    compiled = ShapeRecorder(model)
    state = engine.TrainState(model=model, optimizer=opt, scaler=None, device=CPU, precision="fp32")
    state.train_module = compiled
    loss, acc, _ = engine.evaluate(TrainConfig(channels_last=False), state, _batches(6, 4))
    assert compiled.batch_sizes == [] and math.isfinite(loss) and 0.0 <= acc <= 1.0


def test_first_non_finite_step_is_recorded_on_the_device():
    sums = StepSums(CPU)
    out, y = torch.zeros(2, 10), torch.zeros(2, dtype=torch.int64)
    for loss in (1.0, 2.0, math.nan, math.inf, 1.0):
        sums.add(torch.tensor(loss), out, y)
    assert sums.read()[2] == 2
    sums.reset()
    assert sums.read() == (0.0, 0, -1)


# ------------------------------------------------------------------------------- evaluation




def test_data_parallel_evaluates_eagerly(monkeypatch):
    monkeypatch.setattr(steps.dist, "is_active", lambda: True)
    assert "data parallel" in steps.eval_capture_blocker(TrainConfig(), torch.device("cuda"))


def test_eval_capture_that_fails_warns_once_records_why_and_evaluates_eagerly(monkeypatch):
    """Asked to capture where it cannot (here: a CPU), evaluation gives eager's numbers, one warning for the
    whole run, and the reason in the state that run.json's eval_step is written from."""
    model, opt = _tiny("sgd")
    eager = engine.TrainState(model=model, optimizer=opt, scaler=None, device=CPU, precision="fp32")
    expected = engine.evaluate(TrainConfig(channels_last=False, cuda_graph="off"), eager, _batches(10, 4))
    monkeypatch.setattr(steps, "eval_capture_blocker", lambda *a: None)  # pretend CUDA is eligible
    state = engine.TrainState(model=model, optimizer=opt, scaler=None, device=CPU, precision="fp32")
    warnings: list[str] = []
    cfg = TrainConfig(channels_last=False)
    first = engine.evaluate(cfg, state, _batches(10, 4), warn=warnings.append)
    second = engine.evaluate(cfg, state, _batches(10, 4), warn=warnings.append)
    assert first[:2] == second[:2] == expected[:2]
    assert len(warnings) == 1 and "evaluating eagerly" in warnings[0] and "CUDA" in warnings[0]
    described = state.eval_forward.describe()
    assert described["step"] == "eager" and "CUDA" in described["fallback_reason"]
    assert described["replayed_batches"] == 0
    assert eager.eval_forward.describe()["note"] == "--cuda-graph off"


# --------------------------------------------------------------------------------- fallback


def test_capture_on_a_cpu_falls_back_with_its_reason_and_trains_eagerly():
    model, opt = _tiny("sgd")
    flags = [dict(g) for g in opt.param_groups]
    runner = CapturedStep(model, opt, "fp32", CPU, batch_size=4, sample_shape=(3, 8, 8), channels_last=False)
    before = _params(model)
    runner.setup([4, 2])
    assert runner.mode == "eager" and not runner.captured
    assert "CUDA" in runner.fallback_reason and runner.describe()["fallback_reason"] == runner.fallback_reason
    assert [dict(g) for g in opt.param_groups] == flags  # foreach again, float lr
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))


def test_failure_in_the_middle_of_setup_restores_everything(monkeypatch, cpu_capturable):
    """A capture that dies after switching the optimizer and running warm-up steps: flags, lr, weights,
    BatchNorm statistics and optimizer state are as before, and training then equals plain eager."""

    def broken(self, other_batch_sizes):
        self.lr_tensor = torch.tensor(0.1)
        prepare_optimizer(self.optimizer, self.lr_tensor)
        with preserved_training_state(self.model, self.optimizer, keep_new_state=lambda: False):
            self._graph_body(StepSums(CPU))
            raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    monkeypatch.setattr(CapturedStep, "_warm_up_and_capture", broken)
    batches = _batches(12, 4)
    model_a, opt_a = _tiny("adam")
    runner = CapturedStep(model_a, opt_a, "fp32", CPU, batch_size=4, sample_shape=(3, 8, 8), channels_last=False)
    runner.setup([4])
    assert runner.fallback_reason == "RuntimeError: operation not permitted when stream is capturing"
    runner.begin_epoch()
    for x, y in batches:
        runner.load(x, y)
        runner.step()
    model_b, opt_b = _tiny("adam")
    for x, y in batches:
        _plain_step(model_b, opt_b, x, y)
    assert all(torch.equal(a, b) for a, b in zip(_params(model_a), _params(model_b)))


def test_engine_warns_once_and_records_eager_when_capture_fails(monkeypatch):
    monkeypatch.setattr(steps, "capture_blocker", lambda *a: None)  # pretend CUDA is eligible
    warnings: list[str] = []
    model = TinyNet()
    state = engine.TrainState(model=model, optimizer=build_optimizer("sgd", model.parameters(), 0.1, 0.9, 5e-4),
                              scaler=None, device=CPU, precision="fp32")
    hooks = engine.Hooks(on_warning=warnings.append)
    loader = _device_loader(n=6, batch=4)
    cfg = TrainConfig(batch_size=4, epochs=2, evaluate=False)
    assert engine.train(cfg, state, loader, None, hooks) == "completed"
    assert len(warnings) == 1 and "training eagerly" in warnings[0] and "CUDA" in warnings[0]
    assert "\n" not in warnings[0]
    r1, r2 = state.records
    assert r1.step_mode == r2.step_mode == "eager"
    assert r1.setup_s is not None and r2.setup_s is None  # setup is reported once, apart from the epochs


def test_cuda_graph_on_needs_cuda():
    with pytest.raises(UsageError, match="--cuda-graph on needs a CUDA device"):
        TrainConfig(cuda_graph="on", device="cpu").validate()
    with pytest.raises(UsageError, match="--cuda-graph"):
        TrainConfig(cuda_graph="sometimes").validate()
    model = TinyNet()
    state = engine.TrainState(model=model, optimizer=build_optimizer("sgd", model.parameters(), 0.1, 0.9, 0.0),
                              scaler=None, device=CPU, precision="fp32")
    with pytest.raises(UsageError, match="CUDA device"):
        engine.ensure_step_runner(TrainConfig(cuda_graph="on"), state, _device_loader())


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device auto is CUDA here")
def test_cuda_graph_on_without_cuda_is_one_line_before_anything_is_printed_or_written(tmp_path, capsys) -> None:
    """`--device auto` resolving to the CPU with `--cuda-graph on` is bad input: one line and exit 2, before the
    banner and before a run folder exists (it used to print the banner and leave a run folder marked failed)."""
    from cifarlab.cli import main

    for command in ("train", "doctor"):
        code = main([command, "--dataset", "synthetic", "--subset", "16", "--cuda-graph", "on",
                     "--out", str(tmp_path / command)])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", out
        assert err.strip() == ("cifarlab: error: --cuda-graph on needs a CUDA device (this run uses cpu); "
                               "use --cuda-graph auto or off")
        assert not (tmp_path / command).exists() or not any((tmp_path / command).iterdir())


@pytest.mark.parametrize("blocker", [steps.capture_blocker, steps.eval_capture_blocker])
def test_why_a_run_steps_or_evaluates_eagerly(blocker):
    cuda = torch.device("cuda")  # only its type is looked at
    assert blocker(TrainConfig(), cuda) is None  # the fast path on CUDA captures
    assert "off" in blocker(TrainConfig(cuda_graph="off"), cuda)
    assert "classic" in blocker(TrainConfig(loader="torch"), cuda)
    assert blocker(TrainConfig(loader="torch", cuda_graph="on"), cuda) is None
    assert "CUDA device" in blocker(TrainConfig(), CPU)


def test_what_only_the_training_step_cannot_capture():
    cuda = torch.device("cuda")
    assert "own" in steps.capture_blocker(TrainConfig(compile="reduce-overhead"), cuda)
    assert steps.capture_blocker(TrainConfig(compile="default"), cuda) is None  # compiled kernels inside the graph
    assert steps.capture_blocker(TrainConfig(compile="max-autotune-no-cudagraphs"), cuda) is None
    assert "GradScaler" in steps.capture_blocker(TrainConfig(), cuda, object())
    assert steps.eval_capture_blocker(TrainConfig(compile="reduce-overhead"), cuda) is None  # eval: the plain model


def test_epoch_batch_sizes_and_sample_shape():
    loader = _device_loader(n=10, batch=4)
    assert steps.epoch_batch_sizes(loader, TrainConfig()) == [4, 2]
    assert steps.epoch_batch_sizes(_device_loader(n=8, batch=4), TrainConfig()) == [4]
    assert steps.epoch_batch_sizes(_device_loader(n=3, batch=4), TrainConfig()) == [3]
    assert steps.sample_shape(loader) == (3, 32, 32)


# ------------------------------------------------------------------- augmentation per epoch


def _reference_batches(images, labels, batch, seed, epoch):
    """Straightforward per-image augmentation from the same per-epoch draws: one generator seeded by
    engine.seed_epoch's rule, permutation then offsets then flips; zero pad, crop, flip, /255, normalize."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    n = len(labels)
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(3, 1, 1)
    out = []
    for start in range(0, n, batch):
        xs, ys = [], []
        for i in order[start:start + batch].tolist():
            k = start + len(xs)
            img = images[i].permute(2, 0, 1)  # C, H, W uint8
            padded = F.pad(img, (PAD, PAD, PAD, PAD))
            r, c = offsets[k].tolist()
            crop = padded[:, r:r + 32, c:c + 32]
            if flips[k]:
                crop = crop.flip(2)
            xs.append(((crop.float() / 255) - mean) / std)
            ys.append(labels[i])
        out.append((torch.stack(xs), torch.stack(ys)))
    return out


def test_per_epoch_augmentation_equals_a_per_image_reference_pixel_for_pixel():
    """The device loader draws the epoch's permutation, offsets and flips once, at epoch start; each
    batch equals a per-image reference built from the same (seed, epoch) draws, bit for bit, and a
    re-run of the same epoch gives the same batches."""
    loader = _device_loader(n=10, batch=4, seed=0)
    for epoch in (1, 2):
        engine.seed_epoch(7, epoch, loader)
        got = [(x.clone(), y.clone()) for x, y in loader]
        engine.seed_epoch(7, epoch, loader)
        again = list(loader)
        ref = _reference_batches(loader.images, loader.labels, 4, 7, epoch)
        assert [x.shape[0] for x, _ in got] == [4, 4, 2]
        for (x, y), (x2, y2), (rx, ry) in zip(got, again, ref):
            assert torch.equal(x, x2) and torch.equal(y, y2)
            assert torch.equal(y, ry)
            assert torch.equal(x.contiguous(), rx)


# ------------------------------------------------------------------------------- CUDA only


def _cuda_pair(name: str, batch: int = 32, n: int = 80):
    device = torch.device("cuda")
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = resnet18().to(device).to(memory_format=torch.channels_last)
        # Adagrad's and Adam's first steps move every weight by about +-lr whatever the gradient's size,
        # so bf16 noise that flips a tiny gradient's sign costs 2 lr there: smaller lr for them.
        lr = {"adam": 1e-3, "adagrad": 0.01}.get(name, 0.1)
        models.append((m, build_optimizer(name, m.parameters(), lr, 0.9, 5e-4)))
    g = torch.Generator(device=device).manual_seed(3)
    data = [(torch.randn(min(batch, n - s), 3, 32, 32, device=device, generator=g).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (min(batch, n - s),), device=device, generator=g)) for s in range(0, n, batch)]
    return device, models, data


@pytest.fixture
def cuda_deterministic():
    """cuDNN's deterministic kernels, no autotuning, no TF32, restored afterwards. Without them two *eager*
    runs from the same seed differ: on an H200 (torch 2.11) two eager SGD runs of these 6 steps at lr 0.1
    differed by up to 81% of a weight tensor's norm, so no tolerance could tell a capture bug from noise."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = flags


@needs_cuda
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_captured_step_matches_eager(name, cuda_deterministic):
    """Replays of the captured step give eager training's weights *bit for bit*, for every optimizer, when
    the kernels are deterministic and the eager optimizer has the same capturable configuration (checked
    on an H200, torch 2.11). SGD, SGD-nesterov and Adagrad: 2 epochs of 32, 32 and a partial 16 (the
    eager last batch included), eager lr a float. Adam and Adadelta: full batches with the lr a tensor on
    both sides -- their tensor-lr math rounds differently from the float-lr math (one ulp, which their
    normalized steps amplify to percents within 6 steps); the partial batch is covered on the CPU."""
    tensor_lr = name in ("adam", "adadelta")
    device, ((m_c, o_c), (m_e, o_e)), data = _cuda_pair(name, n=64 if tensor_lr else 80)
    captured = CapturedStep(m_c, o_c, "fp32", device, batch_size=32)
    captured.setup(sorted({int(y.shape[0]) for _, y in data}, reverse=True))
    assert captured.captured, captured.fallback_reason
    assert all(torch.equal(a, b) for a, b in zip(_params(m_c), _params(m_e)))  # warm-up changed nothing
    lr = float(o_e.param_groups[0]["lr"])
    prepare_optimizer(o_e, torch.tensor(lr, device=device))
    if not tensor_lr:
        for group in o_e.param_groups:
            group["lr"] = lr
    eager = StepRunner(m_e, o_e, "fp32", device)
    for runner in (captured, eager):
        runner.begin_epoch()
        for epoch in range(2):
            for x, y in data:
                runner.load(x, y)
                runner.step()
    assert captured.read_sums() == eager.read_sums()
    assert all(torch.equal(a, b) for a, b in zip(_params(m_c), _params(m_e))), name


@needs_cuda
def test_cuda_warmup_lr_reaches_the_graph():
    device, ((m_c, o_c), (m_e, o_e)), data = _cuda_pair("sgd", batch=32, n=64)
    captured = CapturedStep(m_c, o_c, "fp32", device, batch_size=32)
    captured.setup([32])
    assert captured.captured, captured.fallback_reason
    captured.begin_epoch()
    captured.load(*data[0])
    captured.step(0.0)  # lr 0: a replay must leave the weights alone
    before = _params(m_c)
    captured.load(*data[1])
    captured.step(0.0)
    torch.cuda.synchronize()
    after = _params(m_c)
    assert all(torch.equal(a, b) for a, b in zip(before[:62], after[:62]))  # parameters (not BN buffers)
    captured.load(*data[0])
    captured.step(0.1)
    torch.cuda.synchronize()
    assert not torch.equal(_params(m_c)[0], after[0])


@needs_cuda
def test_cuda_capture_failure_falls_back_and_restores(monkeypatch):
    device, ((m_c, o_c), _), data = _cuda_pair("adam")
    before = _params(m_c)
    original = CapturedStep._graph_body

    def fail_in_capture(self, sums):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("injected capture failure")
        original(self, sums)

    monkeypatch.setattr(CapturedStep, "_graph_body", fail_in_capture)
    runner = CapturedStep(m_c, o_c, "bf16", device, batch_size=32)
    runner.setup([32, 16])
    assert runner.mode == "eager" and "injected capture failure" in runner.fallback_reason
    assert all(torch.equal(a, b) for a, b in zip(before, _params(m_c)))
    runner.begin_epoch()
    for x, y in data:
        runner.load(x, y)
        runner.step()
    assert runner.read_sums()[2] == -1


@needs_cuda
def test_cuda_train_reports_setup_and_epoch_one_is_not_taxed():
    """Through engine.train on the device loader: captured, setup_s reported once, epoch 1 within
    1.3x of the steady epochs (plus 50 ms for timer noise on short epochs)."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    n = 128 * 40 + 80  # 40 full batches and a partial one, like CIFAR-10's 390 + 80
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    loader = DeviceLoader(images, torch.arange(n) % 10, 128, device, augment=True, shuffle=True)
    cfg = TrainConfig(batch_size=128, epochs=4, evaluate=False, sync_timing=False)
    torch.manual_seed(0)
    model = resnet18().to(device).to(memory_format=torch.channels_last)
    state = engine.TrainState(model=model, optimizer=build_optimizer("sgd", model.parameters(), 0.1, 0.9, 5e-4),
                              scaler=None, device=device, precision="bf16")
    assert engine.train(cfg, state, loader, None) == "completed"
    records = state.records
    assert all(r.step_mode == "cuda-graph" for r in records), state.step_runner.fallback_reason
    assert records[0].setup_s > 0 and all(r.setup_s is None for r in records[1:])
    steady = sorted(r.epoch_s for r in records[1:])[len(records[1:]) // 2]
    assert records[0].epoch_s <= 1.3 * steady + 0.05, [r.epoch_s for r in records]
    assert all(math.isfinite(r.train_loss) and r.images == n for r in records)


def test_an_eager_run_resumed_from_a_captured_checkpoint_gets_the_eager_flags_back():
    model, opt = _tiny("sgd")
    prepare_optimizer(opt, torch.tensor(0.1))  # as a captured run's checkpoint would restore them
    state = engine.TrainState(model=model, optimizer=opt, scaler=None, device=CPU, precision="fp32")
    runner = engine.ensure_step_runner(TrainConfig(), state, _device_loader())
    assert runner.mode == "eager"
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]


def test_train_with_compile_names_inductors_cache_and_keeps_compilation_in_setup(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`cifarlab train --compile MODE` says where inductor's on-disk cache is and whether it was warm (console and
    run.json), and the compiled module's first call happens in setup, before epoch 1's clock -- on a CPU too.
    torch.compile is replaced by a stand-in here (compiling ResNet-18 on 2 cores takes minutes)."""
    import json
    import os

    from cifarlab.cli import main

    made: list[ShapeRecorder] = []

    def fake_compile(model, mode=None):
        wrapper = ShapeRecorder(model)
        wrapper._orig_mod = model
        made.append(wrapper)
        return wrapper

    monkeypatch.setattr(engine.torch, "compile", fake_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    (tmp_path / "inductor").mkdir()
    (tmp_path / "inductor" / "entry").write_text("x")
    walks: list[str] = []
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top, *a, **kw: (walks.append(str(top)), real_walk(top, *a, **kw))[1])
    code = main(["train", "--dataset", "synthetic", "--subset", "20", "--test-subset", "10", "--batch-size", "8",
                 "--epochs", "1", "--compile", "default", "--no-evaluate", "--device", "cpu", "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    assert (f"compile: torch.compile mode default; inductor's on-disk cache {tmp_path / 'inductor'} (warm, 1 file(s); "
            f"from $TORCHINDUCTOR_CACHE_DIR)") in out
    (run,) = (tmp_path / "runs").glob("*-train")
    doc = json.loads((run / "run.json").read_text())
    assert doc["compile_cache"] == {"dir": str(tmp_path / "inductor"), "source": "from $TORCHINDUCTOR_CACHE_DIR",
                                    "entries_before": 1, "entries_after": 1}
    (wrapper,) = made
    assert wrapper.batch_sizes == [8, 8, 8]  # the setup warm-up, then the 2 full batches (the last 4 ran plain)
    assert "setup" in out and "not in epoch (eager step)" in out
    # the cache folder is walked once before the run (banner and run.json share it) and once after
    assert walks.count(str(tmp_path / "inductor")) == 2
    # The classic pipeline too: compilation is setup whatever the loader (its eager runs keep no warm-up).
    made.clear()
    assert main(["train", "--dataset", "synthetic", "--subset", "20", "--test-subset", "10", "--batch-size", "8",
                 "--epochs", "1", "--compile", "default", "--no-evaluate", "--loader", "torch", "--workers", "0",
                 "--device", "cpu", "--out", str(tmp_path / "runs")]) == 0
    (wrapper,) = made
    assert wrapper.batch_sizes == [8, 8, 8]


def test_a_stop_during_evaluation_keeps_the_epoch_and_records_no_test_figures():
    """Ctrl-C / SIGTERM while the test set is evaluated (a minute on a CPU for 10,000 images): evaluation stops
    at the next batch instead of finishing, the epoch's training is kept (status ok, the run's epoch count
    advances), its test figures stay empty (a part of the test set would be another number), one warning says
    so, and the run ends interrupted."""
    model = TinyNet()
    state = engine.TrainState(model=model, optimizer=build_optimizer("sgd", model.parameters(), 0.1, 0.9, 5e-4),
                              scaler=None, device=CPU, precision="fp32")
    stop = [False]
    evaluated: list[int] = []

    class SignalDuringEvaluation:
        def __iter__(self):
            stop[0] = True  # the signal arrives as evaluation starts
            for x, y in _batches(12, 4):
                evaluated.append(len(y))
                yield x, y

    warnings: list[str] = []
    hooks = engine.Hooks(should_stop=lambda: stop[0], on_warning=warnings.append)
    cfg = TrainConfig(batch_size=4, epochs=3, loader="torch", workers=0, channels_last=False)
    assert engine.train(cfg, state, _batches(8, 4), SignalDuringEvaluation(), hooks) == "interrupted"
    (record,) = state.records
    assert record.status == "ok" and state.epoch == 1
    assert record.test_acc is None and record.test_loss is None and record.eval_s is None
    assert evaluated == [4]  # the first batch was drawn, the check before it ran stopped the rest
    assert len(warnings) == 1 and "epoch 1: evaluation stopped by the signal" in warnings[0]


@needs_cuda
def test_cuda_captured_evaluation_matches_eager_and_follows_the_weights():
    """Evaluation replays a graph captured per evaluation: the same loss and accuracy as eager (partial batch
    included), the graph really used, and after a training step the next evaluation sees the new weights."""
    device, ((model, opt), _), data = _cuda_pair("sgd", batch=32, n=80)  # 32, 32, 16
    cfg = TrainConfig(batch_size=32)
    captured = engine.TrainState(model=model, optimizer=opt, scaler=None, device=device, precision="bf16")
    eager = engine.TrainState(model=model, optimizer=opt, scaler=None, device=device, precision="bf16")
    off = TrainConfig(batch_size=32, cuda_graph="off")
    for _ in range(2):
        loss_c, acc_c, _ = engine.evaluate(cfg, captured, data)
        loss_e, acc_e, _ = engine.evaluate(off, eager, data)
        assert captured.eval_forward.mode == "cuda-graph" and captured.eval_forward.fallback_reason is None
        assert math.isclose(loss_c, loss_e, rel_tol=1e-2) and abs(acc_c - acc_e) <= 2 / 80
        model.train()
        _plain_step(model, opt, *data[0])  # the weights move in place: the next capture reads them
    assert captured.eval_forward.replays == 4  # 2 full batches per evaluation; the partial one eager
    # One graph pool per run, reused by every evaluation (a fresh pool per capture is never handed back, and a
    # reused handle whose graphs are all gone trips torch's allocator): reserved memory stays flat.
    model.eval()
    reserved = []
    for _ in range(6):
        engine.evaluate(cfg, captured, data)
        reserved.append(torch.cuda.memory_reserved(device))
    assert captured.eval_forward.fallback_reason is None and captured.eval_forward.replays == 16
    assert reserved[-1] <= reserved[1], reserved
