"""A command's output is its own: TensorFlow's C++ start-up lines stay out of it unless asked
for (``--verbose``, or the user's own TF_CPP_MIN_LOG_LEVEL), and real errors still show."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpt2_effnet.cli import build_parser, main
from gpt2_effnet.startup_logs import ABSL_BANNER, is_startup_chatter, quiet_tensorflow

REPO = Path(__file__).resolve().parent.parent
# Lines TensorFlow 2.21 wrote on this project's CPU test machine (see startup_logs.py),
# and what the quiet console must do with each.
MEASURED = {
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n": True,
    "I0000 00:00:1796563016.155691   29269 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. To turn "
    "them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n": True,
    "I0000 00:00:1796563016.156017   29269 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.\n": True,
    "I0000 00:00:1796563016.199005   29269 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.\n": True,
    "E0000 00:00:1796563038.266934   29334 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)\n": True,
    # A real error, logged by TensorFlow's JPEG decoder for bytes that are not a JPEG.
    "E0000 00:00:1796563138.515478   29897 jpeg_mem.cc:165]  Invalid components value 0\n": False,
    "F0000 00:00:1796563138.515478   29897 cpu_feature_guard.cc:90] The TensorFlow library was compiled to use AVX "
    "instructions, but these aren't available on your machine.\n": False,
    "Traceback (most recent call last):\n": False,
    "gpt2-effnet caption: --checkpoint run: no config.yaml\n": False,
}
STARTUP_PHRASES = ("absl::InitializeLog", "oneDNN custom operations", "rebuild TensorFlow", "failed call to cuInit",
                   "Could not find cuda drivers")


def test_chatter_is_told_from_errors() -> None:
    for line, chatter in MEASURED.items():
        assert is_startup_chatter(line, nvidia_driver=False) is chatter, line
    # Where an NVIDIA driver is installed, a failed cuInit is a real problem: shown.
    cuinit = next(line for line in MEASURED if "cuInit" in line)
    assert not is_startup_chatter(cuinit, nvidia_driver=True)


def test_a_user_s_own_level_is_applied_as_tensorflow_would() -> None:
    """With the user's TF_CPP_MIN_LOG_LEVEL, the lines absl wrote before it could apply it go as
    the level says, and the cuInit failure shows below level 3, as TensorFlow shows it."""
    info, cuinit, jpeg, fatal = (next(line for line in MEASURED if word in line)
                                 for word in ("oneDNN", "cuInit", "jpeg_mem", "AVX"))
    banner = ABSL_BANNER + "\n"
    expected = {1: (banner, info), 2: (banner, info), 3: (banner, info, cuinit, jpeg)}
    for level, dropped in expected.items():
        for line in (banner, info, cuinit, jpeg, fatal):
            got = is_startup_chatter(line, level, drop_no_driver=False, nvidia_driver=False)
            assert got is (line in dropped), (level, line)


def test_verbose_or_the_user_s_level_0_leaves_tensorflow_alone(monkeypatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    assert quiet_tensorflow(verbose=True) is False and "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert quiet_tensorflow() is False and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_every_command_takes_verbose(capsys) -> None:
    from gpt2_effnet.cli import COMMANDS

    for name in COMMANDS:
        _, parser = build_parser(name)
        assert "--verbose" in parser.format_help(), name
    assert main(["--verbose", "nonsense"]) == 2  # before the command too
    assert "unknown command" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_and_photos(tiny_config, tmp_path_factory) -> tuple[Path, Path, Path]:
    from PIL import Image

    from gpt2_effnet.captioner import Captioner

    model = Captioner(tiny_config(real_vocabulary=True, gpt2={"n_positions": 8, "n_embd": 16, "n_layer": 1},
                                  model={"image_size": 32, "max_caption_length": 3}))
    root = tmp_path_factory.mktemp("quiet")
    run = model.save_pretrained(root / "run")
    good, broken = root / "photo.png", root / "broken.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good)
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return run, good, broken


def _run(*args: str, env_extra: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(env_extra or {})
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "gpt2_effnet.cli", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _chatter(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines(keepends=True)
            if is_startup_chatter(line) or any(phrase in line for phrase in STARTUP_PHRASES)]


@pytest.mark.slow
def test_a_command_prints_only_its_own_output(run_and_photos) -> None:
    run, good, broken = run_and_photos
    quiet = _run("caption", "--checkpoint", str(run), str(good), str(broken))
    assert quiet.returncode == 0, quiet.stderr
    assert _chatter(quiet.stderr) == [], quiet.stderr
    assert quiet.stdout.count('"caption"') == 1
    # The command's own messages are all there, the skipped file named.
    assert "broken.jpg" in quiet.stderr and "skipped 1 unreadable image(s)" in quiet.stderr
    assert "captioned 1 image(s)" in quiet.stderr

    verbose = _run("caption", "--checkpoint", str(run), str(good), "--explain", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert _chatter(verbose.stderr), f"--verbose showed no TensorFlow start-up line:\n{verbose.stderr}"
    assert "image(s) a batch" in verbose.stdout
    # The user's own level 3: nothing of TensorFlow's, though it writes six lines before
    # absl can apply that level.
    own = _run("caption", "--checkpoint", str(run), str(good), "--explain", env_extra={"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert own.returncode == 0 and _chatter(own.stderr) == [], own.stderr


@pytest.mark.slow
def test_an_error_tensorflow_logs_after_start_up_still_shows() -> None:
    code = textwrap.dedent(
        """
        from gpt2_effnet.startup_logs import quiet_tensorflow
        assert quiet_tensorflow()
        import tensorflow as tf
        try:
            tf.io.decode_jpeg(b"\\xff\\xd8\\xff\\xe0 not a jpeg")
        except tf.errors.InvalidArgumentError:
            print("raised")
        """
    )
    result = _run(code=code)
    assert result.returncode == 0 and "raised" in result.stdout, result.stderr
    assert "jpeg_mem.cc" in result.stderr and "Invalid components" in result.stderr, result.stderr
    assert _chatter(result.stderr) == [], result.stderr


def test_what_is_written_before_a_crash_still_shows() -> None:
    """A fatal error inside the filtered window (a CPU without the instructions TensorFlow was
    built for aborts its import) reaches stderr: the relay outlives the process."""
    code = textwrap.dedent(
        """
        import os
        from gpt2_effnet.startup_logs import ABSL_BANNER, filtered_stderr
        with filtered_stderr():
            os.write(2, (ABSL_BANNER + "\\n").encode())
            os.write(2, b"F0000 00:00:1796563138.515478   29897 cpu_feature_guard.cc:90] The TensorFlow library "
                        b"was compiled to use AVX instructions, but these aren't available on your machine.\\n")
            os.abort()
        """
    )
    result = _run(code=code)
    assert result.returncode != 0
    assert "compiled to use AVX instructions" in result.stderr, result.stderr
    assert "absl::InitializeLog" not in result.stderr
