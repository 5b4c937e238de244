"""The reproductions of issue 24, each through the real CLI: a second `train` on a workdir in use, a 16-bit PNG, a
corrupt newest checkpoint for `sample`, disk full and a read-only workdir, a broken config file, an unknown config
argument, and messages that must name the problem. Every case: one line on stderr naming the cause, exit 2, and the
workdir as it was (docs/reliability.md lists them). Then property tests (hypothesis): random config overrides and
flag values give exit 0 or exit 2 with one line, never a traceback (training itself is replaced by a no-op there)."""
import dataclasses
import errno
import os
import shutil

import numpy as np
import pytest
from conftest import DIGITS, ROOT, hold_workdir_lock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion_jax.cli.main import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def _snapshot(workdir):
    return {os.path.relpath(os.path.join(r, f), workdir): os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(workdir) for f in fs if f != ".lock"}


def _one_line_error(out, *needles):
    lines = out.err.strip().splitlines()
    assert lines and "Traceback" not in out.err, out.err
    assert all(n in lines[-1] for n in needles), out.err


def test_a_second_train_on_a_workdir_in_use_is_refused_and_changes_nothing(capsys, trained_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_workdir, workdir)
    before = _snapshot(workdir)
    with hold_workdir_lock(workdir) as holder:
        code, out = run(capsys, "train", "--config", DIGITS + ":debug", "--workdir", workdir, "--config.train.steps=5")
    assert code == 2
    _one_line_error(out, f"in use by PID {holder.pid}", "wait for it to finish or stop it")
    assert _snapshot(workdir) == before


