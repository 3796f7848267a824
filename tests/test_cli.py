"""The command-line tools as a user runs them: stbllm-generate output and errors, and stbllm-convert under real
signals (Ctrl-C and kill -9 leave no output file behind, never a truncated one)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from stbllm_rt import Model, StbReader


def run_generate(*args, **kw):
    code = "import sys; from stbllm_rt.cli import generate_main; sys.exit(generate_main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, **kw)


def test_generate_greedy_matches_the_api(tiny_stb):
    path = str(tiny_stb("llama", "fp16"))
    res = run_generate(path, "Once upon a time", "-n", "12", "--temperature", "0", "--threads", "1")
    assert res.returncode == 0, res.stderr
    expected = Model(path, threads=1).generate("Once upon a time", max_new_tokens=12, temperature=0)
    assert res.stdout == expected + "\n"
    assert "tok/s" in res.stderr


def test_generate_chat_no_stream_and_stdin(tiny_stb):
    path = str(tiny_stb("mistral", "sign", "4:8"))
    res = run_generate(path, "-", "--chat", "--no-stream", "-n", "6", "--seed", "3", input="Hello there")
    assert res.returncode == 0, res.stderr
    m = Model(path)
    prompt = m.apply_chat_template([{"role": "user", "content": "Hello there"}])
    assert res.stdout == m.generate(prompt, max_new_tokens=6, seed=3) + "\n"


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp, stb: [str(tmp / "absent.stb"), "hi"], "no such model file"),
    (lambda tmp, stb: [str(tmp), "hi"], "is a directory"),
    (lambda tmp, stb: [str(tmp / "garbage.stb"), "hi"], "not an .stb file"),
    (lambda tmp, stb: [stb, "hi", "--top-p", "0"], "top_p"),
])
def test_generate_errors_are_one_line(tmp_path, tiny_stb, make_args, message):
    (tmp_path / "garbage.stb").write_bytes(b"hello, this is not a model" * 10)
    res = run_generate(*make_args(tmp_path, str(tiny_stb("llama", "fp16"))))
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr


def test_generate_without_tokenizer_explains(tiny_stb):
    res = run_generate(str(tiny_stb("llama-notok", "fp16")), "hi")
    assert res.returncode == 2 and "no tokenizer" in res.stderr


def _convert_and_signal(out, sig, delay):
    cmd = [sys.executable, "-m", "stbllm_convert", "smollm2-135m", "-o", str(out), "--method", "sign", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_during_conversion_leaves_nothing(smollm2_gguf, tmp_path):
    out = tmp_path / "smol.stb"
    code, err = _convert_and_signal(out, signal.SIGINT, 4.0)
    assert code == 130, err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path)], "a partial file was left behind"


@pytest.mark.parametrize("delay", [3.0, 9.0])
def test_kill_during_conversion_never_leaves_a_truncated_file(smollm2_gguf, tmp_path, delay):
    out = tmp_path / "smol.stb"
    code, _ = _convert_and_signal(out, signal.SIGKILL, delay)
    if code == 0:  # finished before the kill: then the file must be complete and valid
        StbReader(out)
    else:
        assert code == -signal.SIGKILL
        assert not out.exists()
