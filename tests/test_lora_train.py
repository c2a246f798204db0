"""LoRA fine-tuning on the shared training core (tiny model and dataset, CPU): only the adapter trains, the base
stays bitwise untouched, checkpoints hold the adapter and resume exactly, precision / checkpointing / DDP work."""
import subprocess
import sys

import pytest
import torch

from diffusion.model.lora import adapter_state_dict, base_state_dict, fingerprint, is_adapter_key
from diffusion.train import state as ckpt
from diffusion.train.lora import LoRAFlavour
from diffusion.utils.checkpoint import CheckpointError, read_checkpoint, save_weights
from diffusion.utils.config import ConfigError
from tests.conftest import REPO, tiny_model
from tests.train_kit import assert_states_equal, final_state, run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

LORA = {"rank": 4, "alpha": 8, "target_modules": ["self_attention", "cross_attention", "mlp", "t_block"]}
TRAIN_SCRIPT = REPO / "scripts" / "train.py"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained-looking base model (every weight random, none zero) as a released-layout checkpoint."""
    path = tmp_path_factory.mktemp("base") / "base.pth"
    model = tiny_model(seed=3)
    save_weights(model.state_dict(), path)
    return path, fingerprint(model.state_dict())


def lora_run(config, work_dir, base, overrides=None, flavour=None, **options):
    path, _ = base
    return run(config, work_dir, {"lora": LORA, **(overrides or {})}, flavour=flavour, load_from=str(path), **options)


class KeepsTheModel(LoRAFlavour):
    """LoRA training that keeps a handle on the model it trained, for inspection after the run."""

    def wrap_model(self, model, cfg):
        self.model = super().wrap_model(model, cfg)
        return self.model


def test_only_the_adapter_trains_and_the_base_stays_bitwise_untouched(train_config, tmp_path, base):
    flavour = KeepsTheModel(LORA)
    result = lora_run(train_config, tmp_path / "run", base, {"max_steps": 4}, flavour=flavour)
    model = flavour.model
    assert fingerprint(base_state_dict(model)) == base[1]  # hash of the base weights before and after training
    base_params = [p for n, p in model.named_parameters() if not is_adapter_key(n)]
    assert base_params and not any(p.requires_grad or p.grad is not None for p in base_params)
    state = final_state(result)
    adapter = adapter_state_dict(model.state_dict())
    assert set(state["state_dict"]) == set(state["state_dict_ema"]) == set(adapter)  # adapter only, live and EMA
    assert len(state["optimizer"]["state"]) == len(adapter)  # optimizer state for the adapter tensors only
    assert state["flavour"]["name"] == "lora" and state["flavour"]["state"]["base_fingerprint"] == base[1]
    key = "blocks.0.attn.qkv.lora_B.weight"
    assert state["state_dict"][key].abs().max() > 0  # B starts at zero: the adapter did train
    assert not torch.equal(state["state_dict_ema"][key], state["state_dict"][key])  # EMA averages the adapter
    assert "t_block.1.lora_A.weight" in adapter and "y_embedder.y_proj.fc1.lora_A.weight" not in adapter


@pytest.mark.parametrize("stop_at", [6, 7], ids=["epoch-boundary", "mid-epoch"])
def test_lora_resume_matches_an_uninterrupted_run(train_config, tmp_path, base, stop_at):
    """24 records / batch 4 = 6 steps an epoch: stop at an epoch boundary and in the middle of an epoch. The
    adapter's dropout draws from the global RNG, which the checkpoint carries."""
    straight = lora_run(train_config, tmp_path / "straight", base, {"max_steps": 9, "lora.dropout": 0.1})
    lora_run(train_config, tmp_path / "resumed", base, {"max_steps": stop_at, "lora.dropout": 0.1})
    resumed = lora_run(train_config, tmp_path / "resumed", base, {"max_steps": 9, "lora.dropout": 0.1},
                       resume_from="auto")
    assert resumed.global_step == 9
    assert_states_equal(final_state(straight), final_state(resumed))  # bitwise on the CPU


def test_resume_on_other_base_weights_is_refused(train_config, tmp_path, base):
    lora_run(train_config, tmp_path / "run", base, {"max_steps": 1})
    other = tmp_path / "other.pth"
    save_weights(tiny_model(seed=4).state_dict(), other)
    with pytest.raises(CheckpointError, match="trained on other base weights"):
        lora_run(train_config, tmp_path / "run", (other, None), {"max_steps": 2}, resume_from="auto")


def test_lora_needs_base_weights(train_config, tmp_path):
    with pytest.raises(ConfigError, match="'lora' training flavour fine-tunes loaded weights.*--load-from"):
        run(train_config, tmp_path / "run", {"lora": LORA, "max_steps": 1})


