"""A zoo of small random-weight models with attention, built from configs (no downloads).

Used by the tests, the benchmarks and `attn-opt zoo NAME -o model.onnx`. Every model is
wrapped so that its forward takes positional tensors and returns one tensor, which is
what both ONNX exporters and `torch.export` want.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

VOCAB = 99
SEQ = 8
BATCH = 2


@dataclass(frozen=True)
class Expected:
    """What detection must find in a zoo model (the test oracle)."""

    sites: int
    heads: int
    kv_heads: int
    causal: tuple[bool, ...]  # per site in graph order; one value means every site
    masks: frozenset = frozenset({"none"})  # allowed mask kinds (exporters differ: Add vs Where)
    cross: int = 0  # how many sites are cross-attention

    def causal_of(self, i: int) -> bool:
        return self.causal[i] if len(self.causal) > 1 else self.causal[0]


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...], tuple[str, ...]]]
    expected: Expected
    # exporters that cannot export this model, with the reason
    unsupported: dict[str, str] = field(default_factory=dict)


class _HFWrapper(nn.Module):
    """Positional-tensor front for a Hugging Face model; returns last_hidden_state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _run(self, **kw):
        return self.model(**kw).last_hidden_state


class _Text(_HFWrapper):
    def forward(self, input_ids, attention_mask):
        return self._run(input_ids=input_ids, attention_mask=attention_mask)


class _Seq2Seq(_HFWrapper):
    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self._run(input_ids=input_ids, attention_mask=attention_mask,
                         decoder_input_ids=decoder_input_ids)


class _Pixels(_HFWrapper):
    def forward(self, pixel_values):
        return self._run(pixel_values=pixel_values)


def _ids_and_padded_mask(batch: int = BATCH, seq: int = SEQ):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - 3:] = 0  # a padded row, so the mask is real
    return ids, mask


def _hf(cls_name: str, cfg_name: str, impl: str, **cfg):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(**cfg)
    config._attn_implementation = impl
    model = getattr(transformers, cls_name)(config).eval()
    return model


def _text_model(cls_name: str, cfg_name: str, impl: str, **cfg):
    def build():
        model = _hf(cls_name, cfg_name, impl, **cfg)
        ids, mask = _ids_and_padded_mask()
        names = ("input_ids", "attention_mask")
        return _Text(model), (ids, mask), names

    return build


def _t5(impl: str):
    def build():
        model = _hf("T5Model", "T5Config", impl, vocab_size=VOCAB, d_model=32, d_kv=8,
                    d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, decoder_start_token_id=0)
        ids, mask = _ids_and_padded_mask()
        dec = ids[:, :5].clone()
        names = ("input_ids", "attention_mask", "decoder_input_ids")
        return _Seq2Seq(model), (ids, mask, dec), names

    return build


def _vit(impl: str):
    def build():
        model = _hf("ViTModel", "ViTConfig", impl, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, image_size=16,
                    patch_size=4, num_channels=3)
        torch.manual_seed(1)
        pixels = torch.randn(BATCH, 3, 16, 16)
        names = ("pixel_values",)
        return _Pixels(model), (pixels,), names

    return build


class _MHA(nn.Module):
    def __init__(self, causal: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.causal = causal

    def forward(self, x):
        mask = None
        if self.causal:
            n = x.shape[1]  # new_ones, not torch.ones: symbolic_trace records method calls
            mask = x.new_ones(n, n, dtype=torch.bool).triu(1)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        return self.enc(x)


def _torch_model(cls, **kw):
    def build():
        torch.manual_seed(1)
        return cls(**kw).eval(), (torch.randn(BATCH, SEQ, 32),), ("x",)

    return build


_TS_NO_MHA = "nn.MultiheadAttention exports only with dynamo=True"
_T5_SDPA = {e: "torch.onnx's dynamo exporter fails to decompose T5's sdpa attention (ConversionError)"
            for e in ("dynamo", "dynamo23")}
PAD = frozenset({"additive", "boolean"})  # a padding mask (plus causal where the model is causal)

BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)

