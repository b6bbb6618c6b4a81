"""encode() on a realistic corpus, side by side in one process and on the same weights with
(a) the model's own forward rate on the same lengths and (b) a Transformers + PEFT loop.

    python benchmarks/encode_throughput.py [--layers 6] [--dtype float32|bfloat16] [--scale 1]
    python benchmarks/encode_throughput.py --corpus small --texts 160 --profile --baseline

Weights: a random Transformers model at the released widths (`harness.build_reference`, 1024
wide, 16 heads, FFN 4096, vocab 250002, `--layers` deep) plus a PEFT LoRA adapter
`retrieval_passage` (rank 4, every Linear, non-zero B) written by PEFT. jina-jax reads that
folder; the loop loads it with `PeftModel.from_pretrained`.

Corpora (every text gets the task's instruction), shuffled:
- large (`--scale` multiplies the counts): 384 queries (5-25 words), 128 paragraphs (40-250
  words), 8 long documents (600-2000 words);
- small (`--texts`, 100-500: what one call of a RAG application embeds): 55% queries of 4-20
  words, 35% paragraphs of 40-250, 10% documents of 300-900.

Measured, all with task retrieval.passage:
- jina-jax `encode`: first call (compiles) and steady (the best of `--rounds` more calls), the
  padding fraction of its plan, compiled shapes, the cost model it planned with.
- `--baseline`: the same pipeline (tokenize, `Runner`, pool) with the padding-only plan that
  `encode` used before the cost model (`plan(..., cost=None)`), timed in the same rounds.
- the model's own rate on the same lengths: each text counted at the rate of full, unpadded
  batches of its length class (the nearest in log length), measured with the same compiled
  forward; time = sum of tokens / class rate. Each round times encode (and the baseline) once
  and then every class, and each side takes its best round, so a fast or slow moment of this
  shared machine favours neither side. Two sets of classes: one an octave (32x32, 16x64, ...,
  1x1024, 1x2048, 1x3072, 1x4096: the estimate reported) and the coarse 32x32, 8x128, 2x512,
  1x2048, 1x4096.
- `--profile`: one more pass of the cost plan through `Runner` with its timeline on, printed
  per batch (stderr): shape, real tokens, host time to pad and dispatch, the time until its
  result was ready after the one before (with two batches in flight: the device's time for it),
  what the model's rate gives its tokens, and the cost model's prediction; then tokenization,
  planning, the task's weight merge, host time between dispatches and the tail (last dispatch
  to last result).
- Transformers + PEFT as users write it: texts sorted by length, batches of `--batch-size`
  padded to their longest, `last_hidden_state` mean-pooled over the mask, L2-normalised
  (sdpa attention, `torch.inference_mode`), loaded once, one timed pass in each round right
  after encode's, its best round reported: a pass of the 160-text corpus took 65-68 s in some
  hours and 93-103 s in others, so only passes timed in the same moments compare.
  `--loop-shapes`: one more pass of the loop timed batch by batch, each of its padded batches
  then run through jina-jax's forward at the same shape (where the two forwards stand).
Prints one JSON line; the embeddings of the two are compared (max-abs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from convert.random_checkpoint import write_tokenizer  # noqa: E402
from harness import build_reference  # noqa: E402
from jina_jax import JinaEmbeddingsV3  # noqa: E402
from jina_jax.cost import calibrate, for_model  # noqa: E402
from jina_jax.encode import FILLER, Runner, finish, padding_fraction, plan, progress  # noqa: E402
from jina_jax.tokenize import pad, position_limit, token_ids  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there one all we their been has when who will "
         "more no if out so said what up its about into than them can only other new some could "
         "time these two may then do first any my now such like our over man me even most made "
         "after also did many before must through back years where much your way well down "
         "retrieval embedding multilingual transformer rotary adapter passage query").split()
# (rows, length) of the full, unpadded batches each text is counted at (the nearest in log
# length). COARSE: the examples (8x128, 2x512, 1x2048) plus the two ends; FINE: one an
# octave, a closer estimate of the model's rate at each text's own length.
COARSE = ((32, 32), (8, 128), (2, 512), (1, 2048), (1, 4096))
FINE = ((32, 32), (16, 64), (8, 128), (4, 256), (2, 512), (1, 1024), (1, 2048), (1, 3072),
        (1, 4096))


def corpus(scale: float, seed: int = 0, small: int | None = None) -> list[str]:
    """The large corpus (`scale`), or with `small` that many texts of the small mix."""
    rng = np.random.default_rng(seed)
    if small is None:
        spans = ((384, 5, 25), (128, 40, 250), (8, 600, 2000))
    else:
        queries, paragraphs = round(0.55 * small), round(0.35 * small)
        spans = ((queries, 4, 20), (paragraphs, 40, 250),
                 (small - queries - paragraphs, 300, 900))
    counts = [c for n, lo, hi in spans
              for c in rng.integers(lo, hi + 1, n if small else max(1, int(n * scale)))]
    texts = [" ".join(rng.choice(WORDS, size=c)) for c in counts]
    return [texts[i] for i in rng.permutation(len(texts))]


def write_weights(folder: str, layers: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import JinaEmbeddingsV3Model

    if os.path.isfile(os.path.join(folder, "retrieval_passage", "adapter_config.json")):
        return folder
    build_reference(folder, layers)
    write_tokenizer(folder, 250002)
    torch.manual_seed(1)
    base = JinaEmbeddingsV3Model.from_pretrained(folder).eval()
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"])
    peft_model = get_peft_model(base, lora, adapter_name="retrieval_passage")
    tmp = tempfile.mkdtemp()
    peft_model.save_pretrained(tmp)
    os.replace(os.path.join(tmp, "retrieval_passage"), os.path.join(folder, "retrieval_passage"))
    return folder


def class_of(length: int, classes) -> tuple[int, int]:
    return min(classes, key=lambda c: abs(np.log(c[1]) - np.log(length)))


def class_batches(model, classes) -> dict:
    """One full, unpadded batch (ids, lengths) per (rows, length) class, compiled."""
    rng = np.random.default_rng(0)
    batches = {}
    for rows, length in classes:
        ids = rng.integers(3, model.config.vocab_size, (rows, length)).astype(np.int32)
        batches[(rows, length)] = ids, np.full((rows,), length, np.int32)
    return batches


def class_rates(model, batches, task) -> dict:
    """tokens/s of each class's batch, one timed call each (same compiled forward)."""
    rates = {}
    for (rows, length), (ids, full) in batches.items():
        start = time.perf_counter()
        np.asarray(model.pooled(ids, full, task))
        rates[(rows, length)] = rows * length / (time.perf_counter() - start)
    return rates


