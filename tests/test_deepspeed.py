"""Training under accelerate + DeepSpeed ZeRO-2 with the shipped config, on two CPU processes: it trains,
writes partitioned optimizer state without the frozen UNet, exports a loadable adapter, and resumes exactly.

Needs deepspeed (skipped without it; ``./run.sh test`` installs it). On a machine where it never ran, DeepSpeed
first compiles its CPU shared-memory communication op (a minute or two, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from test_train import _accelerate_launch, _launch_args, dataset  # noqa: F401  (the same small dataset)

from faceid.checkpoints import load_state_dict

pytestmark = pytest.mark.skipif(  # decided before the dataset fixture is built
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install deepspeed)"
)
CPU = {"DS_ACCELERATOR": "cpu"}  # DeepSpeed's CPU accelerator (gloo between the processes)


def test_deepspeed_zero2_on_two_cpu_processes_trains_and_resumes(dataset, tiny_models, tmp_path):  # noqa: F811
    one = tmp_path / "one"
    done = _accelerate_launch("accelerate_deepspeed_zero2.yaml", _launch_args(dataset, tiny_models, one), CPU, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 3 steps on 2 processes" in done.stdout
    checkpoint = one / "checkpoint-2"
    assert (checkpoint / "adapter.safetensors").is_file()
    # ZeRO-2 really ran: the optimizer state is partitioned, one shard per process
    shards = sorted(p.name for p in (checkpoint / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # ... and the module file holds the trained weights only, not the frozen UNet
    module = torch.load(checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all("lora" in k or "_ip" in k or k.startswith("projection.") for k in module)
    history = json.loads((one / "train_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    final = load_state_dict(one / "ip-adapter-faceid.safetensors")  # a complete, loadable adapter
    at_two = load_state_dict(checkpoint / "adapter.safetensors")
    assert any(not torch.equal(final[g][k], at_two[g][k]) for g in final for k in final[g])  # step 3 trained

    # resume from the step-2 checkpoint (ZeRO optimizer shards, schedule, step): the same step 3
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    args = _launch_args(dataset, tiny_models, resumed, "--resume", "latest")
    done = _accelerate_launch("accelerate_deepspeed_zero2.yaml", args, CPU, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((resumed / "train_history.json").read_text()) == history[2:]
    again = load_state_dict(resumed / "ip-adapter-faceid.safetensors")
    for group in final:
        for key in final[group]:
            assert torch.equal(final[group][key], again[group][key]), f"{group}.{key} differs after resume"


def test_deepspeed_config_that_disagrees_with_the_training_config_is_refused(dataset, tiny_models, tmp_path):  # noqa: F811
    args = _launch_args(dataset, tiny_models, tmp_path / "x", "--set", "max_grad_norm=0.5")
    done = _accelerate_launch("accelerate_deepspeed_zero2.yaml", args, CPU, tmp_path)
    assert done.returncode != 0
    assert "gradient_clipping" in done.stderr and "max_grad_norm" in done.stderr