MODELS: dict[str, ZooModel] = {}
for _impl in ("eager", "sdpa"):
    for _zm in (
        ZooModel(f"bert-{_impl}", _text_model("BertModel", "BertConfig", _impl, **BERT),
                 Expected(sites=2, heads=4, kv_heads=4, causal=(False,), masks=PAD)),
        ZooModel(f"gpt2-{_impl}", _text_model("GPT2Model", "GPT2Config", _impl, **GPT2),
                 Expected(sites=2, heads=4, kv_heads=4, causal=(True,), masks=PAD)),
        ZooModel(f"llama-{_impl}", _text_model("LlamaModel", "LlamaConfig", _impl, **LLAMA),
                 Expected(sites=2, heads=4, kv_heads=2, causal=(True,), masks=PAD)),
        ZooModel(f"vit-{_impl}", _vit(_impl),
                 Expected(sites=2, heads=4, kv_heads=4, causal=(False,))),
        # encoder self x2, then per decoder layer: causal self, cross
        ZooModel(f"t5-{_impl}", _t5(_impl),
                 Expected(sites=6, heads=4, kv_heads=4, causal=(False, False, True, False, True, False), masks=frozenset({"additive"}),
                          cross=2), unsupported=_T5_SDPA if _impl == "sdpa" else {}),
    ):
        MODELS[_zm.name] = _zm
MODELS["torch-mha"] = ZooModel("torch-mha", _torch_model(_MHA),
                               Expected(sites=1, heads=4, kv_heads=4, causal=(False,)),
                               unsupported={"torchscript": _TS_NO_MHA})
MODELS["torch-mha-causal"] = ZooModel("torch-mha-causal", _torch_model(_MHA, causal=True),
                                      Expected(sites=1, heads=4, kv_heads=4, causal=(True,),
                                               masks=frozenset({"causal"})),
                                      unsupported={"torchscript": _TS_NO_MHA})
MODELS["torch-encoder"] = ZooModel("torch-encoder", _torch_model(_Encoder),
                                   Expected(sites=2, heads=4, kv_heads=4, causal=(False,)),
                                   unsupported={"torchscript": _TS_NO_MHA})

EXPORTERS = ("dynamo", "dynamo23", "torchscript")


def _dynamic_shapes(names: tuple[str, ...], args: tuple[torch.Tensor, ...]):
    batch = torch.export.Dim("batch", min=1, max=64)
    dims = {}
    for n, a in zip(names, args):
        if n == "pixel_values" or a.dim() < 2:
            dims[n] = {0: batch}
        elif n == "decoder_input_ids":
            dims[n] = {0: batch, 1: torch.export.Dim("dec_seq", min=2, max=32)}
        else:
            dims[n] = {0: batch, 1: torch.export.Dim("seq", min=2, max=32)}
    return dims


@contextlib.contextmanager
def _quiet():
    """The exporters' warnings and prints swallowed (errors still raise)."""
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        yield