def replay(model, batches, lengths, task) -> float:
    """Seconds for the plan's batches (same shapes and lengths, random ids) run one after
    another, each waited for: encode's device time without its host work and overlap."""
    rng = np.random.default_rng(0)
    inputs = []
    for batch in batches:
        rows = [rng.integers(3, 1000, lengths[i]).astype(np.int32) for i in batch.members]
        rows += [np.array(FILLER, np.int32)] * (batch.rows - len(rows))
        inputs.append(pad(rows, batch.width, model.config.pad_token_id))
    start = time.perf_counter()
    for ids, rows_lengths in inputs:
        np.asarray(model.pooled(ids, rows_lengths, task))
    return time.perf_counter() - start


def model_time(lengths, rates, classes) -> float:
    """Seconds the corpus takes with each text at its class's rate."""
    return sum(n / rates[class_of(n, classes)] for n in lengths)


def pipeline(model, texts, task, batch_size, cost, timeline=None):
    """What `encode` does for one window (tokenize, `Runner`, pool, normalise) with the plan
    priced by `cost` (None: the padding-only plan); returns (embeddings, seconds, steps)
    where steps times tokenization and planning, and `timeline` (a list) gets the Runner's."""
    cfg = model.config
    start = time.perf_counter()
    ids = token_ids(model.tokenizer, cfg, texts, [model.resolve_task(task)] * len(texts),
                    8192)
    tokenized = time.perf_counter()
    runner = Runner(model, batch_size, 16384, False, progress(None, 1, False), cost=cost)
    runner.timeline = timeline
    tasks = [model.resolve_task(task)] * len(texts)
    batches = runner.plan(ids, tasks)
    planned = time.perf_counter()
    out = runner.submit(ids, tasks, batches)
    runner.drain()
    emb = finish(out, cfg.hidden_size, True)
    return emb, time.perf_counter() - start, {"tokenize_s": tokenized - start,
                                              "plan_s": planned - tokenized}


