"""DDP: 2 processes at batch B train exactly like 1 process at batch 2B, with one all-reduce.

The 2-process runs use scripts (Lightning's ``ddp`` strategy relaunches the script, so it
cannot run inside pytest): one launch of ``tests/_ddp_cases.py`` trains every case on 2 CPU
processes with gloo (the example's three rules; PC with the tolerance schedule; DTP with noisy
feedback; backprop, PC and DTP on a depth-4 ReLU network with cross-entropy), each process
saving its weights, its per-step all-reduce counts (a DDP communication hook), the epoch loss
and PC's inference steps; ``examples/ddp_train.py`` runs the spawn and accumulation cases. The
reference is the same script's single-process run at batch 2B on the same samples, in this
process.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import signal
import subprocess
import sys
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions on ForkingPickler)
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.distributed import (
    AllReduceCounter,
    LocalDDPStrategy,
    StepCommunication,
    check_supported_strategy,
    global_batch_sampler,
    process_layout,
    single_bucket_mb,
    sum_across_processes,
)
from lightning_local.errors import LocalLearningError
from lightning_local.models import MLP
from lightning_local.modules import BackpropModule, PredictiveCodingModule
from lightning_local.rules import RULES as RULES_REGISTRY
from lightning_local.rules import PredictiveCoding
from lightning_local.rules.base import ProcessLayout

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_train.py"
SCRIPT = ROOT / "tests" / "_ddp_cases.py"  # the cases, on the example's data and sampler
RULES = ("bp", "pc", "tp")
# cases that need the global batch before the surrogate, and a deeper ReLU/cross-entropy net
GLOBAL_CASES = ("pc_tolerance", "dtp_noisy")
SI_CASES = ("pc_si_fpa", "pc_si")  # PC's sequential schedules, with and without FPA
REGISTERED_CASES = tuple(f"registered_{family}" for family in RULES_REGISTRY)  # defaults
RELU4_CASES = ("relu4_ce_bp", "relu4_ce_pc_tolerance", "relu4_ce_dtp_ridge",
               "relu4_ce_dtp_noisy")
BATCH, SAMPLES, WIDTH, SEED = 4, 16, 32, 0  # 2 ranks x 4 = 8 per step: 2 steps per epoch
STEPS = SAMPLES // (2 * BATCH)
COMMON = ["--data", "gaussian", "--samples", str(SAMPLES), "--width", str(WIDTH),
          "--seed", str(SEED), "--epochs", "1"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example():
    return _load(EXAMPLE, "ddp_train_example")


def _cases():
    return _load(SCRIPT, "ddp_cases")


def _launch(args: list[str], timeout: float = 400, script: Path = EXAMPLE) -> None:
    """Run ``script`` in a new process group; kill the whole group if it hangs."""
    process = subprocess.Popen(
        [sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the DDP run hung for {timeout} s:\n{output[-4000:]}") from None
    assert process.returncode == 0, f"the DDP run failed:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"ddp": dir, "spawn": dir, "single": dir}`` of per-rank result files."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("ddp", "spawn", "single")}
    cases = [*RULES, *REGISTERED_CASES, *SI_CASES, *GLOBAL_CASES, *RELU4_CASES]
    shared = ["--samples", str(SAMPLES), "--width", str(WIDTH), "--seed", str(SEED),
              "--epochs", "1"]
    _launch(["--cases", *cases, "--devices", "2", "--batch-size", str(BATCH),
             "--alignment-every", "1", "--out", str(folders["ddp"]), *shared], script=SCRIPT)
    _launch(["--rules", "pc", "--devices", "2", "--strategy", "local_ddp_spawn",
             "--batch-size", str(BATCH), "--out", str(folders["spawn"]), *COMMON])
    _cases().main(["--cases", *cases, "--devices", "1", "--batch-size", str(2 * BATCH),
                   "--out", str(folders["single"]), *shared])
    return folders


@pytest.fixture(scope="module")
def accumulated_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bp and PC with accumulate_grad_batches=2: 2 processes at B and 1 process at 2B."""
    folders = {name: tmp_path_factory.mktemp(f"acc_{name}") for name in ("ddp", "single")}
    accumulate = ["--accumulate-grad-batches", "2"]
    _launch(["--rules", "bp", "pc", "--devices", "2", "--strategy", "local_ddp",
             "--batch-size", str(BATCH), "--out", str(folders["ddp"]), *accumulate, *COMMON])
    _example().main(["--rules", "bp", "pc", "--devices", "1", "--batch-size", str(2 * BATCH),
                     "--out", str(folders["single"]), *accumulate, *COMMON])
    return folders


