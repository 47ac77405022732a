"""Build the Optimum exports that tests/test_optimum.py reads (tests/fixtures/optimum/).

Hugging Face Optimum (`optimum-onnx` 0.1) pins transformers 4.x, which the project's own
environment (transformers 5.x) must not take, so the exports are made in a venv of their
own and only the small ONNX files are kept:

    python3 tools/optimum_fixtures.py --venv /work/venv-optimum     # makes the venv once, then exports
    python3 tools/optimum_fixtures.py --venv /work/venv-optimum -o tests/fixtures/optimum

Every model is built from a tiny config with random weights (seeded), saved with
`save_pretrained` to a temporary folder and exported by Optimum's own exporter
(`optimum.exporters.onnx.main_export`), as `optimum-cli export onnx` does; no hub access.

    bert/         encoder: model.onnx (feature-extraction)
    t5/           seq2seq: encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx
                  (no post-processing) and decoder_model_merged.onnx (Optimum's If on use_cache_branch)
    llama/        decoder with past: model.onnx (text-generation-with-past, GQA 4 heads / 2 kv heads)
    llama-merged/ decoder_model_merged.onnx: Optimum's merge_decoders of the decoder without and
                  with past (the layout older Optimum versions wrote)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PINS = ["torch==2.13.0", "optimum-onnx==0.1.0", "onnxruntime"]
HERE = Path(__file__).resolve().parent.parent


def _make_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", PINS[0]], check=True)  # the CPU build first
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *PINS[1:]], check=True)
    return py


def _configs():
    from transformers import BertConfig, LlamaConfig, T5Config

    bert = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)
    t5 = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    llama = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return bert, t5, llama


def _save(model_cls, config, folder: Path) -> str:
    import torch

    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(folder)
    return str(folder)


def _keep(src: Path, dst: Path, names) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(src / n, dst / n)
        data = src / f"{n}_data"
        if data.exists():
            raise SystemExit(f"{n} has external data: the fixture configs are meant to stay inline")


def build(out: Path) -> None:
    from optimum.exporters.onnx import main_export
    from transformers import BertModel, LlamaForCausalLM, T5ForConditionalGeneration

    bert, t5, llama = _configs()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        common = dict(do_validation=False, local_files_only=True, opset=18)
        main_export(_save(BertModel, bert, t / "bert-hf"), t / "bert", task="feature-extraction", **common)
        _keep(t / "bert", out / "bert", ["model.onnx"])

        t5_dir = _save(T5ForConditionalGeneration, t5, t / "t5-hf")
        main_export(t5_dir, t / "t5", task="text2text-generation-with-past", no_post_process=True, **common)
        _keep(t / "t5", out / "t5", ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"])
        main_export(t5_dir, t / "t5m", task="text2text-generation-with-past", **common)
        _keep(t / "t5m", out / "t5", ["decoder_model_merged.onnx"])

        llama_dir = _save(LlamaForCausalLM, llama, t / "llama-hf")
        main_export(llama_dir, t / "llama", task="text-generation-with-past", **common)
        _keep(t / "llama", out / "llama", ["model.onnx"])
        # the first step of a merged decoder: no past inputs, present outputs (Optimum's own config for it)
        from optimum.exporters.tasks import TasksManager

        cfg_cls = TasksManager.get_exporter_config_constructor("onnx", model_type="llama", task="text-generation",
                                                              library_name="transformers")
        first = cfg_cls(llama, task="text-generation", use_past=True, use_past_in_inputs=False)
        main_export(llama_dir, t / "llama-nopast", task="text-generation", custom_onnx_configs={"model": first},
                    **common)
        from optimum.onnx import merge_decoders

        (t / "llama-merged").mkdir()
        merge_decoders(t / "llama-nopast" / "model.onnx", t / "llama" / "model.onnx",
                       save_path=t / "llama-merged" / "decoder_model_merged.onnx", strict=False)
        _keep(t / "llama-merged", out / "llama-merged", ["decoder_model_merged.onnx"])
    for f in sorted(out.rglob("*.onnx")):
        print(f"{f.relative_to(out)}  {f.stat().st_size // 1024} KiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, help="the venv that has Optimum (made with its pins if missing)")
    ap.add_argument("-o", "--output", type=Path, default=HERE / "tests" / "fixtures" / "optimum")
    a = ap.parse_args()
    try:
        import optimum.exporters.onnx  # noqa: F401
    except ImportError:
        if a.venv is None:
            raise SystemExit("Optimum is not installed here: give --venv PATH (made with "
                             f"{' '.join(PINS)} if missing)")
        py = _make_venv(a.venv)
        os.execv(str(py), [str(py), __file__, "-o", str(a.output)])
    build(a.output.resolve())


if __name__ == "__main__":
    main()
