"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives), one CPU device each, train the tiny
digits U-Net through the CLI, save a checkpoint together, and resume from it together. The result must match one
process with two devices running the same steps straight through.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import DIGITS, TINY

OVERRIDES = [f"--config.{o}" for o in TINY if not o.startswith("train.steps")] + [
    "--config.train.batch_size=8", "--config.train.sample_num=4", "--config.optim.warmup_steps=0",
    "--config.optim.decay=constant",   # a cosine decay depends on train.steps, which the resume changes
    "--config.train.async_checkpointing=True",
    "--config.model.channel_mult=(1,)", "--config.model.attention_resolutions=()"]   # compiles in seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(workdir, steps):
    return [sys.executable, "-m", "diffusion_jax", "train", "--config", DIGITS + ":debug", "--workdir", str(workdir),
            "--no-progress", f"--config.train.steps={steps}", *OVERRIDES]


def _env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _two_processes(workdir, steps, logs):
    """Both processes' (stdout, stderr), written to files: a full pipe would block one process while the other
    waits for it at a collective."""
    port, procs, files = _free_port(), [], []
    for i in range(2):
        name = f"{workdir.name}_{steps}_{i}"
        out, err = open(logs / f"{name}.out", "w+"), open(logs / f"{name}.err", "w+")
        files.append((out, err))
        procs.append(subprocess.Popen(_train_cmd(workdir, steps) + ["--coordinator", f"127.0.0.1:{port}",
                                                                    "--num-processes", "2", "--process-id", str(i)],
                                      env=_env(1), stdout=out, stderr=err, text=True))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    texts = []
    for out, err in files:
        out.seek(0), err.seek(0)
        texts.append((out.read(), err.read()))
        out.close(), err.close()
    for code, (_, err) in zip(codes, texts):
        assert code == 0, err[-3000:]
    return texts


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow    # about a minute: five JAX processes (two pairs over gloo, one with two devices)
def test_two_processes_train_save_and_resume_like_one_process_with_two_devices(tmp_path):
    from diffusion_jax.train.checkpoint import Checkpointer, load_trained

    multi, single = tmp_path / "multi", tmp_path / "single"
    first = _two_processes(multi, 2, tmp_path)
    assert "trained to step 2" in first[0][0] and "trained to step" not in first[1][0]  # process 0 reports
    assert Checkpointer(str(multi)).all_steps() == [2]
    second = _two_processes(multi, 4, tmp_path)
    assert all("resuming from" in err and "(step 2)" in err for _, err in second), second[0][1][-2000:]
    assert Checkpointer(str(multi)).all_steps() == [2, 4]

    proc = subprocess.run(_train_cmd(single, 4), env=_env(2), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi_losses, single_losses = _losses(multi), _losses(single)
    assert sorted(multi_losses) == [1, 2, 3, 4]   # process 0 logged each step once, across the resume
    for step, loss in single_losses.items():
        assert multi_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    params_multi, params_single = load_trained(str(multi))[2], load_trained(str(single))[2]
    import jax

    for a, b in zip(jax.tree.leaves(params_multi), jax.tree.leaves(params_single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
