"""Detection and every pass across Hugging Face `transformers` architectures.

Each architecture is built from a tiny config with random weights (hidden 32, 2 layers,
4 heads, vocab 99, 64 positions, MLP 64; 2 key/value heads where the family has
grouped-query attention) and exported with both ONNX exporters. On each export:

    detection   sites found against the expected count (layers x attention blocks per
                layer: one in encoders and decoders, self + cross in an encoder-decoder's
                decoder), self/cross split, heads and key/value heads, and whether
                exactly the decoders' self-attention sites are causal
    passes      fuse, sparse:window=4, gated, softplus, sigmoid, sinkfree:mode=logit,bias=-inf
                and mlpfree:collapse=qk+vo, each alone through attn_opt.optimize on
                generated inputs: sites rewritten, sites skipped and why, the worst
                relative error against the model before the pass over every input set,
                or the error. fuse and the collapse are exact, and a null-slot logit of
                -inf is softmax itself: those three should stay within 1e-4

An export the exporter cannot do is recorded as such: it is the exporter's limit.
Exports (and export failures) are cached under ~/.cache/attn-opt/arch/, keyed by the
config and the torch/transformers versions; delete a file to redo it. Writes
benchmarks/results/architectures.{md,json}.

    python benchmarks/architectures.py
    python benchmarks/architectures.py --only GPT2Model    # rerun one, keep the others' results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from _report import RESULTS, write

import attn_opt
from attn_opt.core.errors import first_line
from attn_opt.tools import zoo

CACHE = Path(os.environ.get("ATTN_OPT_CACHE", Path.home() / ".cache" / "attn-opt")) / "arch"
EXPORTERS = ("torchscript", "dynamo")
PASSES = {"fuse": "fuse", "sparse": "sparse:window=4", "gated": "gated", "softplus": "softplus",  # column: spec
          "sigmoid": "sigmoid", "sinkfree": "sinkfree:mode=logit,bias=-inf", "mlpfree": "mlpfree:collapse=qk+vo"}
EXACT = {"fuse", "sinkfree", "mlpfree"}  # these options should move outputs by at most EXACT_TOL
EXACT_TOL = 1e-4
LAYERS, HEADS, KV = 2, 4, 2

ENC = dict(vocab_size=zoo.VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
           intermediate_size=64, max_position_embeddings=64)
GQA = dict(ENC, num_key_value_heads=KV)
GPT2 = dict(vocab_size=zoo.VOCAB, n_embd=32, n_layer=LAYERS, n_head=HEADS, n_positions=64, n_inner=64)
BART = dict(vocab_size=zoo.VOCAB, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=64)
VIT = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
           image_size=16, patch_size=4, num_channels=3)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # for configs whose defaults lie past vocab 99
MEL, FRAMES = 8, 16  # Whisper: mel bins, and encoder positions (the input has twice as many frames)


@dataclass(frozen=True)
class Arch:
    cls: str
    config: str
    cfg: dict
    kind: str  # "encoder", "decoder", "seq2seq", "vision" or "audio"
    kv_heads: int = HEADS
    image: int = 16  # a vision model's input size
    expect: tuple | None = None  # (self, cross, causal) where the family's count is not the kind's

    def expected(self) -> dict:
        """Sites by (kind, causal): decoders' self-attention is causal, the rest is not."""
        if self.expect is not None:
            return dict(zip(("self", "cross", "causal"), self.expect))
        if self.kind in ("seq2seq", "audio"):
            return {"self": 2 * LAYERS, "cross": LAYERS, "causal": LAYERS}
        return {"self": LAYERS, "cross": 0, "causal": LAYERS if self.kind == "decoder" else 0}