@pytest.mark.parametrize("rule", ["bp", "pc"])
def test_ddp_accumulation_equals_one_process_and_skips_the_first_all_reduce(
    accumulated_runs, rule
):
    """k = 2 micro-batches per step: 2 x B equals 1 x 2B, and the first micro-batch's backward
    runs without an all-reduce (DDP's no_sync), the k-th with exactly one."""
    rank0 = _check_weights(accumulated_runs["ddp"], accumulated_runs["single"], rule)[0]
    counts = [(s["before_backward"], s["backward"], s["after_backward"])
              for s in rank0["all_reduces"]]
    assert counts == [(0, 0, 0), (0, 1, 0)] * (STEPS // 2)


def _network(case: str) -> torch.nn.Module:
    L.seed_everything(SEED, verbose=False)
    return _cases().build_module(case, WIDTH, 0.1).network_for_rule()


def _initial_weights(case: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _network(case).state_dict().items()}


def _check_weights(folder: Path, reference: Path, rule: str) -> tuple[dict, dict, dict]:
    """Both ranks hold the same weights, those of the single process at twice the batch, and
    they moved; returns the three result files (rank 0, rank 1, single)."""
    rank0, rank1 = (torch.load(folder / f"{rule}_rank{r}.pt") for r in (0, 1))
    single = torch.load(reference / f"{rule}_rank0.pt")
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    initial = _initial_weights(rule)
    assert rank0["state_dict"].keys() == single["state_dict"].keys() == initial.keys()
    moved = 0.0
    for name, weight in rank0["state_dict"].items():
        assert torch.equal(weight, rank1["state_dict"][name]), f"ranks differ in {name}"
        difference = (weight - single["state_dict"][name]).abs().max().item()
        assert difference < 1e-6, f"{rule} {name}: 2 x B differs from 1 x 2B by {difference}"
        moved = max(moved, (weight - initial[name]).abs().max().item())
    assert moved > 1e-3, "the weights did not move: the comparison would prove nothing"
    return rank0, rank1, single


def _check_against_one_process(folder: Path, reference: Path, rule: str) -> tuple[dict, ...]:
    rank0, rank1, single = _check_weights(folder, reference, rule)
    # epoch metrics are synchronised across ranks: both hold the global mean of 1 x 2B
    assert rank0["loss_epoch"] == rank1["loss_epoch"]
    assert rank0["loss_epoch"] == pytest.approx(single["loss_epoch"], abs=1e-6)
    trainable = sum(v.numel() for k, v in _trainable(rule).items())
    expected = StepCommunication(before_backward=0, backward=1, after_backward=0, numel=trainable)
    for rank in (rank0, rank1):
        assert [StepCommunication(**s) for s in rank["all_reduces"]] == [expected] * STEPS
    return rank0, rank1, single


def _trainable(case: str) -> dict[str, torch.Tensor]:
    return {k: p for k, p in _network(case).named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rule", RULES)
def test_ddp_two_processes_equal_one_process_with_one_all_reduce_per_step(runs, rule):
    """``local_ddp`` (script relaunch), gloo: ranks bit-identical, = 1 x 2B, 1 all-reduce/step.

    The run also computes the local-update/backprop cosine every step: it adds no all-reduce
    and does not change the training (the single-process reference runs without it).
    """
    _check_against_one_process(runs["ddp"], runs["single"], rule)


@pytest.mark.parametrize("case", REGISTERED_CASES + SI_CASES + GLOBAL_CASES + RELU4_CASES)
def test_ddp_equals_one_process_where_the_rule_needs_the_global_batch(runs, case):
    """Every registered rule with its defaults, PC's sequential schedules (with and without
    FPA) and its tolerance schedule, DTP's
    noisy feedback, and every rule on a depth-4 ReLU
    network with cross-entropy: ranks bit-identical, = 1 x 2B (< 1e-6), 1 gradient all-reduce
    per step. Each PC step's inference stops where the single process stops on the global
    batch, strictly between the first step and the cap, on both ranks. [Without the global
    stop decision the tanh case is 3e-4 and the ReLU case 5e-3 off (a rank takes one step
    more or less); with the same noise on both ranks the DTP feedback is 0.2 and 0.14 off.]
    """
    rank0, rank1, single = _check_against_one_process(runs["ddp"], runs["single"], case)
    if case.endswith("pc_tolerance"):
        steps, cap = single["inference_steps"], _cases().PC_TOLERANCE["inference_steps"]
        assert len(steps) == STEPS and all(1 < s < cap for s in steps), steps
        assert rank0["inference_steps"] == rank1["inference_steps"] == steps


def test_ddp_spawn_two_processes_equal_one_process(runs):
    """``local_ddp_spawn`` pickles the module into new processes: muP base shapes survive."""
    _check_against_one_process(runs["spawn"], runs["single"], "pc")


def test_base_shapes_survive_the_spawn_pickler():
    module = PredictiveCodingModule(MLP(width=WIDTH), parametrization="mup", base_width=16)
    buffer = io.BytesIO()
    ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(module)
    copy = pickle.loads(buffer.getvalue())
    for (name, p), (_, q) in zip(module.named_parameters(), copy.named_parameters()):
        assert hasattr(q, "infshape"), f"{name} lost its base shape"
        assert q.infshape.width_mult() == p.infshape.width_mult()
        assert [d.base_dim for d in q.infshape] == [d.base_dim for d in p.infshape]


def _fit_on_one_ddp_process(strategy: LocalDDPStrategy, counter: AllReduceCounter) -> None:
    """Fit a ~37 MB backprop MLP for 2 steps under DDP with one process (gloo, in process)."""
    environment = dict(os.environ)
    try:
        L.seed_everything(0, verbose=False)
        module = BackpropModule(MLP(width=3000), lr=0.01)
        data = TensorDataset(torch.randn(8, 40), torch.randint(0, 10, (8,)))
        trainer = L.Trainer(
            accelerator="cpu", devices=1, strategy=strategy, max_steps=2, logger=False,
            callbacks=[counter], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(data, batch_size=4))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


def test_a_model_over_ddp_default_bucket_size_is_still_one_all_reduce():
    counter = AllReduceCounter()
    _fit_on_one_ddp_process(LocalDDPStrategy(ddp_comm_hook=counter), counter)
    params = sum(p.numel() for p in MLP(width=3000).parameters())
    assert params * 4 > 25 * 2**20  # larger than DDP's default 25 MiB bucket
    assert counter.steps == [StepCommunication(0, 1, 0, params)] * 2
    split = AllReduceCounter()  # the control: DDP's default buckets split it (once rebuilt)
    _fit_on_one_ddp_process(LocalDDPStrategy(ddp_comm_hook=split, single_bucket=False), split)
    assert all(step.numel == params for step in split.steps)
    assert max(step.backward for step in split.steps) > 1


def test_single_bucket_mb_holds_every_trainable_parameter():
    network = MLP(width=3000)
    size = sum(p.numel() * 4 for p in network.parameters())
    assert single_bucket_mb(network) * 2**20 >= size
    assert single_bucket_mb(MLP(width=16)) == 25  # small models keep DDP's default


def test_global_batch_sampler_gives_n_ranks_the_single_process_batches():
    dataset = TensorDataset(torch.arange(24))
    batch = 3
    single = list(global_batch_sampler(dataset, shuffle=True, seed=5))
    ranks = []
    for rank in range(2):
        trainer = type("T", (), {"world_size": 2, "global_rank": rank})()
        ranks.append(list(global_batch_sampler(dataset, trainer, shuffle=True, seed=5)))
    assert sorted(single) == list(range(24)) and single != sorted(single)
    for step in range(len(single) // (2 * batch)):
        together = ranks[0][step * batch:(step + 1) * batch] + ranks[1][step * batch:(step + 1)
                                                                          * batch]
        assert sorted(together) == sorted(single[step * 2 * batch:(step + 1) * 2 * batch])


def test_sum_across_processes_is_the_identity_in_one_process():
    value = torch.tensor([1.0, -2.0])
    assert sum_across_processes(value) is value and value.tolist() == [1.0, -2.0]


def test_process_layout_of_one_process_and_of_a_trainer():
    assert process_layout() == ProcessLayout() == PredictiveCoding().process_layout
    trainer = type("T", (), {"world_size": 4, "global_rank": 2})()
    assert process_layout(trainer) == ProcessLayout(2, 4, sum_across_processes)
    trainer = type("T", (), {"world_size": 1, "global_rank": 0})()
    assert process_layout(trainer) == ProcessLayout()  # no communication in one process


def test_process_layout_refuses_an_impossible_layout():
    with pytest.raises(LocalLearningError, match="all_reduce_sum"):
        ProcessLayout(rank=0, world_size=2)
    for rank, world_size in ((2, 2), (-1, 2), (0, 0), (True, 2), (0.0, 2)):
        with pytest.raises(LocalLearningError, match="0 <= rank < world_size"):
            ProcessLayout(rank, world_size, sum_across_processes)


def test_assigning_all_reduce_sum_keeps_the_rank_and_world_size():
    rule = PredictiveCoding()
    assert rule.all_reduce_sum is None
    rule.process_layout = ProcessLayout(1, 2, sum_across_processes)

    def other(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    rule.all_reduce_sum = other
    assert rule.process_layout == ProcessLayout(1, 2, other) and rule.all_reduce_sum is other
    assert PredictiveCoding().process_layout == ProcessLayout()  # per rule, not per class


def test_registered_strategy_names():
    for name, start in (("local_ddp", "popen"), ("local_ddp_spawn", "spawn")):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert isinstance(trainer.strategy, LocalDDPStrategy)
        assert trainer.strategy._start_method == start
        assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is False


def test_find_unused_parameters_is_refused():
    with pytest.raises(LocalLearningError, match="find_unused_parameters"):
        LocalDDPStrategy(find_unused_parameters=True)


def test_sharding_strategies_are_refused_with_the_reason():
    with pytest.raises(LocalLearningError, match="infshape"):
        check_supported_strategy(FSDPStrategy())
    check_supported_strategy(DDPStrategy())  # DDP is the supported path
    module = BackpropModule(MLP(width=16))
    module.trainer = type("T", (), {"strategy": FSDPStrategy()})()
    with pytest.raises(LocalLearningError, match="FSDP"):
        module.setup("fit")
