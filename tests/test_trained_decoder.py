"""The trained decoder (zoo.TRAINED["llama-bytes"], tools/train_decoder.py): its weights
are the kept ones (checksum), its ONNX step is the model (teacher-forced through the
cache it equals the torch model's full-sequence log-probabilities) and has learned the
held-out text, stream is exact while a sequence fits its cache, and `attn-opt zoo` /
`generate` run it. One exported step, shared by every test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attn_opt
from attn_opt.core.errors import UserError
from attn_opt.core.ir import onnx as onnx_adapter
from attn_opt.pipeline.onnx_decode import forced_quality, loop_of, teacher_forced
from attn_opt.tools import train_decoder, zoo
from conftest import _cached
from test_pipeline import cli


@pytest.fixture(scope="session")
def trained_step(cache_dir):
    digest = train_decoder.CHECKSUM.read_text().split()[0][:12]
    return _cached(cache_dir / f"trained-llama-bytes-{digest}.onnx",
                   lambda tmp: zoo.export_trained("llama-bytes", "torchscript", tmp))


@pytest.fixture(scope="session")
def text() -> np.ndarray:
    """[2, 96] held-out bytes."""
    t = np.frombuffer(train_decoder.held_out_text(), np.uint8).astype(np.int64)
    return np.stack([t[1000:1096], t[len(t) // 2: len(t) // 2 + 96]])


def loop(path):
    om, _, gv = onnx_adapter.load_view(str(path))
    return om, loop_of(gv, onnx_adapter.input_specs(gv))


def test_weights_are_the_kept_ones(tmp_path):
    assert train_decoder.sha256(train_decoder.WEIGHTS) == train_decoder.CHECKSUM.read_text().split()[0]
    bad = tmp_path / "w.safetensors"
    data = bytearray(train_decoder.WEIGHTS.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        train_decoder.load_model(bad)


def test_step_sites_and_cache(trained_step):
    sites = attn_opt.inspect(str(trained_step)).sites
    assert [(s.heads, s.kv_heads, s.head_dim, s.causal) for s in sites] == [(8, 2, 32, True)] * 4
    assert [s.cache.present_key for s in sites] == [f"present.{i}.key" for i in range(4)]


def test_step_is_the_model_and_has_learned(trained_step, text):
    om, lp = loop(trained_step)
    f = teacher_forced(om, lp, text)
    with torch.no_grad():
        logits = zoo.trained_model().eval()(input_ids=torch.from_numpy(text)).logits
    ref = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, torch.from_numpy(text[:, 1:, None]))[..., 0]
    np.testing.assert_allclose(f.logprob, ref.numpy(), atol=2e-3)
    q = forced_quality(f)["all"]
    assert q["tokens"] == 2 * 95
    assert q["nll"] < 3.0 < np.log(256)  # far below uniform on text it never saw
    assert q["top1"] > 0.3


def test_stream_exact_while_it_fits_then_not(trained_step, text, tmp_path):
    om, lp = loop(trained_step)
    dense = teacher_forced(om, lp, text)
    for window, exact in ((92, True), (16, False)):  # 4 sinks + 92 keeps all 96 bytes; + 16 drops most
        out = tmp_path / f"s{window}.onnx"
        attn_opt.optimize(str(trained_step), [f"stream:sinks=4,window={window}"], force=True)[0].save(str(out))
        f = teacher_forced(onnx_adapter.load(str(out)), lp, text)
        err = np.abs(f.logprob - dense.logprob).max()
        assert (err < 1e-4) == exact, (window, err)
    q = forced_quality(f, dense, split=48)
    assert q["before"]["agreement"] > q["after"]["agreement"] - 0.5  # both measured, on the parts they name
    assert q["before"]["tokens"] + q["after"]["tokens"] == q["all"]["tokens"] == 190


def test_teacher_forcing_refuses_bad_shapes(trained_step, text):
    om, lp = loop(trained_step)
    with pytest.raises(UserError, match="teacher forcing"):
        teacher_forced(om, lp, text[0])
    with pytest.raises(UserError, match="teacher forcing"):
        teacher_forced(om, lp, text, prompt=96)


def test_cli_zoo_names_and_generate(trained_step, tmp_path):
    r = cli("zoo")
    assert r.returncode == 0 and "llama-bytes" in r.stdout
    r = cli("zoo", "llama-bytes-nope", "-o", tmp_path / "x.onnx")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "llama-bytes-full" in r.stderr
    np.save(tmp_path / "p.npy", np.frombuffer(b"import os\nimport sys\n\n\ndef ", np.uint8).astype(np.int64))
    r = cli("generate", trained_step, "--prompt-ids", tmp_path / "p.npy", "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout)
    assert len(got["tokens"][0]) == 12 and all(0 <= t < 256 for t in got["tokens"][0])