@pytest.mark.parametrize("lora, message", [
    ({"rnak": 4}, "unknown config key 'lora.rnak'; did you mean 'rank'?"),
    ({"rank": 0}, "'lora.rank' is 0; expected an integer >= 1"),
    ({"target_modules": "mlp"}, "'lora.target_modules' is 'mlp'; expected None"),
    ({"target_modules": ["atn.qkv"]}, "entry 'atn.qkv' matches no module of PixArt"),
    ({"target_modules": ["blocks.0.norm1"]}, "selects 'blocks.0.norm1', a LayerNorm"),
])
def test_bad_lora_settings_fail_at_start_up_with_named_errors(train_config, tmp_path, base, lora, message):
    with pytest.raises(ConfigError) as info:
        run(train_config, tmp_path / "run", {"lora": lora, "max_steps": 1}, load_from=str(base[0]))
    assert message in str(info.value)


def test_bf16_mixed_precision_lora_trains_on_cpu(train_config, tmp_path, base):
    result = lora_run(train_config, tmp_path / "run", base, {"max_steps": 3, "mixed_precision": "bf16",
                                                             "lora.use_dora": True})
    state = final_state(result)
    assert any(k.endswith("lora_magnitude_vector") for k in state["state_dict"])
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state["state_dict"].values())


def test_gradient_checkpointing_trains_the_same_adapter(train_config, tmp_path, base):
    plain = lora_run(train_config, tmp_path / "plain", base, {"max_steps": 3})
    checkpointed = lora_run(train_config, tmp_path / "gc", base, {"max_steps": 3, "grad_checkpointing": True})
    assert_states_equal(final_state(plain), final_state(checkpointed), atol=1e-6)


def test_two_processes_match_one_process_with_twice_the_batch(train_config, tmp_path, base):
    """scripts/train.py picks the LoRA flavour from the config; DDP averages the adapter's gradients."""
    common = [str(train_config), "--report-to", "none", "--load-from", str(base[0]), "--cfg-options", "max_steps=2",
              f"lora={LORA!r}"]
    one = run(train_config, tmp_path / "one", {"lora": LORA, "max_steps": 2, "train_batch_size": 8},
              load_from=str(base[0]))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
                          str(TRAIN_SCRIPT), *common, "train_batch_size=4", "--work-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    b = read_checkpoint(ckpt.list_checkpoints(tmp_path / "two")[-1])
    assert b["flavour"]["name"] == "lora" and b["world_size"] == 2
    assert_states_equal(final_state(one), b, atol=1e-5)


@pytest.mark.gpu
def test_fsdp_bf16_lora_training_resumes_on_cuda(train_config, tmp_path, base):
    options = ["--report-to", "none", "--load-from", str(base[0]), "--cfg-options", "use_fsdp=True",
               "mixed_precision=bf16", f"lora={LORA!r}"]

    def torchrun(*args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                               "--master_port=29562", str(TRAIN_SCRIPT), str(train_config), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=600)
    first = torchrun("--work-dir", str(tmp_path / "run"), *options, "max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun("--work-dir", str(tmp_path / "run"), "--resume-from", "auto", *options, "max_steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    state = read_checkpoint(ckpt.list_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == 6
    assert all(".lora_" in k and torch.isfinite(v).all() for k, v in state["state_dict"].items())


def test_the_tools_export_a_run_as_a_peft_folder_and_merge_it_into_a_full_checkpoint(train_config, tmp_path, base):
    from peft import PeftModel

    from diffusion.model.lora import add_adapter
    from diffusion.train.lora import adapter_from_checkpoint
    from diffusion.utils.checkpoint import load_checkpoint
    from tests.conftest import tiny_inputs
    from tests.test_diffusers_interop import converted, diffusers_forward
    from tools import export_lora, merge_lora

    result = lora_run(train_config, tmp_path / "run", base, {"max_steps": 2})
    export_lora.main(["--checkpoint", str(result.last_checkpoint), "--output", str(tmp_path / "adapter")])
    merge_lora.main(["--model_path", str(base[0]), "--config", str(train_config), "--lora", str(tmp_path / "adapter"),
                     "--output", str(tmp_path / "merged.pth")])
    x, t, y, mask, _ = tiny_inputs()
    weights, spec = adapter_from_checkpoint(result.last_checkpoint)
    ours = add_adapter(tiny_model(seed=3), spec, weights=weights)
    with torch.no_grad():
        expected = ours(x, t, y, mask)  # the base with the run's EMA adapter
    theirs = PeftModel.from_pretrained(converted(tiny_model(seed=3)), tmp_path / "adapter").eval()
    torch.testing.assert_close(diffusers_forward(theirs.base_model.model, x, t, y, mask), expected, rtol=0, atol=1e-5)
    merged = tiny_model()
    load_checkpoint(tmp_path / "merged.pth", merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, y, mask), expected, rtol=0, atol=1e-5)