def profile(model, texts, task, batch_size, cost, lengths, rates, classes, planned=True) -> dict:
    """One pass of the cost plan (planned=False: the padding-only plan) with the Runner's
    timeline, printed per batch (stderr), `cost` predicting each batch; returns the totals."""
    model.task_cache.clear()
    start = time.perf_counter()
    model.params_for(task)  # the task's merged weights, which encode makes once per window
    merge_s = time.perf_counter() - start
    timeline = []
    _, total, steps = pipeline(model, texts, task, batch_size, cost if planned else None,
                               timeline)
    print(f"profile of the {'cost' if planned else 'padding-only'} plan:", file=sys.stderr)
    print(f"{'batch':>5} {'shape':>9} {'real':>6} {'pad%':>5} {'host ms':>8} {'batch ms':>9} "
          f"{'model ms':>9} {'model/batch':>11} {'predicted ms':>12}", file=sys.stderr)
    ready_before, host, sums = timeline[0][1], 0.0, {"batch": 0.0, "model": 0.0}
    for k, (batch, started, dispatched, waited, ready) in enumerate(timeline):
        real = sum(lengths[i] for i in batch.members)
        took = ready - max(ready_before, started)
        at_rate = sum(lengths[i] / rates[class_of(lengths[i], classes)] for i in batch.members)
        host += dispatched - started
        sums["batch"] += took
        sums["model"] += at_rate
        print(f"{k:>5} {batch.rows:>4}x{batch.width:<4} {real:>6} "
              f"{100 * (batch.rows * batch.width / real - 1):>5.1f} "
              f"{1e3 * (dispatched - started):>8.1f} {1e3 * took:>9.1f} {1e3 * at_rate:>9.1f} "
              f"{at_rate / took:>11.2f} {1e3 * cost.seconds(batch.rows, batch.width):>12.1f}",
              file=sys.stderr)
        ready_before = ready
    last_dispatch = max(t[2] for t in timeline)
    totals = {"batches": len(timeline), "total_s": round(total, 3), "merge_s": round(merge_s, 3),
              "tokenize_s": round(steps["tokenize_s"], 3), "plan_s": round(steps["plan_s"], 4),
              "host_dispatch_s": round(host, 3),
              "tail_s": round(timeline[-1][4] - last_dispatch, 3),
              "sum_batch_s": round(sums["batch"], 3), "sum_model_s": round(sums["model"], 3)}
    print(f"profile totals: {json.dumps(totals)}", file=sys.stderr)
    return totals


def plan_table(model, batch_size) -> list[dict]:
    """Padding, shapes and batches of the padding-only plan and of the priced one (the
    model's cost), on each corpus and on a stream of 40 windows of 16,384 lognormal lengths
    (the stream's plans reuse the shapes met before, as `Runner` does)."""
    cost, limit = for_model(model), position_limit(model.config)
    prefix = model.config.instruction("retrieval.passage")
    tok = model.tokenizer
    tok.enable_truncation(8192)
    rows = []
    for name, texts in (("large", corpus(1.0)), ("large-0.5", corpus(0.5)),
                        ("small-100", corpus(1.0, small=100)), ("small-160", corpus(1.0, small=160)),
                        ("small-300", corpus(1.0, small=300))):
        lengths = [len(e.ids) for e in tok.encode_batch([prefix + t for t in texts])]
        row = {"corpus": name}
        for key, priced in (("before", None), ("after", cost)):
            batches = plan(lengths, ["t"] * len(lengths), limit, batch_size, cost=priced)
            row[key] = {"padding": round(padding_fraction(batches, lengths), 4),
                        "shapes": len({(b.rows, b.width) for b in batches}),
                        "batches": len(batches),
                        "predicted_s": round(sum(cost.seconds(b.rows, b.width)
                                                 for b in batches), 1)}
        rows.append(row)
    row = {"corpus": "stream 40 x 16384 lognormal"}
    for key, priced in (("before", None), ("after", cost)):
        rng, seen, paddings = np.random.default_rng(0), set(), []
        for _ in range(40):
            lengths = [int(min(8192, max(3, x))) for x in rng.lognormal(4.5, 1.0, 16384)]
            batches = plan(lengths, ["t"] * len(lengths), limit, batch_size, cost=priced,
                           known=frozenset(seen))
            seen |= {(b.rows, b.width) for b in batches}
            paddings.append(padding_fraction(batches, lengths))
        row[key] = {"padding": round(float(np.mean(paddings)), 4), "shapes": len(seen)}
    rows.append(row)
    return rows


