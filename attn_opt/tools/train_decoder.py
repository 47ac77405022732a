"""Train `llama-bytes`: a small byte-level LLaMA-shaped decoder (RoPE, GQA, RMSNorm) on the
Python standard library's own source, so the decoder forms are judged on learned attention.

Deterministic: fixed seed, fixed step count, one thread, deterministic kernels; the weights
are written as fp16 safetensors and their SHA-256 is compared with the one kept in the repo.

    python -m attn_opt.tools.train_decoder            # train, write, compare the checksum
    python -m attn_opt.tools.train_decoder --check    # only compare the kept file's checksum

The corpus is every top-level `*.py` file of the running Python's standard library, sorted
by name; the held-out split is every 10th file (by sorted position). `split.json` names the
files, their byte ranges in the concatenation and the SHA-256 of the whole text, so a machine
with another Python version says so instead of training on something else.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS = WEIGHTS_DIR / "llama-bytes.safetensors"
SPLIT = WEIGHTS_DIR / "llama-bytes.split.json"
CHECKSUM = WEIGHTS_DIR / "llama-bytes.sha256"

CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
              rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
CONTEXT = 256           # training sequence length: the context the model knows
SEED, STEPS, BATCH = 1234, 400, 8
LR, WARMUP = 4e-3, 30
HELD_OUT_EVERY = 10     # every 10th file (by sorted name) is held out
SEPARATOR = b"\n\x00\n"  # between files


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def corpus() -> tuple[bytes, bytes, dict]:
    """(train bytes, held-out bytes, split description)."""
    train, held, files, pos = [], [], [], {"train": 0, "held_out": 0}
    for i, path in enumerate(stdlib_files()):
        data = path.read_bytes() + SEPARATOR
        part = "held_out" if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"
        (held if part == "held_out" else train).append(data)
        files.append({"file": path.name, "split": part, "bytes": [pos[part], pos[part] + len(data)],
                      "sha256": hashlib.sha256(data).hexdigest()})
        pos[part] += len(data)
    t, h = b"".join(train), b"".join(held)
    split = {"source": "top-level *.py of the Python standard library, sorted by name",
             "python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
             "separator": SEPARATOR.hex(), "held_out_every": HELD_OUT_EVERY,
             "train_sha256": hashlib.sha256(t).hexdigest(), "held_out_sha256": hashlib.sha256(h).hexdigest(),
             "train_bytes": len(t), "held_out_bytes": len(h), "files": files}
    return t, h, split


def held_out_text() -> bytes:
    """The held-out bytes, checked against the split kept with the weights."""
    _, held, split = corpus()
    kept = json.loads(SPLIT.read_text())
    if split["held_out_sha256"] != kept["held_out_sha256"]:
        raise ValueError(f"this Python's standard library ({split['python']}) is not the held-out text the "
                         f"weights were trained beside (Python {kept['python']})")
    return held


def build_model(seed: int = SEED):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**CONFIG)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_model(path: Path = WEIGHTS):
    """The trained model (float32, eval mode), its weights checked against the kept checksum."""
    from safetensors.torch import load_file

    want = CHECKSUM.read_text().split()[0]
    got = sha256(path)
    if got != want:
        raise ValueError(f"{path.name}: SHA-256 {got[:12]}… is not the kept {want[:12]}… (rebuild with "
                         f"python -m attn_opt.tools.train_decoder)")
    model = build_model()
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval()


def windows(data, count: int, length: int):
    """`count` evenly spaced windows of `length` + 1 bytes (deterministic, no sampling)."""
    import torch

    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    step = (len(t) - length - 1) // max(count, 1)
    return torch.stack([t[i * step: i * step + length + 1] for i in range(count)])


def held_out_nll(model, data: bytes, count: int = 64, length: int = CONTEXT) -> float:
    import torch

    w = windows(data, count, length)
    with torch.no_grad():
        total = 0.0
        for chunk in w.split(16):
            logits = model(input_ids=chunk[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1),
                                                       reduction="sum").item()
    return total / w[:, 1:].numel()


def train(steps: int = STEPS, log_every: int = 25) -> dict:
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # one thread: deterministic, and no barrier stalls on a shared machine
    torch.use_deterministic_algorithms(True)
    train_text, held, split = corpus()
    data = torch.frombuffer(bytearray(train_text), dtype=torch.uint8).long()
    model = build_model()
    model.config._attn_implementation = "sdpa"  # the same weights; the fused kernel trains faster
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    g = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=g)
        batch = torch.stack([data[i: i + CONTEXT + 1] for i in idx.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - start:7.1f} s", flush=True)
    model.eval()
    model.config._attn_implementation = "eager"
    seconds = time.perf_counter() - start
    nll = held_out_nll(model, held)
    WEIGHTS_DIR.mkdir(exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    tmp = WEIGHTS.with_suffix(".tmp")
    save_file(state, str(tmp), 
              # one key: safetensors writes its metadata map in no fixed order
              metadata={"llama-bytes": json.dumps({"steps": steps, "seed": SEED, "batch": BATCH, "context": CONTEXT})})
    digest = sha256(tmp)
    split |= {"held_out_nll_nats_per_byte": round(nll, 4), "train_seconds": round(seconds, 1), "steps": steps}
    return {"tmp": tmp, "sha256": digest, "nll": nll, "seconds": seconds, "split": split}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare the kept weights with the kept checksum")
    ap.add_argument("--steps", type=int, default=STEPS, help="for trials; the kept weights use the default")
    ap.add_argument("--write", action="store_true", help="replace the kept weights and checksum with this run's")
    a = ap.parse_args(argv)
    if a.check:
        want = CHECKSUM.read_text().split()[0]
        got = sha256(WEIGHTS)
        print(f"{WEIGHTS.name}: {got}  {'matches' if got == want else 'DIFFERS from'} the kept checksum")
        return 0 if got == want else 1
    r = train(a.steps)
    print(f"trained {a.steps} steps in {r['seconds']:.0f} s; held-out {r['nll']:.3f} nats/byte "
          f"(uniform: {math.log(256):.3f}); sha256 {r['sha256']}")
    if a.write or not CHECKSUM.exists():
        r["tmp"].replace(WEIGHTS)
        CHECKSUM.write_text(f"{r['sha256']}  {WEIGHTS.name}\n")
        tmp = SPLIT.with_suffix(".tmp")
        tmp.write_text(json.dumps(r["split"], indent=1) + "\n")
        tmp.replace(SPLIT)
        print(f"wrote {WEIGHTS} and its checksum")
        return 0
    want = CHECKSUM.read_text().split()[0]
    r["tmp"].unlink()
    same = r["sha256"] == want
    print(f"{'reproduces' if same else 'DOES NOT reproduce'} the kept checksum {want}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