def export_module(model: nn.Module, args: tuple, names: tuple[str, ...], exporter: str, path: str | Path,
                  dynamic: bool = True) -> Path:
    """Export with one of EXPORTERS: "dynamo" (default opset), "dynamo23", "torchscript"."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}")
    path = Path(path)
    with _quiet():
        if exporter == "torchscript":
            axes = {n: ({0: "batch"} if n == "pixel_values" or args[i].dim() < 2 else
                        {0: "batch", 1: "dec_seq" if n == "decoder_input_ids" else "seq"})
                    for i, n in enumerate(names)} if dynamic else None
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17,
                              input_names=list(names), dynamic_axes=axes)
        else:
            kwargs = {"opset_version": 23} if exporter == "dynamo23" else {}
            if dynamic:
                kwargs["dynamic_shapes"] = _dynamic_shapes(names, args)
            prog = torch.onnx.export(model, args, input_names=list(names), dynamo=True, verbose=False, **kwargs)
            prog.save(str(path))
    return path


def export_onnx(name: str, exporter: str, path: str | Path) -> Path:
    """Export zoo model `name` with `exporter` ("dynamo", "dynamo23", "torchscript")."""
    zm = MODELS[name]
    if exporter in zm.unsupported:
        raise NotImplementedError(f"{name} with {exporter}: {zm.unsupported[exporter]}")
    model, args, names = zm.build()
    return export_module(model, args, names, exporter, path)


# -- decoder steps with a KV cache: what generation loops (ONNX Runtime GenAI, optimum) run
DECODERS = {  # name: (model class, config class, config)
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(LLAMA, max_position_embeddings=512)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2,
                                                       intermediate_size=64, max_position_embeddings=512)),
    # learned sink logits (cat([S, sinks]) → softmax → [..., :-1]), sliding and full layers alternating, GQA,
    # a mixture of experts (the batched_mm experts are the ones that export)
    "gpt-oss": ("GptOssForCausalLM", "GptOssConfig", dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), experts_implementation="batched_mm")),
}


def _loud_sinks(model: nn.Module) -> None:
    """Sink logits of the size trained models have (the init's std 0.02 would hide a lost sink)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(getattr(m, "sinks", None), nn.Parameter):
            with torch.no_grad():
                m.sinks.copy_(torch.randn(m.sinks.shape, generator=g) * 1.5)


AFTER_BUILD = {"gpt-oss": _loud_sinks}  # name: what the tiny random model needs after it is built


class DecoderStep(nn.Module):
    """One step of a causal LM with its cache as flat tensors: (input_ids, attention_mask,
    position_ids, past key/value per layer) -> (logits, present key/value per layer)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.layers = model, model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def decoder_step(name: str, **config) -> tuple[DecoderStep, tuple, tuple[str, ...], tuple[str, ...]]:
    """(step module, example args: 2 new tokens after 3 cached, input names, output names);
    `config` overrides the family's tiny config."""
    cls, cfg, kw = DECODERS[name]
    step = DecoderStep(_hf(cls, cfg, "eager", **(kw | config)))
    AFTER_BUILD.get(name, lambda m: None)(step.model)
    c = step.model.config
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d = c.hidden_size // c.num_attention_heads
    g = torch.Generator().manual_seed(0)
    past_len, new = 3, 2
    args = (torch.randint(1, VOCAB, (1, new), generator=g), torch.ones(1, past_len + new, dtype=torch.long),
            torch.arange(past_len, past_len + new)[None],
            *(torch.randn(1, kv, past_len, d, generator=g) for _ in range(2 * step.layers)))
    kvs = [f"{i}.{x}" for i in range(step.layers) for x in ("key", "value")]
    return step, args, ("input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kvs)), \
        ("logits", *(f"present.{n}" for n in kvs))


def export_decoder_step(name: str, exporter: str, path: str | Path, **config) -> Path:
    """A decoder step exported with a dynamic batch, new-token and past-length axis."""
    return _export_step(decoder_step(name, **config), exporter, path)


def _export_step(built: tuple, exporter: str, path: str | Path) -> Path:
    step, args, names, outs = built
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}")
    path = Path(path)
    with _quiet():
        if exporter == "torchscript":
            axes = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
                    "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
            axes |= {n: {0: "batch", 2: "past"} for n in names[3:]} | {n: {0: "batch", 2: "total"} for n in outs[1:]}
            torch.onnx.export(step, args, str(path), dynamo=False, opset_version=17, input_names=list(names),
                              output_names=list(outs), dynamic_axes=axes)
        else:
            auto = torch.export.Dim.AUTO  # the mask's length is past + seq: let export derive the relation
            shapes = ({1: auto}, {1: auto}, {1: auto}, tuple({2: auto} for _ in names[3:]))  # *past: one tuple
            prog = torch.onnx.export(step, args, input_names=list(names), output_names=list(outs), dynamo=True,
                                     dynamic_shapes=shapes, verbose=False)
            prog.save(str(path))
    return path


# -- a decoder with trained weights (tools/train_decoder.py): learned sinks, local and long-range heads
TRAINED = {  # name: what it is
    "llama-bytes": "byte-level LLaMA (4 layers, d 256, 8 heads, 2 kv heads, RoPE, RMSNorm) trained on the "
                   "Python standard library's source; weights checked against their SHA-256",
}


def trained_model(name: str = "llama-bytes") -> nn.Module:
    """The trained causal LM (float32, eager attention, eval mode)."""
    if name not in TRAINED:
        raise ValueError(f"unknown trained model {name!r}; choose from {', '.join(TRAINED)}")
    from attn_opt.tools import train_decoder

    return train_decoder.load_model()


def trained_step(name: str = "llama-bytes") -> tuple[DecoderStep, tuple, tuple[str, ...], tuple[str, ...]]:
    """decoder_step's tuple for the trained model: byte ids, 2 new tokens after 3 cached."""
    step = DecoderStep(trained_model(name))
    c = step.model.config
    d = c.hidden_size // c.num_attention_heads
    g = torch.Generator().manual_seed(0)
    args = (torch.randint(32, 127, (1, 2), generator=g), torch.ones(1, 5, dtype=torch.long), torch.arange(3, 5)[None],
            *(torch.randn(1, c.num_key_value_heads, 3, d, generator=g) for _ in range(2 * step.layers)))
    kvs = [f"{i}.{x}" for i in range(step.layers) for x in ("key", "value")]
    return step, args, ("input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kvs)), \
        ("logits", *(f"present.{n}" for n in kvs))


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_trained(name: str, exporter: str, path: str | Path, step: bool = True) -> Path:
    """The trained model as a decoder step (past/present per layer, as export_decoder_step)
    or, with step=False, as a full-sequence model (input_ids, attention_mask) -> logits."""
    if not step:
        model = _Logits(trained_model(name))
        ids = torch.tensor([list(b"def main():\n    return 0\n")])
        return export_module(model, (ids, torch.ones_like(ids)), ("input_ids", "attention_mask"), exporter, path)
    return _export_step(trained_step(name), exporter, path)