ARCHS = [
    Arch("BertModel", "BertConfig", ENC, "encoder"),
    Arch("RobertaModel", "RobertaConfig", ENC, "encoder"),
    Arch("XLMRobertaModel", "XLMRobertaConfig", ENC, "encoder"),
    Arch("DistilBertModel", "DistilBertConfig", dict(vocab_size=zoo.VOCAB, dim=32, n_layers=LAYERS, n_heads=HEADS,
                                                     hidden_dim=64, max_position_embeddings=64), "encoder"),
    Arch("AlbertModel", "AlbertConfig", dict(ENC, embedding_size=16), "encoder"),
    Arch("ElectraModel", "ElectraConfig", dict(ENC, embedding_size=16), "encoder"),
    Arch("DebertaModel", "DebertaConfig", ENC, "encoder"),
    Arch("DebertaV2Model", "DebertaV2Config", dict(ENC, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                   max_relative_positions=16), "encoder"),
    Arch("MPNetModel", "MPNetConfig", ENC, "encoder"),
    Arch("ModernBertModel", "ModernBertConfig", dict(ENC, **TOKENS, cls_token_id=3, sep_token_id=4), "encoder"),
    Arch("GPT2Model", "GPT2Config", GPT2, "decoder"),
    Arch("GPTNeoModel", "GPTNeoConfig", dict(vocab_size=zoo.VOCAB, hidden_size=32, num_layers=LAYERS,
                                             num_heads=HEADS, intermediate_size=64, max_position_embeddings=64,
                                             attention_types=[[["global", "local"], LAYERS // 2]]), "decoder"),
    Arch("GPTJModel", "GPTJConfig", dict(GPT2, rotary_dim=4), "decoder"),
    Arch("CodeGenModel", "CodeGenConfig", dict(GPT2, rotary_dim=4), "decoder"),
    Arch("GPTNeoXModel", "GPTNeoXConfig", ENC, "decoder"),
    Arch("OPTModel", "OPTConfig", dict(ENC, ffn_dim=64, word_embed_proj_dim=32), "decoder"),
    Arch("BloomModel", "BloomConfig", dict(vocab_size=zoo.VOCAB, hidden_size=32, n_layer=LAYERS, n_head=HEADS),
         "decoder"),
    Arch("FalconModel", "FalconConfig", ENC, "decoder", kv_heads=1),  # multi-query by default
    Arch("LlamaModel", "LlamaConfig", GQA, "decoder", KV),
    Arch("MistralModel", "MistralConfig", GQA, "decoder", KV),
    Arch("MixtralModel", "MixtralConfig", dict(GQA, num_local_experts=4, num_experts_per_tok=2), "decoder", KV),
    Arch("Qwen2Model", "Qwen2Config", GQA, "decoder", KV),
    Arch("Qwen3Model", "Qwen3Config", dict(GQA, head_dim=8), "decoder", KV),
    Arch("PhiModel", "PhiConfig", GQA, "decoder", KV),
    Arch("Phi3Model", "Phi3Config", dict(GQA, **TOKENS), "decoder", KV),
    Arch("GemmaModel", "GemmaConfig", dict(GQA, head_dim=8), "decoder", KV),
    Arch("Gemma2Model", "Gemma2Config", dict(GQA, head_dim=8), "decoder", KV),
    Arch("Gemma3TextModel", "Gemma3TextConfig", dict(GQA, head_dim=8), "decoder", KV),
    Arch("StableLmModel", "StableLmConfig", GQA, "decoder", KV),
    Arch("OlmoModel", "OlmoConfig", GQA, "decoder", KV),
    # learned sink logits per head, sliding and full layers alternating, a mixture of experts
    Arch("GptOssModel", "GptOssConfig", dict(GQA, head_dim=8, intermediate_size=32, num_local_experts=4,
                                             num_experts_per_tok=2, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"],
                                             rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                                             experts_implementation="batched_mm"), "decoder", KV),
    # latent attention (MLA): q_a → norm → q_b, kv_a → norm → kv_b and a shared rotary key
    Arch("DeepseekV3Model", "DeepseekV3Config", dict(
        ENC, moe_intermediate_size=16, first_k_dense_replace=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        num_key_value_heads=HEADS), "decoder"),
    Arch("CLIPTextModel", "CLIPTextConfig", dict(ENC, **TOKENS), "decoder"),  # causal text tower
    Arch("T5Model", "T5Config", dict(vocab_size=zoo.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS,
                                     num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
                                     decoder_start_token_id=0), "seq2seq"),
    Arch("BartModel", "BartConfig", BART, "seq2seq"),
    Arch("MarianModel", "MarianConfig", dict(BART, **TOKENS, decoder_start_token_id=0), "seq2seq"),
    Arch("WhisperModel", "WhisperConfig", dict(BART, **TOKENS, decoder_start_token_id=3, num_mel_bins=MEL,
                                               max_source_positions=FRAMES, max_target_positions=64), "audio"),
    # the decoder's n-gram self-attention: a main stream and the predict streams in one
    # 5-D einsum (bnhtc,bnhsc->bnhts) per layer; the main stream is causal
    Arch("ProphetNetModel", "ProphetNetConfig", dict(
        vocab_size=zoo.VOCAB, hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=LAYERS,
        num_decoder_layers=LAYERS, num_encoder_attention_heads=HEADS, num_decoder_attention_heads=HEADS, ngram=2,
        num_buckets=8, relative_max_distance=16, max_position_embeddings=64, **TOKENS, decoder_start_token_id=0),
        "seq2seq", expect=(3 * LAYERS, LAYERS, LAYERS)),
    Arch("ViTModel", "ViTConfig", VIT, "vision"),
    Arch("DeiTModel", "DeiTConfig", VIT, "vision"),
    Arch("CLIPVisionModel", "CLIPVisionConfig", VIT, "vision"),
    # cosine attention, a per-head temperature, a bias from an MLP over relative coordinates,
    # shifted windows (the second layer) masked through view → add → view: 4 windows of 16
    Arch("Swinv2Model", "Swinv2Config", dict(image_size=16, patch_size=2, num_channels=3, embed_dim=32, depths=[LAYERS],
                                             num_heads=[HEADS], window_size=4, mlp_ratio=2.0), "vision"),
    # windows and heads folded into one batch axis with a decomposed relative-position bias
    # (the first layer: 4 windows of 16), then a global layer
    # (the last encoder layer's output: _EncoderPixels)
    Arch("SamVisionModel", "SamVisionConfig", dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                   image_size=32, patch_size=4, window_size=4, global_attn_indexes=[1],
                                                   output_channels=16, mlp_dim=64), "vision", image=32),
]


class _EncoderPixels(zoo._HFWrapper):
    """The last encoder layer's hidden states: SAM's neck (convolutions and norms initialised
    to give ~1e-21 with random weights) would hide what attention does from every error."""

    def __init__(self, model):
        super().__init__(model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # its own initialisation gives hidden states of ~1e-9 here too: random weights
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.05))

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]


class _Audio(zoo._HFWrapper):
    def forward(self, input_features, decoder_input_ids):
        return self._run(input_features=input_features, decoder_input_ids=decoder_input_ids)


def build(arch: Arch):
    """(wrapped model, example inputs, input names) for the arch's kind of input."""
    model = zoo._hf(arch.cls, arch.config, "eager", **arch.cfg)
    ids, mask = zoo._ids_and_padded_mask()
    torch.manual_seed(1)
    if arch.kind in ("encoder", "decoder"):
        return zoo._Text(model), (ids, mask), ("input_ids", "attention_mask")
    if arch.kind == "seq2seq":
        names = ("input_ids", "attention_mask", "decoder_input_ids")
        return zoo._Seq2Seq(model), (ids, mask, ids[:, :5].clone()), names
    if arch.kind == "vision":
        wrap = _EncoderPixels if arch.cls == "SamVisionModel" else zoo._Pixels
        return wrap(model), (torch.randn(zoo.BATCH, 3, arch.image, arch.image),), ("pixel_values",)
    features = torch.randn(zoo.BATCH, MEL, 2 * FRAMES)
    return _Audio(model), (features, ids[:, :5].clone()), ("input_features", "decoder_input_ids")


class ExportFailed(Exception):
    """The exporter could not export the model: its limit, not attn-opt's."""


def root_cause(e: BaseException) -> str:
    """The innermost cause's type and first line (an exporter wraps what failed), colour codes dropped."""
    while e.__cause__ is not None:
        e = e.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", f"{type(e).__name__}: {first_line(e)}")


def export(arch: Arch, exporter: str) -> Path:
    """The cached export, made on a miss; ExportFailed (also cached) when the exporter cannot."""
    key = json.dumps([asdict(arch), exporter, torch.__version__, transformers.__version__], sort_keys=True)
    path = CACHE / f"{arch.cls}-{exporter}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.onnx"
    failed = path.with_suffix(".failed")
    if failed.exists():
        raise ExportFailed(failed.read_text())
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.onnx")
        try:
            model, args, names = build(arch)
            # Whisper's encoder takes exactly 2 x max_source_positions frames: a static export
            zoo.export_module(model, args, names, exporter, tmp, dynamic=arch.kind != "audio")
        except Exception as e:
            failed.write_text(root_cause(e))
            raise ExportFailed(failed.read_text()) from None
        os.replace(tmp, path)
    return path


def detection(path: Path) -> list[dict]:
    fields = ("id", "kind", "heads", "kv_heads", "causal", "mask", "layer", "window", "softcap", "rule")
    return [{f: s.to_json()[f] for f in fields} for s in attn_opt.inspect(str(path)).sites]


def run_pass(path: Path, spec: str) -> dict:
    try:
        _, report = attn_opt.optimize(str(path), passes=[spec])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {first_line(e)}"}
    p = report.passes[0]
    step = p.step_fidelity_all or p.step_fidelity
    return {"rewritten": p.sites_rewritten, "skipped": [s.to_json() for s in p.sites_skipped],
            "max_rel_error": step.get("max_rel_error"), "notes": p.notes, "exact": p.exact}


def measure(arch: Arch, exporter: str) -> dict:
    expected = dict(arch.expected(), heads=HEADS, kv_heads=arch.kv_heads)
    rec = {"arch": arch.cls, "exporter": exporter, "expected": expected}
    try:
        path = export(arch, exporter)
    except ExportFailed as e:
        return dict(rec, export_error=str(e))
    try:
        rec["sites"] = detection(path)
    except Exception as e:
        return dict(rec, inspect_error=f"{type(e).__name__}: {first_line(e)}")
    rec["passes"] = {col: dict(run_pass(path, spec), spec=spec) for col, spec in PASSES.items()}
    return rec


class Notes:
    """Footnotes: each distinct long text once, cells cite it by number."""

    def __init__(self):
        self.texts: list[str] = []

    def cite(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def mark(ok: bool) -> str:
    return "" if ok else " ✗"


def detection_cells(rec: dict) -> list[str]:
    exp, sites = rec["expected"], rec["sites"]
    kinds = Counter(s["kind"] for s in sites)
    n_exp = exp["self"] + exp["cross"]
    heads = sorted({f"{s['heads']}/{s['kv_heads']}" for s in sites})
    return [f"{len(sites)}/{n_exp}" + mark(len(sites) == n_exp),
            f"{kinds['self']}/{kinds['cross']}" + mark(kinds["self"] == exp["self"] and kinds["cross"] == exp["cross"]),
            ",".join(heads) + mark(heads == [f"{exp['heads']}/{exp['kv_heads']}"]),
            causal_cell(exp, sites)]


def causal_cell(exp: dict, sites: list[dict]) -> str:
    found = Counter((s["kind"], s["causal"]) for s in sites)
    want = Counter({("self", True): exp["causal"], ("self", False): exp["self"] - exp["causal"],
                    ("cross", False): exp["cross"]})
    if +found == +want:
        return "✓"
    unknown = sum(s["causal"] is None for s in sites)
    return (f"✗ {sum(s['causal'] is True for s in sites)} causal (exp {exp['causal']})"
            + (f", {unknown} unknown" if unknown else ""))


def pass_cell(col: str, r: dict, notes: Notes) -> str:
    if "error" in r:
        return f"✗ {r['error'].split(':')[0]} {notes.cite(r['error'])}"
    parts = [f"✓{len(r['rewritten'])}"] if r["rewritten"] else []
    for reason, n in Counter(s["reason"] for s in r["skipped"]).items():
        parts.append(f"skip{n} {notes.cite(reason)}")
    err = r["max_rel_error"]
    if r["rewritten"] and err is not None:
        exact = col in EXACT and r.get("exact", True)  # the pass says where it is not exact (a site's own sinks)
        parts.append(f"{err:.0e}" + mark(not exact or err <= EXACT_TOL) + ("" if exact or col not in EXACT else " (not exact here)"))
    return " ".join(parts) or "–"


def row(rec: dict, notes: Notes) -> list[str]:
    head = [rec["arch"], rec["exporter"]]
    for key, label in (("export_error", "export failed"), ("inspect_error", "✗ inspect")):
        if key in rec:
            return head + [f"{label} {notes.cite(rec[key])}"] + [""] * (3 + len(PASSES))
    return head + detection_cells(rec) + [pass_cell(col, rec["passes"][col], notes) for col in PASSES]


def report(records: list[dict]) -> None:
    notes = Notes()
    rows = [row(r, notes) for r in records]
    cols = ["architecture", "exporter", "sites", "self/cross", "heads/kv", "causal", *PASSES]
    specs = ", ".join(f"{col} = `{spec}`" for col, spec in PASSES.items())
    preface = ["# attn-opt across transformers architectures", "",
               f"Tiny random-weight configs (hidden 32, {LAYERS} layers, {HEADS} heads, {KV} kv heads where the "
               f"family has GQA), torch {torch.__version__}, transformers {transformers.__version__}. "
               "sites: found/expected; heads/kv: as detected; causal: ✓ when exactly the decoders' "
               f"self-attention sites are causal. Passes ({specs}): ✓n rewritten, skipN skipped, the worst "
               f"relative error against the model before the pass (✗ past {EXACT_TOL:g} where the options make "
               "it exact: fuse, the collapse, a -inf null slot), ✗ an exception. [n]: the notes below.", ""]
    footer = "\n".join(f"{i}. {t}" for i, t in enumerate(notes.texts, 1))
    write("architectures", "attn-opt across transformers architectures", cols, rows, records, preface, footer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", metavar="CLS", help="rerun this architecture (repeatable)")
    args = ap.parse_args()
    archs = [a for a in ARCHS if not args.only or a.cls in args.only]
    if args.only and len(archs) != len(set(args.only)):
        sys.exit(f"unknown architecture in {args.only}; known: {', '.join(a.cls for a in ARCHS)}")
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    old = RESULTS / "architectures.json"
    records = {(r["arch"], r["exporter"]): r for r in json.loads(old.read_text())} if args.only and old.exists() else {}
    for arch in archs:
        for exporter in EXPORTERS:
            t0 = time.perf_counter()
            records[arch.cls, exporter] = measure(arch, exporter)
            print(f"{arch.cls} {exporter}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    order = {a.cls: i for i, a in enumerate(ARCHS)}
    report(sorted(records.values(), key=lambda r: (order.get(r["arch"], len(order)), EXPORTERS.index(r["exporter"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
