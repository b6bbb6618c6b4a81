"""The train step: steps/s side by side with PyTorch + PEFT, and what remat saves at full size.

    python benchmarks/train_step.py speed  [--layers 4 --hidden 256 --pairs 16 --length 64]
    python benchmarks/train_step.py memory [--pairs 16 --length 512]

speed: a small random model (release layout, written to a temp folder), contrastive loss with
queries through retrieval.query and passages through retrieval.passage, both adapters trained
with AdamW. jina-jax's jitted step vs the same step in PyTorch (Transformers sdpa + PEFT, the
model exported by `save_pretrained(format="transformers")`), same batch, same process. The two
first losses are printed to show they compute the same thing.

memory: released widths (24 layers, vocab 250002), nothing allocated: the step is lowered on
abstract parameters and XLA's `memory_analysis()` reports the temporary buffers per remat policy,
for LoRA training (two rank-4 adapters on every module) and for full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu import median_time  # noqa: E402  (two warm-up calls, then the median)
from convert.random_checkpoint import write_random_release  # noqa: E402
from jina_jax import JinaConfig, JinaEmbeddingsV3, JinaEncoder  # noqa: E402
from jina_jax.training import Contrastive, Trainer  # noqa: E402


def _batch(cfg, pairs: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("query", "positive"):
        lengths = rng.integers(length // 2, length + 1, pairs).astype(np.int32)
        ids = np.full((pairs, length), cfg.pad_token_id, np.int32)
        for i, n in enumerate(lengths):
            ids[i, :n] = rng.integers(3, cfg.vocab_size, n)
            ids[i, 0], ids[i, n - 1] = 0, 2
        out[f"{side}_ids"], out[f"{side}_lengths"] = ids, lengths
    return out


def speed(args):
    import torch
    from peft import PeftModel
    from transformers import JinaEmbeddingsV3Model

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = JinaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                     num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                     vocab_size=args.vocab)
    tmp = tempfile.mkdtemp()
    write_random_release(os.path.join(tmp, "src"), cfg, dtype="float32")
    model = JinaEmbeddingsV3.from_pretrained(os.path.join(tmp, "src"))
    batch = _batch(cfg, args.pairs, args.length)
    rows = {}

    for remat in (None, "full"):
        trainer = Trainer(model, Contrastive(), optax.adamw(1e-4), dropout=False, remat=remat)
        state = trainer.init()
        start = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics["loss"])
        first = time.perf_counter() - start
        holder = {"state": state}

        def one():
            holder["state"], m = trainer.step(holder["state"], batch)
            jax.block_until_ready(m["loss"])

        rows[f"jina-jax remat={remat}"] = (median_time(one, args.repeats), first,
                                           float(metrics["loss"]))

    model.save_pretrained(os.path.join(tmp, "hf"), format="transformers")
    base = JinaEmbeddingsV3Model.from_pretrained(os.path.join(tmp, "hf"), attn_implementation="sdpa")
    peft = PeftModel.from_pretrained(base, os.path.join(tmp, "hf", "retrieval_query"),
                                     adapter_name="retrieval_query", is_trainable=True)
    peft.load_adapter(os.path.join(tmp, "hf", "retrieval_passage"),
                      adapter_name="retrieval_passage", is_trainable=True)
    peft.eval()  # dropout off, as in the jina-jax runs
    params = [p for n, p in peft.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    t = {k: torch.from_numpy(v).long() for k, v in batch.items()}

    def embed(side, adapter):
        peft.set_adapter(adapter)
        for p in params:
            p.requires_grad_(True)
        ids, n = t[f"{side}_ids"], t[f"{side}_lengths"]
        mask = (torch.arange(ids.shape[1])[None] < n[:, None]).long()
        h = peft(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def torch_step():
        opt.zero_grad()
        q, p = embed("query", "retrieval_query"), embed("positive", "retrieval_passage")
        loss = torch.nn.functional.cross_entropy(q @ p.T / 0.05, torch.arange(len(q)))
        loss.backward()
        opt.step()
        return float(loss)

    start = time.perf_counter()
    torch_loss = torch_step()
    first = time.perf_counter() - start
    rows["PyTorch + PEFT"] = (median_time(torch_step, args.repeats), first, torch_loss)

    tokens = 2 * args.pairs * args.length
    ref = rows["PyTorch + PEFT"][0]
    print(f"train step: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"{args.pairs} pairs x {args.length} tokens (padded), AdamW on both retrieval adapters, "
          f"{os.cpu_count()} CPU threads")
    print(f"{'contender':<24}{'step s':>9}{'steps/s':>9}{'tok/s':>9}{'vs torch':>10}"
          f"{'first s':>9}{'1st loss':>10}")
    for name, (sec, first, loss) in rows.items():
        print(f"{name:<24}{sec:9.3f}{1 / sec:9.2f}{tokens / sec:9.0f}{ref / sec:10.2f}"
              f"{first:9.2f}{loss:10.4f}")
    return {k: {"step_s": v[0], "first_s": v[1], "first_loss": v[2]} for k, v in rows.items()}


def memory(args):
    cfg = JinaConfig()
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(lambda i: JinaEncoder(cfg).init(jax.random.PRNGKey(0), i), ids)
    model = JinaEmbeddingsV3(cfg, params["params"], {}, {})
    model.add_adapter("query", rank=4, seed=0)
    model.add_adapter("passage", rank=4, seed=1)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in _batch(cfg, args.pairs, args.length).items()}
    print(f"train step memory, released widths (24 layers), {args.pairs} pairs x {args.length} "
          "tokens, fp32, XLA:CPU memory_analysis() (nothing allocated)")
    print(f"{'trains':<12}{'remat':<15}{'temp GB':>9}{'args GB':>9}{'out GB':>8}")
    out = {}
    for train, policies in ((None, (None, "dots_no_batch", "dots", "full")),
                            ("all", (None, "full"))):
        for remat in policies:
            trainer = Trainer(model, Contrastive("query", "passage"), optax.adamw(1e-4),
                              train=train, remat=remat, dropout=False)
            state = jax.eval_shape(trainer.init_from, trainer.initial)
            compiled = trainer.lower_step(state, batch).compile()
            mem = compiled.memory_analysis()
            gb = lambda x: x / 2 ** 30  # noqa: E731
            name = "LoRA" if train is None else "everything"
            print(f"{name:<12}{str(remat):<15}{gb(mem.temp_size_in_bytes):9.2f}"
                  f"{gb(mem.argument_size_in_bytes):9.2f}{gb(mem.output_size_in_bytes):8.2f}")
            out[f"{name}/{remat}"] = mem.temp_size_in_bytes
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "memory"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--length", type=int, default=None, help="default 64 (speed), 512 (memory)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.length is None:
        args.length = 64 if args.what == "speed" else 512
    result = speed(args) if args.what == "speed" else memory(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