class TorchLoop:
    """Transformers + PEFT, written the way users write it, loaded once; each call is one
    timed pass over the texts: (embeddings, seconds)."""

    def __init__(self, folder, prefix, dtype, batch_size, device="cpu"):
        import torch
        from peft import PeftModel
        from transformers import JinaEmbeddingsV3Model, PreTrainedTokenizerFast

        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(folder, "tokenizer.json"), pad_token="<pad>",
            bos_token="<s>", eos_token="</s>")
        base = JinaEmbeddingsV3Model.from_pretrained(folder, attn_implementation="sdpa",
                                                     dtype=tdtype)
        model = PeftModel.from_pretrained(base, os.path.join(folder, "retrieval_passage"))
        self.model = model.to(device).eval()
        self.prefix, self.batch_size, self.device = prefix, batch_size, device
        self.hidden_size = base.config.hidden_size

    def __call__(self, texts, batches=None):
        """batches: a list that gets (ids int32[rows, width], real lengths, seconds) per batch."""
        import torch

        texts = [self.prefix + t for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.hidden_size), np.float32)
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(order), self.batch_size):
                began = time.perf_counter()
                rows = order[i:i + self.batch_size]
                batch = self.tokenizer([texts[r] for r in rows], padding=True, truncation=True,
                                       max_length=8192, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
                if batches is not None:
                    batches.append((batch["input_ids"].cpu().numpy().astype(np.int32),
                                    batch["attention_mask"].sum(1).cpu().numpy().astype(np.int32),
                                    time.perf_counter() - began))
        return out, time.perf_counter() - start


def loop_shapes(model, loop, texts, task) -> list[dict]:
    """The loop's own batches, each timed, then run through jina-jax's forward at the same
    padded shape (compiled first, then timed): where the two forwards stand shape for shape."""
    batches = []
    loop(texts, batches)
    rows = []
    for ids, lengths, seconds in batches:
        np.asarray(model.pooled(ids, lengths, task))
        start = time.perf_counter()
        np.asarray(model.pooled(ids, lengths, task))
        ours = time.perf_counter() - start
        real = int(lengths.sum())
        rows.append({"shape": f"{ids.shape[0]}x{ids.shape[1]}", "real": real,
                     "padding": round(ids.size / real - 1, 3), "loop_s": round(seconds, 3),
                     "jax_s": round(ours, 3), "loop_over_jax": round(seconds / ours, 3)})
        print(f"loop batch {rows[-1]}", file=sys.stderr)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--corpus", choices=["large", "small"], default="large")
    p.add_argument("--scale", type=float, default=1.0, help="large corpus: multiplies counts")
    p.add_argument("--texts", type=int, default=160, help="small corpus: how many texts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weights", default=None, help="folder for the weights (reused if present)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--loop-shapes", action="store_true",
                   help="also time the loop batch by batch and jina-jax at the same shapes")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of encode + classes")
    p.add_argument("--baseline", action="store_true",
                   help="also time the padding-only plan (before the cost model) each round")
    p.add_argument("--profile", action="store_true", help="print a per-batch profile")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate the cost model on this machine first (cached for encode)")
    p.add_argument("--replay", action="store_true",
                   help="also run the plan's batches back to back, each waited for")
    p.add_argument("--plans", action="store_true",
                   help="only print each corpus's plan before/after the cost model (no timing)")
    args = p.parse_args()
    if args.corpus == "small" and not 1 <= args.texts <= 100000:
        p.error("--texts must be a positive count")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.loop_shapes and args.skip_torch:
        p.error("--loop-shapes times the Transformers + PEFT loop: not with --skip-torch")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    folder = write_weights(args.weights or os.path.join(
        tempfile.gettempdir(), f"jina-encode-bench-{args.layers}"), args.layers)
    model = JinaEmbeddingsV3.from_pretrained(folder, dtype=args.dtype)
    if args.plans:
        for row in plan_table(model, args.batch_size):
            print(json.dumps(row))
        return
    task = "retrieval.passage"
    texts = corpus(args.scale, small=args.texts if args.corpus == "small" else None)
    if args.calibrate:
        calibrate(model, task)
    cost = for_model(model)
    prefix = model.config.instruction(task)
    tok = model.tokenizer
    tok.enable_truncation(8192)
    lengths = [len(e.ids) for e in tok.encode_batch([prefix + t for t in texts])]
    limit = position_limit(model.config)
    batches = plan(lengths, [task] * len(texts), limit, args.batch_size, cost=cost)
    before = plan(lengths, [task] * len(texts), limit, args.batch_size)

    def timed():
        start = time.perf_counter()
        emb = model.encode(texts, task=task, batch_size=args.batch_size, show_progress_bar=False)
        return emb, time.perf_counter() - start

    emb, first = timed()
    compiles = model.compile_count
    if args.baseline:
        pipeline(model, texts, task, args.batch_size, None)  # compiles its own shapes
    used = class_batches(model, sorted({class_of(n, c) for n in lengths for c in (COARSE, FINE)}))
    class_rates(model, used, task)  # compiles the classes' shapes
    steady, baseline, rates = float("inf"), float("inf"), {c: 0.0 for c in used}
    loop = None if args.skip_torch else TorchLoop(folder, prefix, args.dtype, args.batch_size)
    torch_s, theirs = float("inf"), None
    for _ in range(args.rounds):
        steady = min(steady, timed()[1])
        if loop is not None:
            theirs, seconds = loop(texts)
            torch_s = min(torch_s, seconds)
        if args.baseline:
            baseline = min(baseline, pipeline(model, texts, task, args.batch_size, None)[1])
        for c, rate in class_rates(model, used, task).items():
            rates[c] = max(rates[c], rate)
    model_s, coarse_s = model_time(lengths, rates, FINE), model_time(lengths, rates, COARSE)
    tokens = sum(lengths)
    row = {
        "corpus": args.corpus, "layers": args.layers, "dtype": args.dtype, "texts": len(texts),
        "tokens": tokens, "cost_model": cost.source,
        "padding_fraction": round(padding_fraction(batches, lengths), 4),
        "shapes": len({(b.rows, b.width) for b in batches}), "batches": len(batches),
        "compiled_shapes": compiles, "jax_first_s": round(first, 2),
        "jax_steady_s": round(steady, 2), "jax_tok_s": round(tokens / steady, 1),
        "model_rate_tok_s": round(tokens / model_s, 1),
        "class_rates_tok_s": {f"{r}x{n}": round(v, 1) for (r, n), v in rates.items()},
        "encode_vs_model_rate": round(model_s / steady, 3),
        "encode_vs_model_rate_coarse_classes": round(coarse_s / steady, 3),
        "padding_plan": {"padding_fraction": round(padding_fraction(before, lengths), 4),
                         "shapes": len({(b.rows, b.width) for b in before}),
                         "batches": len(before)},
    }
    if args.baseline:
        row["padding_plan"].update({"steady_s": round(baseline, 2),
                                    "vs_model_rate": round(model_s / baseline, 3),
                                    "encode_speedup": round(baseline / steady, 3)})
    if args.profile:
        row["profile"] = profile(model, texts, task, args.batch_size, cost, lengths, rates, FINE)
        if args.baseline:
            row["padding_plan"]["profile"] = profile(model, texts, task, args.batch_size, cost,
                                                     lengths, rates, FINE, planned=False)
    if args.replay:
        row["plan_replay_s"] = round(replay(model, batches, lengths, task), 2)
    if loop is not None and args.loop_shapes:
        row["loop_shapes"] = loop_shapes(model, loop, texts, task)
    if loop is not None:
        row.update({"torch_s": round(torch_s, 2),
                    "torch_tok_s": round(tokens / torch_s, 1),
                    "encode_vs_torch": round(torch_s / steady, 3),
                    "max_abs_vs_torch": float(np.abs(emb - theirs).max())})
    print(json.dumps(row))


if __name__ == "__main__":
    main()
