"""LoRA through the CLI: `train` with configs/lora_digits.py on a trained base workdir (only the adapters train; the
base in the checkpoint stays the base run's), `export` to pytorch_lora_weights.safetensors, `sample --lora` merging
that file into the base run (the LoRA run's own samples), and the user errors (rank 0, a LoRA of another
architecture, --lora-scale alone) as one line and exit 2."""
import os

import jax
import numpy as np
import pytest
from conftest import ROOT

from diffusion_jax.cli.main import main

CONFIG = os.path.join(ROOT, "configs", "lora_digits.py") + ":debug"
FAST = ["--config.train.steps=3", "--config.train.batch_size=8", "--config.train.sample_num=4",
        "--config.train.sample_steps=2", "--config.train.async_checkpointing=False", "--config.optim.warmup_steps=0",
        "--config.optim.learning_rate=0.05", "--config.data.split=train", "--no-progress"]


@pytest.fixture(scope="module")
def lora_workdir(trained_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora") / "run")
    code = main(["train", "--config", CONFIG, "--workdir", workdir, f"--config.model.base_workdir={trained_workdir}",
                 "--config.model.targets=('q','k','v','proj_out','conv1')", *FAST])
    assert code == 0
    return workdir


def test_lora_trains_only_its_adapters_and_exports(lora_workdir, trained_workdir, tmp_path, capsys):
    from diffusion_jax.train.checkpoint import load_trained

    _, _, base, _ = load_trained(trained_workdir)
    exp, _, params, step = load_trained(lora_workdir)
    assert step == 3 and exp.model.name == "lora" and exp.model.rank == 4
    for a, b in zip(jax.tree.leaves(params["base"]), jax.tree.leaves(base)):
        assert np.array_equal(a, b)
    assert any(np.abs(a["lora_B"]).max() > 0 for a in params["adapters"].values())   # B left zero
    out = tmp_path / "exported"
    assert main(["export", "--workdir", lora_workdir, "--to", str(out)]) == 0
    assert os.listdir(out) == ["pytorch_lora_weights.safetensors"]
    capsys.readouterr()
    args = ["--sampler", "ddim", "--steps", "2", "--num", "4", "--seed", "3"]
    assert main(["sample", "--workdir", lora_workdir, *args, "--out", str(tmp_path / "a.png"),
                 "--npz", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", "--workdir", trained_workdir, "--lora", str(out), *args, "--out", str(tmp_path / "b.png"),
                 "--npz", str(tmp_path / "b.npz")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "b.npz")["x"], np.load(tmp_path / "a.npz")["x"], atol=1e-4)
    assert main(["sample", "--workdir", trained_workdir, "--lora", str(out), "--lora-scale", "0", *args,
                 "--out", str(tmp_path / "c.png"), "--npz", str(tmp_path / "c.npz")]) == 0
    assert main(["sample", "--workdir", trained_workdir, *args, "--out", str(tmp_path / "d.png"),
                 "--npz", str(tmp_path / "d.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "c.npz")["x"], np.load(tmp_path / "d.npz")["x"])


def test_lora_errors_exit_2_with_the_problem_named(lora_workdir, trained_workdir, tmp_path, capsys):
    from diffusion_jax.models.functional import abstract_params
    from diffusion_jax.models.lora import LoRAConfig, LoRAUNet
    from diffusion_jax.models.lora_io import save_lora
    from diffusion_jax.models.unet import UNetConfig

    other = LoRAConfig(base=UNetConfig(image_size=8, in_channels=1, channels=16, channel_mult=(1,), num_res_blocks=1,
                                       attention_resolutions=(), num_groups=4, num_classes=10), rank=2)
    graphdef, abstract = abstract_params(lambda r: LoRAUNet(other, rngs=r))
    from flax import nnx

    paths = nnx.merge(graphdef, abstract).paths
    adapters = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract["adapters"])
    save_lora(str(tmp_path / "other"), other, adapters, paths)
    cases = [
        (["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"), f"--config.model.base_workdir={trained_workdir}",
          "--config.model.rank=0"], "model.rank=0 must be a positive int"),
        (["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"), f"--config.model.base_workdir={trained_workdir}",
          "--config.model.targets=('to_q',)"], "model.targets ['to_q'] match no Linear or conv layer"),
        (["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"), f"--config.model.base_workdir={trained_workdir}",
          "--config.loss.prediction=eps"], "loss.prediction='eps' but the base run"),
        (["sample", "--workdir", trained_workdir, "--lora", str(tmp_path / "other"), "--num", "2"],
         "a LoRA of another architecture"),
        (["sample", "--workdir", trained_workdir, "--lora-scale", "2", "--num", "2"], "--lora-scale needs --lora"),
        (["sample", "--workdir", lora_workdir, "--lora", str(tmp_path / "other"), "--num", "2"],
         "--lora merges into a 'unet' or 'unet_cond' run"),
        (["sample", "--workdir", trained_workdir, "--lora", str(tmp_path / "nothing"), "--num", "2"], "does not exist"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err, (argv, err)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