def test_a_16_bit_png_is_read_with_its_16_bits(tmp_path):
    from diffusion_jax.inference.editing.files import load_image, load_mask

    values = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = load_image(str(tmp_path / "deep.png"), size=8, channels=1)[0, ..., 0]
    np.testing.assert_allclose(image, values / 65535 * 2 - 1, atol=1e-6)   # convert("L") clipped all but 4 to white
    mask = np.where(np.arange(64).reshape(8, 8) < 32, 0, 65535).astype(np.uint16)
    Image.fromarray(mask).save(tmp_path / "mask16.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "mask16.png"), size=8)[0, ..., 0], mask / 65535)
    palette = Image.new("P", (8, 8))
    palette.info["transparency"] = 0
    palette.save(tmp_path / "mask_p.png", transparency=0)
    with pytest.raises(ValueError, match="mask_p.png' has transparency .* a transparent palette colour"):
        load_mask(str(tmp_path / "mask_p.png"), size=8)


def test_sample_skips_a_corrupt_newest_checkpoint_and_stops_when_none_is_good(capsys, trained_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_workdir, workdir)
    step3 = os.path.join(workdir, "checkpoints", "3")
    big = max((os.path.join(r, f) for r, _, fs in os.walk(step3) for f in fs if f != "manifest.json"),
              key=os.path.getsize)
    data = bytearray(open(big, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(big, "wb").write(bytes(data))
    args = ["sample", "--workdir", workdir, "--steps", "2", "--num", "2", "--out", tmp_path / "s.png"]
    with pytest.warns(RuntimeWarning, match=r"checkpoints/3 could not be restored .*content changed.*using step 2"):
        code, out = run(capsys, *args)
    assert code == 0, out.err
    code, out = run(capsys, "check-workdir", workdir)
    assert code == 1 and "step 3  corrupt" in out.out and "step 2  ok" in out.out
    shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))
    code, out = run(capsys, *args)
    assert code == 2
    _one_line_error(out, "could be restored", "checkpoints/3", "check-workdir")
    assert os.path.isdir(step3)   # a reader moves nothing


@pytest.mark.parametrize("code_, message", [(errno.ENOSPC, "no space left on the device"),
                                            (errno.EROFS, "the file system is read-only"),
                                            (errno.EACCES, "permission denied")])
def test_disk_full_and_read_only_are_one_line(capsys, tmp_path, monkeypatch, code_, message):
    import diffusion_jax.train.loop as loop

    def fail(*args, **kwargs):   # as the first write into the workdir fails, wrapped as a writer library does
        try:
            raise OSError(code_, os.strerror(code_), str(tmp_path / "w" / "config.json"))
        except OSError as e:
            raise RuntimeError("writer failed") from e

    monkeypatch.setattr(loop, "write_config", fail)
    code, out = run(capsys, "train", "--config", DIGITS + ":debug", "--workdir", tmp_path / "w")
    assert code == 2
    _one_line_error(out, message, "config.json")


def test_config_file_errors_are_one_line(capsys, tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(arg=None):\n    return {\n")
    (tmp_path / "notdict.py").write_text("def get_config(arg=None):\n    return [1, 2]\n")
    (tmp_path / "noarg.py").write_text("import ml_collections\n"
                                       "def get_config():\n    return ml_collections.ConfigDict()\n")
    cases = [(tmp_path / "syntax.py", "syntax.py' line 2"), (tmp_path / "notdict.py", "returned a list"),
             (f"{tmp_path / 'noarg.py'}:x", "rejected the argument 'x'"),
             (DIGITS + ":nosucharg", "got 'nosucharg'"),
             (os.path.join(ROOT, "configs", "edm.py") + ":digits,nosucharg", "digits,nosucharg"),
             (os.path.join(ROOT, "configs", "score_sde.py") + ":vp,digits,nosucharg", "vp,digits,nosucharg")]
    for spec, needle in cases:
        code, out = run(capsys, "train", "--config", spec, "--workdir", tmp_path / "w")
        assert code == 2, (spec, out.err)
        _one_line_error(out, needle)
    assert not (tmp_path / "w").exists()


def test_messages_name_the_problem(capsys, trained_workdir, tmp_path):
    code, out = run(capsys, "train", "--config", DIGITS, "--workdir", tmp_path / "w",
                    "--config.optim.learning_rate=nan")
    assert code == 2
    _one_line_error(out, "optim.learning_rate", "not a number")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    code, out = run(capsys, "edit", "--workdir", trained_workdir, "--task", "img2img", "--image", tmp_path / "x.png",
                    "--out", tmp_path / "e.png")
    assert code == 2
    _one_line_error(out, "img2img", "--strength")
    code, out = run(capsys, "train", "--config", DIGITS, "--workdir", tmp_path / "w", "--config.train.steps=x")
    assert code == 2
    _one_line_error(out, "train.steps", "expects int", "'x'")
    for argv in (["--debug", "train"], ["train", "--debug"]):   # --debug anywhere: the traceback
        with pytest.raises(ValueError, match="train.steps"):
            main([*argv, "--config", DIGITS, "--workdir", str(tmp_path / "w"), "--config.train.steps=x"])


KEYS = ["train.steps", "train.batch_size", "optim.learning_rate", "model.channels", "data.image_size", "sample.steps",
        "schedule.num_timesteps", "loss.prediction", "sample.sampler", "model.channel_mult", "train.nosuch", "nope.key"]
VALUES = st.one_of(st.integers(-3, 300).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["", "x", "(1,2)", "[]", "None", "True", "v", "eps", "ddim", "1e-3", "((", "'a'"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=3))
def test_random_config_overrides_exit_0_or_2_never_a_traceback(overrides, capsys, tmp_path, monkeypatch):
    import diffusion_jax.train.runs as runs

    no_op = dataclasses.replace(runs.RUN_KINDS["denoiser"], train=lambda run, workdir, progress=True: None,
                                summary=lambda result, workdir: "no-op")
    monkeypatch.setitem(runs.RUN_KINDS, "denoiser", no_op)
    argv = ["train", "--config", DIGITS, "--workdir", str(tmp_path / "w"), "--no-progress"]
    code = main(argv + [f"--config.{k}={v}" for k, v in overrides])
    out = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in out.err
    if code == 2:
        assert len(out.err.strip().splitlines()) == 1 and out.err.startswith("diffusion-jax train: error: ")


FLAGS = ["--steps", "--num", "--seed", "--sampler", "--guidance-scale", "--label", "--spacing", "--eta", "--step"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.lists(st.tuples(st.sampled_from(FLAGS), VALUES), min_size=1, max_size=3))
def test_random_sample_flags_exit_0_or_2_never_a_traceback(flags, capsys, tmp_path, monkeypatch):
    import diffusion_jax.cli.sampling as sampling

    def no_sampling(*args, **kwargs):   # what comes after the flags are checked: not what is tested here
        raise SystemExit(0)

    monkeypatch.setattr(sampling, "_load_run", no_sampling)
    argv = ["sample", "--workdir", str(tmp_path / "none")]
    for flag, value in flags:
        argv += [flag, value]
    try:
        code = main(argv)
    except SystemExit as e:   # argparse: exit 2 with usage and one error line; the no-op above: 0
        code = e.code
    out = capsys.readouterr()
    assert code in (0, 2, None) and "Traceback" not in out.err
